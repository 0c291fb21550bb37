"""Benchmarks: `python code/benchmark.py WHICH`, WHICH one of conv, attention, attack,
models, recipe, pipeline, train, step, ddp.

conv, attention and attack time our code against a reference in the same process,
with interleaved repetitions, and print ratios (ratios survive a noisy machine;
absolute times do not). models and recipe train with main.py and print validation
accuracy: recipe over data sets (the demo textures and real digit scans), models
and training configurations. Figures are recorded in BENCHMARKS.md.
"""
import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from statistics import mean, median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sync(device):
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
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _median_ratio(times, num, den):
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


def _conv_layers_with_inputs(model, images):
    """[(name, conv module, copy of its input)] for every conv of model, from one
    forward pass over images (the inputs keep their real shape, memory layout and
    requires_grad: the first conv needs no gradient for the images)."""
    import torch
    records, hooks = [], []
    for name, module in model.named_modules():
        if hasattr(module, 'kernel_size') and hasattr(module, 'weight') \
                and module.weight is not None and module.weight.dim() == 4:
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, name=name: records.append(
                    (name, m, inp[0].detach().clone().requires_grad_(inp[0].requires_grad)))))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return records


def _conv_step(nets, images, labels, device, repeats):
    """(a) a full training step of each net: ({name: [seconds]}, {name: saved bytes}).
    BatchNorm statistics get updated: that is harmless here."""
    import torch.nn.functional as F

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
        return run

    saved = {k: saved_bytes(lambda m=m: F.cross_entropy(m(images), labels))
             for k, m in nets.items()}
    return interleaved_times({k: step(m) for k, m in nets.items()}, device, repeats), saved


def _conv_layer_rows(nets, images, device, repeats):
    """(b) every conv layer alone, at the input it gets in its own network:
    [(name, shape, native ms, custom ms, time ratio, saved-bytes ratio)]."""
    import torch

    def fwd_bwd(conv, x):
        def run():   # gradients w.r.t. input and weight, as in the network
            out = conv(x)
            wrt = [x, conv.weight] if x.requires_grad else [conv.weight]
            torch.autograd.grad(out, wrt, torch.ones_like(out))
        return run

    rows = []
    for (name, conv_n, x_n), (_, conv_c, x_c) in zip(
            _conv_layers_with_inputs(nets['native'], images),
            _conv_layers_with_inputs(nets['custom'], images)):
        pair = {'native': (conv_n, x_n), 'custom': (conv_c, x_c)}
        saved = {k: saved_bytes(lambda c=c, x=x: c(x)) for k, (c, x) in pair.items()}
        times = interleaved_times({k: fwd_bwd(c, x) for k, (c, x) in pair.items()},
                                  device, repeats)
        shape = (f"{conv_n.in_channels}->{conv_n.out_channels} k{conv_n.kernel_size[0]} "
                 f"s{conv_n.stride[0]} @{x_n.shape[2]}x{x_n.shape[3]}")
        rows.append((name, shape, median(times['native']) * 1e3, median(times['custom']) * 1e3,
                     _median_ratio(times, 'custom', 'native'), saved['custom'] / saved['native']))
    return rows


def bench_conv(args):
    """CustomConv2d vs nn.Conv2d in the default CNN of student_code: (a) a full
    training step (forward + backward, same weights, same batch), (b) each conv
    layer alone (forward + backward at its real input shape). Prints medians of
    interleaved repetitions, time ratios and saved-for-backward byte ratios."""
    import torch
    import torch.nn as nn
    import student_code
    device, batch = torch.device(args.device), args.batch_size
    net_cls = student_code.default_cnn_model
    torch.manual_seed(0)
    nets = {'native': net_cls(conv_op=nn.Conv2d).to(device).train(),
            'custom': net_cls(conv_op=student_code.CustomConv2d).to(device).train()}
    nets['custom'].load_state_dict(nets['native'].state_dict())       # same weights
    images = torch.randn(batch, 3, 128, 128, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    print(f"conv benchmark: {net_cls.__name__}, batch {batch}x3x128x128, device {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repetitions")
    times, saved = _conv_step(nets, images, labels, device, args.repeats)
    rows = _conv_layer_rows(nets, images, device, args.repeats)

    print(f"\n(b) per conv layer, forward + backward, median ms")
    print(f"{'layer':<24}{'shape':<26}{'native':>9}{'custom':>9}{'time x':>8}{'saved x':>9}")
    for name, shape, t_n, t_c, ratio, s_ratio in rows:
        print(f"{name:<24}{shape:<26}{t_n:9.1f}{t_c:9.1f}{ratio:8.2f}{s_ratio:9.2f}")
    print(f"\n(a) full training step (forward + backward), median of {args.repeats}")
    print(f"  native nn.Conv2d : {median(times['native']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['native'] / 2**20:8.1f} MiB")
    print(f"  CustomConv2d     : {median(times['custom']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['custom'] / 2**20:8.1f} MiB")
    print("  (saved bytes: peak of the distinct storages autograd holds for backward)")
    step_ratio = _median_ratio(times, 'custom', 'native')
    saved_ratio = saved['custom'] / saved['native']
    print(f"\n{'target':<34}{'measured':>10}  result")
    print(f"{'step time custom/native <= 1.5x':<34}{step_ratio:9.2f}x  "
          f"{'PASS' if step_ratio <= 1.5 else 'FAIL'}")
    print(f"{'saved bytes custom/native <= 1.0x':<34}{saved_ratio:9.2f}x  "
          f"{'PASS' if saved_ratio <= 1.0 else 'FAIL'}")


# the default ViT's attention shapes: batch 64, 8x8 tokens, dim 192, 4 heads, windows 4x4
ATTN_BATCH, ATTN_GRID, ATTN_DIM, ATTN_HEADS, ATTN_WINDOW = 64, 8, 192, 4, 4


def _best_ms(times):
    """Best milliseconds per variant: other work on the machine can only add time."""
    return {name: min(t) * 1e3 for name, t in times.items()}


def bench_attention_time(args, device):
    """Attention module forward+backward: default path vs explicit vs fused kernel,
    globally over 8x8 tokens and in 4x4 windows (target: default within 1.1x of fused)."""
    import torch
    from custom_blocks import window_partition
    from student_code import Attention
    B, win = ATTN_BATCH, ATTN_WINDOW
    x = torch.randn(B, ATTN_GRID, ATTN_GRID, ATTN_DIM, device=device, requires_grad=True)
    cases = {'global 8x8': x,
             f'window {win}x{win}': window_partition(x.detach(), win)[0].requires_grad_()}
    attn = Attention(ATTN_DIM, ATTN_HEADS).to(device)
    print(f"\n[attention time] Attention(dim={ATTN_DIM}, heads={ATTN_HEADS}) forward+backward, "
          f"batch {B}; default path = {'fused' if attn.use_fused() else 'explicit'}")

    def step(tokens, fused):
        def run():
            attn.fused = fused
            attn(tokens).sum().backward()
        return run

    passed = True
    for case, tokens in cases.items():
        t = _best_ms(interleaved_times(
            {name: step(tokens, f) for name, f in
             {'default': None, 'explicit': False, 'fused': True}.items()},
            device, 10 * args.repeats))
        ratio = t['default'] / t['fused']
        passed &= ratio <= 1.1
        print(f"  {case:12s} explicit {t['explicit']:7.2f} ms   fused {t['fused']:7.2f} ms"
              f"   default {t['default']:7.2f} ms   explicit/fused {t['explicit'] / t['fused']:.2f}x"
              f"   default/fused {ratio:.2f}x")
    print(f"  target: default path within 1.1x of the fused kernel: {'PASS' if passed else 'FAIL'}")


def bench_attention_core(args, device):
    """The part that differs between the paths, without the qkv / proj linear layers
    around it: softmax(QK^T/sqrt(d))V written out vs F.scaled_dot_product_attention."""
    import torch
    import torch.nn.functional as F
    B, heads, win = ATTN_BATCH, ATTN_HEADS, ATTN_WINDOW
    hd = ATTN_DIM // heads
    print(f"  core softmax(QK^T/sqrt(d))V only, forward+backward:")
    for case, (b, n) in {'global 8x8': (B, 64), f'window {win}x{win}': (B * 4, 16)}.items():
        q, k, v = (torch.randn(b, heads, n, hd, device=device, requires_grad=True)
                   for _ in range(3))

        def explicit():
            ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1).matmul(v).sum().backward()

        def fused():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        t = _best_ms(interleaved_times({'explicit': explicit, 'fused': fused}, device,
                                       10 * args.repeats))
        print(f"  {case:12s} explicit {t['explicit']:7.2f} ms   fused {t['fused']:7.2f} ms"
              f"   explicit/fused {t['explicit'] / t['fused']:.2f}x")


def _attention_memory(attn, x, window_size, device):
    """(attention-matrix bytes, saved-for-backward bytes, CUDA peak bytes or None) of
    one forward of `attn` over the token grid x, globally or in windows."""
    import torch
    from custom_blocks import window_partition
    tokens = window_partition(x, window_size)[0] if window_size else x
    n = tokens.shape[1] * tokens.shape[2]                # tokens per attention
    matrix_bytes = tokens.shape[0] * attn.num_heads * n * n * x.element_size()
    saved = saved_bytes(lambda: attn(tokens))
    peak = None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        attn(tokens).sum().backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return matrix_bytes, saved, peak


def bench_attention_memory(args, device):
    """Global vs windowed attention memory, at the ViT's 8x8 tokens and at 16x16
    (patch size 8), where the N^2 attention matrix starts to dominate."""
    import torch
    from student_code import Attention
    B, win, MiB = ATTN_BATCH, ATTN_WINDOW, 2 ** 20
    attn = Attention(ATTN_DIM, ATTN_HEADS).to(device)
    print(f"\n[attention memory] batch {B}, dim {ATTN_DIM}, {ATTN_HEADS} heads, "
          f"window {win}x{win}, float32")
    for grid in (8, 16):
        x = torch.randn(B, grid, grid, ATTN_DIM, device=device)
        for fused in (False, True):
            attn.fused = fused
            for window_size in (0, win):
                mat, saved, peak = _attention_memory(attn, x, window_size, device)
                kind = f'window {win}x{win}' if window_size else 'global'
                cuda = f"   CUDA peak fwd+bwd {peak / MiB:7.1f} MiB" if peak is not None else ""
                print(f"  {grid}x{grid} tokens {kind:10s} {'fused   ' if fused else 'explicit'}"
                      f"  attention matrix {mat / MiB:6.1f} MiB   saved for backward "
                      f"{saved / MiB:6.1f} MiB{cuda}")


def bench_vit_step(args, device):
    """Throughput of one AdamW training step of the default ViT on 128x128 images,
    with the default attention path and with the explicit one."""
    import torch
    import torch.nn.functional as F
    from student_code import Attention, default_vit_model
    batch = 64
    images = torch.randn(batch, 3, 128, 128, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    model = default_vit_model(num_classes=100).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step(fused):
        def run():
            for m in model.modules():
                if isinstance(m, Attention):
                    m.fused = fused
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return run

    t = _best_ms(interleaved_times({'default': train_step(None), 'explicit': train_step(False)},
                                   device, args.repeats))
    print(f"\n[ViT training step] default_vit_model, batch {batch}, 128x128, AdamW")
    for name, ms in t.items():
        print(f"  {name:8s} attention: {batch / ms * 1e3:8.1f} images/s   ({ms:.0f} ms/step)")


def bench_attention(args):
    """The attention benchmarks in one process: time, core time, memory, ViT step."""
    import torch
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}")
    for bench in (bench_attention_time, bench_attention_core, bench_attention_memory,
                  bench_vit_step):
        bench(args, device)


def _attack_memory(model, x, criterion, device):
    """{kind: {steps: peak bytes}} of a 1-step and a 20-step attack: autograd's saved
    tensors on any device, and the CUDA allocator's peak on a GPU."""
    import torch
    import student_code
    peaks = {'autograd saved': {}}
    for steps in (1, 20):
        attacker = student_code.PGDAttack(criterion, num_steps=steps)
        if device.type == 'cuda':
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with SavedForBackwardMeter() as meter:
            attacker.perturb(model, x)
        peaks['autograd saved'][steps] = meter.peak_bytes
        if device.type == 'cuda':
            _sync(device)
            peaks.setdefault('CUDA allocator', {})[steps] = \
                torch.cuda.max_memory_allocated(device) - base
    return peaks


def bench_attack(args):
    """One PGD step vs one forward+backward of the same batch (target <= 1.1x),
    and peak memory of a 20-step vs a 1-step attack (target: equal)."""
    import torch
    import torch.nn as nn
    import student_code
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = student_code.default_cnn_model.__name__
    model = student_code.default_cnn_model().to(device).eval()  # attacks run in eval mode
    x = torch.randn(args.batch_size, 3, 128, 128, device=device)
    criterion = nn.CrossEntropyLoss()
    attack = student_code.PGDAttack(criterion)          # handout defaults
    with torch.no_grad():
        labels = student_code.least_confident_labels(model(x))

    def forward_backward():               # a plain training-style step, no optimizer
        model.zero_grad(set_to_none=True)
        criterion(model(x), labels).backward()

    lower, upper = student_code.feasible_box(x, attack.epsilon)

    def pgd_step():                       # what perturb() repeats num_steps times
        attack._step(model, x, lower, upper, labels)

    times = interleaved_times({'fwd+bwd': forward_backward, 'pgd step': pgd_step},
                              device, args.repeats)
    model.zero_grad(set_to_none=True)
    fb, step = median(times['fwd+bwd']), median(times['pgd step'])
    print("model {}, batch {} x 3 x 128 x 128 on {}, median of {} interleaved runs".format(
        name, args.batch_size, device, args.repeats))
    print("  forward+backward {:8.1f} ms".format(fb * 1e3))
    print("  one PGD step     {:8.1f} ms   ratio {:.2f}x  (target <= 1.1x)  {}".format(
        step * 1e3, step / fb, 'PASS' if step / fb <= 1.1 else 'FAIL'))
    for kind, peak in _attack_memory(model, x, criterion, device).items():
        ratio = peak[20] / max(peak[1], 1)
        print("  peak memory ({}): 1 step {:.1f} MiB, 20 steps {:.1f} MiB, ratio {:.3f}  "
              "(target 1.0)  {}".format(kind, peak[1] / 2**20, peak[20] / 2**20, ratio,
                                        'PASS' if ratio <= 1.01 else 'FAIL'))


def bench_models(args):
    """Accuracy at equal epochs on the demo set (issue: the default CNN must beat
    SimpleNet, and CustomConv2d must train like nn.Conv2d): three runs of main.py
    with the same data, seed, schedule and batch size."""
    import contextlib
    import main as driver
    from make_demo_data import make_demo_dataset
    data = args.data or os.path.join(REPO, 'data', 'demo')
    if not os.path.isfile(os.path.join(data, 'train.txt')):
        make_demo_dataset(data)
    logs = tempfile.mkdtemp(prefix='bench_models_')
    common = [data, '--num-classes', '10', '--epochs', str(args.epochs), '--warmup', '1',
              '-b', '32', '--lr', str(args.lr), '-j', '2', '--device', args.device,
              '--seed', '0', '--log-dir', logs, '-p', '1000']
    runs = [('SimpleNet, nn.Conv2d', ['--arch', 'simplenet']),
            ('default CNN, nn.Conv2d', []),
            ('default CNN, CustomConv2d', ['--use-custom-conv'])]
    print(f'models benchmark: demo set {data}, {args.epochs} epochs, lr {args.lr}, '
          f'batch 32, seed 0, device {args.device} (logs of main.py in {logs})')
    rows = []
    for label, extra in runs:
        with open(os.path.join(logs, 'console.log'), 'a') as log, \
                contextlib.redirect_stdout(log):
            summary = driver.main(common + extra)
        rows.append((label, summary))
    print(f"{'model':<28}{'arch':<11}{'params':>10}{'best val top-1':>16}"
          f"{'final val top-1':>17}{'images/s':>10}")
    for label, summary in rows:
        final = summary['epochs'][-1]
        speed = sum(e['images_per_s'] for e in summary['epochs']) / len(summary['epochs'])
        print(f"{label:<28}{summary['arch']:<11}{summary['num_params']:>10,}"
              f"{summary['best_acc1']:>16.2f}{final['val_top1']:>17.2f}{speed:>10.1f}")


# ---------------------------------------------------------------- recipe (issue 9)
# every cell trains one model on one set with one configuration and seed, by running
# main.py in a subprocess, as a user would; both sets have 10 classes
RECIPE_DATASETS = {'demo': 'make_demo_data.py', 'real': 'make_real_data.py'}
RECIPE_MODELS = {'simplenet': ('SimpleNet', ['--arch', 'simplenet']),
                 'cnn': ('default CNN', []),
                 'vit': ('ViT', ['--use-vit'])}
RECIPE_CONFIGS = {
    # 8 epochs at batch 64 with the handout's default lr (0.1; ViT: see VIT_FLAGS)
    '8ep': ['--epochs', '8', '--warmup', '1', '-b', '64', '-j', '2', '--device', 'cpu'],
    # the Makefile's `demo` target, less its --seed and --name (tests check they agree)
    'demo': ['--epochs', '4', '--warmup', '1', '-b', '32', '--lr', '0.05', '-j', '2',
             '--device', 'cpu'],
}
VIT_FLAGS = ['--lr', '0.01', '--wd', '0.05']       # the handout's ViT command
# --quick: 2 training and 1 validation image per class, one epoch of 2 batches, no
# workers: to see that every cell runs, not to measure anything
QUICK_DATA = {'demo': ['--train-per-class', '2', '--val-per-class', '1', '--size', '32'],
              'real': ['--max-train', '20', '--val-fraction', '0.006']}
QUICK_FLAGS = {'--epochs': '1', '--warmup': '0', '-b': '10', '-j': '0'}


class RecipeError(RuntimeError):
    """A data set or a run of main.py failed; the message is one line."""


def recipe_flags(model, config, seed, quick=False):
    """main.py's flags (after DIR) for one cell."""
    flags = list(RECIPE_CONFIGS[config])
    if model == 'vit' and config == '8ep':
        flags += VIT_FLAGS
    for name, value in (QUICK_FLAGS.items() if quick else ()):
        flags[flags.index(name) + 1] = value
    return flags + RECIPE_MODELS[model][1] + ['--num-classes', '10', '--seed', str(seed),
                                              '-p', '1000']


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else 'no output'


def build_recipe_data(name, out_dir, quick=False, extra=None):
    """Write data set `name` into out_dir with its generator script (`extra`: its flags)."""
    script = os.path.join(REPO, 'code', RECIPE_DATASETS[name])
    extra = QUICK_DATA[name] if quick else (extra or [])
    done = subprocess.run([sys.executable, script, out_dir] + extra,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RecipeError(f"{RECIPE_DATASETS[name]} failed: {_last_line(done.stderr)}")


def run_recipe_cell(data, flags, log_dir, processes=1):
    """Train with main.py DIR flags (under torchrun for several processes), logging into
    log_dir; returns its summary.json."""
    os.makedirs(log_dir)
    console = os.path.join(log_dir, 'console.log')
    launcher = [sys.executable]
    if processes > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone',
                     f'--nproc_per_node={processes}']
    with open(console, 'w') as log:
        done = subprocess.run(launcher + [os.path.join(REPO, 'code', 'main.py'), data,
                                          '--log-dir', log_dir] + flags,
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        with open(console) as log:
            raise RecipeError(f"main.py exited with {done.returncode}: {_last_line(log.read())}")
    (run,) = [d for d in os.listdir(log_dir) if os.path.isdir(os.path.join(log_dir, d))]
    with open(os.path.join(log_dir, run, 'summary.json')) as f:
        return json.load(f)


RECIPE_HEADER = ("| dataset | model | config | seed | best val top-1 | final val top-1 "
                 "| epochs | minutes |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")


def best_and_final(summary):
    """(best, final) validation top-1 of a run from its summary.json. main.py leaves
    best_acc1 at None when no epoch scored above 0 %."""
    top1 = [epoch['val_top1'] for epoch in summary['epochs']]
    best = summary['best_acc1']
    return (max(top1) if best is None else best), top1[-1]


def model_label(model, summary=None):
    """The model's name in the table; the default CNN's also names its architecture,
    which changes when student_code.default_cnn_model does."""
    label = RECIPE_MODELS[model][0]
    return f"{label} ({summary['arch']})" if model == 'cnn' and summary else label


def recipe_row(dataset, model, config, seed, summary):
    """The table's line for one finished run (summary: main.py's summary.json)."""
    best, final = best_and_final(summary)
    return (f"| {dataset} | {model_label(model, summary)} | {config} | {seed} "
            f"| {best:.2f} | {final:.2f} "
            f"| {len(summary['epochs'])} | {summary['wall_time_s'] / 60:.1f} |")


def recipe_summary(results):
    """Mean over seeds of every (dataset, model, config): markdown lines. results:
    {(dataset, model, config, seed): summary}."""
    cells = {}
    for (dataset, model, config, seed), summary in results.items():
        cells.setdefault((dataset, model, config), []).append((seed, summary))
    lines = ["| dataset | model | config | seeds | best val top-1, mean (min-max) "
             "| final val top-1, mean (min-max) |", "| --- | --- | --- | --- | ---: | ---: |"]
    for (dataset, model, config), runs in cells.items():
        best, final = zip(*(best_and_final(s) for _, s in runs))
        seeds = ' '.join(str(seed) for seed, _ in runs)
        lines.append(f"| {dataset} | {model_label(model, runs[0][1])} | {config} | {seeds} "
                     f"| {mean(best):.2f} ({min(best):.2f}-{max(best):.2f}) "
                     f"| {mean(final):.2f} ({min(final):.2f}-{max(final):.2f}) |")
    return lines


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


def cell_flags(args, model, workers):
    """The main.py flags a `train` or `ddp` cell shares: the schedule, -b, seed 0, 10
    classes, the model (and the ViT's own lr and weight decay)."""
    return (['--epochs', str(args.epochs), '--warmup', '1' if args.epochs > 1 else '0',
             '-b', str(args.batch_size), '--lr', str(args.lr), '-j', str(workers),
             '--device', args.device, '--num-classes', '10', '--seed', '0', '-p', '1000']
            + (VIT_FLAGS if model == 'vit' else []) + RECIPE_MODELS[model][1])


def bench_recipe(args):
    """dataset (demo, real) x model (SimpleNet, default CNN, ViT) x config (8 epochs at
    batch 64, the Makefile's demo command) x seed -> best and final val top-1."""
    import torch
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    seeds = list(dict.fromkeys(seeds))          # a seed twice would only repeat a run
    work = tempfile.mkdtemp(prefix='bench_recipe_')
    print(f"recipe: torch {torch.__version__}, CPU {cpu_name()} ({os.cpu_count()} cores), "
          f"main.py per cell{', QUICK (tiny sets, 1 epoch)' if args.quick else ''}; "
          f"data and logs in {work}\n", flush=True)
    for name in args.datasets:
        build_recipe_data(name, os.path.join(work, 'data', name), args.quick)
    print(RECIPE_HEADER, flush=True)
    results, failed = {}, 0
    for dataset, config, model, seed in itertools.product(args.datasets, args.configs,
                                                          args.models, seeds):
        key = (dataset, model, config, seed)
        try:
            results[key] = run_recipe_cell(os.path.join(work, 'data', dataset),
                                           recipe_flags(model, config, seed, args.quick),
                                           os.path.join(work, 'logs', '_'.join(map(str, key))))
            print(recipe_row(*key, results[key]), flush=True)
        except RecipeError as e:            # the other cells still run
            failed += 1
            print(f"| {dataset} | {model_label(model)} | {config} | {seed} | failed: {e} "
                  f"| | | |", flush=True)
    if len(seeds) > 1 and results:
        print('\n' + '\n'.join(recipe_summary(results)))
    if failed:
        raise RecipeError(f"{failed} of {failed + len(results)} runs failed (logs in {work})")


def bench_pipeline(args):
    """Input pipeline, images/s per core, side by side in one process: the per-image
    path (JPEG decode + get_train_transforms(), float32 out) against the cached path
    (fast_data.CachedDataset: the fused warp from the memory-mapped cache, uint8 out),
    each fetching --images images per call and collating them as a DataLoader worker
    does, on one thread (torch and OpenCV), calls interleaved, best call kept. Prints
    their ratio (target >= 5x); then the batched device path (fast_data.augment_on_device)
    on --device, and normalize_on_device, which follows the cached path on the device."""
    import cv2
    import torch
    from torch.utils.data import default_collate
    import fast_data
    from custom_dataloader import MiniPlacesLoader
    from make_demo_data import make_demo_dataset
    from student_code import get_train_transforms
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    device = torch.device(args.device)
    data = args.data or os.path.join(REPO, 'data', 'demo')
    if not os.path.isfile(os.path.join(data, 'train.txt')):
        make_demo_dataset(data)
    cache = fast_data.load_or_build_cache(data, 'train')
    supported, reason = fast_data.fused_path_supported(get_train_transforms())
    if not supported:
        print(f"get_train_transforms() has no fused path: {reason}")
        return None
    per_image = MiniPlacesLoader(data, 'train', get_train_transforms(), num_classes=None)
    cached = fast_data.CachedDataset(cache, get_train_transforms())
    n, total = args.images, len(cache)
    window = {'per-image': 0, 'cached': 0}

    def indices(path):                    # consecutive windows, wrapping around the split
        start = window[path]
        window[path] = (start + n) % total
        return [(start + k) % total for k in range(n)]

    fns = {'per-image': lambda: default_collate([per_image[i] for i in indices('per-image')]),
           'cached': lambda: default_collate(cached.__getitems__(indices('cached')))}
    print(f"pipeline benchmark: {data} train ({total} images), cache {cache.path}, "
          f"torch {torch.__version__}, OpenCV {cv2.__version__}, 1 thread, {n} images per "
          f"call, best of {args.repeats} interleaved calls")
    t = {k: min(v) for k, v in interleaved_times(fns, torch.device('cpu'), args.repeats).items()}
    rate = {k: n / sec for k, sec in t.items()}
    ratio = rate['cached'] / rate['per-image']
    print(f"  per-image path (decode + get_train_transforms, float32): "
          f"{rate['per-image']:8.0f} images/s per core")
    print(f"  cached path (memory-mapped cache, fused cv2 warp, uint8):  "
          f"{rate['cached']:8.0f} images/s per core")
    print(f"  ratio cached/per-image {ratio:.2f}x "
          f"(target >= 5x: {'PASS' if ratio >= 5 else 'FAIL'})")

    # the batched device path: the cache (its first images) on the device, whole batches
    batch = 256
    count = min(total, 8 * batch)
    images = torch.from_numpy(cache.images[:count].copy()).to(device)
    plan = cached.plan
    position = [0]

    def device_batch():
        idx = torch.arange(position[0], position[0] + batch, device=device) % count
        position[0] = (position[0] + batch) % count
        fast_data.augment_on_device(images.index_select(0, idx),
                                    fast_data.draw_params(plan, batch), plan)

    uint8_batch = default_collate(cached.__getitems__(list(range(batch))))
    uint8_batch = uint8_batch[0].to(device)
    mean, std = cached.normalization
    t = {k: min(v) for k, v in interleaved_times(
        {'device': device_batch,
         'normalize': lambda: fast_data.normalize_on_device(uint8_batch, mean, std)},
        device, args.repeats).items()}
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else '1 thread; on a CPU the cached path above is used')
    print(f"  batched device path on {device} ({where}), batch {batch}: "
          f"{batch / t['device']:8.0f} images/s")
    print(f"    (parameters drawn on the CPU; warp, colour and normalization on {device})")
    print(f"  normalize_on_device on {device}, the uint8 paths' last step: "
          f"{batch / t['normalize']:8.0f} images/s")
    return ratio


# ---------------------------------------------------------------- train (issue 10)
# main.py's speed settings, each on the per-image and on the cached path; the speed
# flags not named are pinned off, so a cell measures exactly what its name says
TRAIN_CONFIGS = {'fp32': ['--no-amp', '--no-channels-last', '--no-compile'],
                 'amp': ['--amp', '--no-channels-last', '--no-compile'],
                 'amp+cl': ['--amp', '--channels-last', '--no-compile'],
                 'cl': ['--no-amp', '--channels-last', '--no-compile'],
                 'compile': ['--no-amp', '--no-channels-last', '--compile']}
TRAIN_PATHS = {'per-image': ['--no-data-cache'], 'cached': ['--data-cache']}
TRAIN_TOLERANCE = 5.0   # points of val top-1: "equal within noise" on 200-image val sets
# --small: 400 training images per set (demo: 200 val, real: 360 val), for slow machines
SMALL_DATA = {'demo': ['--train-per-class', '40'], 'real': ['--max-train', '400']}


def train_speed(summary):
    """(images/s, peak MB) of a run: the mean over its epochs after the first (the first
    pays for compilation and warm caches), or the only epoch."""
    epochs = summary['epochs'][1:] or summary['epochs']
    return (mean(e['images_per_s'] for e in epochs),
            max(e['peak_memory_mb'] for e in summary['epochs']))


def train_checks(results):
    """PASS/FAIL lines where issue 10 names a target: the cached path reaches the
    per-image path's accuracy, and amp trains the default CNN within a few points of fp32
    (best val top-1, TRAIN_TOLERANCE points)."""
    lines = []
    for (dataset, model, path, config), summary in sorted(results.items()):
        best = best_and_final(summary)[0]
        other = results.get((dataset, model, 'per-image', config))
        if path == 'cached' and other is not None:
            diff = best - best_and_final(other)[0]
            lines.append(f"{dataset} {model_label(model)} {config}: cached - per-image = "
                         f"{diff:+.2f} points ({'PASS' if diff >= -TRAIN_TOLERANCE else 'FAIL'}"
                         f", target >= -{TRAIN_TOLERANCE:g})")
        fp32 = results.get((dataset, model, path, 'fp32'))
        if model == 'cnn' and config == 'amp' and fp32 is not None:
            diff = best - best_and_final(fp32)[0]
            # one-sided, like the cached check: amp scoring higher than fp32 is noise, not
            # a failure to train
            lines.append(f"{dataset} {model_label(model)} {path}: amp - fp32 = {diff:+.2f} "
                         f"points ({'PASS' if diff >= -TRAIN_TOLERANCE else 'FAIL'}, "
                         f"target >= -{TRAIN_TOLERANCE:g})")
    return lines


def bench_train(args):
    """dataset x model x speed setting x input path: main.py trains each cell for --epochs
    in a subprocess of its own (its own peak memory), same seed, data and schedule.
    Prints images/s, peak memory, best and final val top-1, then the PASS/FAIL lines."""
    import torch
    work = tempfile.mkdtemp(prefix='bench_train_')
    device = torch.device(args.device)
    if args.quick:  # tiny sets: every cell runs, nothing is measured
        args.epochs, args.batch_size = 1, 10
    print(f"train: torch {torch.__version__}, {machine(device)}, {args.epochs} epochs per cell, "
          f"batch {args.batch_size}, seed 0{', SMALL sets' if args.small else ''}; data and "
          f"logs in {work}\n", flush=True)
    for name in args.datasets:
        build_recipe_data(name, os.path.join(work, 'data', name), args.quick,
                          SMALL_DATA[name] if args.small else None)
    print("| dataset | model | path | setting | images/s | peak MB | best val top-1 "
          "| final val top-1 |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
          flush=True)
    results = {}
    for dataset, model, config, path in itertools.product(
            args.datasets, args.models, args.train_configs, args.paths):
        flags = cell_flags(args, model, workers=2) + TRAIN_CONFIGS[config] + TRAIN_PATHS[path]
        key = (dataset, model, path, config)
        try:
            summary = run_recipe_cell(os.path.join(work, 'data', dataset), flags,
                                      os.path.join(work, 'logs', '_'.join(key)))
        except RecipeError as e:
            print(f"| {dataset} | {model_label(model)} | {path} | {config} | failed: {e} "
                  f"| | | |", flush=True)
            continue
        results[key] = summary
        speed, peak = train_speed(summary)
        best, final = best_and_final(summary)
        print(f"| {dataset} | {model_label(model, summary)} | {path} | {config} | {speed:.1f} "
              f"| {peak:.0f} | {best:.2f} | {final:.2f} |", flush=True)
    print('\n' + '\n'.join(train_checks(results)))
    return results


def bench_step(args):
    """One training step (forward, loss, backward, SGD) of each model at 128 x 128, in fp32,
    channels-last, amp (bf16 on a CPU or a bf16 GPU, else fp16) and amp + channels-last,
    interleaved in one process; median ms and the speed-up over fp32. Behind main.py's
    auto defaults (auto_speed_settings): the data pipeline is left out."""
    import torch
    import torch.nn as nn
    import student_code as sc
    from speed import amp_dtype_for
    device = torch.device(args.device)
    dtype = getattr(torch, amp_dtype_for(device))
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 128, 128, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    builders = {'simplenet': lambda: sc.cnn_models['simplenet'](num_classes=100),
                'cnn': lambda: sc.default_cnn_model(num_classes=100),
                'vit': lambda: sc.default_vit_model(num_classes=100)}
    print(f"step: torch {torch.__version__}, {device}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, amp = {dtype}, median of {args.repeats} "
          f"interleaved steps (ms)")
    for name in args.models:
        fns = {}
        for amp, cl in itertools.product((False, True), (False, True)):
            fmt = torch.channels_last if cl else torch.contiguous_format
            model = builders[name]().to(device).to(memory_format=fmt)
            opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
            xi = x.contiguous(memory_format=fmt)

            def step(model=model, opt=opt, xi=xi, amp=amp):
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = nn.functional.cross_entropy(model(xi), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            fns[('amp' if amp else 'fp32') + ('+cl' if cl else '')] = step
        t = {k: median(v) for k, v in interleaved_times(fns, device, args.repeats).items()}
        print(f"  {name:<10}" + '  '.join(f"{k} {v * 1000:7.0f} ({t['fp32'] / v:.2f}x)"
                                          for k, v in t.items()), flush=True)


BN_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


def max_weight_difference(run_a, run_b):
    """The largest absolute difference between the final learned weights of two runs.
    BatchNorm's running statistics are left out: without --sync-bn each process keeps
    those of its own share of the batch, so they differ by design."""
    import torch
    a, b = (torch.load(os.path.join(run, 'models', 'checkpoint.pth.tar'), map_location='cpu',
                       weights_only=True)['state_dict'] for run in (run_a, run_b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if not k.endswith(BN_STATISTICS))


def bench_ddp(args):
    """1 process against N (torchrun + DDP; gloo on the CPU, NCCL on GPUs) at the same
    global batch, seed and data: images/s, best and final val top-1, and how far the final
    weights are from the 1-process run's. On a CPU the processes share its cores (torchrun
    gives each one thread; the single process uses torch's default threads)."""
    import torch
    device = torch.device(args.device)
    work = tempfile.mkdtemp(prefix='bench_ddp_')
    where = (f"{torch.cuda.device_count()} x {machine(device)}" if device.type == 'cuda'
             else machine(device))
    if args.quick:
        args.epochs, args.batch_size = 1, 10
    print(f"ddp: torch {torch.__version__}, {where}, {args.epochs} epochs of {args.model} at "
          f"global batch {args.batch_size}, seed 0; data and logs in {work}\n", flush=True)
    build_recipe_data('real', os.path.join(work, 'data'), args.quick,
                      SMALL_DATA['real'] if args.small else None)
    print("| processes | backend | images/s | speed-up | best val top-1 | final val top-1 "
          "| max weight difference from 1 process |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    runs = {}
    for n in args.processes:
        flags = cell_flags(args, args.model, workers=1)
        log_dir = os.path.join(work, 'logs', f'{n}')
        try:
            summary = run_recipe_cell(os.path.join(work, 'data'), flags, log_dir, processes=n)
        except RecipeError as e:
            print(f"| {n} | | failed: {e} | | | | |", flush=True)
            continue
        runs[n] = summary
        speed = train_speed(summary)[0]
        best, final = best_and_final(summary)
        base = runs.get(1)
        ratio = f"{speed / train_speed(base)[0]:.2f}x" if base else ''
        diff = f"{max_weight_difference(base['run_dir'], summary['run_dir']):.2e}" \
            if base and n > 1 else ''
        print(f"| {n} | {summary.get('dist_backend') or '-'} | {speed:.1f} | {ratio} "
              f"| {best:.2f} | {final:.2f} | {diff} |", flush=True)
    print("\nThe weight difference leaves out BatchNorm's running statistics. A model with "
          "BatchNorm differs by more than float rounding: each process normalises its share "
          "of the batch with that share's statistics (--sync-bn, CUDA only, makes them "
          "global). SimpleNet has no BatchNorm: its difference is rounding.", flush=True)
    return runs


BENCHMARKS = {'conv': bench_conv, 'attention': bench_attention, 'attack': bench_attack,
              'models': bench_models, 'recipe': bench_recipe, 'pipeline': bench_pipeline,
              'train': bench_train, 'step': bench_step, 'ddp': bench_ddp}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('which', choices=sorted(BENCHMARKS))
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repetitions')
    parser.add_argument('--batch-size', type=int, default=64, help='batch size (conv)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    parser.add_argument('--epochs', type=int, default=4, help='training epochs (models)')
    parser.add_argument('--lr', type=float, default=0.02, help='learning rate (models)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help='training seeds (recipe; default 0 1, with --quick 0)')
    parser.add_argument('--datasets', nargs='+', choices=list(RECIPE_DATASETS),
                        default=list(RECIPE_DATASETS), help='data sets (recipe)')
    parser.add_argument('--models', nargs='+', choices=list(RECIPE_MODELS),
                        default=list(RECIPE_MODELS), help='models (recipe)')
    parser.add_argument('--configs', nargs='+', choices=list(RECIPE_CONFIGS),
                        default=list(RECIPE_CONFIGS), help='training configurations (recipe)')
    parser.add_argument('--train-configs', nargs='+', choices=list(TRAIN_CONFIGS),
                        default=['fp32', 'amp', 'amp+cl', 'compile'],
                        help='speed settings (train)')
    parser.add_argument('--paths', nargs='+', choices=list(TRAIN_PATHS),
                        default=list(TRAIN_PATHS), help='input paths (train)')
    parser.add_argument('--small', action='store_true',
                        help='train: 400 training images per data set (slow machines)')
    parser.add_argument('--quick', action='store_true',
                        help='recipe on tiny sets for 1 epoch: checks that every cell runs')
    parser.add_argument('--processes', type=int, nargs='+', default=[1, 2],
                        help='process counts to compare (ddp; 1 first: the reference)')
    parser.add_argument('--model', choices=list(RECIPE_MODELS), default='cnn',
                        help='the model (ddp)')
    parser.add_argument('--data', default=None,
                        help='data folder (models, pipeline; default data/demo)')
    parser.add_argument('--images', type=int, default=256,
                        help='images per timed call of each path (pipeline)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        BENCHMARKS[args.which](args)
    except RecipeError as e:
        sys.exit(f"benchmark.py {args.which}: error: {e}")


if __name__ == '__main__':
    main()
