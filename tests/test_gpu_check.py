"""gpu_check.py on the CPU: its no-GPU line, that every command it plans exists as
written, how it runs a check (passed, failed, timed out, no time left) and its report."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import benchmark
import gpu_check
import main as driver
from toolkit.settings import RECIPES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'gpu_check.py'),
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.strip()]
    assert done.stdout.startswith('gpu-check: no CUDA device') and not os.listdir(tmp_path)


@pytest.mark.parametrize('device, rehearse', [('cuda', False), ('cpu', True)])
def test_every_planned_command_parses(tmp_path, device, rehearse):
    """The flags of each main.py and benchmark.py command are the programs' own: a renamed
    flag would otherwise surface only on the day a GPU is at hand. The rehearsal's are the
    same commands with smaller sizes after them."""
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'train.txt').write_text('')   # benchmark.py checks --data exists
    checks = gpu_check.plan(sys.executable, str(tmp_path / 'data'), str(tmp_path / 'logs'),
                            device, rehearse)
    gpu = gpu_check.plan(sys.executable, str(tmp_path / 'data'), str(tmp_path / 'logs'),
                         'cuda')
    assert [name.replace('gloo', 'nccl') for name, _, _ in checks] == [n for n, _, _ in gpu]
    assert sum(seconds for _, _, seconds in gpu) < 1650   # each a limit; the budget cuts
    programs = set()
    for name, command, seconds in checks:
        assert 0 < seconds <= 240, name
        for i, word in enumerate(command):
            if word.endswith('main.py'):
                args = driver.parser.parse_args(command[i + 1:])
                assert args.device == device, name
                programs.add('main')
            elif word.endswith('benchmark.py'):
                assert benchmark.build_parser().parse_args(command[i + 1:]).device == device
                programs.add(command[i + 1])
    assert programs == {'main', 'conv', 'attention', 'attack', 'step', 'pipeline',
                        'accuracy-time'}
    (torchrun,) = [command for name, command, _ in checks if name.startswith('torchrun')]
    args = driver.parser.parse_args(torchrun[torchrun.index('--nproc_per_node') + 3:])
    assert args.dist_backend == ('gloo' if rehearse else 'nccl')
    (auto,), (fp32,) = ([driver.parser.parse_args(command[2:]) for name, command, _ in checks
                         if name == f'train {which}'] for which in ('auto', 'fp32'))
    assert fp32.amp is False and auto.amp is None         # auto: the device's default
    assert (auto.epochs, auto.seed, auto.batch_size) == (fp32.epochs, fp32.seed, fp32.batch_size)


@pytest.mark.slow
def test_run_check_records_each_outcome():
    deadline = time.monotonic() + 60
    ok = gpu_check.run_check('ok', [sys.executable, '-c', 'print("fine")'], 30, deadline)
    assert ok['status'] == 'passed' and ok['output'] == 'fine\n'
    bad = gpu_check.run_check('bad', [sys.executable, '-c', 'import sys; sys.exit(3)'], 30,
                              deadline)
    assert bad['status'] == 'failed (exit 3)'
    slow = gpu_check.run_check('slow', [sys.executable, '-c',
                                        'print("started", flush=True); import time; '
                                        'time.sleep(30)'], 2, deadline)
    assert slow['status'] == 'timed out after 2 s' and 'started' in slow['output']
    late = gpu_check.run_check('late', ['true'], 30, time.monotonic() + 5)
    assert late['status'] == 'skipped (no time left)'


def test_run_checks_runs_two_at_once_and_waits_before_a_run_folder(tmp_path, capsys):
    """The rehearsal's two at a time: 'a' and 'b' each wait for the other to have started
    (one at a time, the first would give up and fail); 'c' names a run folder that 'a'
    makes a second after 'b' has ended, so 'c' passes only if it waits for 'a' too."""
    meet = ('import os, sys, time; open(sys.argv[1], "w").close(); end = time.time() + 20\n'
            'while not os.path.exists(sys.argv[2]) and time.time() < end:\n'
            '    time.sleep(0.02)\n'
            'time.sleep(float(sys.argv[4])); os.makedirs(sys.argv[3])\n'
            'sys.exit(not os.path.exists(sys.argv[2]))')
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    checks = [('a', [sys.executable, '-c', meet, a, b, str(tmp_path / 'exp_1_a'), '1'], 30),
              ('b', [sys.executable, '-c', meet, b, a, str(tmp_path / 'b_done'), '0'], 30),
              ('c', [sys.executable, '-c', 'import os, sys; sys.exit(not os.path.isdir('
                     'sys.argv[1]))', str(tmp_path / 'exp_*_a')], 30)]
    records = gpu_check.run_checks(checks, time.monotonic() + 60, jobs=2)
    assert [(r['name'], r['status']) for r in records] == [('a', 'passed'), ('b', 'passed'),
                                                           ('c', 'passed')]
    assert capsys.readouterr().out.splitlines()[-1].startswith('  c: passed')


def test_ctrl_c_stops_the_checks_still_queued(tmp_path, monkeypatch):
    """One at a time (the GPU's way) every check is queued at once; a Ctrl-C while the
    first is reported must not leave the queue to run on: 'c' never starts."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpu_check, 'print', interrupted, raising=False)
    mark = [sys.executable, '-c', 'import sys, time; time.sleep(float(sys.argv[2])); '
            'open(sys.argv[1], "w").close()']
    checks = [(name, mark + [str(tmp_path / name), pause], 30)
              for name, pause in (('a', '0'), ('b', '1'), ('c', '0'))]
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_checks(checks, time.monotonic() + 60, jobs=1)
    assert (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()


def test_expand_fills_in_a_run_folder(tmp_path):
    (tmp_path / 'exp_1_auto' / 'models').mkdir(parents=True)
    pattern = str(tmp_path / 'exp_*_auto' / 'models')
    assert gpu_check.expand(['x', pattern]) == ['x', str(tmp_path / 'exp_1_auto' / 'models')]
    assert gpu_check.expand([str(tmp_path / 'none_*')]) == [str(tmp_path / 'none_*')]


def test_report_holds_the_machine_the_checks_and_the_runs(tmp_path):
    logs = tmp_path / 'logs'
    (logs / 'exp_1_auto').mkdir(parents=True)
    (logs / 'exp_1_auto' / 'summary.json').write_text(json.dumps(
        {'status': 'finished', 'best_acc1': 91.5, 'args': {'amp': True, 'compile': False},
         'epochs': [{'images_per_s': 10.0}, {'images_per_s': 12000.5, 'peak_memory_mb': 812,
                                             'epoch_time_s': 0.4}]}))
    (logs / 'exp_2_broken').mkdir()
    (logs / 'exp_2_broken' / 'summary.json').write_text('{not json')
    facts = {'date': '2026-11-29', 'gpu': 'NVIDIA H200', 'torch': '2.14.1'}
    checks = [{'name': 'benchmark step', 'command': 'python benchmark.py step',
               'status': 'passed', 'seconds': 12.0,
               'output': 'Epoch: [1][0/10] noise\n  cnn  fp32 10 (1.00x)\n'}]
    path = gpu_check.write_report(str(tmp_path / 'out'), facts, checks,
                                  gpu_check.run_summaries(str(logs)))
    assert os.path.basename(path) == '2026-11-29-nvidia-h200.md'
    text = open(path).read()
    assert '| benchmark step | passed | 12.0 |' in text and 'cnn  fp32 10 (1.00x)' in text
    assert 'noise' not in text and '| exp_1_auto | finished | 91.5 | 12000.5 | 812 |' in text
    saved = json.load(open(path[:-3] + '.json'))
    assert saved['machine']['gpu'] == 'NVIDIA H200' and list(saved['runs']) == ['exp_1_auto']


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_check_and_writes_the_report(tmp_path):
    """`gpu_check.py --rehearse`: the GPU's plan on the CPU, every check passes (a fault of
    the script shows here, not in GPU minutes), the torchrun run trains through a process
    group (gloo here, NCCL on the GPU), and the report sets the auto run's top-1 beside the
    fp32 run's. Under a minute on a quiet 2-core machine."""
    done = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'gpu_check.py'),
                           '--rehearse', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = [name for name in os.listdir(tmp_path) if name.endswith('.md')]
    assert report.endswith('-cpu-rehearsal.md')
    saved = json.load(open(tmp_path / report.replace('.md', '.json')))
    planned = [name for name, _, _ in gpu_check.plan(sys.executable, 'D', 'L', 'cpu', True)]
    assert [c['name'] for c in saved['checks']] == planned
    failed = [(c['name'], c['status'], c['output'][-800:]) for c in saved['checks']
              if c['status'] != 'passed']
    assert not failed, failed
    runs = {name.rsplit('_', 1)[-1]: run for name, run in saved['runs'].items()}
    assert runs['torchrun']['dist_backend'] == 'gloo' and runs['auto']['dist_backend'] is None
    assert runs['fp32']['speed']['amp'] is False
    text = open(tmp_path / report).read()
    auto, fp32 = (f"| {label} | {amp} | {runs[name]['best_acc1']} |" for label, amp, name in
                  (('auto', runs['auto']['speed']['amp_dtype'] or 'off', 'auto'),
                   ('fp32 (--no-amp)', 'off', 'fp32')))
    assert auto in text and fp32 in text, text
    assert 'auto - fp32: ' in text
    # accuracy-time: the GPU's command, --quick (Fashion-MNIST where it is installed)
    (timed,) = [c['output'] for c in saved['checks'] if c['name'] == 'benchmark accuracy-time']
    assert 'channels-last True, data cache True' in timed
    assert 'best top-1 after 1 epochs' in timed and 'removed at the end' in timed
    assert '| handout | 1 |' in timed and '| fast | 1 |' in timed   # both recipes ran
    fast = RECIPES['fast']
    assert f"recipe: augment {fast['augment']}, label smoothing {fast['label_smoothing']}, " \
        f"image size {fast['image_size']}" in timed
