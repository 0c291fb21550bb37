"""checkpoint.py: the one definition of the checkpoint file, its writer and its reader."""
import glob
import os
import re

import pytest
import torch

from toolkit.checkpoint import Checkpoint, from_file, to_file
from utils import CheckpointError

CODE = os.path.join(os.path.dirname(__file__), os.pardir, 'code')


def weights():
    return {'fc.weight': torch.ones(3, 2), 'fc.bias': torch.zeros(3)}


def test_what_is_written_is_what_is_read(tmp_path):
    ckpt = Checkpoint(state_dict=weights(), epoch=4, arch='resnet10', args={'lr': 0.1},
                      optimizer={'state': {}, 'param_groups': []}, scheduler={'last_epoch': 8},
                      best_acc1=61.5, best_epoch=3, history=[{'epoch': 1}], wall_time_s=9.5,
                      schema=2)
    path = tmp_path / 'c.pth'
    torch.save(to_file(ckpt), path)
    back = from_file(torch.load(path, weights_only=True), str(path))
    assert back.epoch == 4 and back.plan == {'lr': 0.1} and back.missing_for_resume() == []
    assert torch.equal(back.state_dict['fc.weight'], ckpt.state_dict['fc.weight'])
    best = back.best_model()                   # no best weights kept: this epoch's
    assert best.kind == 'best' and best.epoch == 3 and best.state_dict is back.state_dict
    assert set(to_file(best)) == {'kind', 'epoch', 'arch', 'state_dict', 'best_acc1', 'args'}


def test_the_handouts_checkpoint_and_bare_weights_are_read():
    handout = from_file({'epoch': 5, 'model_arch': 'simplenet', 'state_dict': weights(),
                         'best_acc1': torch.tensor(42.0), 'optimizer': {'state': {}}}, 'h')
    assert handout.best_acc1 == 42.0 and isinstance(handout.best_acc1, float)
    assert handout.model_arch == 'simplenet' and handout.missing_for_resume() == \
        ['args', 'scheduler']
    bare = from_file(weights(), 'b')
    assert bare.missing_for_resume() == ['epoch', 'args', 'optimizer', 'scheduler']


@pytest.mark.parametrize('raw, words', [
    ({'weights': 1}, 'no state_dict'),
    ({'state_dict': weights(), 'epoch': -1}, "its 'epoch' is -1"),
    ({'state_dict': weights(), 'args': {'lr': 'fast'}}, "args['lr'] is 'fast'"),
    ({'state_dict': {'w': torch.tensor([float('nan')])}}, 'non-finite weights'),
])
def test_a_damaged_file_is_one_line_naming_the_entry(raw, words):
    with pytest.raises(CheckpointError, match=re.escape(words)):
        from_file(raw, 'x.pth')


def checkpoint_key_uses(root):
    """'path:line' of every line under root (every .py file, at any depth, but
    checkpoint.py) that reads or writes a checkpoint's entries by key."""
    pattern = re.compile(r"ckpt(\[|\.get\()|\['state_dict'\]")
    return [f'{os.path.relpath(path, root)}:{n}'
            for path in glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
            if os.path.basename(path) != 'checkpoint.py'
            for n, line in enumerate(open(path), 1) if pattern.search(line)]


def test_no_other_module_reads_or_writes_checkpoint_entries_by_key():
    """The keys live in checkpoint.py: elsewhere (main.py, toolkit/, the tools) a
    checkpoint is a Checkpoint."""
    assert checkpoint_key_uses(CODE) == []
    assert checkpoint_key_uses(os.path.join(os.path.dirname(CODE), 'tools')) == []


def test_the_key_guard_finds_a_key_read_in_the_toolkit(tmp_path):
    (tmp_path / 'toolkit').mkdir()
    (tmp_path / 'toolkit' / 'resume.py').write_text("epoch = ckpt['epoch']\n")
    assert checkpoint_key_uses(str(tmp_path)) == [os.path.join('toolkit', 'resume.py') + ':1']