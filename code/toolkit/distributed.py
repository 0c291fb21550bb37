"""Data-parallel training over several processes: torchrun + DistributedDataParallel.

    torchrun --standalone --nproc_per_node 4 code/main.py DIR -b 256 ...   # one machine

What a student can count on (docs/training.md):
- `-b` is the GLOBAL batch: each of the N processes takes b / N images of every global
  batch, and DDP averages the gradients, so --lr and the schedule mean what they mean
  on one device.
- The training order and every image's augmentation depend only on (seed, epoch):
  the same global batches on 1, 2 or 8 processes and with any -j (data_order.py), so a
  resumed run replays exactly what an uninterrupted one does.
- Validation sees every image exactly once (each process a contiguous share, no
  padding), and the figures are sums reduced over the processes. Before it, BatchNorm's
  running statistics are averaged over the processes, so the model validated is the
  model saved: `-e` of a checkpoint on one process gives the run's figure.
- Rank 0 alone prints, writes TensorBoard events, checkpoints and summary.json.
A plain `python main.py` is a world of one process: the same code, no process group.
torchrun with one process starts a group of one and trains through DDP all the same, so
one GPU runs the NCCL path (make gpu-check) and one CPU the gloo path.
"""
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from utils import UsageError, one_line


@dataclass
class World:
    rank: int = 0         # this process, 0 .. size - 1
    size: int = 1         # how many processes train together
    backend: str = None   # 'nccl' or 'gloo'; None for one process
    device: torch.device = torch.device('cpu')  # where collectives' tensors live


WORLD = World()  # this process's; set by start()


def world():
    """This process's World (a function: start() replaces the object)."""
    return WORLD


def is_main():
    return WORLD.rank == 0


def launched_by_torchrun():
    """torchrun sets these in every process it starts, one process included."""
    return 'WORLD_SIZE' in os.environ and 'LOCAL_RANK' in os.environ


def launch_rank():
    """The rank torchrun gave this process (0 without torchrun), known before start()."""
    return int(os.environ.get('RANK', '0')) if launched_by_torchrun() else 0


def launch_size():
    """How many processes torchrun started (1 without torchrun), known before start()."""
    return int(os.environ.get('WORLD_SIZE', '1')) if launched_by_torchrun() else 1


def check_launch(device_flag, backend_flag, sync_bn):
    """The checks every process makes alike, before any process group exists (so that
    bad flags stop all of them with the same line, and none waits for the others)."""
    size = int(os.environ['WORLD_SIZE'])
    on_gpu = device_flag.startswith('cuda') or (device_flag == 'auto' and
                                               torch.cuda.is_available())
    if device_flag == 'mps':
        raise UsageError("torchrun: DistributedDataParallel does not run on Apple MPS; "
                         "train with one process (python main.py)")
    backend = backend_flag if backend_flag != 'auto' else ('nccl' if on_gpu else 'gloo')
    if backend == 'nccl' and not on_gpu:
        raise UsageError(f"--dist-backend nccl needs CUDA GPUs, but the run's device is "
                         f"{'cpu' if device_flag == 'auto' else device_flag}: use gloo (the "
                         f"default on the CPU)")
    if on_gpu:
        local = int(os.environ.get('LOCAL_WORLD_SIZE', size))
        found = torch.cuda.device_count()
        if local > found:
            raise UsageError(f"torchrun started {local} processes on this machine but it has "
                             f"{found} GPU(s): one GPU per process, use --nproc_per_node "
                             f"{found} or fewer")
    if sync_bn and not on_gpu:
        raise UsageError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on the "
                         "CPU")
    return backend, on_gpu


def start(device_flag, backend_flag, sync_bn, timeout_minutes=30):
    """Join the process group of a torchrun launch; returns this process's device (None
    when not launched by torchrun: main.py then picks the device as usual). Processes
    other than rank 0 print nothing (their stderr stays, for tracebacks)."""
    global WORLD
    if not launched_by_torchrun():
        if sync_bn:
            raise UsageError("--sync-bn is for several processes (torchrun): one process "
                             "already normalizes over its whole batch")
        return None
    backend, on_gpu = check_launch(device_flag, backend_flag, sync_bn)
    local_rank = int(os.environ['LOCAL_RANK'])
    device = torch.device('cuda', local_rank) if on_gpu else torch.device('cpu')
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(),
                  backend=backend, device=device)
    if WORLD.rank != 0:
        sys.stdout = open(os.devnull, 'w')
    return device


def stop():
    global WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    WORLD = World()


def check_global_batch(batch_size, size):
    """Refuse a global batch that does not divide over `size` processes. run_plan.check_args
    asks it first, before any process loads anything (size from the launch)."""
    if batch_size % size:
        raise UsageError(f"--batch-size {batch_size} is the global batch and must divide "
                         f"evenly over the {size} processes (try "
                         f"{batch_size // size * size or size})")


def per_process_batch(batch_size):
    """Each process's share of the global batch; refuses one that does not divide (a
    resumed run's batch, which comes from its checkpoint)."""
    check_global_batch(batch_size, WORLD.size)
    return batch_size // WORLD.size


################################################################################
# When a process of the launch fails
################################################################################
def lost_process(exc):
    """Whether `exc` is a collective that failed because another process of the launch is
    gone (killed, crashed, its machine lost). Gloo says so in a RuntimeError naming its
    transport ('Connection reset by peer'), NCCL in a DistBackendError."""
    if WORLD.size == 1 or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return isinstance(exc, dist.DistError) or 'gloo' in text or 'NCCL' in text


def lost_process_message(exc):
    """One line for a lost process, instead of the backend's traceback."""
    # gloo's first sentence, without its source location: "Read error [...]: Connection
    # reset by peer"
    reason = one_line(exc).split('] ', 1)[-1].split('. ')[0][:150]
    return (f"another process of the torchrun launch is gone ({reason}): it was killed or "
            f"it failed, and then its own output says why")


def ignore_sigterm():
    """torchrun sends SIGTERM to the processes left when one of them dies. One that has
    met the loss already is ending, writing its run's status and saying why in one line:
    the signal would only cut that short (main.py turns it into an interruption)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def let_rank0_say_it(seconds=10):
    """A process other than rank 0 that meets an error every process meets leaves the
    saying to rank 0 (one line, not one per process), and waits a moment before it exits:
    torchrun stops every process as soon as one exits with an error, and would otherwise
    stop rank 0 before it has said why. torchrun's SIGTERM ends the wait quietly."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(seconds)


def wrap(model):
    """The model as this process trains it: DistributedDataParallel over the world
    (gradients averaged in backward), or the model itself without a process group."""
    if WORLD.backend is None:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [WORLD.device.index] if WORLD.device.type == 'cuda' else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    """The model inside a DistributedDataParallel (what checkpoints and attacks use)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def reduce_sums(values):
    """The element-wise sums of `values` (floats) over all processes."""
    if WORLD.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=WORLD.device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_processes(value):
    return reduce_sums([value])[0] / WORLD.size


def rank0_first(fn):
    """fn() in rank 0, then in the other processes (say, building a file they all read)."""
    if WORLD.size == 1:
        return fn()
    if is_main():
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()


def average_batchnorm_statistics(model):
    """Replace every BatchNorm's running mean and variance by their average over the
    processes. Without --sync-bn each process normalises only its share of every batch,
    so after training their statistics differ; validated and saved as they are, the
    accuracy a run reports (each process on its share of the images) would not be that
    of the model rank 0 saves. Averaged, every process holds the saved model (timm does
    the same before each validation: --dist-bn reduce)."""
    if WORLD.size == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                module.track_running_stats and module.running_mean is not None:
            for stat in (module.running_mean, module.running_var):
                dist.all_reduce(stat)
                stat.div_(WORLD.size)


def reduce_meters(meters):
    """Make AverageMeters hold the figures of all processes (their sums and counts)."""
    sums = reduce_sums([x for m in meters for x in (m.sum, m.count)])
    for k, m in enumerate(meters):
        m.sum, m.count = sums[2 * k], sums[2 * k + 1]
        m.avg = m.sum / m.count if m.count else 0.0


class NoWriter(object):
    """What processes other than rank 0 get instead of a SummaryWriter: it writes nothing."""

    log_dir = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
