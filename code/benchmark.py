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
