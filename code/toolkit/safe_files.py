"""Files that no kill corrupts and no second process tramples, for the run folder
(run_folder.py), the decoded-image cache (data_cache.py) and the submission zip
(zip_submission.py):

    FileLock             an exclusive lock that dies with its holder, and only with it
    replacing(path)      write a temporary file, then rename it over `path`
    atomic_write(...)    replacing() for a function that writes a file object, with
                         Ctrl-C and SIGTERM held until the file is in place
    temp_path(path)      the temporary name: hidden, beside `path`, with the writer's
                         host and pid, so that two writers never share one
    remove_dead_temp_files(folder)   the temporary files whose writer is dead
    write_or_explain(...)  atomic_write whose failure (a full disk, no permission) is one
                         RunFolderError line that says the previous file is intact

A crash (kill -9, a full disk, a power cut) leaves the old file or the new one, never
half of one; what it leaves besides is a temporary file that the next writer removes,
but only when the process that wrote it is gone: a second writer at work at the same
time keeps its own.
"""
import contextlib
import os
import re
import signal
import socket
import threading

try:
    import fcntl  # POSIX (Linux, macOS); absent on native Windows: locks do nothing
except ImportError:
    fcntl = None

TEMP_MARK = '.tmp-'
# .<name>.tmp-<host>-<pid>: the host, so that a sweep on a shared disk leaves alone the
# files of writers on other machines, whose pids mean nothing here
TEMP_NAME = re.compile(r'\.(?P<name>.+)' + re.escape(TEMP_MARK) + r'(?P<host>.+)-(?P<pid>\d+)')


################################################################################
# Temporary files
################################################################################
def temp_path(path):
    """The temporary file of this process for `path`: .<name>.tmp-<host>-<pid> beside it.
    Hidden, so that listings and the submission zip pass it by. One per process and file:
    no two threads of the toolkit write one file at once."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}')


def pid_alive(pid):
    """True while a process of this machine with this pid exists (or may: another
    user's process answers with PermissionError). A dead writer's pid that the system
    has given to a new process keeps its file until that one ends too."""
    if pid == os.getpid() or os.name == 'nt':
        return True  # Windows' os.kill(pid, 0) would send Ctrl-C: its leftovers stay
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_temp_files(folder):
    """The temporary files in `folder` whose writer, a process of this machine, is dead."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no folder: nothing left in it
        return []
    found = []
    for name in names:
        match = TEMP_NAME.fullmatch(name)
        if match and match['host'] == socket.gethostname() and not pid_alive(int(match['pid'])):
            found.append(os.path.join(folder, name))
    return found


def remove_dead_temp_files(folder):
    """Remove the temporary files of dead writers in `folder`: [(path, bytes)] of those
    removed. Needs no lock: a live writer's file is never among them."""
    removed = []
    for path in dead_temp_files(folder):
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:  # removed meanwhile by another sweep
            continue
        removed.append((path, size))
    return removed


################################################################################
# Atomic writes
################################################################################
@contextlib.contextmanager
def replacing(path):
    """Yields the temporary path to write instead of `path`. Leaving the block normally,
    the file is flushed to the disk and renamed over `path` (the rename is atomic: a
    reader sees the old file or the new one); leaving it by an exception (Ctrl-C
    included), the temporary file is removed and `path` is untouched."""
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        try:
            os.fsync(fd)  # on the disk before the rename makes it official
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write(path, write_fn, binary=False):
    """Write `path` with write_fn(file) through replacing(), Ctrl-C and SIGTERM held
    until it is done (interrupts_held). The new file's mode is what open() gives (0o666
    less the umask), as for any other file the user writes: a group may read it where
    the umask lets it (tempfile.mkstemp would make it private)."""
    with interrupts_held(), replacing(path) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_BINARY', 0)
        with os.fdopen(os.open(tmp, flags, 0o666), 'wb' if binary else 'w') as f:
            write_fn(f)


@contextlib.contextmanager
def interrupts_held():
    """Hold SIGINT (Ctrl-C) and SIGTERM that arrive in the block and deliver them, to the
    handlers of before, when it ends. torch.save turns an exception raised inside one of
    its writes into a RuntimeError ("unexpected pos N vs M"): a Ctrl-C in the middle of
    a checkpoint would end the run as a failed write instead of an interrupted run. The
    writes held are small (a checkpoint, a summary): a fraction of a second. Signal
    handlers belong to the main thread; elsewhere, or where a handler was not set from
    Python, nothing is held."""
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in signals}
    if threading.current_thread() is not threading.main_thread() or None in before.values():
        yield
        return
    arrived = []
    for sig in signals:
        signal.signal(sig, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(arrived):  # each once, in the order they came
            signal.raise_signal(signum)


################################################################################
# The lock
################################################################################
_held = set()  # the FileLocks this process holds (kept even when no one else keeps them)


def _forget_locks_in_child():
    """In a forked child (a DataLoader worker, a multiprocessing pool), close the copies
    of the lock descriptors: a flock belongs to the open file, which the fork shares, so
    a child that kept its copy would hold the lock after its parent died (until the
    worker notices, seconds later), and a run killed with kill -9 would seem alive."""
    for lock in list(_held):
        os.close(lock.fd)
        lock.fd = None
    _held.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class FileLock(object):
    """An exclusive lock on a file (fcntl.flock), held from acquire() (or the start of a
    `with` block) to release() (its end).

    The kernel releases it when its holder ends, however it ends (kill -9 included), so
    a crashed process never blocks the next one; nor does a child it started: the
    descriptor is closed on exec and in a forked child. While held, the file holds
    "pid N on HOST" of its holder, for messages only; `previous_holder` is what it held
    when taken: the holder of a lock that ended without releasing it (a killed process).
    Where fcntl does not exist (native Windows) it does nothing."""

    def __init__(self, path):
        self.path, self.fd = path, None
        self.holder = self.previous_holder = ''

    def acquire(self, wait=True, waiting=None):
        """Take the lock; True once held. Held by another process: False at once where
        wait=False (its holder in `holder`), else waiting(holder) is called (to say
        so) and it waits for the release. OSError where the file cannot be opened."""
        if fcntl is None or self.fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_CLOEXEC', 0), 0o644)
        try:
            if not self._try_flock(fd):
                self.holder = os.pread(fd, 200, 0).decode(errors='replace').strip()
                if not wait:
                    os.close(fd)
                    return False
                if waiting is not None:
                    waiting(self.holder or 'another process')
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:  # Ctrl-C while waiting, say: the descriptor is not kept
            os.close(fd)
            raise
        self.fd = fd
        _held.add(self)
        self.previous_holder = os.pread(fd, 200, 0).decode(errors='replace').strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0)
        return True

    @staticmethod
    def _try_flock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self):
        if self.fd is not None:
            _held.discard(self)
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly
            os.close(self.fd)         # closing releases the flock
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def write_or_explain(path, write_fn, binary):
    """atomic_write for the run folder's files and checkpoints: a crash leaves either the
    old file or the new one, never half of one. A failed write (disk full, ...) raises
    RunFolderError and keeps the old file."""
    from utils import RunFolderError  # here: zip_submission.py uses this module alone
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, write_fn, binary)
    except OSError as exc:
        raise RunFolderError(f"cannot write {path} ({exc.strerror or exc}); the previous "
                             f"version of the file, if any, is intact") from exc
    except RuntimeError as exc:  # torch.save reports a failed write as RuntimeError
        raise RunFolderError(f"cannot write {path} ({write_failure(exc)}); the previous "
                             f"version of the file, if any, is intact") from exc


def write_failure(exc):
    """What made torch.save fail, in words: its RuntimeError says only "unexpected pos N vs
    M", while the OSError of the write it could not make (ENOSPC: "No space left on
    device") is the exception it was raised during."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause.strerror or str(cause)
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
