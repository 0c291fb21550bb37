"""The Part benchmarks: conv, attention and attack, our code against a reference in one process.

Each times both sides with interleaved repetitions and prints ratios (ratios survive
a noisy machine; absolute times do not), with a PASS/FAIL line per target.
"""
from statistics import median

from benchmarks.bench_timing import (SavedForBackwardMeter, interleaved_times, median_ratio,
                                     saved_bytes, sync)


# ---------------------------------------------------------------- conv
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
                     median_ratio(times, 'custom', 'native'), saved['custom'] / saved['native']))
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

    print("\n(b) per conv layer, forward + backward, median ms")
    print(f"{'layer':<24}{'shape':<26}{'native':>9}{'custom':>9}{'time x':>8}{'saved x':>9}")
    for name, shape, t_n, t_c, ratio, s_ratio in rows:
        print(f"{name:<24}{shape:<26}{t_n:9.1f}{t_c:9.1f}{ratio:8.2f}{s_ratio:9.2f}")
    print(f"\n(a) full training step (forward + backward), median of {args.repeats}")
    print(f"  native nn.Conv2d : {median(times['native']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['native'] / 2**20:8.1f} MiB")
    print(f"  CustomConv2d     : {median(times['custom']) * 1e3:9.1f} ms, "
          f"saved for backward {saved['custom'] / 2**20:8.1f} MiB")
    print("  (saved bytes: peak of the distinct storages autograd holds for backward)")
    step_ratio = median_ratio(times, 'custom', 'native')
    saved_ratio = saved['custom'] / saved['native']
    print(f"\n{'target':<34}{'measured':>10}  result")
    print(f"{'step time custom/native <= 1.5x':<34}{step_ratio:9.2f}x  "
          f"{'PASS' if step_ratio <= 1.5 else 'FAIL'}")
    print(f"{'saved bytes custom/native <= 1.0x':<34}{saved_ratio:9.2f}x  "
          f"{'PASS' if saved_ratio <= 1.0 else 'FAIL'}")


# ---------------------------------------------------------------- attention
# the default ViT's attention shapes: 8x8 tokens, dim 192, 4 heads, windows 4x4 (the batch
# is --batch-size: 64, the ViT's training batch, unless given)
ATTN_GRID, ATTN_DIM, ATTN_HEADS, ATTN_WINDOW = 8, 192, 4, 4


def _best_ms(times):
    """Best milliseconds per variant: other work on the machine can only add time."""
    return {name: min(t) * 1e3 for name, t in times.items()}


def bench_attention_time(args, device):
    """Attention module forward+backward: default path vs explicit vs fused kernel,
    globally over 8x8 tokens and in 4x4 windows (target: default within 1.1x of fused)."""
    import torch
    from custom_blocks import window_partition
    from student_code import Attention
    B, win = args.batch_size, ATTN_WINDOW
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
    B, heads, win = args.batch_size, ATTN_HEADS, ATTN_WINDOW
    hd = ATTN_DIM // heads
    print("  core softmax(QK^T/sqrt(d))V only, forward+backward:")
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
    B, win, MiB = args.batch_size, ATTN_WINDOW, 2 ** 20
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
    batch = args.batch_size
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


# ---------------------------------------------------------------- attack
def _attack_memory(model, x, criterion, device):
    """{kind: {steps: peak bytes}} of a 1-step and a 20-step attack: autograd's saved
    tensors on any device, and the CUDA allocator's peak on a GPU."""
    import torch
    import student_code
    peaks = {'autograd saved': {}}
    for steps in (1, 20):
        attacker = student_code.PGDAttack(criterion, num_steps=steps)
        if device.type == 'cuda':
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with SavedForBackwardMeter() as meter:
            attacker.perturb(model, x)
        peaks['autograd saved'][steps] = meter.peak_bytes
        if device.type == 'cuda':
            sync(device)
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
