"""Side-by-side benchmarks: `python code/benchmark.py {conv,attention,attack}`.

Each benchmark times our code against a reference in the same process, with
interleaved repetitions, and prints ratios (ratios survive a noisy machine;
absolute times do not). Figures are recorded in BENCHMARKS.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def bench_conv(args):
    raise NotImplementedError("benchmark conv: written in Part I (issue 3)")


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def _interleaved_times(fns, device, calls):
    """Best seconds per call of each fn in `fns` (a dict). The variants take turns
    call by call, so a busy machine slows each alike, and the minimum is kept,
    since other work on the machine can only add time."""
    import time
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


def _saved_tensor_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass of fn() (the
    activation memory of training), counting each storage once."""
    import torch
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _attention_memory(attn, x, window_size, device):
    """(attention-matrix bytes, saved-tensor bytes, CUDA peak bytes or None) of one
    forward of `attn` over the token grid x, globally or in windows."""
    import torch
    from custom_blocks import window_partition
    B, H, W, C = x.shape
    tokens = window_partition(x, window_size)[0] if window_size else x
    n = tokens.shape[1] * tokens.shape[2]                # tokens per attention
    matrix_bytes = tokens.shape[0] * attn.num_heads * n * n * x.element_size()
    saved = _saved_tensor_bytes(lambda: attn(tokens))
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
    raise NotImplementedError("benchmark attack: written in Part III (issue 5)")


BENCHMARKS = {'conv': bench_conv, 'attention': bench_attention, 'attack': bench_attack}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('which', choices=sorted(BENCHMARKS))
    parser.add_argument('--device', default='cpu', help='cpu, cuda, cuda:N or mps')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repetitions')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    args = parser.parse_args()
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    BENCHMARKS[args.which](args)


if __name__ == '__main__':
    main()
