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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, 'code', 'gpu_check.py'),
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.strip()]
    assert done.stdout.startswith('gpu-check: no CUDA device') and not os.listdir(tmp_path)


def test_every_planned_command_parses(tmp_path):
    """The flags of each main.py and benchmark.py command are the programs' own: a renamed
    flag would otherwise surface only on the day a GPU is at hand."""
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'train.txt').write_text('')   # benchmark.py checks --data exists
    checks = gpu_check.plan(sys.executable, str(tmp_path / 'data'), str(tmp_path / 'logs'),
                            'cuda')
    programs = set()
    for name, command, seconds in checks:
        assert 0 < seconds <= 240, name
        for i, word in enumerate(command):
            if word.endswith('main.py'):
                args = driver.parser.parse_args(command[i + 1:])
                assert args.device == 'cuda', name
                programs.add('main')
            elif word.endswith('benchmark.py'):
                assert benchmark.build_parser().parse_args(command[i + 1:]).device == 'cuda'
                programs.add(command[i + 1])
    assert programs == {'main', 'conv', 'attention', 'attack', 'step', 'pipeline'}


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
