"""Side-by-side benchmarks: `python code/benchmark.py {conv,attention,attack,models,pipeline}`.

Each benchmark times our code against a reference in the same process, with
interleaved repetitions, and prints ratios (ratios survive a noisy machine;
absolute times do not). Figures are recorded in BENCHMARKS.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def _timed(fn, device):
    """Seconds of one call of fn (synchronising the device around it)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _saved_bytes(fn):
    """Bytes the autograd graph built by fn() keeps for backward. Counted with
    torch.autograd.graph.saved_tensors_hooks: every tensor an op saves goes
    through the pack hook; each distinct storage (by its data_ptr) is counted
    once, with its full size, so a tensor saved by two ops (e.g. a ReLU output
    that is also the next conv's input) or a view of it is not counted twice.
    Parameters saved by the ops are included, on both sides alike."""
    import torch
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


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


def bench_conv(args):
    """CustomConv2d vs nn.Conv2d in the default CNN of student_code: (a) a full
    training step (forward + backward, same weights, same batch), (b) each conv
    layer alone (forward + backward at its real input shape). Prints medians of
    interleaved repetitions, time ratios and saved-for-backward byte ratios."""
    import torch
    import torch.nn as nn
    import student_code
    device = torch.device(args.device)
    batch = args.batch_size
    net_cls = student_code.default_cnn_model
    torch.manual_seed(0)
    native = net_cls(conv_op=nn.Conv2d).to(device).train()
    custom = net_cls(conv_op=student_code.CustomConv2d).to(device).train()
    custom.load_state_dict(native.state_dict())       # same weights
    images = torch.randn(batch, 3, 128, 128, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    print(f"conv benchmark: {net_cls.__name__}, batch {batch}x3x128x128, device {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repetitions")

    # (a) full training step (BN statistics get updated: that is harmless here)
    def step(model):
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()

    nets = {'native': native, 'custom': custom}
    saved = {k: _saved_bytes(lambda m=m: nn.functional.cross_entropy(m(images), labels))[0]
             for k, m in nets.items()}
    times = {k: [] for k in nets}
    for k, m in nets.items():                          # warm-up
        step(m)
    for _ in range(args.repeats):
        for k, m in nets.items():
            times[k].append(_timed(lambda: step(m), device))
    step_ratio = _median([c / n for n, c in zip(times['native'], times['custom'])])
    saved_ratio = saved['custom'] / saved['native']

    # (b) every conv layer alone, at the input it gets in its own network
    rows = []
    layers = zip(_conv_layers_with_inputs(native, images),
                 _conv_layers_with_inputs(custom, images))
    for (name, conv_n, x_n), (_, conv_c, x_c) in layers:
        pair = {'native': (conv_n, x_n), 'custom': (conv_c, x_c)}

        def fwd_bwd(conv, x):
            # gradients w.r.t. input and weight, as in the network (none accumulated)
            out = conv(x)
            wrt = [x, conv.weight] if x.requires_grad else [conv.weight]
            torch.autograd.grad(out, wrt, torch.ones_like(out))

        layer_saved = {k: _saved_bytes(lambda c=c, x=x: c(x))[0] for k, (c, x) in pair.items()}
        layer_times = {k: [] for k in pair}
        for k, (c, x) in pair.items():
            fwd_bwd(c, x)
        for _ in range(args.repeats):
            for k, (c, x) in pair.items():
                layer_times[k].append(_timed(lambda: fwd_bwd(c, x), device))
        ratio = _median([c / n for n, c in zip(layer_times['native'], layer_times['custom'])])
        shape = (f"{conv_n.in_channels}->{conv_n.out_channels} k{conv_n.kernel_size[0]} "
                 f"s{conv_n.stride[0]} @{x_n.shape[2]}x{x_n.shape[3]}")
        rows.append((name, shape, _median(layer_times['native']) * 1e3,
                     _median(layer_times['custom']) * 1e3, ratio,
                     layer_saved['custom'] / layer_saved['native']))

    print(f"\n(b) per conv layer, forward + backward, median ms")
    print(f"{'layer':<24}{'shape':<26}{'native':>9}{'custom':>9}{'time x':>8}{'saved x':>9}")
    for name, shape, t_n, t_c, ratio, s_ratio in rows:
        print(f"{name:<24}{shape:<26}{t_n:9.1f}{t_c:9.1f}{ratio:8.2f}{s_ratio:9.2f}")
    print(f"\n(a) full training step (forward + backward), median of {args.repeats}")
    print(f"  native nn.Conv2d : {_median(times['native']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['native'] / 2**20:8.1f} MiB")
    print(f"  CustomConv2d     : {_median(times['custom']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['custom'] / 2**20:8.1f} MiB")
    print("  (saved bytes: distinct storages packed by saved_tensors_hooks, each once)")
    step_ok, saved_ok = step_ratio <= 1.5, saved_ratio <= 1.0
    print(f"\n{'target':<34}{'measured':>10}  result")
    print(f"{'step time custom/native <= 1.5x':<34}{step_ratio:9.2f}x  "
          f"{'PASS' if step_ok else 'FAIL'}")
    print(f"{'saved bytes custom/native <= 1.0x':<34}{saved_ratio:9.2f}x  "
          f"{'PASS' if saved_ok else 'FAIL'}")
    return step_ratio, saved_ratio


def _interleaved_times(fns, device, calls):
    """Best seconds per call of each fn in `fns` (a dict). The variants take turns
    call by call, so a busy machine slows each alike, and the minimum is kept,
    since other work on the machine can only add time."""
    times = {name: [] for name in fns}
    for fn in fns.values():                          # warm-up (allocator, kernels)
        fn()
    for _ in range(calls):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def _attention_memory(attn, x, window_size, device):
    """(attention-matrix bytes, saved-tensor bytes, CUDA peak bytes or None) of one
    forward of `attn` over the token grid x, globally or in windows."""
    import torch
    from custom_blocks import window_partition
    B, H, W, C = x.shape
    tokens = window_partition(x, window_size)[0] if window_size else x
    n = tokens.shape[1] * tokens.shape[2]                # tokens per attention
    matrix_bytes = tokens.shape[0] * attn.num_heads * n * n * x.element_size()
    saved = _saved_bytes(lambda: attn(tokens))[0]
    peak = None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = attn(tokens)
        out.sum().backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return matrix_bytes, saved, peak


def bench_attention(args):
    """Explicit vs fused attention time, global vs windowed attention memory, and
    the default ViT's training throughput, all in one process."""
    import torch
    import torch.nn.functional as F
    from custom_blocks import window_partition
    from student_code import Attention, default_vit_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}")
    MiB = 2 ** 20

    # 1. time: the ViT's real shapes, batch 64, 8x8 tokens, dim 192, 4 heads
    B, grid, dim, heads, win = 64, 8, 192, 4, 4
    x = torch.randn(B, grid, grid, dim, device=device, requires_grad=True)
    cases = {'global 8x8': x,
             f'window {win}x{win}': window_partition(x.detach(), win)[0].requires_grad_()}
    variants = {'default': None, 'explicit': False, 'fused': True}
    attn = Attention(dim, heads).to(device)
    print(f"\n[attention time] Attention(dim={dim}, heads={heads}) forward+backward, "
          f"batch {B}; default path = {'fused' if attn.use_fused() else 'explicit'}")

    def step(tokens, fused):
        def run():
            attn.fused = fused
            attn(tokens).sum().backward()
        return run

    passed = True
    for case, tokens in cases.items():
        t = _interleaved_times({name: step(tokens, f) for name, f in variants.items()},
                               device, calls=10 * args.repeats)
        ratio = t['default'] / t['fused']
        passed &= ratio <= 1.1
        print(f"  {case:12s} explicit {t['explicit'] * 1e3:7.2f} ms   fused {t['fused'] * 1e3:7.2f} ms"
              f"   default {t['default'] * 1e3:7.2f} ms   explicit/fused {t['explicit'] / t['fused']:.2f}x"
              f"   default/fused {ratio:.2f}x")
    print(f"  target: default path within 1.1x of the fused kernel: {'PASS' if passed else 'FAIL'}")

    # the part that differs, without the qkv / proj linear layers around it
    print(f"  core softmax(QK^T/sqrt(d))V only, forward+backward:")
    hd = dim // heads
    for case, (b, n) in {'global 8x8': (B, 64), f'window {win}x{win}': (B * 4, 16)}.items():
        q, k, v = (torch.randn(b, heads, n, hd, device=device, requires_grad=True)
                   for _ in range(3))

        def explicit():
            ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1).matmul(v).sum().backward()

        def fused():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        t = _interleaved_times({'explicit': explicit, 'fused': fused}, device,
                               calls=10 * args.repeats)
        print(f"  {case:12s} explicit {t['explicit'] * 1e3:7.2f} ms   fused {t['fused'] * 1e3:7.2f} ms"
              f"   explicit/fused {t['explicit'] / t['fused']:.2f}x")

    # 2. memory: global vs windowed attention, at the ViT's 8x8 tokens and at 16x16
    #    (patch size 8), where the N^2 attention matrix starts to dominate
    print(f"\n[attention memory] batch {B}, dim {dim}, {heads} heads, window {win}x{win}, float32")
    for grid in (8, 16):
        x = torch.randn(B, grid, grid, dim, device=device)
        for fused in (False, True):
            attn.fused = fused
            for window_size in (0, win):
                mat, saved, peak = _attention_memory(attn, x, window_size, device)
                kind = f'window {win}x{win}' if window_size else 'global'
                cuda = f"   CUDA peak fwd+bwd {peak / MiB:7.1f} MiB" if peak is not None else ""
                print(f"  {grid}x{grid} tokens {kind:10s} {'fused   ' if fused else 'explicit'}"
                      f"  attention matrix {mat / MiB:6.1f} MiB   saved for backward "
                      f"{saved / MiB:6.1f} MiB{cuda}")
    attn.fused = None

    # 3. throughput: one AdamW training step of the default ViT on 128x128 images
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

    t = _interleaved_times({'default': train_step(None), 'explicit': train_step(False)},
                           device, calls=args.repeats)
    print(f"\n[ViT training step] default_vit_model, batch {batch}, 128x128, AdamW")
    for name, sec in t.items():
        print(f"  {name:8s} attention: {batch / sec:8.1f} images/s   ({sec * 1e3:.0f} ms/step)")


def bench_attack(args):
    """One PGD step vs one forward+backward of the same batch (target <= 1.1x),
    and peak memory of a 20-step vs a 1-step attack (target: equal)."""
    import torch
    import torch.nn as nn
    import student_code
    from utils import SavedTensorMeter

    device = torch.device(args.device)
    torch.manual_seed(0)
    name = student_code.default_cnn_model.__name__
    model = student_code.default_cnn_model().to(device).eval()  # attacks run in eval mode
    x = torch.randn(64, 3, 128, 128, device=device)
    criterion = nn.CrossEntropyLoss()
    attack = student_code.PGDAttack(criterion)          # handout defaults
    with torch.no_grad():
        labels = student_code.least_confident_labels(model(x))

    def forward_backward():               # a plain training-style step, no optimizer
        model.zero_grad(set_to_none=True)
        criterion(model(x), labels).backward()

    def pgd_step():                       # what perturb() repeats num_steps times
        attack._step(model, x, x, labels)

    forward_backward(), pgd_step()        # warm-up (allocator, cuDNN autotuning)
    times = {'fwd+bwd': [], 'pgd step': []}
    for _ in range(args.repeats):         # interleaved: both see the same machine load
        times['fwd+bwd'].append(_timed(forward_backward, device))
        times['pgd step'].append(_timed(pgd_step, device))
    model.zero_grad(set_to_none=True)
    fb, step = _median(times['fwd+bwd']), _median(times['pgd step'])
    print("model {}, batch 64 x 3 x 128 x 128 on {}, median of {} interleaved runs".format(
        name, device, args.repeats))
    print("  forward+backward {:8.1f} ms".format(fb * 1e3))
    print("  one PGD step     {:8.1f} ms   ratio {:.2f}x  (target <= 1.1x)  {}".format(
        step * 1e3, step / fb, 'PASS' if step / fb <= 1.1 else 'FAIL'))

    peaks = {}
    for steps in (1, 20):
        attacker = student_code.PGDAttack(criterion, num_steps=steps)
        if device.type == 'cuda':
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with SavedTensorMeter() as meter:
            attacker.perturb(model, x)
        peaks[steps] = {'autograd saved': meter.peak}
        if device.type == 'cuda':
            _sync(device)
            peaks[steps]['CUDA allocator'] = torch.cuda.max_memory_allocated(device) - base
    for kind in peaks[1]:
        one, twenty = peaks[1][kind], peaks[20][kind]
        ratio = twenty / max(one, 1)
        print("  peak memory ({}): 1 step {:.1f} MiB, 20 steps {:.1f} MiB, ratio {:.3f}  "
              "(target 1.0)  {}".format(kind, one / 2**20, twenty / 2**20, ratio,
                                        'PASS' if ratio <= 1.01 else 'FAIL'))


def bench_models(args):
    """Accuracy at equal epochs on the demo set (issue: the default CNN must beat
    SimpleNet, and CustomConv2d must train like nn.Conv2d): three runs of main.py
    with the same data, seed, schedule and batch size."""
    import contextlib
    import tempfile
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
    t = _interleaved_times(fns, torch.device('cpu'), calls=args.repeats)
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
    t = _interleaved_times({'device': device_batch,
                            'normalize': lambda: fast_data.normalize_on_device(
                                uint8_batch, mean, std)}, device, calls=args.repeats)
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else '1 thread; on a CPU the cached path above is used')
    print(f"  batched device path on {device} ({where}), batch {batch}: "
          f"{batch / t['device']:8.0f} images/s")
    print(f"    (parameters drawn on the CPU; warp, colour and normalization on {device})")
    print(f"  normalize_on_device on {device}, the uint8 paths' last step: "
          f"{batch / t['normalize']:8.0f} images/s")
    return ratio


BENCHMARKS = {'conv': bench_conv, 'attention': bench_attention, 'attack': bench_attack,
              'models': bench_models, 'pipeline': bench_pipeline}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('which', choices=sorted(BENCHMARKS))
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repetitions')
    parser.add_argument('--batch-size', type=int, default=64, help='batch size (conv)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    parser.add_argument('--epochs', type=int, default=4, help='training epochs (models)')
    parser.add_argument('--lr', type=float, default=0.02, help='learning rate (models)')
    parser.add_argument('--data', default=None,
                        help='data folder (models, pipeline; default data/demo)')
    parser.add_argument('--images', type=int, default=256,
                        help='images per timed call of each path (pipeline)')
    args = parser.parse_args()
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    BENCHMARKS[args.which](args)


if __name__ == '__main__':
    main()
