"""download_dataset.sh, run by a POSIX sh with stand-ins for gdown, curl and wget that serve
a tiny archive and tiny lists. PATH holds only the stand-ins and the few tools the script
uses, so which downloader exists (or is missing) is up to each test. MIN_TRAIN_LINES and
MIN_VAL_LINES are set to the sizes of the tiny lists, except where a test checks the
defaults."""
import os
import shutil
import subprocess
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'download_dataset.sh')
FILE_ID = '16GYHdSWS3iMYwMPv5FpeDZN2rH7PR0F2'
LIST_URL = 'https://raw.githubusercontent.com/CSAILVision/miniplaces/master/data'
TRAIN = ['train/a/abbey/00000001.jpg', 'train/a/abbey/00000002.jpg', 'train/b/bar/00000001.jpg']
VAL = ['val/00000001.jpg', 'val/00000002.jpg']
TOOLS = ['mkdir', 'mv', 'rm', 'tar', 'gzip', 'dirname', 'cat', 'grep']  # what the script and stand-ins call

STANDINS = {
    'gdown': f'''#!/bin/sh
echo "gdown $*" >> "$STUB_LOG"
[ "$1" = {FILE_ID} ] && [ "$2" = -O ] || {{ echo "gdown stand-in: bad arguments $*" >&2; exit 1; }}
cat "$FAKE_ARCHIVE" > "$3"
''',
    'curl': f'''#!/bin/sh
echo "curl $*" >> "$STUB_LOG"
out=; url=
while [ $# -gt 0 ]; do case $1 in -o) out=$2; shift 2;; *) url=$1; shift;; esac; done
case $url in {LIST_URL}/train.txt|{LIST_URL}/val.txt) ;; *) exit 22;; esac
[ -z "${{FAKE_OFFLINE:-}}" ] || exit 6
cat "$FAKE_LISTS/${{url##*/}}" > "$out"
''',
    'wget': f'''#!/bin/sh
echo "wget $*" >> "$STUB_LOG"
[ "$1" = -q ] && [ "$2" = -O ] || exit 2
case $4 in {LIST_URL}/train.txt|{LIST_URL}/val.txt) ;; *) exit 8;; esac
cat "$FAKE_LISTS/${{4##*/}}" > "$3"
''',
}


def make_archive(path, images, corrupt=False):
    staging = path + '.d'
    for name in images:
        os.makedirs(os.path.dirname(os.path.join(staging, 'images', name)), exist_ok=True)
        with open(os.path.join(staging, 'images', name), 'wb') as f:
            f.write(b'\xff\xd8 not really a jpeg')
    os.makedirs(os.path.join(staging, 'objects'), exist_ok=True)
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(os.path.join(staging, 'images'), 'images')
        tar.add(os.path.join(staging, 'objects'), 'objects')
    if corrupt:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)


@pytest.fixture
def sandbox(tmp_path):
    """(run, tmp_path): run(*standins, archive=, **env) runs the script with only those
    stand-ins; env adds to or (None) removes from its environment."""
    lists = tmp_path / 'lists'
    lists.mkdir()
    (lists / 'train.txt').write_text(''.join(f'{p} {i % 2}\n' for i, p in enumerate(TRAIN)))
    (lists / 'val.txt').write_text(''.join(f'{p} {i}\n' for i, p in enumerate(VAL)))
    make_archive(str(tmp_path / 'data.tar.gz'), TRAIN + VAL)

    def run(*standins, archive=None, **extra):
        bin_dir = tmp_path / ('bin_' + '_'.join(standins))
        if not bin_dir.exists():
            bin_dir.mkdir()
            for tool in TOOLS:
                os.symlink(shutil.which(tool), bin_dir / tool)
            for name in standins:
                (bin_dir / name).write_text(STANDINS[name])
                (bin_dir / name).chmod(0o755)
        env = {'PATH': str(bin_dir), 'DATA_DIR': str(tmp_path / 'data'),
               'STUB_LOG': str(tmp_path / 'calls.log'), 'FAKE_LISTS': str(lists),
               'FAKE_ARCHIVE': str(archive or tmp_path / 'data.tar.gz'),
               'MIN_TRAIN_LINES': str(len(TRAIN)), 'MIN_VAL_LINES': str(len(VAL))}
        env.update(extra)
        env = {k: v for k, v in env.items() if v is not None}
        return subprocess.run(['/bin/sh', SCRIPT], env=env, capture_output=True, text=True,
                              timeout=30)

    return run, tmp_path


def calls(tmp_path):
    log = tmp_path / 'calls.log'
    return log.read_text().splitlines() if log.exists() else []


def test_downloads_unpacks_verifies_then_skips(sandbox):
    run, tmp = sandbox
    first = run('gdown', 'curl')
    assert first.returncode == 0, first.stderr
    assert 'train: 3 of 3 images listed in train.txt present' in first.stdout
    assert 'val: 2 of 2 images listed in val.txt present' in first.stdout
    data = tmp / 'data'
    assert sorted(os.listdir(data)) == ['data.tar.gz', 'images', 'objects', 'train.txt', 'val.txt']
    assert (data / 'images' / TRAIN[2]).is_file()
    assert [c.split()[0] for c in calls(tmp)] == ['curl', 'curl', 'gdown']
    assert calls(tmp)[2] == f'gdown {FILE_ID} -O {data}/data.tar.gz.part'

    again = run('gdown', 'curl')
    assert again.returncode == 0, again.stderr
    assert 'images: complete, nothing to do' in again.stdout
    assert len(calls(tmp)) == 3  # nothing downloaded a second time


def test_wget_when_there_is_no_curl(sandbox):
    run, tmp = sandbox
    proc = run('gdown', 'wget')
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls(tmp)] == ['wget', 'wget', 'gdown']


def test_missing_gdown_says_how_to_install_it(sandbox):
    run, tmp = sandbox
    proc = run('curl')
    assert proc.returncode != 0
    assert 'gdown not found' in proc.stderr and 'pip install gdown' in proc.stderr
    assert not (tmp / 'data' / 'data.tar.gz').exists()
    # installed later: the lists are not fetched again, the archive is
    proc = run('gdown', 'curl')
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls(tmp)] == ['curl', 'curl', 'gdown']


def test_missing_image_fails_verification(sandbox):
    run, tmp = sandbox
    make_archive(str(tmp / 'short.tar.gz'), TRAIN + VAL[:1])
    proc = run('gdown', 'curl', archive=tmp / 'short.tar.gz')
    assert proc.returncode != 0
    assert 'val: 1 of 2 images listed in val.txt present' in proc.stdout
    assert f'1 missing, e.g. images/{VAL[1]}' in proc.stdout
    assert 'delete' in proc.stderr and 'data.tar.gz' in proc.stderr
    again = run('gdown', 'curl')  # the short archive is kept and unpacked again: still short
    assert again.returncode != 0 and 'data.tar.gz: already downloaded' in again.stdout
    (tmp / 'data' / 'data.tar.gz').unlink()  # as the message says
    assert run('gdown', 'curl').returncode == 0
    # an image lost after a good run comes back from the archive, without downloading
    (tmp / 'data' / 'images' / TRAIN[0]).unlink()
    proc = run('gdown', 'curl')
    assert proc.returncode == 0 and 'data.tar.gz: already downloaded' in proc.stdout
    assert (tmp / 'data' / 'images' / TRAIN[0]).is_file()
    assert [c.split()[0] for c in calls(tmp)].count('gdown') == 2


def test_damaged_archive_and_no_network_stop_with_advice(sandbox):
    run, tmp = sandbox
    make_archive(str(tmp / 'broken.tar.gz'), TRAIN + VAL, corrupt=True)
    proc = run('gdown', 'curl', archive=tmp / 'broken.tar.gz')
    assert proc.returncode != 0
    assert 'cannot unpack' in proc.stderr and 'delete it and run again' in proc.stderr
    shutil.rmtree(tmp / 'data')
    proc = subprocess.run(['/bin/sh', SCRIPT], capture_output=True, text=True, env={
        'PATH': str(tmp / 'bin_gdown_curl'), 'DATA_DIR': str(tmp / 'data'), 'FAKE_OFFLINE': '1',
        'STUB_LOG': str(tmp / 'calls.log'), 'FAKE_LISTS': str(tmp / 'lists')})
    assert proc.returncode != 0
    assert 'could not download' in proc.stderr and 'train.txt' in proc.stderr
    assert not (tmp / 'data' / 'train.txt').exists() and not (tmp / 'data' / 'train.txt.part').exists()


# what a rate limiter or a captive portal serves with status 200 instead of the list
HTML = ('<!DOCTYPE html>\n<html><head><title>Too Many Requests</title></head>\n'
        '<body>\n</body></html>\n')


def test_html_list_is_deleted_and_a_rerun_succeeds(sandbox):
    run, tmp = sandbox
    good = (tmp / 'lists' / 'train.txt').read_text()
    (tmp / 'lists' / 'train.txt').write_text(HTML)
    proc = run('gdown', 'curl')
    assert proc.returncode != 0
    assert proc.stderr.count('\n') == 1
    assert 'bad train.txt' in proc.stderr and "4 of its lines are not 'path label'" in proc.stderr
    assert 'deleted it' in proc.stderr and 'run again' in proc.stderr
    assert not (tmp / 'data' / 'train.txt').exists()
    assert 'gdown' not in ' '.join(calls(tmp))  # stopped before the archive
    (tmp / 'lists' / 'train.txt').write_text(good)  # the network is fine again
    proc = run('gdown', 'curl')
    assert proc.returncode == 0, proc.stderr
    assert 'train: 3 of 3 images listed in train.txt present' in proc.stdout
    assert (tmp / 'data' / 'train.txt').read_text() == good


def test_bad_list_left_by_an_earlier_run_is_fetched_again(sandbox):
    run, tmp = sandbox
    assert run('gdown', 'curl').returncode == 0
    (tmp / 'data' / 'val.txt').write_text(HTML)  # as an older version of the script kept it
    proc = run('gdown', 'curl')
    assert proc.returncode == 0, proc.stderr
    assert 'train.txt: already there' in proc.stdout
    assert "val.txt: 4 of its lines are not 'path label' (a web page instead of the list?); " \
           'deleted, downloading it again' in proc.stdout
    assert (tmp / 'data' / 'val.txt').read_text() == (tmp / 'lists' / 'val.txt').read_text()
    assert [c.split()[0] for c in calls(tmp)] == ['curl', 'curl', 'gdown', 'curl']


def test_short_list_is_refused_at_the_miniplaces_sizes(sandbox):
    run, tmp = sandbox
    proc = run('gdown', 'curl', MIN_TRAIN_LINES=None, MIN_VAL_LINES=None)  # the defaults
    assert proc.returncode != 0
    assert 'bad train.txt: it lists 3 images, MiniPlaces has at least 100000' in proc.stderr
    assert not (tmp / 'data' / 'train.txt').exists()
    proc = run('gdown', 'curl', MIN_VAL_LINES=None)
    assert proc.returncode != 0
    assert 'bad val.txt: it lists 2 images, MiniPlaces has at least 10000' in proc.stderr
    assert (tmp / 'data' / 'train.txt').exists() and not (tmp / 'data' / 'val.txt').exists()
