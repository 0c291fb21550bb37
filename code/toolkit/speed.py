"""The speed settings of a run (docs/training.md): --amp, --channels-last, --compile,
--data-cache. Each is on, off or auto (None); auto resolves to what was measured fastest on
the device (docs/benchmarks.md), and the start line says which and why."""
import contextlib
import os
import sys

import torch

from toolkit import distributed
from utils import one_line


def cpu_has_amx():
    """True where the CPU has AMX tiles (Intel Sapphire Rapids and later): oneDNN runs
    bf16 convolutions and matrix products on them several times faster than fp32. A
    private torch.cpu helper; a torch without it is taken to have none."""
    return getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()


def cpu_has_bf16():
    """True where the CPU computes bf16 in hardware (AMX or AVX512-BF16): without it
    oneDNN emulates bf16 and autocast is much slower than fp32."""
    return cpu_has_amx() or getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()


# bf16 autocast on a CPU with AMX tiles, per --arch, as a training step measured it
# (docs/benchmarks.md, "CPUs with AMX tiles"): oneDNN's bf16 kernels win big on the
# default CNN's 3 x 3 convolutions and lose on SimpleNet's large ones. resnet18 has
# resnet10's layers. A model not named here (your own) stays in fp32 until measured.
AMX_BF16 = {
    'resnet10': (True, "bf16 on this CPU's AMX tiles: 6.6x fp32 for this model"),
    'resnet18': (True, "bf16 on this CPU's AMX tiles: resnet10's layers, 6.6x fp32 there"),
    'simplenet': (False, 'bf16 on AMX measured 1.9x slower than fp32 for this model'),
    'simplevit': (False, 'bf16 on AMX measured no faster than fp32 for this model'),
}


def cpu_amp_setting(arch):
    """(on, why) of the CPU's auto --amp for the model `arch`."""
    if not cpu_has_amx():
        # with AVX512-BF16 alone the measurements disagree between CPUs (docs/benchmarks.md,
        # "CPU training step"): fp32, never wrong, stays the default there
        return (False, 'bf16 without AMX tiles: slower than fp32 on one CPU measured, '
                       '1.4-2.1x faster on another; ask with --amp' if cpu_has_bf16() else
                'this CPU computes bf16 in software, slower than fp32')
    return AMX_BF16.get(arch, (False, f'bf16 not measured for {arch} on AMX; ask with --amp'))


def auto_speed_settings(device, arch):
    """{flag: (value, why)}: the defaults measured best on each kind of device, for the
    model `arch` (docs/benchmarks.md; the reasons are printed at start)."""
    if device.type == 'cuda':
        return {'amp': (True, 'tensor cores'), 'channels_last': (True, 'NHWC convolutions'),
                'compile': (False, 'compiling costs minutes at start; ask with --compile'),
                'data_cache': (True, 'augmentation on the GPU')}
    if device.type == 'mps':
        return {'amp': (False, 'not measured on MPS'),
                'channels_last': (False, 'not measured on MPS'),
                'compile': (False, 'not measured on MPS'),
                'data_cache': (True, 'the fused warp frees the CPU cores')}
    # CPU: channels-last was faster for every model, with and without AMX
    return {'amp': cpu_amp_setting(arch),
            'channels_last': (True, 'faster on a CPU'),
            'compile': (False, 'compiling costs minutes at start; ask with --compile'),
            'data_cache': (True, 'the workers share the cores with training')}


def amp_dtype_for(device):
    """bf16 where the device computes it natively (no loss scaling needed), else fp16
    (+ GradScaler). On CUDA that is compute capability 8.0 (Ampere) and later, asked of
    the run's own GPU: torch.cuda.is_bf16_supported() also counts emulation, and before
    8.0 (a T4, Colab's GPU) cuDNN has no bf16 convolutions, while fp16 runs on its tensor
    cores."""
    if device.type == 'cuda':
        return 'bfloat16' if torch.cuda.get_device_capability(device) >= (8, 0) else 'float16'
    if device.type == 'mps':
        return 'float16'
    return 'bfloat16'


SPEED_SETTINGS = ('amp', 'channels_last', 'compile', 'data_cache')


def speed_line(plan, device):
    """The start line: each speed setting as resolved, and why where it was decided for
    the run (its source in the plan: 'auto: why', or 'fell back: why')."""
    parts = []
    for key in SPEED_SETTINGS:
        value, source = getattr(plan, key), plan.sources.get(key, 'default')
        text = f"{key.replace('_', '-')} {'on' if value else 'off'}"
        if key == 'amp' and value:
            text = f"amp {plan.amp_dtype}" + (' + GradScaler' if plan.amp_dtype == 'float16'
                                              else '')
            if device.type == 'cpu' and not cpu_has_bf16():
                text += ' (no bf16 hardware on this CPU: expect it slower than fp32)'
        if source.startswith('auto: '):
            text += f' ({source})'
        elif source.startswith('fell back: '):
            text += f" ({source[len('fell back: '):]})"
        parts.append(text)
    return '=> speed: ' + ' | '.join(parts)


def autocast(args, device):
    """The forward passes' context: torch.autocast in args.amp_dtype, or nothing (fp32
    then runs exactly the code it ran before these flags)."""
    if not args.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))


def gradient_autocast(args, device):
    """The context of the passes that take gradients w.r.t. the images (PGD, saliency,
    the adversarial batches of --adv-train): autocast in bf16, whose range is float32's,
    but float32 under fp16 amp, where the input gradients of an unscaled loss underflow
    to exactly 0 (the training step's GradScaler does not reach these passes) and the
    attack weakens. They are a small share of the time of a training step."""
    if args.amp_dtype == 'float16':
        return contextlib.nullcontext()
    return autocast(args, device)


def memory_format(args):
    return torch.channels_last if args.channels_last else \
        torch.contiguous_format


def compile_blocker(device):
    """Why torch.compile cannot work here (None: try it)."""
    try:
        import torch._dynamo
        if not torch._dynamo.is_dynamo_supported():
            return f'torch.compile is not supported on Python {sys.version.split()[0]}'
    except Exception as exc:  # an incomplete torch install
        return f'torch.compile is unavailable ({type(exc).__name__})'
    if device.type == 'cpu':
        import shutil
        cxx = os.environ.get('CXX', 'g++')
        if shutil.which(cxx) is None and shutil.which('clang++') is None:
            return f'no C++ compiler ({cxx}) for its CPU code'
    if device.type == 'mps':
        return 'torch.compile on MPS is experimental and untested with this toolkit'
    return None


class CompiledOrEager(object):
    """The model's forward, compiled; if compiling fails (at the first call: torch.compile
    is lazy), one line says so and the eager model is used from then on. An error that
    the eager model raises too is the model's own, and keeps its traceback."""

    def __init__(self, model, device):
        self.model, self.forward = model, model
        reason = compile_blocker(device)
        if reason is not None:
            print(f'note: --compile: {reason}; training runs eagerly')
        else:
            self.forward = torch.compile(model)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, input):
        if self.forward is self.model:
            return self.model(input)
        try:
            return self.forward(input)
        except Exception as exc:
            print(f'note: --compile failed ({type(exc).__name__}: '
                  f'{one_line(exc)[:160]}); training runs eagerly', flush=True)
            self.forward = self.model
            return self.model(input)


def eager(model):
    """The nn.Module behind a CompiledOrEager and a DistributedDataParallel: attacks walk
    its modules (and must not trigger DDP's gradient averaging), clipping its parameters."""
    model = model.model if isinstance(model, CompiledOrEager) else model
    return distributed.unwrap(model)


def forward_fn(model, args, device):
    """What train_one_epoch and validate call: the compiled model (--compile) or the model.
    Checkpoints always save `model` itself: no _orig_mod. prefixes, -e/-a load it eagerly."""
    return CompiledOrEager(model, device) if args.compile else model
