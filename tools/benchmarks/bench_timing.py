"""Timing and measuring helpers the benchmarks share: timers, saved bytes, the machine.

Times are taken in turns (interleaved_times) so that a busy machine slows every variant
alike; what autograd keeps for backward is counted per storage (SavedForBackwardMeter);
cpu_name and machine say what a figure was measured on.
"""
import os
import platform
import time
from statistics import median


def sync(device):
    """Wait for the device's queued work: GPU calls return before their kernels finish."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def interleaved_times(fns, device, repeats):
    """{name: [seconds of each call]} for the functions in `fns` (a dict name -> fn).
    After one warm-up call each (allocator, kernels, cuDNN autotuning) the variants
    take turns call by call, so a busy machine slows each alike. Callers report the
    median, or the minimum where only other work on the machine could add time."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times, num, den):
    """Median over repetitions of times[num] / times[den], taken pairwise: each pair
    ran back to back, under the same load."""
    return median(a / b for a, b in zip(times[num], times[den]))


class SavedForBackwardMeter(object):
    """Bytes of the tensors that autograd holds for backward, within a `with` block:
    `live_bytes` now and `peak_bytes` the most at any time.

    Every tensor an op saves goes through a saved_tensors_hooks pack hook, which
    wraps it in a small holder; the bytes are counted per storage (keyed by its
    data_ptr), each distinct storage once with its full size, so a tensor saved by
    two ops (a ReLU output that is also the next conv's input) or a view of it is
    not counted twice. A storage stops counting when autograd has dropped all its
    holders (graph freed). Parameters saved by the ops count, on both sides of a
    comparison alike. Works on any device; on CUDA the allocator's peak includes
    more (workspaces, outputs, gradients)."""

    def __enter__(self):
        import torch
        self.live_bytes, self.peak_bytes, self._storages = 0, 0, {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack,
                                                               lambda holder: holder.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        holders, nbytes = self._storages.get(key, (0, storage.nbytes()))
        if holders == 0:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._storages[key] = (holders + 1, nbytes)
        return _SavedHolder(tensor, key, self)

    def _dropped(self, key):
        """Autograd dropped a holder of storage `key`."""
        holders, nbytes = self._storages[key]
        if holders == 1:
            del self._storages[key]
            self.live_bytes -= nbytes
        else:
            self._storages[key] = (holders - 1, nbytes)


class _SavedHolder(object):
    """A saved tensor as autograd keeps it; tells the meter when it is dropped."""

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._dropped(self.key)


def saved_bytes(fn):
    """Peak bytes autograd holds for backward while fn() builds its graph."""
    with SavedForBackwardMeter() as meter:
        fn()
    return meter.peak_bytes


def cpu_name():
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """What the figures were measured on: the GPU's name, or the CPU's and its cores."""
    import torch
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"
