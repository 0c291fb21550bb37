"""Helpers of the driver: meters, accuracy, the learning-rate schedule, devices,
run folders, atomic checkpoints and summaries, peak memory."""
import datetime
import json
import math
import os
import resource
import sys
import tempfile

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not fit the model."""


class AverageMeter(object):
    """Computes and stores the average and current value"""

    def __init__(self):
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


def build_lr_scheduler(optimizer, warmup_epochs, epochs, iters_per_epoch):
    """torch's LambdaLR stepped once per iteration; its state_dict holds the step."""
    warmup_iters = warmup_epochs * iters_per_epoch
    total_iters = epochs * iters_per_epoch

    def factor(it):
        return warmup_cosine_factor(it, warmup_iters, total_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        raise ValueError(f"unknown --device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available on this machine")
    elif dev.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"unsupported --device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
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
    os.makedirs(log_dir, exist_ok=True)
    for n in range(1000):
        path = base if n == 0 else f'{base}-{n}'
        try:
            os.makedirs(path)  # fails if it exists: runs are never overwritten
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f'could not create a new run folder next to {base}')


def _atomic_write(path, write_fn, binary):
    """Write to a temporary file in the same folder, then rename over `path`:
    a crash leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_', suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    _atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False), binary=False)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_checkpoint(state, is_best, run_dir):
    """RUN/models/checkpoint.pth.tar every epoch, model_best.pth.tar on improvement."""
    model_dir = os.path.join(run_dir, 'models')
    _atomic_write(os.path.join(model_dir, 'checkpoint.pth.tar'),
                  lambda f: torch.save(state, f), binary=True)
    if is_best:
        _atomic_write(os.path.join(model_dir, 'model_best.pth.tar'),
                      lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path):
    """Load a checkpoint safely (weights_only) onto the CPU, or explain in one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint found at '{path}'")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, not a torch file ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}' (truncated or not a "
                              f"checkpoint?): {reason[:200]}")
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise CheckpointError(f"'{path}' is not a checkpoint of this toolkit (no state_dict)")
    return ckpt


def run_dir_of_checkpoint(path):
    """RUN for RUN/models/checkpoint.pth.tar, if it looks like one of our runs."""
    models = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(models)
    if os.path.basename(models) == 'models' and os.path.isfile(os.path.join(run, 'summary.json')):
        return run
    return None


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))
