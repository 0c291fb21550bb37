"""Helpers of the driver: errors, meters, accuracy, the learning-rate schedule,
devices, run folders (lock, atomic files, checkpoints), peak memory."""
import datetime
import json
import math
import os
import pickle
import resource
import socket
import sys
import tempfile

import torch

try:
    import fcntl  # POSIX (Linux, macOS); absent on native Windows
except ImportError:
    fcntl = None


################################################################################
# Errors
################################################################################
class ToolkitError(ValueError):
    """An expected problem with the user's flags, data, checkpoint or run folder.

    main.py prints these as one line `main.py: error: ...` and exits with 1; any
    other exception (above all one raised by student_code.py) keeps its
    traceback. A ValueError, so callers that catch ValueError still catch it."""


class UsageError(ToolkitError):
    """A bad flag or combination of flags."""


class CheckpointError(ToolkitError):
    """A checkpoint that is missing, truncated, refused or does not fit the model."""


class RunFolderError(ToolkitError):
    """A run folder that cannot be created, written, or is in use by another run."""


class DivergedError(ToolkitError):
    """Training produced a non-finite loss or weights."""


class AverageMeter(object):
    """Computes and stores the average and current value (as in PyTorch's ImageNet
    example); str() gives "name val (avg)" in the meter's format."""

    def __init__(self, name='', fmt=':f'):
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self):
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ('{name} {val' + self.fmt + '} ({avg' + self.fmt + '})').format(**self.__dict__)


class ProgressMeter(object):
    """One progress line: "PREFIX[i/n]" and the meters, tab-separated."""

    def __init__(self, num_batches, meters, prefix=''):
        self.num_batches, self.meters, self.prefix = num_batches, meters, prefix

    def line(self, batch, *extra):
        return '\t'.join([f'{self.prefix}[{batch}/{self.num_batches}]'] +
                          [str(m) for m in self.meters] + list(extra))


def accuracy(output, target, topk=(1,)):
    """Computes the precision@k (in percent) for the specified values of k"""
    with torch.no_grad():
        maxk = min(max(topk), output.size(1))
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:min(k, maxk)].reshape(-1).float().sum(0) * (100.0 / batch_size)
                for k in topk]


################################################################################
# Learning rate: linear warmup, then cosine decay to zero, per iteration
################################################################################
def warmup_cosine_factor(it, warmup_iters, total_iters):
    """Multiplier of the base lr at iteration `it` (0-based), in closed form.

    A closed form (rather than chaining LinearLR and CosineAnnealingLR) means the
    lr after a resume is exactly the lr of an uninterrupted run.
    """
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer, warmup_epochs, epochs, iters_per_epoch, start_iter=0):
    """torch's LambdaLR stepped once per iteration; its state_dict holds the step.
    start_iter > 0 starts the curve there (--start-epoch without a checkpoint)."""
    warmup_iters = warmup_epochs * iters_per_epoch
    total_iters = epochs * iters_per_epoch

    def factor(it):
        return warmup_cosine_factor(it, warmup_iters, total_iters)
    if start_iter > 0:  # LambdaLR(last_epoch=k) needs each group's 'initial_lr'
        for group in optimizer.param_groups:
            group.setdefault('initial_lr', group['lr'])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_iter - 1)


################################################################################
# Devices and memory
################################################################################
def select_device(device='auto', gpu=0, use_mps=False):
    """Resolve --device/--gpu/--use-mps to a torch.device without touching CUDA
    unless CUDA is asked for or present (the handout's driver crashed on CPUs)."""
    if device == 'auto':
        if gpu is not None and gpu < 0:
            return torch.device('cpu')
        if use_mps:
            device = 'mps'
        elif torch.cuda.is_available():
            return torch.device('cuda', gpu or 0)
        elif torch.backends.mps.is_available():
            return torch.device('mps')
        else:
            return torch.device('cpu')
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == 'mps' and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple MPS is not available on this machine")
    elif dev.type not in ('cpu', 'cuda', 'mps'):
        raise UsageError(f"unsupported --device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return dev


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """CUDA: the allocator's peak since the last reset. MPS: memory the driver holds
    now. CPU: the process's peak resident set size (never reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == 'mps':
        return torch.mps.driver_allocated_memory() / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10  # bytes vs KiB


################################################################################
# Run folders, atomic files, checkpoints
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


def read_json(path):
    with open(path) as f:
        return json.load(f)


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
# Checkpoints
################################################################################
CHECKPOINT, BEST = 'checkpoint.pth.tar', 'model_best.pth.tar'


def save_checkpoint(state, run_dir):
    """RUN/models/checkpoint.pth.tar: the commit point of an epoch (see main.py)."""
    _atomic_write(os.path.join(run_dir, 'models', CHECKPOINT),
                  lambda f: torch.save(state, f), binary=True)


def save_best_model(state, run_dir):
    """RUN/models/model_best.pth.tar: the best epoch's weights, for -e and -a."""
    _atomic_write(os.path.join(run_dir, 'models', BEST),
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
    if os.path.basename(models) != 'models':
        return None
    if os.path.isfile(os.path.join(run, 'summary.json')) or \
            os.path.isfile(os.path.join(models, CHECKPOINT)):
        return run
    return None


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


def one_line(exc):
    """The message of an exception on one line, also when a DataLoader worker
    re-raised it wrapped in its own traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else type(exc).__name__
    prefix = type(exc).__name__ + ': '
    return line.split(prefix, 1)[1] if prefix in line else line
