"""The run folder, written so that no kill loses or corrupts a run: every file is
written atomically (a temporary file renamed over the old one), a training run holds
the folder's lock from start to end, and every writer of summary.json holds its short
lock. What the files hold is defined in run_record.py.

checkpoint.pth.tar is the commit point of an epoch (commit_epoch). It holds everything
(weights, optimizer, schedule, the epoch history, the best model's weights) and is
written first; model_best.pth.tar and summary.json are derived from it, written after
it, and rewritten from it when the run is resumed (restore_run_files).
"""
import datetime
import json
import math
import os
import pickle
import socket
import tempfile

import torch

import run_record as rr
from distributed import is_main
from utils import CheckpointError, RunFolderError

try:
    import fcntl  # POSIX (Linux, macOS); absent on native Windows
except ImportError:
    fcntl = None


################################################################################
# Folders, atomic files, locks
################################################################################
def make_run_dir(log_dir, name=None):
    """Create LOGDIR/exp_<timestamp>[_<name>]; never reuse an existing folder."""
    stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
    base = os.path.join(log_dir, 'exp_' + stamp + ('_' + name if name else ''))
    try:
        os.makedirs(log_dir, exist_ok=True)
        for n in range(1000):
            path = base if n == 0 else f'{base}-{n}'
            try:
                os.makedirs(path)  # fails if it exists: runs are never overwritten
                return path
            except FileExistsError:
                continue
    except OSError as exc:  # a file in the way, no permission, read-only disk ...
        raise RunFolderError(f"--log-dir {log_dir}: cannot create a run folder there "
                             f"({exc.strerror or exc})")
    raise RunFolderError(f'could not create a new run folder next to {base}')


TMP_PREFIX = '.tmp_'


def _atomic_write(path, write_fn, binary):
    """Write to a temporary file in the same folder, then rename over `path`:
    a crash leaves either the old file or the new one, never half of one.
    A failed write (disk full, ...) raises RunFolderError and keeps the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise RunFolderError(f"cannot write {path} ({exc.strerror or exc}); the previous "
                             f"version of the file, if any, is intact") from exc
    except RuntimeError as exc:  # torch.save reports a full disk as RuntimeError
        raise RunFolderError(f"cannot write {path} ({str(exc).splitlines()[0][:200]}); the "
                             f"previous version of the file, if any, is intact") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def remove_temp_files(folder):
    """Remove what _atomic_write leaves behind when the process is killed mid-write.
    Only call it holding the run folder's lock (no other writer is then at work)."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def finite_or_none(obj):
    """A copy of a JSON-able object with NaN and +-inf replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json_atomic(path, obj):
    """Strict JSON (allow_nan=False: a bare NaN is not JSON), written atomically."""
    _atomic_write(path, lambda f: json.dump(finite_or_none(obj), f, indent=2, allow_nan=False),
                  binary=False)


class FolderLock(object):
    """An exclusive lock on a file in a run folder, held while the `with` block runs.

    It is fcntl.flock: the operating system releases it when the process ends, however
    it ends (kill -9 included), so a crashed run never blocks the folder. The file
    keeps "pid N on HOST" of its holder while held: for the messages only.
    wait=False refuses at once (RunFolderError) when another process holds it.
    Where fcntl does not exist (native Windows) it does nothing."""

    def __init__(self, path, wait=False, what='run folder'):
        self.path, self.wait, self.what = path, wait, what
        self.fd, self.previous_holder = None, ''

    def __enter__(self):
        if fcntl is None:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors='replace').strip()
            os.close(self.fd)
            raise RunFolderError(f"{os.path.dirname(self.path)} is in use by "
                                 f"{holder or 'another process'}: one training per {self.what} "
                                 f"(wait for it to end, or stop it)")
        # a holder written but no lock held: that process died without releasing it
        self.previous_holder = os.pread(self.fd, 200, 0).decode(errors='replace').strip()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file: released cleanly
            os.close(self.fd)         # closing releases the flock
            self.fd = None
        return False


def summary_lock(run_dir):
    """The short lock every writer of RUN/summary.json holds for its read-modify-write."""
    return FolderLock(os.path.join(run_dir, '.summary.lock'), wait=True)


def run_lock(run_dir):
    """The lock a training run holds on its folder from start to end."""
    return FolderLock(os.path.join(run_dir, '.lock'), wait=False)


################################################################################
# summary.json
################################################################################
def write_summary(run_dir, summary):
    """Write RUN/summary.json, keeping the results that an -e/-a of the run added to the
    file meanwhile (every writer holds the summary lock for its read-modify-write).
    run_dir None (a torchrun process other than rank 0) writes nothing."""
    if run_dir is None:
        return
    with summary_lock(run_dir):
        on_disk = rr.read_summary(run_dir)
        record = dict(summary, **{k: on_disk[k] for k in rr.RESULT_KEYS if k in on_disk})
        write_json_atomic(rr.summary_path(run_dir), record)


def add_result(run_dir, key, result):
    """Add an -e/-a result to a training run's summary.json."""
    with summary_lock(run_dir):
        summary = rr.read_summary(run_dir)
        summary[key] = result
        write_json_atomic(rr.summary_path(run_dir), summary)


################################################################################
# Checkpoint files
################################################################################
def save_checkpoint(state, run_dir):
    """RUN/models/checkpoint.pth.tar: the commit point of an epoch (see commit_epoch)."""
    _atomic_write(rr.checkpoint_path(run_dir),
                  lambda f: torch.save(state, f), binary=True)


def save_best_model(state, run_dir):
    """RUN/models/model_best.pth.tar: the best epoch's weights, for -e and -a."""
    _atomic_write(rr.checkpoint_path(run_dir, rr.BEST),
                  lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path):
    """Load a checkpoint safely (weights_only) onto the CPU, or explain in one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint found at '{path}'")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused a Python object: loading it could run arbitrary code
        raise CheckpointError(f"'{path}' holds Python objects that no checkpoint of this "
                              f"toolkit holds; refused without loading them (unpickling "
                              f"them could run arbitrary code)")
    except Exception as exc:  # truncated zip, garbage, not a torch file ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}' (truncated or not a "
                              f"checkpoint?): {reason[:200]}")
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise CheckpointError(f"'{path}' is not a checkpoint of this toolkit (no state_dict)")
    key = first_non_finite(ckpt['state_dict'])
    if key is not None:
        raise CheckpointError(f"'{path}' holds non-finite weights (NaN or inf) in '{key}': "
                              f"the run diverged before it was saved; use an earlier "
                              f"checkpoint or train again with a lower --lr")
    return ckpt


def first_non_finite(state_dict):
    """Name of the first floating-point tensor of a state dict holding NaN or inf, or None."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and \
                not torch.isfinite(value).all():
            return key
    return None


def run_dir_of_checkpoint(path):
    """RUN for RUN/models/checkpoint.pth.tar when RUN is the run folder it was
    written in (it has a summary.json, or a checkpoint file inside `models/`)."""
    models = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(models)
    if os.path.basename(models) != rr.MODELS:
        return None
    if os.path.isfile(rr.summary_path(run)) or os.path.isfile(rr.checkpoint_path(run)):
        return run
    return None


################################################################################
# A training run's folder: open, commit an epoch, restore on resume
################################################################################
def open_run_folder(args, ckpt, hold):
    """The run folder, locked for as long as `hold` (an ExitStack's enter_context) keeps
    the lock, or None in processes other than rank 0. A resumed run continues the
    checkpoint's own folder; a new run, or a checkpoint copied out of its folder, gets a
    new one. Temporary files of a killed writer are removed."""
    if not is_main():
        return None
    run_dir = run_dir_of_checkpoint(args.resume) if ckpt is not None else None
    if run_dir is None:
        run_dir = make_run_dir(args.log_dir, args.name)
    lock = hold(run_lock(run_dir))
    if lock.previous_holder:
        print(f'note: took over the lock of {run_dir} from {lock.previous_holder}, which '
              f'is no longer running')
    # the summary lock too: an -e/-a of this run may be writing its summary right now
    with summary_lock(run_dir):
        removed = remove_temp_files(run_dir) + remove_temp_files(os.path.join(run_dir,
                                                                              rr.MODELS))
    if removed:
        print(f'note: removed {len(removed)} temporary file(s) left by a killed run')
    return run_dir


def best_model_of(ckpt):
    """The contents of model_best.pth.tar, derived from a checkpoint."""
    weights = ckpt.get('best_state_dict') or ckpt['state_dict']
    return {'kind': 'best', 'epoch': ckpt['best_epoch'], 'arch': ckpt['arch'],
            'state_dict': weights, 'best_acc1': ckpt['best_acc1'], 'args': ckpt['args']}


def commit_epoch(run_dir, args, learner, summary, record, best):
    """Save one finished epoch: the checkpoint first (the commit point), then the files
    derived from it. `best` is {'epoch', 'acc1', 'weights'}; updated in place, as is
    `summary`. Processes other than rank 0 (run_dir None) write nothing."""
    is_best = best['epoch'] is None or record['val_top1'] > best['acc1']
    if is_best:
        best.update(epoch=record['epoch'], acc1=record['val_top1'], weights=None)
    history = summary['epochs'] + [record]
    summary.update(epochs=history, best_epoch=best['epoch'], best_acc1=best['acc1'])
    if run_dir is None:
        return
    scaler = learner.scaler
    ckpt = {'schema': rr.SCHEMA_VERSION, 'epoch': record['epoch'], 'arch': args.arch,
            'state_dict': learner.model.state_dict(),
            'optimizer': learner.optimizer.state_dict(),
            'scheduler': learner.scheduler.state_dict(), 'best_acc1': best['acc1'],
            'best_epoch': best['epoch'], 'best_state_dict': best['weights'],
            'history': history, 'wall_time_s': summary['wall_time_s'], 'args': vars(args),
            'scaler': scaler.state_dict() if scaler is not None else None}
    save_checkpoint(ckpt, run_dir)
    if is_best:
        save_best_model(best_model_of(ckpt), run_dir)
        # kept for the checkpoints of later epochs, until a better one comes
        best['weights'] = {k: v.detach().cpu().clone() for k, v in ckpt['state_dict'].items()}
    write_summary(run_dir, summary)


def restore_run_files(ckpt, path, run_dir, summary, best):
    """A run resumed in its own folder: its history, best model and summary come from the
    checkpoint (model_best and summary.json may lag behind it after a kill, and are
    rewritten from it)."""
    if run_dir_of_checkpoint(path) != run_dir or 'history' not in ckpt:
        return
    best.update(epoch=ckpt['best_epoch'], acc1=ckpt['best_acc1'],
                weights=ckpt.get('best_state_dict'))
    summary.update(epochs=ckpt['history'], best_epoch=best['epoch'], best_acc1=best['acc1'],
                   wall_time_s=ckpt.get('wall_time_s', 0.0))
    save_best_model(best_model_of(ckpt), run_dir)
