"""A run is never lost or silently changed: resume keeps the run's plan, one writer per
run folder, consistent files after a kill at any write, strict JSON, one-line errors."""
import errno
import glob
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

from conftest import (CODE, FAST, run_main, checkpoint_of, only_run, expect_error, strict_json,
                      temp_file_of_a_dead_writer)
import main as driver
import report
from toolkit import run_folder
from toolkit import safe_files

pytestmark = pytest.mark.usefixtures('one_thread')


def train_args(demo, logs, epochs=3):
    return [demo, '--log-dir', str(logs), '--epochs', str(epochs)] + FAST


def summary_of(run):
    return strict_json(os.path.join(run, 'summary.json'))


def file_bytes(run):
    return {name: open(os.path.join(root, name), 'rb').read()
            for root, _, names in os.walk(run) for name in names
            if not name.startswith('events.out')}


@pytest.fixture(scope='module')
def stopped_run(demo, tmp_path_factory):
    """A 3-epoch run stopped after 1 epoch: (log dir, run folder)."""
    logs = tmp_path_factory.mktemp('stopped')
    driver.main(train_args(demo, logs) + ['--stop-after', '1'])
    return str(logs), only_run(str(logs))


def copy_run(run, tmp_path):
    dst = str(tmp_path / os.path.basename(run))
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------ resume keeps the plan
def test_resume_refuses_flags_that_change_the_plan(demo, stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run[1], tmp_path)
    before = file_bytes(run)
    ckpt = checkpoint_of(run)
    base = [demo, '--resume', ckpt, '--log-dir', str(tmp_path)]
    expect_error(base + ['-b', '4'], capsys, '--batch-size 4', '8')
    expect_error(base + ['--lr', '0.05'], capsys, '--lr 0.05', '0.02')
    expect_error(base + ['--warmup', '2'], capsys, '--warmup 2', '1')
    expect_error(base + ['--epochs', '2'], capsys, '--epochs 2', '3')
    expect_error(base + ['--use-vit'], capsys, '--arch simplevit', 'simplenet')
    assert file_bytes(run) == before  # nothing was written by the refused commands


def test_resume_without_flags_continues_the_runs_plan(demo, stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run[1], tmp_path)
    code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys)
    assert code == 0, err
    summary = summary_of(run)
    assert summary['status'] == 'finished' and [e['epoch'] for e in summary['epochs']] == [1, 2, 3]
    assert summary['args']['batch_size'] == 8 and summary['args']['lr'] == 0.02
    assert summary['args']['epochs'] == 3 and summary['args']['warmup'] == 1
    assert summary['epochs'][-1]['lr'] == pytest.approx(0.0, abs=1e-9)  # the run's own cosine


def test_larger_epochs_extends_the_run_and_says_how_the_lr_changes(demo, stopped_run,
                                                                    tmp_path, capsys):
    run = copy_run(stopped_run[1], tmp_path)
    code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0', '--epochs', '4',
                               '--stop-after', '1'], capsys)
    assert code == 0, err
    assert 'extending the run from 3 to 4 epochs' in out
    assert torch.load(checkpoint_of(run), weights_only=True)['args']['epochs'] == 4


def test_resume_refuses_a_finished_run_and_the_best_model(demo, trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    before = file_bytes(run)
    line = expect_error([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys,
                        'finished all its 2 epochs', '-e', '--epochs N')
    assert 'model_best' in line
    expect_error([demo, '--resume', checkpoint_of(run, 'model_best.pth.tar'), '-j', '0'],
                 capsys, 'best model', '-e', 'checkpoint.pth.tar')
    expect_error([demo, '--resume', checkpoint_of(run, 'model_best.pth.tar'), '-j', '0',
                  '--epochs', '5'], capsys, 'best model')
    assert file_bytes(run) == before


# ------------------------------------------------------------------ one writer per folder
def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(demo, stopped_run, tmp_path,
                                                                capsys):
    run = copy_run(stopped_run[1], tmp_path)
    resume = [demo, '--resume', checkpoint_of(run), '-j', '0']
    with run_folder.run_lock(run):  # another training holds the folder
        expect_error(resume, capsys, 'in use by', f'pid {os.getpid()}', 'one training')
    with open(os.path.join(run, '.lock'), 'w') as f:
        f.write('pid 999999 on elsewhere')  # written by a process that died holding it
    code, out, err = run_main(resume, capsys)
    assert code == 0, err
    assert 'took over the lock' in out and 'pid 999999' in out
    assert summary_of(run)['status'] == 'finished'


LOCK_WITH_WORKERS = '''import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from toolkit import run_folder
run_folder.run_lock(sys.argv[2]).__enter__()
batches = iter(torch.utils.data.DataLoader(range(100), num_workers=2))  # forks 2 workers
next(batches)
print('locked', flush=True)
time.sleep(600)
'''


def test_a_killed_run_frees_its_folder_at_once_though_its_workers_live_on(tmp_path):
    """kill -9 of a training with DataLoader workers: the workers outlive it by seconds
    (until they notice), but they never held its lock: a --resume right after is let in."""
    run = str(tmp_path / 'run')
    os.makedirs(run)
    holder = subprocess.Popen([sys.executable, '-c', LOCK_WITH_WORKERS, CODE, run],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    holder.kill()
    holder.wait(timeout=60)
    with run_folder.run_lock(run) as lock:  # no "in use by pid N" for the dead pid
        assert lock.previous_holder == f'pid {holder.pid} on {socket.gethostname()}'


def test_evaluation_results_survive_later_epochs(demo, stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run[1], tmp_path)
    code, _, err = run_main([demo, '-e', '--resume', checkpoint_of(run, 'model_best.pth.tar'),
                             '-j', '0', '--log-dir', str(tmp_path / 'eval')], capsys)
    assert code == 0, err
    evaluated = summary_of(run)['evaluation']
    best = checkpoint_of(run, 'model_best.pth.tar')
    with open(best, 'rb') as f:
        data = f.read()
    # the record names the epoch and the very file evaluated
    assert evaluated['epoch'] == torch.load(best, weights_only=True)['epoch'] == 1
    assert evaluated['file']['sha256'] == hashlib.sha256(data).hexdigest()
    assert evaluated['file']['bytes'] == len(data)
    code, _, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys)
    assert code == 0, err
    summary = summary_of(run)
    assert summary['status'] == 'finished' and summary['evaluation'] == evaluated
    # report.py tells whether model_best.pth.tar is still the file evaluated
    with open(best, 'rb') as f:
        changed = f.read() != data
    assert summary['best_epoch'] != 1 or not changed
    report.main([run, '--out', str(tmp_path / 'out')])
    md = (tmp_path / 'out' / 'results.md').read_text()
    assert ('**stale**: changed' if changed else '| 1 | current |') in md, md


# ------------------------------------------------------------------ kill at every write
def final_files(run):
    ckpt = torch.load(checkpoint_of(run), weights_only=True)
    best = torch.load(checkpoint_of(run, 'model_best.pth.tar'), weights_only=True)
    return ckpt, best, summary_of(run)


@pytest.mark.slow
def test_killed_at_any_write_then_resumed_ends_identical(demo, tmp_path, capsys, monkeypatch):
    """Ctrl-C arriving before each atomic write of a 3-epoch run in turn (the write
    never happens); resuming the run then ends with the files of an uninterrupted one."""
    real_write = safe_files.write_or_explain
    calls = []

    def counting(path, write_fn, binary):
        calls.append(os.path.basename(path))
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt
        return real_write(path, write_fn, binary)
    monkeypatch.setattr(safe_files, 'write_or_explain', counting)
    kill_at = [0]
    code, _, err = run_main(train_args(demo, tmp_path / 'whole'), capsys)
    assert code == 0, err
    writes = list(calls)
    assert writes.count('checkpoint.pth.tar') == 3
    ref_ckpt, ref_best, ref_summary = final_files(only_run(str(tmp_path / 'whole')))

    for k in range(1, len(writes) + 1):
        logs = tmp_path / f'kill{k}'
        calls.clear()
        kill_at[0] = k
        code, out, err = run_main(train_args(demo, logs), capsys)
        assert code == 130, (k, err)
        kill_at[0] = 0
        run = only_run(str(logs))
        if not os.path.exists(checkpoint_of(run)):
            assert 'before the first epoch finished' in err, (k, err)
            continue
        assert checkpoint_of(run) in err  # the real path, to resume from
        code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys)
        assert code == 0, (k, writes[k - 1], err)
        assert only_run(str(logs)) == run
        ckpt, best, summary = final_files(run)
        for key, value in ref_ckpt['state_dict'].items():
            assert torch.equal(ckpt['state_dict'][key], value), (k, key)
            assert torch.equal(best['state_dict'][key], ref_best['state_dict'][key]), (k, key)
        assert best['epoch'] == ref_best['epoch'] == ckpt['best_epoch'], k
        assert summary['status'] == 'finished', k
        assert [(e['epoch'], e['val_top1']) for e in summary['epochs']] == \
            [(e['epoch'], e['val_top1']) for e in ref_summary['epochs']], k
        assert summary['best_epoch'] == ref_summary['best_epoch'], k


def test_leftover_temporary_files_are_removed_and_a_run_without_summary_resumes_in_place(
        demo, stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run[1], tmp_path)
    os.remove(os.path.join(run, 'summary.json'))  # killed before its first summary
    for folder in (run, os.path.join(run, 'models')):
        with open(temp_file_of_a_dead_writer(os.path.join(folder, 'checkpoint.pth.tar')),
                  'wb') as f:
            f.write(b'\0' * 1000)  # what a kill in the middle of a write leaves
    code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys)
    assert code == 0, err
    assert only_run(str(tmp_path)) == run and 'removed 2 temporary file' in out
    assert [e['epoch'] for e in summary_of(run)['epochs']] == [1, 2, 3]
    leftovers = [n for _, _, names in os.walk(run) for n in names if '.tmp-' in n]
    assert leftovers == []


# ------------------------------------------------------------------ bad input, one line
def test_unusable_log_dir_and_a_full_disk_give_one_line(demo, stopped_run, tmp_path, capsys,
                                                        monkeypatch):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    expect_error(train_args(demo, blocker / 'logs'), capsys, '--log-dir', 'cannot create')

    run = copy_run(stopped_run[1], tmp_path)
    before = file_bytes(run)

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', full_disk)
    expect_error([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys,
                 'No space left on device', '.pth.tar', 'intact')
    monkeypatch.undo()
    after = file_bytes(run)
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        assert after[name] == before[name]  # the epoch-1 files are intact
    assert torch.load(checkpoint_of(run), weights_only=True)['epoch'] == 1


class FillsUp(object):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


class SignalsOnItsFirstWrite(object):
    """A file whose first write sends this process SIGTERM: the signal arrives inside
    torch.save, as a Ctrl-C or a VM's preemption can."""

    def __init__(self, f):
        self.f, self.sent = f, False

    def write(self, data):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_sigterm_during_a_checkpoint_save_ends_the_run_interrupted(demo, tmp_path, capsys,
                                                                   monkeypatch):
    """torch.save turns an exception raised in its write into "unexpected pos": a SIGTERM
    mid-save must not end the run as a failed write (exit 1, status 'failed'). The save
    ends whole, then the run stops as interrupted (143) with that checkpoint to resume."""
    real_save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k:
                        real_save(obj, SignalsOnItsFirstWrite(f), *a, **k))
    logs = tmp_path / 'logs'
    code, out, err = run_main(train_args(demo, str(logs)), capsys)
    monkeypatch.undo()
    run = only_run(str(logs))
    assert code == 143 and checkpoint_of(run) in err and 'cannot write' not in err, err
    assert summary_of(run)['status'] == 'interrupted'
    assert torch.load(checkpoint_of(run), weights_only=True)['epoch'] == 1


def test_a_disk_that_fills_up_during_a_save_says_no_space_left(demo, stopped_run, tmp_path,
                                                              capsys, monkeypatch):
    """torch.save itself reports the failed write as "unexpected pos N vs M"."""
    run = copy_run(stopped_run[1], tmp_path)
    before = file_bytes(run)
    real_save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k:
                        real_save(obj, FillsUp(f, 4096), *a, **k))
    line = expect_error([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys,
                        '.pth.tar (No space left on device)', 'intact')
    assert 'unexpected pos' not in line
    monkeypatch.undo()
    after = file_bytes(run)
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        assert after[name] == before[name]


@pytest.mark.parametrize('content, words', [
    (b'', 'the file is empty'),
    (b'epoch 3, best 41.2 %\n', 'it is not a file that torch.save wrote'),
    (None, 'the zip archive that torch.save writes is damaged or cut short'),
])
def test_an_unreadable_checkpoint_is_named_and_said_in_words(demo, trained_run, tmp_path,
                                                             capsys, content, words):
    """torch.load's own errors said "EOFError" (an empty file), "101" (text) or a miniz
    error about a central directory (a cut archive)."""
    path = tmp_path / 'bad.pth.tar'
    if content is None:
        content = open(checkpoint_of(trained_run), 'rb').read()[:3000]
    path.write_bytes(content)
    for mode in (['-e'], []):
        line = expect_error([demo, '--resume', str(path), '-j', '0', '--log-dir',
                             str(tmp_path / 'logs')] + mode, capsys,
                            f"cannot read checkpoint '{path}': {words}")
        assert 'EOFError' not in line and "'101'" not in line and 'miniz' not in line


class NotAllowed(object):
    pass


def test_refused_and_non_finite_checkpoints_give_our_words(demo, trained_run, tmp_path, capsys):
    ckpt = torch.load(checkpoint_of(trained_run), weights_only=True)
    pickled = str(tmp_path / 'pickled.pth.tar')
    torch.save(dict(ckpt, extra=NotAllowed()), pickled)
    line = expect_error([demo, '-e', '--resume', pickled, '-j', '0'], capsys, 'pickled.pth.tar',
                        'refused')
    assert 'weights_only=False' not in line
    for key in ckpt['state_dict']:
        if ckpt['state_dict'][key].is_floating_point():
            ckpt['state_dict'][key][0] = float('nan')
            break
    nan = str(tmp_path / 'nan.pth.tar')
    torch.save(ckpt, nan)
    for mode in (['-e'], ['-a'], []):
        expect_error([demo, '--resume', nan, '-j', '0'] + mode, capsys, 'non-finite', key)


def test_nan_best_weights_or_optimizer_state_are_refused_before_anything_is_written(
        demo, stopped_run, tmp_path, capsys):
    """Every state dict of a checkpoint is checked: NaN best weights would otherwise become
    the run's model_best.pth.tar on resume, a NaN momentum buffer its next weights."""
    run = copy_run(stopped_run[1], tmp_path)
    good = torch.load(checkpoint_of(run), weights_only=True)
    key = next(k for k, v in good['state_dict'].items() if v.is_floating_point())
    best = {k: v.clone() for k, v in good['state_dict'].items()}
    best[key][(0,) * best[key].dim()] = float('nan')
    momentum = {i: dict(s) for i, s in good['optimizer']['state'].items()}
    index = next(iter(momentum))
    momentum[index]['momentum_buffer'] = momentum[index]['momentum_buffer'].clone()
    buffer = momentum[index]['momentum_buffer']
    buffer[(0,) * buffer.dim()] = float('inf')
    for bad, words in [(dict(good, best_state_dict=best), ('best weights', key)),
                       (dict(good, optimizer=dict(good['optimizer'], state=momentum)),
                        ('optimizer state', f'state.{index}.momentum_buffer'))]:
        torch.save(bad, checkpoint_of(run))
        before = file_bytes(run)
        expect_error([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys,
                     'non-finite', *words)
        assert file_bytes(run) == before  # model_best.pth.tar and summary.json untouched


def slow_epoch_set(tmp_path_factory):
    """A demo set whose first epoch at -b 2 takes 100 steps: time to kill it mid-epoch."""
    from make_demo_data import make_demo_dataset
    root = str(tmp_path_factory.mktemp('slow'))
    make_demo_dataset(root, num_classes=4, train_per_class=50, val_per_class=3, size=48, seed=0)
    return root


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_marked_by_the_next_run(
        demo, tmp_path, tmp_path_factory, capsys):
    """kill -9 in the first epoch: no checkpoint to resume, status 'running' and the
    temporary file of a write cut short. The next run in the --log-dir marks it
    interrupted and removes the file; a live run beside them is left alone."""
    logs = str(tmp_path / 'logs')
    proc = subprocess.Popen([sys.executable, 'main.py', slow_epoch_set(tmp_path_factory),
                             '--log-dir', logs, '--epochs', '5', '--no-data-cache'] + FAST +
                            ['-b', '2'], cwd=CODE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1'))
    try:
        for line in proc.stdout:  # its first step is done: the epoch has 99 to go
            if line.startswith('Epoch: [1]'):
                break
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=60)
    killed = only_run(logs)
    assert summary_of(killed)['status'] == 'running'
    assert not os.path.exists(checkpoint_of(killed))
    os.makedirs(os.path.join(killed, 'models'), exist_ok=True)
    partial = temp_file_of_a_dead_writer(os.path.join(killed, 'models', 'checkpoint.pth.tar'))
    with open(partial, 'wb') as f:
        f.write(b'\0' * 1000)  # what a kill in the middle of a write leaves
    alive = os.path.join(logs, 'exp_alive')  # a run training right now, beside them
    shutil.copytree(killed, alive)
    with run_folder.run_lock(alive):
        code, out, err = run_main(train_args(demo, logs, epochs=2) + ['--stop-after', '1'],
                                  capsys)
        assert code == 0, err
    assert f'{killed} was killed while running' in out and '1 temporary file' in out
    assert summary_of(killed)['status'] == 'interrupted' and not os.path.exists(partial)
    assert summary_of(alive)['status'] == 'running'
    assert os.path.exists(os.path.join(alive, 'models', os.path.basename(partial)))


def test_an_error_in_a_run_leaves_status_failed(demo, tmp_path, capsys, monkeypatch):
    import student_code
    calls = []

    def failing_forward(self, x):
        calls.append(self.training)
        if calls.count(True) > 3:  # the first step of the second epoch (3 steps an epoch)
            raise ValueError('a bad reshape in my own forward')
        return real_forward(self, x)
    real_forward = student_code.SimpleNet.forward
    monkeypatch.setattr(student_code.SimpleNet, 'forward', failing_forward)
    with pytest.raises(ValueError, match='bad reshape'):
        driver.main(train_args(demo, tmp_path))
    run = only_run(str(tmp_path))
    assert summary_of(run)['status'] == 'failed' and len(summary_of(run)['epochs']) == 1


@pytest.mark.parametrize('umask', [0o022, 0o002], ids=['umask022', 'umask002'])
def test_run_files_get_the_mode_the_umask_allows(demo, tmp_path, capsys, umask):
    """summary.json and the checkpoints as readable as the event files: 0o666 less the
    umask (tempfile.mkstemp's 0o600 would hide them from the group)."""
    previous = os.umask(umask)
    try:
        code, _, err = run_main(train_args(demo, tmp_path, epochs=2) + ['--stop-after', '1'],
                                capsys)
    finally:
        os.umask(previous)
    assert code == 0, err
    run = only_run(str(tmp_path))
    (events,) = glob.glob(os.path.join(run, 'events.out.tfevents.*'))
    for path in (os.path.join(run, 'summary.json'), checkpoint_of(run),
                 checkpoint_of(run, 'model_best.pth.tar'), events):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_names_the_checkpoint(demo, tmp_path):
    """What a cloud VM sends before preemption: exit 143 (128 + SIGTERM, as a shell
    reports it; Ctrl-C's is 130), the real path to resume."""
    logs = str(tmp_path / 'logs')
    proc = subprocess.Popen([sys.executable, 'main.py'] + train_args(demo, logs, epochs=50),
                            cwd=CODE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    deadline = time.time() + 120
    for line in proc.stdout:  # wait for the first finished epoch
        if line.startswith('******') or time.time() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    run = only_run(logs)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    assert 'Traceback' not in err and checkpoint_of(run) in err
    assert summary_of(run)['status'] == 'interrupted'
    torch.load(checkpoint_of(run), weights_only=True)  # loadable


def test_an_error_in_student_code_keeps_its_traceback(demo, tmp_path, capsys, monkeypatch):
    import student_code

    def broken_forward(self, x):
        raise ValueError('a bad reshape in my own forward')
    monkeypatch.setattr(student_code.SimpleNet, 'forward', broken_forward)
    with pytest.raises(ValueError, match='bad reshape'):
        driver.main(train_args(demo, tmp_path))
