"""benchmark.py accuracy-time: the time to a validation top-1 read from a run's epochs."""
import pytest

import benchmark
from benchmarks.bench_accuracy_time import accuracy_time_lines, epochs_to_reach
from conftest import needs_fashion_mnist


def epoch(n, top1, seconds):
    return {'epoch': n, 'val_top1': top1, 'epoch_time_s': seconds, 'images_per_s': 100.0}


SUMMARY = {'epochs': [epoch(1, 70.0, 10.0), epoch(2, 86.0, 12.0), epoch(3, 89.5, 11.0)],
           'wall_time_s': 50.0}


def test_the_first_epoch_at_the_target_counts_the_training_seconds_before_it():
    assert epochs_to_reach(SUMMARY['epochs'], 85) == (2, 22.0)
    assert epochs_to_reach(SUMMARY['epochs'], 70) == (1, 10.0)
    assert epochs_to_reach(SUMMARY['epochs'], 90) is None
    lines = accuracy_time_lines(SUMMARY, [85, 90])
    assert '85 % top-1: reached in epoch 2, after 22 s of training' in lines
    assert '90 % top-1: not reached in 3 epochs' in lines
    assert lines[-1].startswith('best top-1 after 3 epochs: 89.50 %; wall time 50 s')


@needs_fashion_mnist
@pytest.mark.slow
def test_a_quick_run_converts_trains_and_reports(capsys):
    benchmark.main(['accuracy-time', '--quick'])
    out = capsys.readouterr().out
    assert 'auto settings: amp ' in out and 'channels-last True, data cache True' in out
    assert '| 1 |' in out and 'best top-1 after 1 epochs' in out
    assert 'removed at the end' in out          # without --keep
