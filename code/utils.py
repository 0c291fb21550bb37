"""Helpers of the driver: errors, meters, accuracy, the learning-rate schedule, devices,
peak memory. The run folder's files are written by run_folder.py."""
import datetime
import math
import resource
import sys

import torch


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
def predict_with_flip(model, input):
    """(logits of the images, logits averaged with those of their mirror images): the
    handout's test-time augmentation, a minor performance boost."""
    logits = model(input).float()  # float32 under autocast too (no-op in fp32)
    return logits, 0.5 * (logits + model(torch.flip(input, (3,))).float())


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
            device = f'cuda:{gpu or 0}'
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
        count = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < count:
            raise UsageError(f"--device {device} (or --gpu): this machine has {count} CUDA "
                             f"device(s), numbered 0 to {count - 1}")
        # the current device too: the pin-memory thread, cuDNN's handles and the
        # capability checks otherwise look at GPU 0
        dev = torch.device('cuda', 0 if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
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


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(max(0, seconds))))


def one_line(exc):
    """The message of an exception on one line, also when a DataLoader worker
    re-raised it wrapped in its own traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else type(exc).__name__
    prefix = type(exc).__name__ + ': '
    return line.split(prefix, 1)[1] if prefix in line else line
