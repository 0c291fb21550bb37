"""The benchmarks that train with main.py: models, train and ddp (recipe is in bench_recipe.py).

Each compares runs at the same data, seed and schedule and prints images/s and
validation accuracy; train and ddp run every cell in a subprocess of its own.
"""
import contextlib
import itertools
import os
from statistics import mean

from toolkit import run_record as rr
from benchmarks.bench_recipe import (REPO, RECIPE_MODELS, VIT_FLAGS, RecipeError, best_and_final,
                                     build_recipe_data, main_py_failure, model_label,
                                     run_recipe_cell, where, work_folder)
from benchmarks.bench_timing import machine


def warmup_epochs(epochs):
    """The runs' warm-up: one epoch, none in a run of one epoch (main.py refuses a warm-up
    as long as the run)."""
    return 1 if epochs > 1 else 0


# ---------------------------------------------------------------- models
def bench_models(args):
    """Accuracy at equal epochs on the demo set (the target: the default CNN beats
    SimpleNet, and CustomConv2d trains like nn.Conv2d): three runs of main.py
    with the same data, seed, schedule and batch size."""
    import main as driver
    from make_demo_data import make_demo_dataset
    data = args.data or os.path.join(REPO, 'data', 'demo')
    if not os.path.isfile(os.path.join(data, 'train.txt')):
        make_demo_dataset(data)
    runs = [('SimpleNet, nn.Conv2d', ['--arch', 'simplenet']),
            ('default CNN, nn.Conv2d', []),
            ('default CNN, CustomConv2d', ['--use-custom-conv'])]
    rows = []
    with work_folder('models', args.keep) as logs:
        common = [data, '--num-classes', '10', '--epochs', str(args.epochs),
                  '--warmup', str(warmup_epochs(args.epochs)), '-b', '32', '--lr', str(args.lr),
                  '-j', '2', '--device', args.device, '--seed', '0', '--log-dir', logs,
                  '-p', '1000']
        print(f'models benchmark: demo set {data}, {args.epochs} epochs, lr {args.lr}, '
              f'batch 32, seed 0, device {args.device}; {where(logs, args.keep)}',
              flush=True)
        for label, extra in runs:
            rows.append((label, main_in_process(driver, common + extra, logs)))
    print(f"{'model':<28}{'arch':<11}{'params':>10}{'best val top-1':>16}"
          f"{'final val top-1':>17}{'images/s':>10}")
    for label, summary in rows:
        best, final = best_and_final(summary)  # best_acc1 is None where no epoch scored
        speed = sum(e['images_per_s'] for e in summary['epochs']) / len(summary['epochs'])
        print(f"{label:<28}{summary['arch']:<11}{summary['num_params']:>10,}"
              f"{best:>16.2f}{final:>17.2f}{speed:>10.1f}")
    return rows


def main_in_process(driver, argv, logs):
    """driver.main(argv) (main.py in this process) with all its output in logs/console.log,
    as a cell run in a subprocess has it: main.py's advice after Ctrl-C names a checkpoint
    in `logs`, a temporary folder. A stopped or failed run raises main_py_failure's."""
    console = os.path.join(logs, 'console.log')
    with open(console, 'a') as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            return driver.main(argv)
        except SystemExit as stop:
            code = stop.code
            if isinstance(code, str):        # the message Python would print, exit 1
                print(code, file=log)
                code = 1
    raise main_py_failure(code, console)


# ---------------------------------------------------------------- train
# the targets: the cached input path trains as well as the per-image path, and amp
# trains the default CNN as well as fp32, at equal epochs. main.py's speed settings,
# each on the per-image and on the cached path; the speed flags not named are pinned
# off, so a cell measures exactly what its name says
TRAIN_CONFIGS = {'fp32': ['--no-amp', '--no-channels-last', '--no-compile'],
                 'amp': ['--amp', '--no-channels-last', '--no-compile'],
                 'amp+cl': ['--amp', '--channels-last', '--no-compile'],
                 'cl': ['--no-amp', '--channels-last', '--no-compile'],
                 'compile': ['--no-amp', '--no-channels-last', '--compile']}
TRAIN_PATHS = {'per-image': ['--no-data-cache'], 'cached': ['--data-cache']}
TRAIN_TOLERANCE = 5.0   # points of val top-1: "equal within noise" on 200-image val sets
# --small: 400 training images per set (demo: 200 val, real: 360 val), for slow machines
SMALL_DATA = {'demo': ['--train-per-class', '40'], 'real': ['--max-train', '400']}


def cell_flags(args, model, workers):
    """The main.py flags a `train` or `ddp` cell shares: the schedule, -b, seed 0, 10
    classes, the model (and the ViT's own lr and weight decay)."""
    return (['--epochs', str(args.epochs), '--warmup', str(warmup_epochs(args.epochs)),
             '-b', str(args.batch_size), '--lr', str(args.lr), '-j', str(workers),
             '--device', args.device, '--num-classes', '10', '--seed', '0', '-p', '1000']
            + (VIT_FLAGS if model == 'vit' else []) + RECIPE_MODELS[model][1])


def train_speed(summary):
    """(images/s, peak MB) of a run: the mean over its epochs after the first (the first
    pays for compilation and warm caches), or the only epoch."""
    epochs = summary['epochs'][1:] or summary['epochs']
    return (mean(e['images_per_s'] for e in epochs),
            max(e['peak_memory_mb'] for e in summary['epochs']))


def train_checks(results):
    """PASS/FAIL lines for the targets: the cached path reaches the
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
    with work_folder('train', args.keep) as work:
        return train_cells(args, work)


def train_cells(args, work):
    """Every cell of the train benchmark, its data and logs in `work`."""
    import torch
    device = torch.device(args.device)
    if args.quick:  # tiny sets: every cell runs, nothing is measured
        args.epochs, args.batch_size = 1, 10
    print(f"train: torch {torch.__version__}, {machine(device)}, {args.epochs} epochs per cell, "
          f"batch {args.batch_size}, seed 0{', SMALL sets' if args.small else ''}; "
          f"{where(work, args.keep)}\n", flush=True)
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


# ---------------------------------------------------------------- ddp
# the target: N processes under torchrun reach one process's accuracy at the same global
# batch, and without BatchNorm (SimpleNet) its weights, up to float rounding
BN_STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


def max_weight_difference(run_a, run_b):
    """The largest absolute difference between the final learned weights of two runs.
    BatchNorm's running statistics are left out: without --sync-bn each process keeps
    those of its own share of the batch, so they differ by design."""
    from toolkit.checkpoint import load_checkpoint
    a, b = (load_checkpoint(rr.checkpoint_path(run)).state_dict for run in (run_a, run_b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if not k.endswith(BN_STATISTICS))


def bench_ddp(args):
    """1 process against N (torchrun + DDP; gloo on the CPU, NCCL on GPUs) at the same
    global batch, seed and data: images/s, best and final val top-1, and how far the final
    weights are from the 1-process run's. On a CPU the processes share its cores (torchrun
    gives each one thread; the single process uses torch's default threads)."""
    with work_folder('ddp', args.keep) as work:
        return ddp_runs(args, work)


def ddp_runs(args, work):
    """The ddp benchmark's runs, their data and logs in `work`."""
    import torch
    device = torch.device(args.device)
    gpus = (f"{torch.cuda.device_count()} x {machine(device)}" if device.type == 'cuda'
            else machine(device))
    if args.quick:
        args.epochs, args.batch_size = 1, 10
    print(f"ddp: torch {torch.__version__}, {gpus}, {args.epochs} epochs of {args.model} at "
          f"global batch {args.batch_size}, seed 0; {where(work, args.keep)}\n", flush=True)
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
