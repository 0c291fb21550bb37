"""benchmark.py accuracy-time: the time to a validation top-1 read from a run's epochs.
A short run of the benchmark itself is one of the GPU check's checks (test_gpu_check.py).
"""
from benchmarks.bench_accuracy_time import accuracy_time_lines, comparison_lines, epochs_to_reach


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


def test_the_comparison_has_a_line_per_recipe():
    fast = {'epochs': [epoch(1, 86.0, 5.0), epoch(2, 90.5, 5.0)], 'wall_time_s': 15.0}
    lines = comparison_lines({'handout': SUMMARY, 'fast': fast}, [85, 90])
    assert lines[0] == '| recipe | epochs | to 85 % | to 90 % | best top-1 | wall s |'
    assert lines[2] == '| handout | 3 | epoch 2, 22 s | not reached | 89.50 | 50 |'
    assert lines[3] == '| fast | 2 | epoch 1, 5 s | epoch 2, 10 s | 90.50 | 15 |'
