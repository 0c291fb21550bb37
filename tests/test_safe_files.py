"""safe_files.py: the sweep of temporary files removes only those of dead writers of
this machine; an atomic write that fails keeps the old file and leaves nothing."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import NO_SUCH_PID
from toolkit import safe_files


def test_the_sweep_removes_only_the_files_of_dead_writers_of_this_machine(tmp_path):
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        host = socket.gethostname()
        names = {'dead': f'.a.zip.tmp-{host}-{NO_SUCH_PID}',
                 'live': f'.a.zip.tmp-{host}-{live.pid}',
                 'other host': f'.a.zip.tmp-elsewhere-{NO_SUCH_PID}',
                 'not a temporary file': 'a.zip.tmp-notes'}
        for name in names.values():
            (tmp_path / name).write_bytes(b'x' * 10)
        removed = safe_files.remove_dead_temp_files(str(tmp_path))
        assert removed == [(str(tmp_path / names['dead']), 10)]
        assert sorted(os.listdir(tmp_path)) == sorted(set(names.values()) - {names['dead']})
    finally:
        live.kill()
        live.wait()


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / 'summary.json'
    path.write_text('old')

    def fail_half_way(f):
        f.write('new, half of it')
        raise OSError('No space left on device')
    with pytest.raises(OSError):
        safe_files.atomic_write(str(path), fail_half_way)
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['summary.json']
    safe_files.atomic_write(str(path), lambda f: f.write('new'))
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['summary.json']


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_an_interrupt_during_an_atomic_write_comes_once_the_file_is_in_place(tmp_path,
                                                                             signum):
    """Ctrl-C or SIGTERM in the middle of a write is held until the new file is in place,
    then delivered to the handler of before: the file is whole and the caller still stops."""
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop(signum)
    path = tmp_path / 'checkpoint.pth.tar'
    path.write_text('old')

    def interrupted_half_way(f):
        f.write('new, first half; ')
        os.kill(os.getpid(), signum)
        f.write('second half')
    before = signal.signal(signum, stop)
    try:
        with pytest.raises(Stop):
            safe_files.atomic_write(str(path), interrupted_half_way)
        assert signal.getsignal(signum) is stop
    finally:
        signal.signal(signum, before)
    assert path.read_text() == 'new, first half; second half'
    assert os.listdir(tmp_path) == ['checkpoint.pth.tar']
