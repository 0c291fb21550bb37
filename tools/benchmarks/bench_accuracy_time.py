"""The time-to-accuracy benchmark: how long the default CNN, with the toolkit's automatic
speed settings, takes to reach given validation top-1 on a large real set (Fashion-MNIST,
make_real_data.py --set fashion-mnist), and its best top-1 after a fixed epoch budget,
with the handout's recipe and with --recipe fast. This is the figure the toolkit's speed
work is judged by: a faster step that learns less per epoch does not count.

One run of main.py per recipe in a subprocess, as a user would start it; read back from its
summary.json. Training seconds are the epochs' own (epoch_time_s: data and steps, without
validation); wall seconds are the whole run's (start-up, cache build and validation too).
"""
import os

from benchmarks.bench_recipe import build_recipe_data, run_recipe_cell, where, work_folder
from benchmarks.bench_timing import cpu_name


def epochs_to_reach(epochs, target):
    """(epoch, training seconds so far) of the first epoch whose val top-1 >= target;
    None if none did."""
    seconds = 0.0
    for epoch in epochs:
        seconds += epoch['epoch_time_s']
        if epoch['val_top1'] >= target:
            return epoch['epoch'], seconds
    return None


def best_top1(summary):
    return max(epoch['val_top1'] for epoch in summary['epochs'])


def accuracy_time_lines(summary, targets):
    """The report of one run: an epoch table, then one line per target and the best."""
    epochs = summary['epochs']
    lines = ['| epoch | val top-1 | training s (cumulative) | images/s |',
             '| ---: | ---: | ---: | ---: |']
    total = 0.0
    for epoch in epochs:
        total += epoch['epoch_time_s']
        lines.append(f"| {epoch['epoch']} | {epoch['val_top1']:.2f} | {total:.0f} "
                     f"| {epoch['images_per_s']:.0f} |")
    for target in targets:
        reached = epochs_to_reach(epochs, target)
        lines.append(f"{target:g} % top-1: " + (
            f"reached in epoch {reached[0]}, after {reached[1]:.0f} s of training"
            if reached else f"not reached in {len(epochs)} epochs"))
    best = best_top1(summary)
    lines.append(f"best top-1 after {len(epochs)} epochs: {best:.2f} %; wall time "
                 f"{summary['wall_time_s']:.0f} s (start-up, cache and validation included)")
    return lines


# each recipe's epoch budget on Fashion-MNIST's 60,000 images: the handout's 2 epochs take
# 23 minutes on a 2-core CPU without AMX (fp32), the fast recipe's 4 (64 px) 9.5 with --amp
RECIPE_EPOCHS = {'handout': 2, 'fast': 4}


def bench_accuracy_time(args):
    """The default CNN with the automatic speed settings on Fashion-MNIST (or --data), once
    per --recipes (main.py --recipe: the handout's, then the fast one): training and wall
    seconds to reach each --targets top-1, and the best top-1 after the recipe's epochs
    (RECIPE_EPOCHS, or --epochs for all). Each run decodes its own data cache
    (--rebuild-cache), so that its wall time is what a first run costs. --amp: bf16 for
    both (on a CPU with AVX512-BF16 and no AMX, where the auto setting is fp32)."""
    with work_folder('accuracy-time', args.keep) as work:
        data = args.data
        if data is None:
            data = os.path.join(work, 'fashion')
            size = ['--max-train', str(args.max_train)] if args.max_train else []
            build_recipe_data('fashion', data, args.quick, size)   # all 60,000 by default
        results = {recipe: timed_run(args, data, recipe, os.path.join(work, recipe))
                   for recipe in args.recipes}
        print('\n' + '\n'.join(comparison_lines(results, args.targets)))


def timed_run(args, data, recipe, work):
    """One run of main.py with --recipe `recipe`; prints its report, returns its summary."""
    import torch
    # --quick: 1 epoch of 2 batches of the tiny set, to see that it runs
    epochs = args.epochs or RECIPE_EPOCHS[recipe]
    epochs, warmup, batch = (1, 0, 10) if args.quick else (epochs, 1, args.batch_size)
    batch = ['-b', str(batch)] if batch else []     # none: the recipe's own
    flags = ['--recipe', recipe, '--epochs', str(epochs), '--warmup', str(warmup), *batch,
             '--seed', str(args.seed), '--num-classes', '10', '-p', '1000',
             '--rebuild-cache', '--device', args.device] + (['--amp'] if args.amp else []) + \
        (['-j', '0'] if args.quick else [])
    print(f"\naccuracy-time, recipe {recipe}: torch {torch.__version__}, CPU {cpu_name()} "
          f"({os.cpu_count()} cores); main.py {data} {' '.join(flags)}; "
          f"{where(work, args.keep)}", flush=True)
    summary = run_recipe_cell(data, flags, os.path.join(work, 'logs'))
    ran = summary['args']     # the run's resolved settings
    print(f"auto settings: amp {ran.get('amp')}, channels-last "
          f"{ran.get('channels_last')}, data cache {ran.get('data_cache')}; recipe: "
          f"augment {ran.get('augment')}, label smoothing {ran.get('label_smoothing')}, "
          f"image size {ran.get('image_size') or 'as the transforms make it'}, batch size "
          f"{ran.get('batch_size')}, lr {ran.get('lr'):g}\n")
    print('\n'.join(accuracy_time_lines(summary, args.targets)))
    return summary


def comparison_lines(results, targets):
    """One line per recipe: the training (and wall) seconds to each target, the best."""
    lines = ['| recipe | epochs | ' + ' | '.join(f'to {t:g} %' for t in targets)
             + ' | best top-1 | wall s |',
             '| --- | ---: | ' + ' | '.join('---:' for _ in targets) + ' | ---: | ---: |']
    for recipe, summary in results.items():
        cells = []
        for target in targets:
            reached = epochs_to_reach(summary['epochs'], target)
            cells.append(f'epoch {reached[0]}, {reached[1]:.0f} s' if reached else 'not reached')
        best = best_top1(summary)
        lines.append(f"| {recipe} | {len(summary['epochs'])} | {' | '.join(cells)} | "
                     f"{best:.2f} | {summary['wall_time_s']:.0f} |")
    return lines
