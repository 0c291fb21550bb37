"""Run one of the toolkit's benchmarks: `python tools/benchmark.py WHICH [options]`.

  conv, attention, attack     our code against a reference in one process (bench_parts.py)
  step, pipeline              a training step per speed setting, input images/s (bench_speed.py)
  models, recipe, train, ddp  train with main.py, print validation accuracy
                              (bench_runs.py; recipe and its cells: bench_recipe.py)
  scale                       the input pipeline at MiniPlaces' size, a 60-epoch run
                              projected (bench_scale.py)
  shared                      one training process alone vs two on the same cores
                              (bench_shared.py)
  accuracy-time               the default CNN's time to a top-1 on Fashion-MNIST, with
                              the handout's and the fast recipe (bench_accuracy_time.py)

The in-process benchmarks interleave their repetitions and print ratios (ratios survive
a noisy machine; absolute times do not). `python tools/benchmark.py WHICH --help` lists
WHICH's own options. Figures are recorded in docs/benchmarks.md.
"""
import argparse
import inspect
import os
import signal
import sys

import _paths  # noqa: F401  code/ and tools/ on sys.path: runs from any directory
from arg_types import bounded_int, nonnegative_int, positive_float, positive_int, seed_int
from benchmarks.bench_accuracy_time import RECIPE_EPOCHS, bench_accuracy_time
from benchmarks.bench_parts import bench_attack, bench_attention, bench_conv
from benchmarks.bench_recipe import (DEFAULT_CONFIGS, DEFAULT_DATASETS, RECIPE_CONFIGS,
                                     RECIPE_DATASETS, RECIPE_MODELS, RecipeError, bench_recipe)
from benchmarks.bench_runs import TRAIN_CONFIGS, TRAIN_PATHS, bench_ddp, bench_models, bench_train
from benchmarks.bench_scale import SCALE_SIZES, bench_scale
from benchmarks.bench_scale_tables import GPU_STEP_MS
from benchmarks.bench_shared import MODELS, WAIT_POLICIES, bench_shared
from benchmarks.bench_speed import bench_pipeline, bench_step
from make_demo_data import MAX_CLASSES

BENCHMARKS = {'conv': bench_conv, 'attention': bench_attention, 'attack': bench_attack,
              'models': bench_models, 'recipe': bench_recipe, 'pipeline': bench_pipeline,
              'train': bench_train, 'step': bench_step, 'ddp': bench_ddp,
              'scale': bench_scale, 'shared': bench_shared,
              'accuracy-time': bench_accuracy_time}

# one line per benchmark for the top-level --help; `WHICH --help` prints the docstring
SUMMARIES = {
    'conv': 'CustomConv2d vs nn.Conv2d: step and layer times, saved bytes',
    'attention': 'default vs explicit vs fused attention; memory; ViT step',
    'attack': 'a PGD step vs forward+backward; memory of 20 vs 1 steps',
    'models': 'equal epochs: default CNN vs SimpleNet, custom vs native conv',
    'recipe': 'val top-1 per data set, model, config and seed (CPU)',
    'pipeline': 'input images/s per core: cached vs per-image; device path',
    'train': 'images/s, memory, val top-1 per speed setting and input path',
    'step': 'a training step in fp32, channels-last, amp, amp+channels-last',
    'ddp': '1 process vs N under torchrun: images/s, val top-1, weights',
    'scale': 'cache, epoch, memory (PSS) at 10k-110k images; 60-epoch projection',
    'shared': 'a training step alone vs two processes at once; OpenMP waiting',
    'accuracy-time': 'default CNN, handout and fast recipes: time to 85/90 %% top-1 '
                     'on Fashion-MNIST',
}


def _parent(*options):
    """A parser that only holds options, for subcommands to inherit (argparse parents).
    options: (flag, keyword arguments of add_argument) pairs."""
    parent = argparse.ArgumentParser(add_help=False)
    for flag, kwargs in options:
        parent.add_argument(flag, **kwargs)
    return parent


def data_folder(path):
    """--data of models and pipeline: a data set in MiniPlaces layout. Only the default,
    data/demo, is written where it is missing: a mistyped path is an error, not a new set."""
    if not os.path.isfile(os.path.join(path, 'train.txt')):
        raise argparse.ArgumentTypeError(f"'{path}' holds no train.txt (a data set in "
                                         f"MiniPlaces layout; without --data, data/demo is "
                                         f"used, written there if absent)")
    return path


def check_device(args, parser):
    """--device as main.py checks it (utils.select_device): an unknown name or a device
    this machine lacks is a usage error; auto becomes the device it picks."""
    from utils import UsageError, select_device
    try:
        args.device = str(select_device(args.device))
    except UsageError as e:
        parser.error(str(e))


def build_parser():
    """The top-level parser: a subcommand per benchmark, each with only its own options."""
    # options several benchmarks share; each keeps one name, type and default everywhere
    device = _parent(('--device', dict(default='cpu', help='auto, cpu, cuda, cuda:N or mps')))
    repeats = _parent(('--repeats', dict(type=positive_int, default=5,
                                         help='interleaved repetitions')))
    # only where torch computes in this process: the runs of main.py in a subprocess use
    # their own threads, and pipeline times one thread
    threads = _parent(('--threads', dict(type=nonnegative_int, default=0,
                                         help='torch threads (0: default)')))
    batch = _parent(('--batch-size', dict(type=positive_int, default=64, help='batch size')))
    training = _parent(('--epochs', dict(type=positive_int, default=4,
                                         help='training epochs (warm-up: 1 if more than 1)')),
                       ('--lr', dict(type=positive_float, default=0.02, help='learning rate')))
    quick = _parent(('--quick', dict(action='store_true',
                                     help='tiny sets, 1 epoch: checks that every cell runs, '
                                          'measures nothing')))
    small = _parent(('--small', dict(action='store_true',
                                     help='400 training images per data set (slow machines)')))
    data = _parent(('--data', dict(type=data_folder, default=None,
                                   help='data folder (default data/demo, written if absent)')))
    keep = _parent(('--keep', dict(action='store_true',
                                   help='keep the temporary folder of data and logs (its path '
                                        'is printed); removed at the end otherwise')))
    datasets = _parent(('--datasets', dict(nargs='+', choices=list(RECIPE_DATASETS),
                                           default=DEFAULT_DATASETS,
                                           help='data sets (fashion: Fashion-MNIST, '
                                                '10,000 training images)')))
    models = _parent(('--models', dict(nargs='+', choices=list(RECIPE_MODELS),
                                       default=list(RECIPE_MODELS), help='models')))
    parents = {'conv': [device, repeats, threads, batch],
               'attention': [device, repeats, threads],
               'attack': [device, repeats, threads, batch],
               'models': [device, threads, training, data, keep],
               'recipe': [datasets, models, quick, keep],
               'pipeline': [device, repeats, data],
               'train': [device, batch, training, datasets, models, quick, small, keep],
               'step': [device, repeats, threads, batch, models],
               'ddp': [device, training, quick, small, keep],
               'scale': [device, repeats, threads],
               'shared': [quick],
               'accuracy-time': [device, quick, keep]}

    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='which', required=True, metavar='WHICH')
    commands = {name: sub.add_parser(name, parents=parents[name], help=SUMMARIES[name],
                                     description=inspect.getdoc(BENCHMARKS[name]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
                for name in BENCHMARKS}

    # the options only one benchmark has
    recipe = commands['recipe']
    recipe.add_argument('--seeds', type=seed_int, nargs='+', default=None,
                        help='training seeds (default 0 1, with --quick 0)')
    recipe.add_argument('--configs', nargs='+', choices=list(RECIPE_CONFIGS),
                        default=DEFAULT_CONFIGS, help='training configurations')
    recipe.add_argument('--compare', nargs=2, action='append', metavar=('A', 'B'),
                        choices=list(RECIPE_CONFIGS),
                        help='print whether config A beats B (paired seeds, 95 %% interval); '
                             'repeat for more pairs')
    recipe.add_argument('--epochs', type=positive_int, default=None,
                        help="epochs of every cell (default: each config's own)")
    commands['attention'].add_argument('--batch-size', type=positive_int, default=64,
                                       help="batch of the attention inputs and the ViT step "
                                            "(the ViT's training batch: 64)")
    commands['pipeline'].add_argument('--images', type=positive_int, default=256,
                                      help='images per timed call of each path')
    train = commands['train']
    train.add_argument('--train-configs', nargs='+', choices=list(TRAIN_CONFIGS),
                       default=['fp32', 'amp', 'amp+cl', 'compile'], help='speed settings')
    train.add_argument('--paths', nargs='+', choices=list(TRAIN_PATHS),
                       default=list(TRAIN_PATHS), help='input paths')
    ddp = commands['ddp']
    ddp.add_argument('--batch-size', type=positive_int, default=64,
                     help='global batch size, shared out among the processes')
    ddp.add_argument('--processes', type=positive_int, nargs='+', default=[1, 2],
                     help='process counts to compare (1 first: the reference)')
    ddp.add_argument('--model', choices=list(RECIPE_MODELS), default='cnn', help='the model')
    scale = commands['scale']
    scale.add_argument('--data', default=None,
                       help='data folder (default data/scale; made if it holds no train.txt)')
    scale.add_argument('--sizes', type=positive_int, nargs='+', default=SCALE_SIZES,
                       help='images (training + validation, 10 to 1) of each measured size')
    scale.add_argument('-j', '--workers', type=nonnegative_int, default=4,
                       help="DataLoader workers and cache builders (main.py's default: 4)")
    scale.add_argument('--batch-size', type=positive_int, default=256,
                       help='training batch size')
    scale.add_argument('--classes', type=bounded_int(2, MAX_CLASSES), default=100,
                       help='classes of a set made in --data (MiniPlaces: 100)')
    scale.add_argument('--image-size', type=bounded_int(16), default=128,   # as make_demo_data
                       help='image side of a set made in --data (MiniPlaces: 128)')
    scale.add_argument('--gpu-step-ms', type=positive_float, default=GPU_STEP_MS,
                       help='training step on one GPU at batch 256, for the projection on '
                            'paper (an estimate; see bench_scale_tables.py)')
    scale.add_argument('--keep-caches', action='store_true',
                       help='keep the caches of DATA/subsets/<size> (several GB at 110k)')
    shared = commands['shared']
    shared.add_argument('--model', choices=list(MODELS), default='resnet10',
                        help='the timed model')
    shared.add_argument('--batch-size', type=positive_int, default=32, help='batch size')
    shared.add_argument('--steps', type=positive_int, default=6,
                        help='timed steps per process')
    shared.add_argument('--policies', nargs='+', choices=list(WAIT_POLICIES),
                        default=list(WAIT_POLICIES), help='OpenMP wait policies to compare')
    timed = commands['accuracy-time']
    timed.add_argument('--data', type=data_folder, default=None,
                       help='a data set folder (default: Fashion-MNIST converted into a '
                            'temporary folder)')
    timed.add_argument('--max-train', type=positive_int, default=None,
                       help='convert only N training images (default all 60,000)')
    timed.add_argument('--recipes', nargs='+', choices=list(RECIPE_EPOCHS),
                       default=list(RECIPE_EPOCHS), help="main.py's --recipe, one run each "
                       "(default: %(default)s)")
    timed.add_argument('--amp', action='store_true',
                       help="main.py --amp for every recipe (default: the device's auto)")
    timed.add_argument('--epochs', type=positive_int, default=None,
                       help='the epoch budget of every recipe (default: ' + ', '.join(
                           f'{r} {e}' for r, e in RECIPE_EPOCHS.items()) + ')')
    timed.add_argument('--batch-size', type=positive_int, default=None,
                       help="batch size (default: the recipe's: main.py's 256 for the "
                            "handout's, 128 for the fast one)")
    timed.add_argument('--seed', type=seed_int, default=0, help='training seed')
    timed.add_argument('--targets', type=positive_float, nargs='+', default=[85.0, 90.0],
                       help='validation top-1 (%%) to time')
    parser.commands = commands      # for errors found after parsing: check_device
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, 'device'):
        check_device(args, parser.commands[args.which])
    import cv2
    import torch
    # some benchmarks time one thread; a caller of main() in-process keeps its own counts
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    if getattr(args, 'threads', 0) > 0:       # only the in-process benchmarks have --threads
        torch.set_num_threads(args.threads)
    try:
        return BENCHMARKS[args.which](args)
    except RecipeError as e:
        sys.exit(f"benchmark.py {args.which}: error: {e}")
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's 130 (128 + SIGINT). By now the work folder is
        # removed (or, with --keep, named), and no advice of main.py's points into it
        print(f"benchmark.py {args.which}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


if __name__ == '__main__':
    main()
