"""Side-by-side benchmarks: `python code/benchmark.py {conv,attention,attack}`.

Each benchmark times our code against a reference in the same process, with
interleaved repetitions, and prints ratios (ratios survive a noisy machine;
absolute times do not). Figures are recorded in BENCHMARKS.md.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _timed(fn, device):
    """Seconds of one call of fn (synchronising the device around it)."""
    import torch
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
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
    batch = getattr(args, 'batch_size', 64)
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


def bench_attention(args):
    raise NotImplementedError("benchmark attention: written in Part II (issue 4)")


def bench_attack(args):
    raise NotImplementedError("benchmark attack: written in Part III (issue 5)")


BENCHMARKS = {'conv': bench_conv, 'attention': bench_attention, 'attack': bench_attack}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('which', choices=sorted(BENCHMARKS))
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repetitions')
    parser.add_argument('--batch-size', type=int, default=64, help='batch size (conv)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    args = parser.parse_args()
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    BENCHMARKS[args.which](args)


if __name__ == '__main__':
    main()
