"""The run folder, written so that no kill loses or corrupts a run: every file is
written atomically (a temporary file renamed over the old one), a training run holds
the folder's lock from start to end, and every writer of summary.json holds its short
lock (the lock and the atomic write are safe_files.py's). What the files hold is
defined in run_record.py.

checkpoint.pth.tar is the commit point of an epoch (commit_epoch). It holds everything
(weights, optimizer, schedule, the epoch history, the best model's weights) and is
written first; model_best.pth.tar and summary.json are derived from it, written after
it, and rewritten from it when the run is resumed (restore_run_files).
"""
import datetime
import json
import math
import os
import socket

from toolkit import checkpoint
from toolkit import run_record as rr
from toolkit import safe_files
from toolkit.checkpoint import Checkpoint
from toolkit.distributed import is_main
from toolkit.safe_files import FileLock
from utils import RunFolderError


################################################################################
# Folders, atomic files, locks
################################################################################
def make_run_dir(log_dir, name=None):
    """Create LOGDIR/exp_<timestamp>[_<name>]; never reuse an existing folder. The runs
    of LOGDIR that a kill ended while running are marked as such (close_dead_runs)."""
    stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
    base = os.path.join(log_dir, 'exp_' + stamp + ('_' + name if name else ''))
    try:
        os.makedirs(log_dir, exist_ok=True)
        for n in range(1000):
            path = base if n == 0 else f'{base}-{n}'
            try:
                os.makedirs(path)  # fails if it exists: runs are never overwritten
            except FileExistsError:
                continue
            print_closed(close_dead_runs(log_dir, skip=path))
            return path
    except OSError as exc:  # a file in the way, no permission, read-only disk ...
        raise RunFolderError(f"--log-dir {log_dir}: cannot create a run folder there "
                             f"({exc.strerror or exc})")
    raise RunFolderError(f'could not create a new run folder next to {base}')


def remove_temp_files(run_dir):
    """Remove what safe_files.write_or_explain leaves behind in a run folder (RUN/ and RUN/models/) when
    its process is killed mid-write; returns their names. The temporary files of a live
    writer (an -e of the run writing its summary) stay."""
    return [os.path.basename(path)
            for folder in (run_dir, os.path.join(run_dir, rr.MODELS))
            for path, _ in safe_files.remove_dead_temp_files(folder)]


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
    safe_files.write_or_explain(path, lambda f: json.dump(finite_or_none(obj), f, indent=2, allow_nan=False),
                  binary=False)


def summary_lock(run_dir):
    """The short lock every writer of RUN/summary.json holds for its read-modify-write."""
    return FileLock(os.path.join(run_dir, '.summary.lock'))


def run_lock_path(run_dir):
    return os.path.join(run_dir, '.lock')


def run_lock(run_dir):
    """The lock a training run holds on its folder from start to end, taken now (a `with`
    block releases it); RunFolderError at once when another process holds it. The kernel
    releases it when the run ends, however it ends: a killed run never blocks its folder."""
    lock = FileLock(run_lock_path(run_dir))
    if not lock.acquire(wait=False):
        raise RunFolderError(f"{run_dir} is in use by {lock.holder or 'another process'}: "
                             f"one training per run folder (wait for it to end, or stop it)")
    return lock


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
# How a run ended, when it could not write it itself
################################################################################
def end_running(run_dir, status):
    """Set the status of a summary.json that still says 'running' to `status`; True if
    it did. The caller holds the summary lock."""
    try:
        summary = rr.read_summary(run_dir)
    except (OSError, ValueError):  # damaged, or of a newer layout: leave it as it is
        return False
    if summary.get('status') != rr.RUNNING:
        return False
    summary['status'] = status
    write_json_atomic(rr.summary_path(run_dir), summary)
    return True


def close_dead_run(run_dir):
    """A run that a kill ended while running (kill -9, the out-of-memory killer, a machine
    that went down) could not say so: its summary says 'running', but no process holds its
    run lock. Such a run gets status 'interrupted' and loses its temporary files; returns
    the names of those, or None for any other folder. Cheap: only a summary that says
    'running' is looked at further."""
    try:
        if rr.read_summary(run_dir).get('status') != rr.RUNNING:
            return None
        with open(run_lock_path(run_dir)) as f:  # "pid N on HOST" of its last holder
            holder = f.read(200).strip()
    except (OSError, ValueError):  # no lock file: not a training run's folder
        return None
    if holder and not holder.endswith(' on ' + socket.gethostname()):
        return None  # a run of another machine (a shared disk): it may be alive there
    try:
        with run_lock(run_dir), summary_lock(run_dir):  # free: no process trains in it
            if not end_running(run_dir, rr.INTERRUPTED):
                return None
            return remove_temp_files(run_dir)
    except (RunFolderError, OSError):  # alive after all, or a folder we may not write
        return None


def close_dead_runs(log_dir, skip=None):
    """close_dead_run for every folder of log_dir but `skip`: [(run folder, removed)]."""
    try:
        names = sorted(os.listdir(log_dir))
    except OSError:
        return []
    closed = []
    for name in names:
        run_dir = os.path.join(log_dir, name)
        if skip is None or os.path.abspath(run_dir) != os.path.abspath(skip):
            removed = close_dead_run(run_dir)
            if removed is not None:
                closed.append((run_dir, removed))
    return closed


def closed_note(run_dir, removed):
    """What close_dead_run did to a run, in words (main.py and report.py say it)."""
    return (f'{run_dir} was killed while running (no process holds its lock): status set '
            f'to interrupted' + (f', {len(removed)} temporary file(s) removed' if removed
                                 else ''))


def print_closed(closed):
    for run_dir, removed in closed:
        print(f'note: {closed_note(run_dir, removed)}')


################################################################################
# Checkpoint files
################################################################################
def save_checkpoint(ckpt, run_dir):
    """RUN/models/checkpoint.pth.tar: the commit point of an epoch (see commit_epoch)."""
    checkpoint.write_file(ckpt, rr.checkpoint_path(run_dir))


def save_best_model(ckpt, run_dir):
    """RUN/models/model_best.pth.tar: the best epoch's weights, for -e and -a."""
    checkpoint.write_file(ckpt, rr.checkpoint_path(run_dir, rr.BEST))


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
def open_run_folder(plan, ckpt, hold):
    """The run folder, locked for as long as `hold` (an ExitStack's enter_context) keeps
    the lock, or None in processes other than rank 0. A resumed run continues the
    checkpoint's own folder; a new run, or a checkpoint copied out of its folder, gets a
    new one. Temporary files of a killed writer are removed, and the runs beside it that
    a kill ended are marked so (close_dead_runs; a new folder's make_run_dir does that)."""
    if not is_main():
        return None
    run_dir = run_dir_of_checkpoint(plan.resume) if ckpt is not None else None
    resumed = run_dir is not None
    if not resumed:
        run_dir = make_run_dir(plan.log_dir, plan.name)
    lock = hold(run_lock(run_dir))
    if resumed:
        print_closed(close_dead_runs(os.path.dirname(run_dir), skip=run_dir))
    if lock.previous_holder:
        print(f'note: took over the lock of {run_dir} from {lock.previous_holder}, which '
              f'is no longer running')
    removed = remove_temp_files(run_dir)
    if removed:
        print(f'note: removed {len(removed)} temporary file(s) left by a killed run')
    return run_dir


def commit_epoch(run_dir, plan, learner, summary, record, best):
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
    scaler, ema = learner.scaler, learner.ema
    ckpt = Checkpoint(schema=rr.SCHEMA_VERSION, epoch=record['epoch'], arch=plan.arch,
                      state_dict=learner.model.state_dict(),
                      optimizer=learner.optimizer.state_dict(),
                      scheduler=learner.scheduler.state_dict(), best_acc1=best['acc1'],
                      best_epoch=best['epoch'], best_state_dict=best['weights'],
                      history=history, wall_time_s=summary['wall_time_s'], args=plan.as_dict(),
                      scaler=scaler.state_dict() if scaler is not None else None,
                      ema_state_dict=ema.state_dict() if ema is not None else None)
    save_checkpoint(ckpt, run_dir)
    if is_best:
        save_best_model(ckpt.best_model(), run_dir)
        # kept for the checkpoints of later epochs, until a better one comes
        best['weights'] = {k: v.detach().cpu().clone()
                           for k, v in ckpt.evaluated_weights().items()}
    write_summary(run_dir, summary)


def restore_run_files(ckpt, path, run_dir, summary, best):
    """A run resumed in its own folder: its history, best model and summary come from the
    checkpoint (model_best and summary.json may lag behind it after a kill, and are
    rewritten from it)."""
    if run_dir_of_checkpoint(path) != run_dir or ckpt.history is None:
        return
    best.update(epoch=ckpt.best_epoch, acc1=ckpt.best_acc1, weights=ckpt.best_state_dict)
    summary.update(epochs=ckpt.history, best_epoch=best['epoch'], best_acc1=best['acc1'],
                   wall_time_s=ckpt.wall_time_s)
    save_best_model(ckpt.best_model(), run_dir)
