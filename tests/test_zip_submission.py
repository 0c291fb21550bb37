"""zip_submission.py, copied into a made-up assignment folder and run from elsewhere:
what goes into submission.zip, what stays out, and that no half-written zip survives."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKED = {'code/main.py', 'code/toolkit/safe_files.py', 'code/student_code.py', 'code/sub/helper.py', 'writeup/report.pdf',
          'writeup/README.md', 'results/demo/top1.png', 'results/demo/results.md',
          'results/link_to_code.py'}


def write(path, data=b'x'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


@pytest.fixture
def assignment(tmp_path):
    """An assignment folder with everything a student's might hold."""
    root = tmp_path / 'hw2'
    for name in PACKED - {'results/link_to_code.py', 'code/toolkit/safe_files.py'}:
        write(str(root / name), os.urandom(64))
    left_out = ['code/__pycache__/main.cpython-311.pyc', 'code/old.pyc', 'code/models/net.py',
                'code/data/images/a.jpg', 'code/logs/exp_1/events.out.tfevents.1',
                'code/model_best.pth.tar', 'code/checkpoint.pth', 'code/weights.pt',
                'code/.DS_Store', 'code/.ipynb_checkpoints/nb-checkpoint.ipynb',
                'code/.pytest_cache/v/cache', 'code/.venv/bin/python', 'code/myenv/pyvenv.cfg',
                'code/myenv/lib/site.py', 'results/logs/x.txt', 'results/submission.zip',
                'data/train.txt', 'logs/exp_1/models/checkpoint.pth.tar', 'notes.txt']
    for name in left_out:
        write(str(root / name))
    write(str(tmp_path / 'outside' / 'secret.txt'), b'not yours to submit')
    os.symlink(tmp_path / 'outside' / 'secret.txt', root / 'results' / 'link_outside.txt')
    os.symlink(tmp_path / 'outside', root / 'results' / 'linked_folder')
    os.symlink('../code/main.py', root / 'results' / 'link_to_code.py')
    os.symlink('../logs/exp_1/models/checkpoint.pth.tar', root / 'results' / 'best_model')
    os.symlink('../nowhere', root / 'results' / 'broken')
    shutil.copy(os.path.join(REPO, 'zip_submission.py'), root)
    toolkit = root / 'code' / 'toolkit'
    toolkit.mkdir()
    shutil.copy(os.path.join(REPO, 'code', 'toolkit', 'safe_files.py'), toolkit)  # it imports it
    return root


def run(root, cwd):
    return subprocess.run([sys.executable, str(root / 'zip_submission.py')], cwd=cwd,
                          capture_output=True, text=True)


def test_packs_the_three_folders_and_nothing_else(assignment, tmp_path):
    proc = run(assignment, cwd=tmp_path)  # not the assignment folder: it finds its own
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(assignment / 'submission.zip') as zf:
        assert set(zf.namelist()) == PACKED
        assert zf.read('results/link_to_code.py') == (assignment / 'code/main.py').read_bytes()
        assert zf.testzip() is None
    for name in PACKED:
        assert name in proc.stdout
    assert 'results/link_outside.txt  (symlink to ' in proc.stdout and 'outside the repository' in proc.stdout
    assert 'results/best_model  (symlink to a left-out file' in proc.stdout
    assert 'code/myenv/  (virtual environment)' in proc.stdout
    assert f'{len(PACKED)} files,' in proc.stdout and 'unpacked' in proc.stdout
    assert proc.stderr == ''  # writeup/ and results/ present, with a PDF: no warnings
    assert not [f for f in os.listdir(assignment) if f.startswith('.submission')]


def test_refuses_without_code(assignment):
    shutil.rmtree(assignment / 'code')
    proc = run(assignment, cwd=assignment)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and 'no code/ folder' in proc.stderr
    assert not (assignment / 'submission.zip').exists()


def test_missing_writeup_warns_and_packs_the_rest(assignment):
    shutil.rmtree(assignment / 'writeup')
    proc = run(assignment, cwd=assignment)
    assert proc.returncode == 0
    assert 'warning: no writeup/ folder' in proc.stderr
    with zipfile.ZipFile(assignment / 'submission.zip') as zf:
        assert set(zf.namelist()) == {n for n in PACKED if not n.startswith('writeup/')}


def load(root):
    spec = importlib.util.spec_from_file_location('zip_submission_copy', root / 'zip_submission.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interrupted_zip_leaves_no_partial_file(assignment, monkeypatch, capsys):
    (assignment / 'submission.zip').write_bytes(b'the earlier submission')
    module = load(assignment)
    written = []

    def write_then_interrupt(self, path, name):
        if written:
            raise KeyboardInterrupt  # Ctrl-C in the middle of packing
        written.append(name)
        original_write(self, path, name)

    original_write = zipfile.ZipFile.write
    monkeypatch.setattr(zipfile.ZipFile, 'write', write_then_interrupt)
    with pytest.raises(SystemExit, match='interrupted; no zip written'):
        module.main()
    assert written  # it had started
    assert (assignment / 'submission.zip').read_bytes() == b'the earlier submission'
    assert not [f for f in os.listdir(assignment) if f.startswith('.submission')]  # no temp file


def test_size_warning(assignment, monkeypatch, capsys):
    module = load(assignment)
    monkeypatch.setattr(module, 'SIZE_LIMIT_MB', 0.0001)
    assert module.main() == 0
    err = capsys.readouterr().err
    assert 'submission.zip is over 0.0001 MB' in err and 'the biggest files:' in err


def test_symlinked_folder_outside_the_repository_is_left_out(assignment, tmp_path):
    shutil.move(str(assignment / 'results'), str(tmp_path / 'my_figures'))
    os.symlink(tmp_path / 'my_figures', assignment / 'results')     # results/ -> outside
    os.rename(assignment / 'writeup', assignment / 'notes')
    os.symlink('notes', assignment / 'writeup')                       # writeup/ -> inside
    proc = run(assignment, cwd=assignment)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(assignment / 'submission.zip') as zf:
        assert set(zf.namelist()) == {n for n in PACKED if not n.startswith('results/')}
    real = os.path.realpath(tmp_path / 'my_figures')
    assert f'left out  results/  (symlink to {real}, outside the repository)' in proc.stdout


def test_names_with_control_characters_are_refused(assignment):
    write(str(assignment / 'code' / 'two\nlines.py'))
    write(str(assignment / 'results' / 'tab\there.png'))
    write(os.path.join(os.fsencode(assignment), b'code', b'caf\xe9.py'))  # Latin-1, not UTF-8
    write(str(assignment / 'code' / 'caf\u00e9.py'))                      # UTF-8: fine
    proc = run(assignment, cwd=assignment)
    assert proc.returncode != 0
    assert proc.stderr.count('\n') == 1 and '3 file name(s) with control characters' in proc.stderr
    for name in ('code/two\nlines.py', 'results/tab\there.png', 'code/caf\udce9.py'):
        assert repr(name) in proc.stderr
    assert 'café' not in proc.stderr
    assert not (assignment / 'submission.zip').exists()
    assert not [f for f in os.listdir(assignment) if f.startswith('.submission')]


def start_slow_zip(assignment):
    """A zip_submission.py run packing 48 MB of random bytes (a second or more of
    deflate), returned with its temporary zip's name once it is writing that file."""
    write(str(assignment / 'results' / 'big.bin'), os.urandom(48 << 20))
    proc = subprocess.Popen([sys.executable, str(assignment / 'zip_submission.py')],
                            cwd=assignment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while True:
        temps = [f for f in os.listdir(assignment) if f.startswith('.submission')]
        if temps:
            return proc, temps[0]
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f'no temporary zip seen: {proc.communicate()}')
        time.sleep(0.001)


def test_leftover_temporary_zip_of_a_killed_run_is_removed(assignment):
    proc, temp = start_slow_zip(assignment)
    proc.kill()  # SIGKILL: it cannot clean up
    proc.communicate(timeout=60)
    assert os.path.exists(assignment / temp)
    write(str(assignment / '.submission-notes.txt'))           # not ours: kept
    proc = run(assignment, cwd=assignment)
    assert proc.returncode == 0, proc.stderr
    assert f'removed  {temp}  (left by an interrupted run)' in proc.stdout
    left = [f for f in os.listdir(assignment) if f.startswith('.submission')]
    assert left == ['.submission-notes.txt']
    with zipfile.ZipFile(assignment / 'submission.zip') as zf:
        assert set(zf.namelist()) == PACKED | {'results/big.bin'}


@pytest.mark.slow
def test_two_runs_at_once_each_write_their_own_temporary_zip(assignment):
    """A second run while the first is writing: it neither removes nor shares the first's
    temporary zip, and both end with a whole submission.zip."""
    first, temp = start_slow_zip(assignment)
    os.kill(first.pid, signal.SIGSTOP)  # held in the middle of its write
    try:
        second = run(assignment, cwd=assignment)
        assert second.returncode == 0, second.stderr
        assert 'removed' not in second.stdout and os.path.exists(assignment / temp)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and err == '', err
    with zipfile.ZipFile(assignment / 'submission.zip') as zf:
        assert set(zf.namelist()) == PACKED | {'results/big.bin'} and zf.testzip() is None
    assert not [f for f in os.listdir(assignment) if f.startswith('.submission')]
