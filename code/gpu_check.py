"""Every GPU check of the toolkit in one run, for the minutes a GPU is at hand.

    make gpu-check                       (or: python code/gpu_check.py)
    python code/gpu_check.py --list      the commands it would run, without running them

It generates a small offline data set, then runs, each with its own time limit: the
graders' code/test_conv.py and the suite's CUDA tests; benchmark.py conv, attention,
attack, step and pipeline on the GPU; short trainings with the GPU's auto settings (data
cache in GPU memory, batched warp, amp, channels-last), with --compile and with
--no-data-cache; a one-process torchrun with NCCL; -e and -a of the trained model. A
failed or timed-out check is recorded and the next one runs. Everything it saw goes to
results/gpu-check/<date>-<gpu>.md, with the same in JSON beside it.

On a machine without CUDA it says so in one line and exits 0.
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

import run_record as rr

CODE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(CODE)
DEFAULT_OUT = os.path.join(REPO, 'results', 'gpu-check')

# the generated set: 10 classes of textures (make_demo_data.py), big enough for a few
# hundred steps at the batch below, small enough to write in seconds
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 400, 50
TRAIN = ['--num-classes', str(CLASSES), '--epochs', '3', '--warmup', '1', '-b', '128',
         '--lr', '0.05', '-j', '4', '--seed', '0', '-p', '20']


def plan(python, data, logs, device):
    """[(name, command, seconds allowed)]: the checks, in the order they run."""
    main, bench = os.path.join(CODE, 'main.py'), os.path.join(CODE, 'benchmark.py')

    def train(name, *flags):
        return [python, main, data, '--device', device, '--log-dir', logs, '--name', name] \
            + TRAIN + list(flags)

    def best_of(name):   # run folders are named exp_<time>_<name>; the shell finds it
        return rr.checkpoint_path(os.path.join(logs, f'exp_*_{name}'), rr.BEST)
    return [
        ('test_conv.py', [python, os.path.join(CODE, 'test_conv.py')], 60),
        ('CUDA tests', [python, '-m', 'pytest', '-q', '-k', 'cuda',
                        os.path.join(REPO, 'tests')], 120),
        ('benchmark conv', [python, bench, 'conv', '--device', device], 60),
        ('benchmark attention', [python, bench, 'attention', '--device', device], 60),
        ('benchmark attack', [python, bench, 'attack', '--device', device], 60),
        ('benchmark step', [python, bench, 'step', '--device', device, '--batch-size', '128',
                            '--models', 'simplenet', 'cnn', 'vit'], 90),
        ('benchmark pipeline', [python, bench, 'pipeline', '--device', device,
                                '--data', data], 60),
        ('train auto', train('auto'), 120),
        ('train compile', train('compile', '--compile'), 180),
        ('train no-data-cache', train('percpu', '--no-data-cache'), 120),
        ('torchrun nccl', [python, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '1'] + train('nccl', '--dist-backend', 'nccl',
                                                            '--stop-after', '1')[1:], 90),
        ('evaluate -e', [python, main, data, '--device', device, '--log-dir', logs, '-e',
                         '--resume', best_of('auto'), '-j', '4'], 90),
        ('attack -a', [python, main, data, '--device', device, '--log-dir', logs, '-a',
                       '--resume', best_of('auto'), '-j', '4'], 120),
    ]


def expand(command):
    """A command with its one glob (a run folder made by an earlier check) filled in."""
    import glob
    out = []
    for word in command:
        matches = sorted(glob.glob(word)) if '*' in word else [word]
        out.append(matches[-1] if matches else word)
    return out


def run_check(name, command, seconds, deadline):
    """Run one check; {name, command, status, seconds, output} where status is passed,
    failed (exit N), timed out or skipped (no time left)."""
    left = deadline - time.monotonic()
    record = {'name': name, 'command': ' '.join(command), 'seconds': 0.0}
    if left < 10:
        return dict(record, status='skipped (no time left)', output='')
    start = time.monotonic()
    try:
        done = subprocess.run(expand(command), capture_output=True, text=True,
                              timeout=min(seconds, left), stdin=subprocess.DEVNULL)
        status = 'passed' if done.returncode == 0 else f'failed (exit {done.returncode})'
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f'timed out after {min(seconds, left):.0f} s'
        output = ''.join(x.decode(errors='replace') if isinstance(x, bytes) else (x or '')
                         for x in (exc.stdout, exc.stderr))
    return dict(record, status=status, seconds=round(time.monotonic() - start, 1),
                output=output)


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
                       'speed': {k: summary.get('args', {}).get(k) for k in
                                 ('amp', 'amp_dtype', 'channels_last', 'compile',
                                  'data_cache')}}
    return table


def write_report(out_dir, facts, checks, runs):
    """results/gpu-check/<date>-<gpu>.md and .json; returns the .md path."""
    os.makedirs(out_dir, exist_ok=True)
    gpu = re.sub(r'[^A-Za-z0-9]+', '-', facts.get('gpu', 'gpu')).strip('-').lower()
    stem = os.path.join(out_dir, f"{facts['date']}-{gpu}")
    with open(stem + '.json', 'w') as f:
        json.dump({'machine': facts, 'checks': checks, 'runs': runs}, f, indent=1)
    lines = [f"# GPU check, {facts['date']}", '',
             *(f"- {key}: {value}" for key, value in facts.items() if key != 'date'), '',
             '| check | status | seconds |', '| --- | --- | --- |',
             *(f"| {c['name']} | {c['status']} | {c['seconds']} |" for c in checks), '']
    if runs:
        lines += ['## Training runs (last epoch)', '',
                  '| run | status | best top-1 | images/s | peak MiB | epoch s | speed |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for name, r in runs.items():
            speed = ', '.join(f'{k}={v}' for k, v in r['speed'].items())
            lines.append(f"| {name} | {r['status']} | {r['best_acc1']} | {r['images_per_s']} "
                         f"| {r['peak_memory_mb']} | {r['epoch_time_s']} | {speed} |")
        lines.append('')
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', help='the GPU to check (default: cuda)')
    parser.add_argument('--out', default=DEFAULT_OUT, help='where the report goes')
    parser.add_argument('--budget', type=float, default=480,
                        help='seconds for all the checks together (default: 480)')
    parser.add_argument('--list', action='store_true', help='print the commands and stop')
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix='gpu-check-')
    data, logs = os.path.join(work, 'data'), os.path.join(work, 'logs')
    checks = plan(sys.executable, data, logs, args.device)
    if args.list:
        for name, command, seconds in checks:
            print(f"{name} ({seconds} s): {' '.join(command)}")
        shutil.rmtree(work)
        return 0
    import torch
    if not torch.cuda.is_available():
        print(f'gpu-check: no CUDA device on this machine (torch {torch.__version__}); '
              f'nothing to check')
        shutil.rmtree(work)
        return 0
    deadline = time.monotonic() + args.budget
    facts = machine_facts(torch.device(args.device))
    print(f"gpu-check: {facts['gpu']}, torch {facts['torch']}; data and runs in {work}",
          flush=True)
    subprocess.run([sys.executable, os.path.join(CODE, 'make_demo_data.py'), data,
                    '--num-classes', str(CLASSES), '--train-per-class', str(TRAIN_PER_CLASS),
                    '--val-per-class', str(VAL_PER_CLASS)], check=True,
                   stdout=subprocess.DEVNULL)
    records = []
    for name, command, seconds in checks:
        records.append(run_check(name, command, seconds, deadline))
        print(f"  {name}: {records[-1]['status']} ({records[-1]['seconds']} s)", flush=True)
    report = write_report(args.out, facts, records, run_summaries(logs))
    shutil.rmtree(work, ignore_errors=True)
    print(f'gpu-check: report in {report}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
