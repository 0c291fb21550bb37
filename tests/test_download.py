"""download_dataset.sh, run by a POSIX sh with stand-ins for gdown, curl and wget that serve
a tiny archive and tiny lists. PATH holds only the stand-ins and the few tools the script
uses, so which downloader exists (or is missing) is up to each test. MIN_TRAIN_LINES and
MIN_VAL_LINES are set to the sizes of the tiny lists, except where a test checks the
defaults. The time limits are checked with the real curl and wget against servers on
127.0.0.1 (one that never answers, one that answers slowly), with the limits lowered to
seconds."""
import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'download_dataset.sh')
FILE_ID = '16GYHdSWS3iMYwMPv5FpeDZN2rH7PR0F2'
LIST_URL = 'https://raw.githubusercontent.com/CSAILVision/miniplaces/master/data'
TRAIN = ['train/a/abbey/00000001.jpg', 'train/a/abbey/00000002.jpg', 'train/b/bar/00000001.jpg']
VAL = ['val/00000001.jpg', 'val/00000002.jpg']
TOOLS = ['mkdir', 'mv', 'rm', 'tar', 'gzip', 'dirname', 'cat', 'grep',   # what the script and
         'sleep', 'wc']                                                    # stand-ins call

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
[ "$1" = -q ] || exit 2
out=; url=
while [ $# -gt 0 ]; do case $1 in -O) out=$2; shift 2;; -*) shift;; *) url=$1; shift;; esac; done
case $url in {LIST_URL}/train.txt|{LIST_URL}/val.txt) ;; *) exit 8;; esac
cat "$FAKE_LISTS/${{url##*/}}" > "$out"
''',
    # gdown stalled: a few bytes, then nothing (exec: the process the script stops is
    # the one that sleeps, so nothing holds the test's pipes afterwards)
    'gdown:stall': '''#!/bin/sh
echo "gdown $*" >> "$STUB_LOG"
printf 'the first bytes' > "$3"
exec sleep 600
''',
    # gdown on a slow line: the archive in pieces, one every 0.5 s
    'gdown:slow': '''#!/bin/sh
echo "gdown $*" >> "$STUB_LOG"
: > "$3"
for piece in "$FAKE_PIECES"/*; do sleep 0.5; cat "$piece" >> "$3"; done
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
        """standins: names of STANDINS ('gdown:stall' is installed as gdown), or
        'curl:real' / 'wget:real' for the real program."""
        bin_dir = tmp_path / ('bin_' + '_'.join(standins).replace(':', '-'))
        if not bin_dir.exists():
            bin_dir.mkdir()
            for tool in TOOLS:
                os.symlink(shutil.which(tool), bin_dir / tool)
            for name in standins:
                tool, _, variant = name.partition(':')
                if variant == 'real':
                    os.symlink(shutil.which(tool), bin_dir / tool)
                    continue
                (bin_dir / tool).write_text(STANDINS[name])
                (bin_dir / tool).chmod(0o755)
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
    # every transfer has its limits (the defaults: 30 s to connect, 60 s without data)
    assert '--connect-timeout 30 --speed-limit 1 --speed-time 60' in calls(tmp)[0]

    again = run('gdown', 'curl')
    assert again.returncode == 0, again.stderr
    assert 'images: complete, nothing to do' in again.stdout
    assert len(calls(tmp)) == 3  # nothing downloaded a second time


def test_wget_when_there_is_no_curl(sandbox):
    run, tmp = sandbox
    proc = run('gdown', 'wget')
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls(tmp)] == ['wget', 'wget', 'gdown']
    assert '--connect-timeout=30 --read-timeout=60 --tries=2' in calls(tmp)[0]


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


@pytest.mark.slow
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


################################################################################
# time limits, for real: curl and wget against local servers, gdown stand-ins
################################################################################
@contextlib.contextmanager
def silent_server():
    """(port, accepted connections) of a server on 127.0.0.1 that accepts every
    connection and never sends a byte: a stalled download."""
    server = socket.create_server(('127.0.0.1', 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except socket.timeout:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


@contextlib.contextmanager
def slow_server(lists):
    """Port of an HTTP server on 127.0.0.1 that sends lists/<name> in 6 pieces, 0.5 s
    apart: 3 s per file, each pause shorter than the tests' 2 s stall limit."""
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (lists / self.path.rsplit('/', 1)[-1]).read_bytes()
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            step = -(-len(body) // 6)
            for start in range(0, len(body), step):
                time.sleep(0.5)
                self.wfile.write(body[start:start + step])
                self.wfile.flush()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


FAST_LIMITS = {'CONNECT_TIMEOUT': '2', 'STALL_TIMEOUT': '2'}


@pytest.mark.slow
@pytest.mark.parametrize('downloader', ['curl', 'wget'])
def test_a_stalled_download_stops_with_advice(sandbox, downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f'{downloader} is not installed')
    run, tmp = sandbox
    with silent_server() as (port, accepted):
        start = time.monotonic()
        proc = run('gdown', f'{downloader}:real', LIST_URL=f'http://127.0.0.1:{port}/data',
                   **FAST_LIMITS)
        elapsed = time.monotonic() - start
        assert accepted                          # it did connect, and then waited
    assert proc.returncode != 0 and elapsed < 20, (elapsed, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert f'could not download http://127.0.0.1:{port}/data/train.txt' in last
    assert 'no data for 2 s' in last and 'STALL_TIMEOUT=300' in last
    assert not (tmp / 'data' / 'train.txt').exists()
    assert not (tmp / 'data' / 'train.txt.part').exists()


@pytest.mark.slow
@pytest.mark.parametrize('downloader', ['curl', 'wget'])
def test_a_slow_download_that_moves_goes_on(sandbox, downloader):
    if shutil.which(downloader) is None:
        pytest.skip(f'{downloader} is not installed')
    run, tmp = sandbox
    with slow_server(tmp / 'lists') as port:
        start = time.monotonic()
        proc = run('gdown', f'{downloader}:real', LIST_URL=f'http://127.0.0.1:{port}/data',
                   **FAST_LIMITS)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start > 5          # two files, longer than the stall limit
    for name in ('train.txt', 'val.txt'):
        assert (tmp / 'data' / name).read_text() == (tmp / 'lists' / name).read_text()


@pytest.mark.slow
def test_a_stalled_gdown_is_stopped_and_a_slow_one_goes_on(sandbox):
    run, tmp = sandbox
    start = time.monotonic()
    proc = run('gdown:stall', 'curl', **FAST_LIMITS)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 20, (elapsed, proc.stderr)
    assert proc.stderr.count('\n') == 1 and 'gdown stopped' in proc.stderr
    assert 'stalled (no connection within 2 s or no data for 2 s)' in proc.stderr
    assert 'STALL_TIMEOUT=300' in proc.stderr
    assert [p for p in os.listdir(tmp / 'data') if p.startswith('data.tar.gz')] == []
    # on a slow line: 6 pieces, 0.5 s apart, 3 s in all
    pieces = tmp / 'pieces'
    pieces.mkdir()
    archive = (tmp / 'data.tar.gz').read_bytes()
    step = -(-len(archive) // 6)
    for k, start in enumerate(range(0, len(archive), step)):
        (pieces / f'{k:02d}').write_bytes(archive[start:start + step])
    proc = run('gdown:slow', 'curl', FAKE_PIECES=str(pieces), **FAST_LIMITS)
    assert proc.returncode == 0, proc.stderr
    assert 'train: 3 of 3 images listed in train.txt present' in proc.stdout
