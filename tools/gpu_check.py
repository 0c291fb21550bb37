"""Every GPU check of the toolkit in one run, for the minutes a GPU is at hand.

    make gpu-check                       (or: python tools/gpu_check.py)
    python tools/gpu_check.py --list      the commands it would run, without running them
    python tools/gpu_check.py --rehearse  the same plan on the CPU, to find a fault in it first

It generates a small offline data set, then runs, each with its own time limit: the
graders' code/test_conv.py and the suite's CUDA tests; benchmark.py conv, attention,
attack, step and pipeline on the GPU; short trainings with the GPU's auto settings (data
cache in GPU memory, batched warp, amp, channels-last), in fp32 (--no-amp, the same
epochs and seed: the report sets its top-1 beside the auto run's, which measures the
amp decision) and with --no-data-cache; a one-process torchrun, which trains through
DDP over NCCL; -e and -a of the trained model; benchmark.py accuracy-time (the handout's
and the fast recipe, on Fashion-MNIST where it is installed); last, as the budget allows,
--compile. A failed or timed-out check is recorded and the next one runs. Everything it
saw goes to results/gpu-check/<date>-<gpu>.md, with the same in JSON beside it.

On a machine without CUDA it says so in one line and exits 0. --rehearse runs the plan
on the CPU instead (gloo for torchrun, tiny data, one repetition, torch.compile off: the
inductor takes minutes on a CPU; two checks at a time), within a smaller budget, and
writes the same report as <date>-cpu-rehearsal.md: it checks the script, it measures
nothing.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import _paths  # noqa: F401  code/ and tools/ on sys.path: runs from any directory
from toolkit import run_record as rr
from arg_types import positive_float

from _paths import CODE, TOOLS
REPO = os.path.dirname(CODE)
DEFAULT_OUT = os.path.join(REPO, 'results', 'gpu-check')

# the generated set: 10 classes of textures (make_demo_data.py), big enough for a few
# hundred steps at the batch below, small enough to write in seconds
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 400, 50
TRAIN = ['--num-classes', str(CLASSES), '--epochs', '3', '--warmup', '1', '-b', '128',
         '--lr', '0.05', '-j', '4', '--seed', '0', '-p', '20']
BUDGET = 480          # seconds for the whole plan on a GPU
# The rehearsal: the same commands, each with these flags after its own (argparse keeps
# the last value of a flag), so that every one runs in seconds on a CPU
REHEARSAL_BUDGET = 600     # under a minute on a quiet 2-core machine; room for a busy one
REHEARSAL_DATA = ['--train-per-class', '4', '--val-per-class', '2', '--size', '32']
REHEARSAL_FLAGS = {'train': ['--epochs', '2', '-b', '8', '-j', '0'],
                   '-e/-a': ['-j', '0'],
                   'benchmark.py': ['--repeats', '1', '--batch-size', '2'],
                   'pipeline': ['--repeats', '1', '--images', '16'],
                   'pytest': ['--collect-only']}   # the suite runs its CPU tests already
# --compile runs, compiling nothing; one thread each, as tiny models need no more and a
# busy machine's other jobs then slow a check down the least
REHEARSAL_ENV = {'TORCH_COMPILE_DISABLE': '1', 'OMP_NUM_THREADS': '1'}
# ... and two checks at a time: most of a rehearsal check's seconds are the imports of one
# Python process, which a second core halves. On the GPU one at a time: they measure.
REHEARSAL_JOBS = 2


def plan(python, data, logs, device, rehearse=False):
    """[(name, command, seconds allowed)]: the checks, in the order they run."""
    main, bench = os.path.join(CODE, 'main.py'), os.path.join(TOOLS, 'benchmark.py')
    backend = 'gloo' if rehearse else 'nccl'

    def small(flags_of):                # the rehearsal's flags, nothing on the GPU
        return REHEARSAL_FLAGS[flags_of] if rehearse else []

    def train(name, *flags):
        return [python, main, data, '--device', device, '--log-dir', logs, '--name', name] \
            + TRAIN + list(flags) + small('train')

    def benchmark(which, *flags):
        return [python, bench, which, '--device', device] + list(flags) \
            + small('pipeline' if which == 'pipeline' else 'benchmark.py')

    def best_of(name):   # run folders are named exp_<time>_<name>; the shell finds it
        return rr.checkpoint_path(os.path.join(logs, f'exp_*_{name}'), rr.BEST)

    def use_best(flag):  # -e or -a of the auto run's best model
        return [python, main, data, '--device', device, '--log-dir', logs, flag,
                '--resume', best_of('auto'), '-j', '4'] + small('-e/-a')
    return [
        ('test_conv.py', [python, os.path.join(CODE, 'test_conv.py')], 60),
        ('CUDA tests', [python, '-m', 'pytest', '-q', '-k', 'cuda',
                        os.path.join(REPO, 'tests')] + small('pytest'), 120),
        ('benchmark conv', benchmark('conv'), 60),
        ('benchmark attention', benchmark('attention'), 60),
        ('benchmark attack', benchmark('attack'), 60),
        ('benchmark step', benchmark('step', '--batch-size', '128',
                                     '--models', 'simplenet', 'cnn', 'vit'), 90),
        ('benchmark pipeline', benchmark('pipeline', '--data', data), 60),
        ('train auto', train('auto'), 120),
        ('train fp32', train('fp32', '--no-amp'), 120),
        ('train no-data-cache', train('percpu', '--no-data-cache'), 120),
        ('train levers', train('levers', '--ema', '0.999', '--label-smoothing', '0.1',
                               '--min-train-size', '64'), 120),
        (f'torchrun {backend}', [python, '-m', 'torch.distributed.run', '--standalone',
                                 '--nproc_per_node', '1']
         + train('torchrun', '--dist-backend', backend, '--stop-after', '1')[1:], 90),
        ('evaluate -e', use_best('-e'), 90),
        ('attack -a', use_best('-a'), 120),
        ('benchmark accuracy-time', accuracy_time(python, bench, data, device, rehearse), 150),
        # last: compiling takes minutes, and the checks above do not need it
        ('train compile', train('compile', '--compile'), 180),
    ]


def accuracy_time(python, bench, data, device, rehearse):
    """benchmark.py accuracy-time as on a CPU (the handout's and the fast recipe), on
    Fashion-MNIST where its package is installed, else on the generated set; the
    rehearsal's is the same command with --quick (a few Fashion-MNIST images)."""
    from make_real_data import FASHION_DIR
    on = [] if os.path.isdir(FASHION_DIR) else ['--data', data]
    return [python, bench, 'accuracy-time', '--device', device] + on + \
        (['--quick'] if rehearse else [])


def expand(command):
    """A command with its one glob (a run folder made by an earlier check) filled in."""
    import glob
    out = []
    for word in command:
        matches = sorted(glob.glob(word)) if '*' in word else [word]
        out.append(matches[-1] if matches else word)
    return out


def run_check(name, command, seconds, deadline, env=None):
    """Run one check (env: the environment, default this one's); {name, command, status,
    seconds, output} where status is passed, failed (exit N), timed out or skipped (no
    time left)."""
    left = deadline - time.monotonic()
    record = {'name': name, 'command': ' '.join(command), 'seconds': 0.0}
    if left < 10:
        return dict(record, status='skipped (no time left)', output='')
    start = time.monotonic()
    try:
        done = subprocess.run(expand(command), capture_output=True, text=True, env=env,
                              timeout=min(seconds, left), stdin=subprocess.DEVNULL)
        status = 'passed' if done.returncode == 0 else f'failed (exit {done.returncode})'
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f'timed out after {min(seconds, left):.0f} s'
        output = ''.join(x.decode(errors='replace') if isinstance(x, bytes) else (x or '')
                         for x in (exc.stdout, exc.stderr))
    return dict(record, status=status, seconds=round(time.monotonic() - start, 1),
                output=output)


def run_checks(checks, deadline, env=None, jobs=1):
    """run_check for each (name, command, seconds), `jobs` at once, each printed as it ends
    and recorded in plan order. A check whose command names an earlier check's run folder
    (a glob: -e and -a of the auto run) starts after every check before it has ended."""
    from concurrent.futures import ThreadPoolExecutor
    records, started = [], []

    def wait_for(count):
        while len(records) < count:
            records.append(started[len(records)].result())
            print(f"  {records[-1]['name']}: {records[-1]['status']} "
                  f"({records[-1]['seconds']} s)", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            for name, command, seconds in checks:
                if any('*' in word for word in command):
                    wait_for(len(started))
                started.append(pool.submit(run_check, name, command, seconds, deadline, env))
            wait_for(len(started))
        except BaseException:   # Ctrl-C: the checks still queued never start
            pool.shutdown(cancel_futures=True)
            raise
    return records


def figures(output, lines=14):
    """The lines of a check's output worth keeping: its last lines, without progress bars
    and per-iteration logging."""
    noise = re.compile(r'^(Epoch: \[|Test: \[|Attack: \[|\s*\d+%\||WARNING|W\d{4} )')
    kept = [l.rstrip() for l in output.splitlines() if l.strip() and not noise.match(l)]
    return kept[-lines:]


def run_summaries(logs):
    """{run folder name: the figures of its summary.json} for the report's table."""
    table = {}
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        try:
            summary = rr.read_summary(os.path.join(logs, name))
        except (OSError, ValueError, rr.SchemaError):
            continue
        if not isinstance(summary, dict) or not summary:
            continue
        last = (summary.get('epochs') or [{}])[-1]
        table[name] = {'status': summary.get('status'), 'best_acc1': summary.get('best_acc1'),
                       'images_per_s': last.get('images_per_s'),
                       'peak_memory_mb': last.get('peak_memory_mb'),
                       'epoch_time_s': last.get('epoch_time_s'),
                       'dist_backend': summary.get('dist_backend'),
                       'speed': {k: summary.get('args', {}).get(k) for k in
                                 ('amp', 'amp_dtype', 'channels_last', 'compile',
                                  'data_cache')}}
    return table


def amp_against_fp32(runs):
    """The report's lines on the amp decision: the auto run (amp where the device takes
    it) beside the fp32 run (--no-amp), at equal epochs and seed; [] without both."""
    by_name = {name.rsplit('_', 1)[-1]: r for name, r in runs.items()}
    pair = [('auto', by_name.get('auto')), ('fp32 (--no-amp)', by_name.get('fp32'))]
    if any(r is None for _, r in pair):
        return []
    lines = ['## amp against fp32 (equal epochs and seed)', '',
             '| run | amp | best top-1 | images/s |', '| --- | --- | --- | --- |']
    for label, r in pair:
        amp = r['speed'].get('amp_dtype') if r['speed'].get('amp') else 'off'
        lines.append(f"| {label} | {amp} | {r['best_acc1']} | {rounded(r['images_per_s'])} |")
    (_, auto), (_, fp32) = pair
    if auto['best_acc1'] is not None and fp32['best_acc1'] is not None:
        lines += ['', f"auto - fp32: {auto['best_acc1'] - fp32['best_acc1']:+.2f} points of "
                      f"best top-1 (one seed each: a hint, not a decision)"]
    return lines + ['']


def rounded(value):
    """A figure as the report shows it: floats to 2 decimals."""
    return round(value, 2) if isinstance(value, float) else value


def write_report(out_dir, facts, checks, runs):
    """results/gpu-check/<date>-<gpu>.md and .json; returns the .md path."""
    os.makedirs(out_dir, exist_ok=True)
    gpu = re.sub(r'[^A-Za-z0-9]+', '-', facts.get('gpu', 'gpu')).strip('-').lower()
    stem = os.path.join(out_dir, f"{facts['date']}-{gpu}")
    with open(stem + '.json', 'w') as f:
        json.dump({'machine': facts, 'checks': checks, 'runs': runs}, f, indent=1)
    title = 'GPU check rehearsal on the CPU' if 'rehearsal' in facts else 'GPU check'
    lines = [f"# {title}, {facts['date']}", '',
             *(f"- {key}: {value}" for key, value in facts.items() if key != 'date'), '',
             '| check | status | seconds |', '| --- | --- | --- |',
             *(f"| {c['name']} | {c['status']} | {c['seconds']} |" for c in checks), '']
    if runs:
        lines += ['## Training runs (last epoch)', '',
                  '| run | status | best top-1 | images/s | peak MiB | epoch s | speed '
                  '| process group |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
        for name, r in runs.items():
            speed = ', '.join(f'{k}={v}' for k, v in r['speed'].items())
            shown = [rounded(r[k]) for k in ('best_acc1', 'images_per_s', 'peak_memory_mb',
                                                'epoch_time_s')]
            lines.append(f"| {name} | {r['status']} | {' | '.join(map(str, shown))} | {speed} "
                         f"| {r.get('dist_backend') or 'none'} |")
        lines.append('')
        lines += amp_against_fp32(runs)
    for c in checks:
        lines += [f"## {c['name']}: {c['status']}", '', '```', c['command'],
                  *figures(c['output']), '```', '']
    with open(stem + '.md', 'w') as f:
        f.write('\n'.join(lines))
    return stem + '.md'


def machine_facts(device):
    import torch
    props = torch.cuda.get_device_properties(device)
    return {'date': datetime.date.today().isoformat(), 'gpu': props.name,
            'capability': '.'.join(map(str, torch.cuda.get_device_capability(device))),
            'memory_gib': round(props.total_memory / 2**30, 1), 'gpus': torch.cuda.device_count(),
            'torch': torch.__version__, 'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version(), 'python': sys.version.split()[0],
            'cpus': os.cpu_count()}


def rehearsal_facts():
    """The report's machine facts for a rehearsal on the CPU."""
    import torch
    from benchmarks.bench_timing import cpu_name
    return {'date': datetime.date.today().isoformat(), 'gpu': 'CPU rehearsal',
            'rehearsal': 'the GPU plan on the CPU (--device cpu, gloo, tiny data, one '
                         'repetition, torch.compile off): it checks the script, it measures '
                         'nothing', 'cpu': cpu_name(), 'torch': torch.__version__,
            'python': sys.version.split()[0], 'cpus': os.cpu_count()}


def make_data(data, rehearse):
    """The generated set (make_demo_data.py); the rehearsal's is tiny."""
    sizes = REHEARSAL_DATA if rehearse else ['--train-per-class', str(TRAIN_PER_CLASS),
                                             '--val-per-class', str(VAL_PER_CLASS)]
    subprocess.run([sys.executable, os.path.join(TOOLS, 'make_demo_data.py'), data,
                    '--num-classes', str(CLASSES)] + sizes, check=True,
                   stdout=subprocess.DEVNULL)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda',
                        help='the GPU to check (default: cuda; --rehearse takes the CPU)')
    parser.add_argument('--out', default=DEFAULT_OUT, help='where the report goes')
    parser.add_argument('--budget', type=positive_float, default=None,
                        help=f'seconds for all the checks together (default: {BUDGET}; '
                             f'rehearsal: {REHEARSAL_BUDGET})')
    parser.add_argument('--list', action='store_true', help='print the commands and stop')
    parser.add_argument('--rehearse', action='store_true',
                        help='run the same plan on the CPU (gloo, tiny data) and write the '
                             'same report: checks this script before a GPU is at hand')
    args = parser.parse_args(argv)
    device = 'cpu' if args.rehearse else args.device
    work = tempfile.mkdtemp(prefix='gpu-check-')
    data, logs = os.path.join(work, 'data'), os.path.join(work, 'logs')
    checks = plan(sys.executable, data, logs, device, args.rehearse)
    if args.list:
        for name, command, seconds in checks:
            print(f"{name} ({seconds} s): {' '.join(command)}")
        shutil.rmtree(work)
        return 0
    import torch
    if not args.rehearse and not torch.cuda.is_available():
        print(f'gpu-check: no CUDA device on this machine (torch {torch.__version__}); '
              f'nothing to check')
        shutil.rmtree(work)
        return 0
    budget = args.budget or (REHEARSAL_BUDGET if args.rehearse else BUDGET)
    deadline = time.monotonic() + budget
    facts = rehearsal_facts() if args.rehearse else machine_facts(torch.device(device))
    env = dict(os.environ, **REHEARSAL_ENV) if args.rehearse else None
    print(f"gpu-check: {facts['gpu']}, torch {facts['torch']}, {budget:.0f} s; data and runs "
          f"in {work}", flush=True)
    make_data(data, args.rehearse)
    records = run_checks(checks, deadline, env, REHEARSAL_JOBS if args.rehearse else 1)
    report = write_report(args.out, facts, records, run_summaries(logs))
    shutil.rmtree(work, ignore_errors=True)
    print(f'gpu-check: report in {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
