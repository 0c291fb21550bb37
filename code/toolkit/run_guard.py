"""How a run of main.py ends, whatever ends it: the one boundary of the rare cases, out
of the path a student reads.

    guarded(body)      runs main.py's run: Ctrl-C and SIGTERM stop it (exit 130 and 143,
                       one line naming the checkpoint to resume from), an expected error of
                       ours is one line (exit 1), a lost torchrun process is one line; any
                       other error (your own code's above all) keeps its traceback
    ends_with_status   held while a training run trains: whatever ends it leaves its
                       status in summary.json ('diverged', 'interrupted', 'failed')

The atomic writes that hold Ctrl-C until a file is in place are safe_files.py's; the runs
a kill -9 ended are found and marked by run_folder.close_dead_runs.
"""
import contextlib
import os
import signal
import sys
import traceback

from toolkit import distributed
from toolkit import run_folder
from toolkit import run_record as rr
from custom_dataloader import DatasetError
from utils import (CheckpointError, DivergedError, RunFolderError, ToolkitError, UsageError,
                   one_line)

# the errors that every process of a torchrun launch meets alike (the same flags, data and
# checkpoint; a divergence is checked on the mean loss): only rank 0 says them
SHARED_ERRORS = (UsageError, CheckpointError, DatasetError, DivergedError)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message says where its checkpoint is."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a run as Ctrl-C does; the exit status says which it was."""


def sigterm_as_interrupt(signum, frame):
    """SIGTERM (what a cloud VM sends before preemption) stops a run like Ctrl-C."""
    raise Terminated


def guarded(body):
    """body(hold) with the boundary above; `hold` (an ExitStack's enter_context) keeps a
    context (the run folder's lock) until the run ends. Returns what body returns."""
    previous_handler = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        with contextlib.ExitStack() as stack:
            return body(stack.enter_context)
    except ToolkitError as exc:  # ours: bad flags, data, checkpoint, run folder, divergence
        if os.environ.get('MAIN_DEBUG'):
            raise
        if distributed.launch_rank() == 0 or not isinstance(exc, SHARED_ERRORS):
            print(f'main.py: error: {one_line(exc)}', file=sys.stderr)
        else:  # rank 0 says it: torchrun must not stop rank 0 before it has
            distributed.let_rank0_say_it()
        # a DataLoader worker's error is re-raised by torch in a reference cycle that
        # holds the loader; freed by the garbage collector later, its workers take 5 s
        # to stop. Clearing the frames frees it now (for callers of main() in-process)
        traceback.clear_frames(exc.__traceback__)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f'\nmain.py: {str(exc) or "interrupted"}', file=sys.stderr)
        # the shell's convention: 128 + the signal's number (SIGINT 130, SIGTERM 143)
        stopped_by = exc.__cause__ if isinstance(exc, Interrupted) else exc
        sys.exit(128 + (signal.SIGTERM if isinstance(stopped_by, Terminated) else signal.SIGINT))
    except Exception as exc:  # a lost torchrun process: one line, not the backend's traceback
        if not distributed.lost_process(exc) or os.environ.get('MAIN_DEBUG'):
            raise  # any other keeps its traceback (your own code's above all)
        distributed.ignore_sigterm()  # torchrun's stop of the processes left
        print(f'main.py: error: {distributed.lost_process_message(exc)}', file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.stop()


@contextlib.contextmanager
def ends_with_status(run_dir):
    """Held with the run lock while a training run trains: an exception that ends the run
    while its summary still says 'running' leaves 'diverged' (a non-finite loss or
    weights), 'interrupted' (Ctrl-C, SIGTERM: re-raised as Interrupted, whose message
    names the checkpoint to resume from) or 'failed' (an error in student_code.py, a lost
    torchrun process, an unreadable image mid-epoch). run_dir None (ranks other than 0)
    writes nothing."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if distributed.lost_process(exc):
            distributed.ignore_sigterm()  # torchrun's stop must not cut the write short
        status = (rr.DIVERGED if isinstance(exc, DivergedError) else
                  rr.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else rr.FAILED)
        if run_dir is not None:
            try:
                with run_folder.summary_lock(run_dir):
                    run_folder.end_running(run_dir, status)
            except (RunFolderError, OSError):
                pass  # a full disk, say: the error that ended the run says more
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(interrupted_message(run_dir)) from exc
        raise


def interrupted_message(run_dir):
    if run_dir is None:  # a process other than rank 0
        return 'interrupted'
    path = rr.checkpoint_path(run_dir)
    if os.path.isfile(path):
        return (f'interrupted; the last finished epoch is in {path}: continue with '
                f'--resume={quoted(path)}')
    return f'interrupted before the first epoch finished ({run_dir})'


def quoted(path):
    """A path as a shell reads it back: pasted, a command that names it runs."""
    import shlex
    return shlex.quote(path)
