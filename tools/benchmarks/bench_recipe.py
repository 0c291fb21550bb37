"""The recipe benchmark: the handout's training recipe on real and demo images, via main.py.

Also the cells that train and ddp run: a cell trains one model on one data set (demo
textures or real digit scans, written by their generator scripts) with main.py in a
subprocess, as a user would, and is read back from its summary.json.
"""
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from statistics import mean, stdev

from toolkit import run_record as rr
from benchmarks.bench_timing import cpu_name

from _paths import REPO


# ---------------------------------------------------------------- recipe
# the target: the training recipes (the defaults, the Makefile's demo command) hold beyond
# the demo textures, on real images. Every cell trains one model on one set with one
# configuration and seed, by running main.py in a subprocess, as a user would; both sets
# have 10 classes. fashion: Fashion-MNIST (Debian's dataset-fashion-mnist), a training
# subset of 10,000 images sized to a 2-core CPU, validated on all 10,000 test images, so
# that a 1-point difference exceeds the noise; asked for by name, not by default
RECIPE_DATASETS = {'demo': 'make_demo_data.py', 'real': 'make_real_data.py',
                   'fashion': 'make_real_data.py'}
DEFAULT_DATASETS = ['demo', 'real']
DATA_FLAGS = {'demo': [], 'real': [], 'fashion': ['--set', 'fashion-mnist']}
SIZE_FLAGS = {'fashion': ['--max-train', '10000']}
RECIPE_MODELS = {'simplenet': ('SimpleNet', ['--arch', 'simplenet']),
                 'cnn': ('default CNN', []),
                 'vit': ('ViT', ['--use-vit'])}
RECIPE_CONFIGS = {
    # 8 epochs at batch 64 with the handout's lr 0.1, given (without --lr main.py scales
    # it to the batch); the ViT's VIT_FLAGS come after it and win
    '8ep': ['--epochs', '8', '--warmup', '1', '-b', '64', '-j', '2', '--device', 'cpu',
            '--lr', '0.1'],
    # the Makefile's `demo` target, less its --seed and --name (tests check they agree);
    # fp32 on every CPU, so that the demo prints the same figure everywhere: bf16 on AMX
    # tiles spread 85-100 % over four seeds where fp32 spread 95-100 % (docs/benchmarks.md)
    'demo': ['--epochs', '4', '--warmup', '1', '-b', '32', '--lr', '0.05', '-j', '2',
             '--device', 'cpu', '--no-amp'],
}
# 8 epochs at batch 32, 64 and 256 with the handout's lr 0.1, and at 32 and 64 with the lr
# scaled linearly to the batch (0.1 x batch / 256; at 256 that is 0.1): is the handout's
# lr one for its batch of 256?
EIGHT_EPOCHS = ['--epochs', '8', '--warmup', '1', '-j', '2', '--device', 'cpu']
RECIPE_CONFIGS.update({
    f'b{batch}{suffix}': EIGHT_EPOCHS + ['-b', str(batch), '--lr', f'{lr:g}']
    for batch in (32, 64, 256)
    for suffix, lr in (('', 0.1), ('-scaled', 0.1 * batch / 256)) if batch < 256 or not suffix})
DEFAULT_CONFIGS = list(RECIPE_CONFIGS)
# bf16 autocast against fp32 at equal epochs (on a CPU without bf16 hardware bf16 is
# slow, but learns as it would with it: the same numerics)
RECIPE_CONFIGS.update({f'b64-scaled-{precision}': RECIPE_CONFIGS['b64-scaled'] + [flag]
                       for precision, flag in (('fp32', '--no-amp'), ('bf16', '--amp'))})
# a short budget (a few epochs): is one epoch of warm-up, half of a 2-epoch run, a waste?
# argparse keeps the last --warmup
RECIPE_CONFIGS['b64-scaled-warmup0'] = RECIPE_CONFIGS['b64-scaled'] + ['--warmup', '0']
# the fast recipe (main.py --recipe fast) beside the handout's at the same epochs and
# batch, and with each of its levers off in turn (an ablation: which carry its gain);
# its warm-up is the configs' own 1 epoch. no-resize trains at 128 px: 4x the time
RECIPE_CONFIGS['b64-fast'] = RECIPE_CONFIGS['b64-scaled'] + ['--recipe', 'fast']
RECIPE_CONFIGS.update({f'b64-fast-no-{lever}': RECIPE_CONFIGS['b64-fast'] + flags
                       for lever, flags in (('augment', ['--augment', '1']),
                                            ('smoothing', ['--label-smoothing', '0']),
                                            ('resize', ['--image-size', '0']))})
# the fast recipe as it is: its own batch (128) and the lr the batch rule gives it (0.05)
RECIPE_CONFIGS['b128-fast'] = EIGHT_EPOCHS + ['-b', '128', '--recipe', 'fast']
VIT_FLAGS = ['--lr', '0.01', '--wd', '0.05']       # the handout's ViT command
# --quick: 2 training and 1 validation image per class, one epoch of 2 batches, no
# workers: to see that every cell runs, not to measure anything
QUICK_DATA = {'demo': ['--train-per-class', '2', '--val-per-class', '1', '--size', '32'],
              'real': ['--max-train', '20', '--val-fraction', '0.006'],
              'fashion': ['--max-train', '20', '--max-val', '10']}
QUICK_FLAGS = {'--epochs': '1', '--warmup': '0', '-b': '10', '-j': '0'}


class RecipeError(RuntimeError):
    """A data set or a run of main.py failed; the message is one line."""


def recipe_flags(model, config, seed, quick=False, epochs=None):
    """main.py's flags (after DIR) for one cell; epochs: instead of the config's."""
    flags = list(RECIPE_CONFIGS[config])
    if model == 'vit' and config == '8ep':
        flags += VIT_FLAGS
    if epochs is not None:
        flags[flags.index('--epochs') + 1] = str(epochs)
    for name, value in (QUICK_FLAGS.items() if quick else ()):
        flags[flags.index(name) + 1] = value
    return flags + RECIPE_MODELS[model][1] + ['--num-classes', '10', '--seed', str(seed),
                                              '-p', '1000']


@contextlib.contextmanager
def work_folder(which, keep):
    """A temporary folder for a benchmark's data and logs (tens of MB), removed at the end,
    also after an error or Ctrl-C, unless `keep` (--keep): then its path is printed."""
    work = tempfile.mkdtemp(prefix=f'bench_{which}_')
    try:
        yield work
    finally:
        if keep:
            print(f"{which}: its data and logs are kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def where(work, keep):
    """The start line's words for the work folder."""
    kept = "" if keep else " (removed at the end; --keep keeps them)"
    return f"data and logs in {work}{kept}"


def _last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else 'no output'


def build_recipe_data(name, out_dir, quick=False, extra=None):
    """Write data set `name` into out_dir with its generator script (`extra`: its size
    flags, else the set's own)."""
    script = os.path.join(REPO, 'tools', RECIPE_DATASETS[name])
    size = QUICK_DATA[name] if quick else (extra if extra is not None else
                                            SIZE_FLAGS.get(name, []))
    done = subprocess.run([sys.executable, script, out_dir] + DATA_FLAGS[name] + size,
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
        raise main_py_failure(done.returncode, console)
    (run,) = [d for d in os.listdir(log_dir) if os.path.isdir(os.path.join(log_dir, d))]
    return rr.read_summary(os.path.join(log_dir, run))


# main.py's exit codes when Ctrl-C or SIGTERM stopped it (128 + the signal's number)
STOPPED_BY_SIGNAL = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def main_py_failure(code, console):
    """What to raise for a run of main.py that exited with `code`, its output in the file
    `console`: a run stopped by Ctrl-C stops the benchmark (KeyboardInterrupt), whose
    folder, where main.py's advice to resume points, is about to go; any other is a
    failed cell (RecipeError) named by main.py's last line."""
    if code in STOPPED_BY_SIGNAL:
        return KeyboardInterrupt()
    with open(console) as log:
        return RecipeError(f"main.py exited with {code}: {_last_line(log.read())}")


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


def spread(values):
    """'mean ± standard deviation (min-max)' of one cell's seeds."""
    sd = f" ± {stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean(values):.2f}{sd} ({min(values):.2f}-{max(values):.2f})"


def recipe_summary(results):
    """Mean and spread over seeds of every (dataset, model, config): markdown lines.
    results: {(dataset, model, config, seed): summary}."""
    cells = {}
    for (dataset, model, config, seed), summary in results.items():
        cells.setdefault((dataset, model, config), []).append((seed, summary))
    lines = ["| dataset | model | config | seeds | best val top-1, mean ± sd (min-max) "
             "| final val top-1, mean ± sd (min-max) |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    for (dataset, model, config), runs in cells.items():
        best, final = zip(*(best_and_final(s) for _, s in runs))
        seeds = ' '.join(str(seed) for seed, _ in runs)
        lines.append(f"| {dataset} | {model_label(model, runs[0][1])} | {config} | {seeds} "
                     f"| {spread(best)} | {spread(final)} |")
    return lines


# Student's t quantile for a two-sided 95 % interval, by degrees of freedom (1-9): a
# decision rests on a few seeds, where the normal 1.96 would claim too much
T_975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26]


def decision(results, dataset, model, a, b):
    """'A beats B by x ± y points' over the seeds both configs ran (paired: one seed, the
    same data order and initial weights), best val top-1, 95 % interval; None below 2."""
    seeds = sorted({k[3] for k in results if k[:3] == (dataset, model, a)} &
                   {k[3] for k in results if k[:3] == (dataset, model, b)})
    if len(seeds) < 2:
        return None
    diffs = [best_and_final(results[(dataset, model, a, s)])[0] -
             best_and_final(results[(dataset, model, b, s)])[0] for s in seeds]
    d, half = mean(diffs), T_975[min(len(diffs) - 2, len(T_975) - 1)] * \
        stdev(diffs) / len(diffs) ** 0.5
    winner, loser = (a, b) if d >= 0 else (b, a)
    verdict = "" if abs(d) > half else " (the interval holds 0: no difference shown)"
    return (f"{dataset}, {model_label(model)}: {winner} beats {loser} by {abs(d):.2f} ± "
            f"{half:.2f} points of best val top-1 (95 % interval, {len(seeds)} paired "
            f"seeds){verdict}")


def bench_recipe(args):
    """dataset (demo, real) x model (SimpleNet, default CNN, ViT) x config (8 epochs at
    batch 64, the Makefile's demo command) x seed -> best and final val top-1."""
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    seeds = list(dict.fromkeys(seeds))          # a seed twice would only repeat a run
    with work_folder('recipe', args.keep) as work:
        recipe_cells(args, seeds, work)


def recipe_cells(args, seeds, work):
    """Every cell of the recipe, its data and logs in `work`."""
    import torch
    print(f"recipe: torch {torch.__version__}, CPU {cpu_name()} ({os.cpu_count()} cores), "
          f"main.py per cell{', QUICK (tiny sets, 1 epoch)' if args.quick else ''}; "
          f"{where(work, args.keep)}\n", flush=True)
    for name in args.datasets:
        build_recipe_data(name, os.path.join(work, 'data', name), args.quick)
    print(RECIPE_HEADER, flush=True)
    results, failed = {}, 0
    for dataset, config, model, seed in itertools.product(args.datasets, args.configs,
                                                          args.models, seeds):
        key = (dataset, model, config, seed)
        try:
            results[key] = run_recipe_cell(os.path.join(work, 'data', dataset),
                                           recipe_flags(model, config, seed, args.quick,
                                                        args.epochs),
                                           os.path.join(work, 'logs', '_'.join(map(str, key))))
            print(recipe_row(*key, results[key]), flush=True)
        except RecipeError as e:            # the other cells still run
            failed += 1
            print(f"| {dataset} | {model_label(model)} | {config} | {seed} | failed: {e} "
                  f"| | | |", flush=True)
    if len(seeds) > 1 and results:
        print('\n' + '\n'.join(recipe_summary(results)))
        lines = [decision(results, dataset, model, a, b) for a, b in args.compare or []
                 for dataset, model in itertools.product(args.datasets, args.models)]
        print('\n'.join([''] + [line for line in lines if line]))
    if failed:
        logs = f"logs in {work}" if args.keep else "rerun with --keep to keep their logs"
        raise RecipeError(f"{failed} of {failed + len(results)} runs failed ({logs})")
