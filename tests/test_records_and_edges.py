"""Rough edges a student reads: a checkpoint's numbers of the wrong shape or type, the
-a results table, and -e/-a given a run folder instead of a checkpoint file."""
import os
import re

import pytest
import torch

from conftest import expect_error
from toolkit import attack_eval
from toolkit import checkpoint
from utils import CheckpointError


def handout_checkpoint(**entries):
    """A checkpoint as the handout's main.py saves one: best_acc1 is a tensor."""
    raw = {'epoch': 5, 'model_arch': 'simplenet', 'best_acc1': torch.tensor(42.0),
           'state_dict': {'fc.weight': torch.zeros(2, 2)}, 'optimizer': {'state': {}}}
    raw.update(entries)
    return raw


@pytest.mark.parametrize('entry, value, words', [
    ('best_acc1', torch.tensor([40.0, 50.0]), 'a tensor of shape (2,)'),
    ('best_acc1', torch.zeros(30, 30), 'a tensor of shape (30, 30)'),   # a long repr
    ('best_acc1', 'high', "'high'"),
    ('best_acc1', torch.tensor(float('nan')), 'nan'),
    ('best_acc1', 420.0, '420.0'),
    ('epoch', torch.tensor([3, 4]), 'a tensor of shape (2,)'),
    ('epoch', 2.5, '2.5'),
    ('wall_time_s', torch.ones(3), 'a tensor of shape (3,)'),
])
def test_a_numeric_checkpoint_entry_of_the_wrong_shape_or_type_is_one_line(entry, value,
                                                                          words):
    with pytest.raises(CheckpointError) as info:
        checkpoint.from_file(handout_checkpoint(**{entry: value}), 'h.pth.tar')
    message = str(info.value)
    assert '\n' not in message and len(message) < 200, message
    assert f"'h.pth.tar' is damaged: its '{entry}' is {words}" in message, message


def test_one_element_tensors_are_read_as_numbers():
    """The handout's tensor best_acc1, of any shape with one element, is one number."""
    ckpt = checkpoint.from_file(handout_checkpoint(best_acc1=torch.tensor([[42.5]]),
                                                   epoch=torch.tensor(5)), 'h.pth.tar')
    assert (ckpt.best_acc1, ckpt.epoch) == (42.5, 5)
    assert isinstance(ckpt.best_acc1, float) and isinstance(ckpt.epoch, int)


@pytest.mark.parametrize('flag', ['-e', '-a'])
def test_evaluating_a_checkpoint_with_a_damaged_number_is_one_line(tmp_path, capsys, flag):
    path = str(tmp_path / 'handout.pth.tar')
    torch.save(handout_checkpoint(best_acc1=torch.tensor([40.0, 50.0])), path)
    expect_error([str(tmp_path), f'--resume={path}', flag, '--log-dir',
                  str(tmp_path / 'logs')], capsys, path, "'best_acc1'", 'shape (2,)')


def test_the_attack_results_table_lines_up(capsys):
    """Every figure of -a's table ends where its column's heading ends."""
    result = {f'{kind}_top{k}{suffix}': 12.3456 * k for kind in ('clean', 'adv')
              for k in (1, 5) for suffix in ('', '_noflip')}
    result.update(num_steps=10, step_size=0.01, epsilon=0.1, success_rate=50.0,
                  target_hit_rate=5.0)
    attack_eval.print_attack_result(result)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if 'adversarial' in line)
    ends = [header.index(word) + len(word) for word in ('clean', 'adversarial')]
    rows = [line for line in lines if line.startswith('Acc@')]
    assert len(rows) == 4
    for row in rows:
        assert [m.end() for m in re.finditer(r'\d+\.\d\d', row)] == ends, '\n'.join(lines)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with its best model (the handout's format will do)."""
    run = tmp_path / 'exp_1'
    (run / 'models').mkdir(parents=True)
    torch.save(handout_checkpoint(), run / 'models' / 'model_best.pth.tar')
    return run


def test_a_run_folder_given_as_the_checkpoint_reads_its_best_model(run_dir, capsys):
    ckpt, fingerprint = checkpoint.read_checkpoint(str(run_dir))
    assert ckpt.epoch == 5 and fingerprint['bytes'] == os.path.getsize(
        run_dir / 'models' / 'model_best.pth.tar')
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(run_dir / 'models' / 'model_best.pth.tar') in out[0], out


def test_a_folder_without_a_best_model_asks_for_a_file(run_dir):
    os.remove(run_dir / 'models' / 'model_best.pth.tar')
    with pytest.raises(CheckpointError) as info:
        checkpoint.read_checkpoint(str(run_dir))
    message = str(info.value)
    assert '\n' not in message and 'no checkpoint found' not in message, message
    assert 'is a folder' in message and 'a checkpoint file' in message, message
    assert str(run_dir / 'models' / 'model_best.pth.tar') in message, message


def test_a_result_on_a_run_folder_is_checked_against_its_best_model(run_dir):
    """main.py records the path given to --resume; for a run folder, the result is on its
    model_best.pth.tar, and is stale only when that file changes."""
    import report
    best = run_dir / 'models' / 'model_best.pth.tar'
    with open(best, 'rb') as f:
        result = {'checkpoint': str(run_dir), 'file': checkpoint.file_fingerprint(f)}
    assert report.checkpoint_state(result) == 'current'
    best.write_bytes(b'another epoch')
    assert report.checkpoint_state(result) == 'changed'
