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


def bench_attention(args):
    raise NotImplementedError("benchmark attention: written in Part II (issue 4)")


class _SavedTensorMeter(object):
    """Peak bytes of the tensors autograd keeps for backward, alive at once.

    This is the memory a growing graph would add to with every PGD step, and it
    can be counted on any device: saved_tensors_hooks wrap every tensor that
    the forward pass saves in a small holder; the holder counts its bytes when
    created and uncounts them when autograd drops it (graph freed). On CUDA the
    allocator's own peak is reported as well.
    """

    def __enter__(self):
        import torch
        meter = self
        self.live, self.peak = 0, 0

        class Held(object):
            def __init__(self, t):
                self.t, self.nbytes = t, t.numel() * t.element_size()
                meter.live += self.nbytes
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.nbytes

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def _attack_model(num_classes=100):
    """The default CNN if it builds, else the handout's SimpleNet."""
    import student_code
    try:
        return student_code.default_cnn_model(num_classes=num_classes), \
            student_code.default_cnn_model.__name__
    except Exception as err:  # e.g. Part I not written yet
        print("default_cnn_model does not build ({}); using SimpleNet".format(err))
        return student_code.SimpleNet(num_classes=num_classes), 'SimpleNet'


def bench_attack(args):
    """One PGD step vs one forward+backward of the same batch (target <= 1.1x),
    and peak memory of a 20-step vs a 1-step attack (target: equal)."""
    import statistics
    import time
    import torch
    import torch.nn as nn
    import student_code

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, name = _attack_model()
    model = model.to(device).eval()      # the attack runs the model in eval mode
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

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    forward_backward(), pgd_step()        # warm-up (allocator, cuDNN autotuning)
    times = {'fwd+bwd': [], 'pgd step': []}
    for _ in range(args.repeats):         # interleaved: both see the same machine load
        times['fwd+bwd'].append(timed(forward_backward))
        times['pgd step'].append(timed(pgd_step))
    model.zero_grad(set_to_none=True)
    fb, step = statistics.median(times['fwd+bwd']), statistics.median(times['pgd step'])
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
        with _SavedTensorMeter() as meter:
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
