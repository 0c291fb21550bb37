"""A student's edit of custom_transforms.py is what trains. The fused cache path (fast_data)
reproduces the shipped module from the transforms' parameters, so it runs only where the
module's code is the shipped one (comments and docstrings aside, nothing replaced at run
time) and the pipeline holds exactly its classes with nothing set on an object beyond what
the class sets; else the run takes the per-image path, which calls the student's code, and
one line says what differs. The tests check the rule, on copies of the file and with
replacements at run time, not the shipped bytes: the cases whose reason needs the shipped
file are skipped where it is edited (every run then takes the per-image path for that)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conftest import (EDITED_TRANSFORMS as EDITED, shipped_transforms_only, CODE, FAST,
                      only_run, run_main)
import custom_transforms as T
from toolkit import fast_data as fd
from toolkit import loaders
from toolkit.run_plan import plan_from_argv
import student_code

pytestmark = pytest.mark.usefixtures('one_thread')

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# what a zeroed image becomes after ToTensor + Normalize
ZERO_IMAGE = (-torch.tensor(MEAN) / torch.tensor(STD))[:, None, None]

shipped_only = shipped_transforms_only


def zeroed(self, img, factors):
    """An edited RandomColor.apply: every pixel black (a change no batch can hide)."""
    return np.zeros_like(img)


def blackened(img, who):
    """An edited _check_image, the helper every transform's __call__ calls first: it
    blackens the image it checks."""
    img[...] = 0


class BlackColor(T.RandomColor):
    """A student's subclass: the same parameters, its own pixels."""

    def apply(self, img, factors):
        return np.zeros_like(img)


class Blacken:
    """A student's own transform, no subclass of a shipped one."""

    def __call__(self, img):
        return np.zeros_like(img)

    def __repr__(self):
        return 'Blacken()'


def flip_with_its_own_apply():
    """A shipped RandomHorizontalFlip whose apply is replaced on the object only."""
    flip = T.RandomHorizontalFlip()
    flip.apply = lambda img, flip: np.zeros_like(img)
    return flip


# ------------------------------------------------------------------ the rule, on copies
def load_copy(folder, name, *edits):
    """custom_transforms.py copied to folder/name.py with each edit (old, new) applied,
    and imported as the module `name`. Skips where a student's edit left no `old`."""
    with open(os.path.join(CODE, 'custom_transforms.py')) as f:
        source = f.read()
    for old, new in edits:
        if old not in source:
            pytest.skip(f'custom_transforms.py is edited: no {old.strip()!r} to edit')
        source = source.replace(old, new, 1)
    path = os.path.join(folder, name + '.py')
    with open(path, 'w') as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# edits that leave the code as it is: a comment inside a method (it shifts every line
# below it), a class's and a method's docstring
COMMENT = ('        _check_image(img, "RandomHorizontalFlip")\n',
           '        # a student\'s note: the flip is drawn first\n'
           '        _check_image(img, "RandomHorizontalFlip")\n')
DOCSTRINGS = [('"""Mirror the image left-right with probability 0.5."""',
               '"""Mirror the image left-right, one image in two.\n\n    (a student\'s words)"""'),
              ('"""True: mirror this image (one draw of random.random())."""',
               '"""Whether to mirror."""')]
# edits of the code: a helper every __call__ calls, a default parameter, a transform added
# to the file, a method replaced by a statement of the file
CODE_EDITS = {
    'helper_edited': ('img.ndim not in (2, 3)', 'img.ndim not in (3,)'),
    'default_edited': ('area_range=(0.25, 1.0)', 'area_range=(0.5, 1.0)'),
    'class_added': ('\nclass ToTensor(object):',
                    '\nclass Invert(object):\n    def __call__(self, img):\n'
                    '        return 255 - img\n\n\nclass ToTensor(object):'),
    'method_replaced': ('\nclass ToTensor(object):',
                        '\nRandomColor.apply = lambda self, img, factors: img\n\n\n'
                        'class ToTensor(object):'),
}


def test_comments_and_docstrings_keep_the_fused_path(tmp_path):
    copy = load_copy(str(tmp_path), 'copied_transforms')
    commented = load_copy(str(tmp_path), 'commented_transforms', COMMENT)
    documented = load_copy(str(tmp_path), 'documented_transforms', *DOCSTRINGS)
    assert fd.source_fingerprint(commented) == fd.source_fingerprint(copy)
    assert fd.source_fingerprint(documented) == fd.source_fingerprint(copy)
    if EDITED is None:         # copies of the shipped file: what the fused path reproduces
        for module in (copy, commented, documented):
            assert fd.module_difference(module) is None, module.__name__


def test_an_edit_of_the_code_takes_the_per_image_path(tmp_path):
    shipped = fd.source_fingerprint(load_copy(str(tmp_path), 'copied_transforms'))
    for name, edit in CODE_EDITS.items():
        edited = load_copy(str(tmp_path), name, edit)
        assert fd.source_fingerprint(edited) != shipped, name
        assert fd.module_difference(edited) == (
            f'{name}.py differs from the version the fused cache path reproduces (in its '
            f'code: comments and docstrings do not count)')


@shipped_only
def test_replaced_parts_and_objects_are_refused_by_name(monkeypatch):
    train, val = student_code.get_train_transforms, student_code.get_val_transforms
    assert fd.fused_path_supported(train())[0] and fd.fused_path_supported(val())[0]
    # any part may call any other: a replacement refuses every pipeline
    for part, value in [('RandomRotate.get_params', lambda self: (0.0, 1)),
                        ('_resize', lambda img, width, height, interpolation: img),
                        ('_check_image', blackened)]:
        owner, _, name = part.rpartition('.')
        monkeypatch.setattr(getattr(T, owner) if owner else T, name, value)
        for transforms in (train(), val()):
            ok, why = fd.fused_path_supported(transforms)
            assert not ok and why == (f'custom_transforms.{part} is not what custom_transforms.py '
                                      f'defines (replaced at run time, or the file changed '
                                      f'since the import)')
        monkeypatch.undo()
    monkeypatch.setattr(T, 'Sharpen', Blacken, raising=False)       # a name added to it
    assert 'custom_transforms.Sharpen is not what' in fd.fused_path_supported(val())[1]
    monkeypatch.undo()
    cases = {
        'transform 2 (RandomHorizontalFlip()) has its own apply (set on the object, not by '
        'its class)': [T.Scale(144), flip_with_its_own_apply(), T.ToTensor()],
        'transform 2 (BlackColor(color_range=0.1)) is a subclass of custom_transforms.'
        'RandomColor': [T.Scale(144), BlackColor(0.1), T.ToTensor()],
        'transform 2 (Blacken()) is not one the fused path knows': [T.Scale(144), Blacken(),
                                                                    T.ToTensor()]}
    for expected, items in cases.items():
        ok, why = fd.fused_path_supported(T.Compose(items))
        assert not ok and expected in why, why
    rotate = T.RandomRotate(15)
    rotate.degree_range = 30          # a parameter its class sets: followed, not refused
    assert fd.fused_path_supported(T.Compose([rotate, T.ToTensor()]))[0]
    crop = T.RandomSizedCrop(128)
    crop.fallback = T.Compose([T.Scale(128), Blacken()])
    ok, why = fd.fused_path_supported(T.Compose([crop, T.ToTensor()]))
    assert not ok and 'has a fallback other than Compose([Scale, CenterCrop])' in why


@shipped_only
def test_an_edited_to_tensor_turns_the_uint8_handover_off(monkeypatch):
    """The per-image path's uint8 hand-over replaces ToTensor and Normalize by a
    normalization on the device: only where they are the shipped ones."""
    assert loaders.uint8_transforms(student_code.get_train_transforms()) is not None
    monkeypatch.setattr(T.ToTensor, '__call__', lambda self, img: torch.zeros(3, 4, 4))
    assert loaders.uint8_transforms(student_code.get_train_transforms()) is None


# ------------------------------------------------------------------ what trains
def first_training_batch(data_folder, asked=False):
    """The data part of a training run as main.py does it, on the CPU, the cache on by
    default or `asked` for (--data-cache): (plan.data_cache, the training loader, its
    first batch)."""
    argv = [data_folder, '-j', '0', '--no-channels-last', '-b', '8', '--seed', '0']
    plan, datasets = plan_from_argv(argv + (['--data-cache'] if asked else []),
                                    torch.device('cpu'))
    train_loader, _ = loaders.build_loaders(plan, torch.device('cpu'), datasets)
    loaders.seed_epoch(0, 0, train_loader)
    images, _ = next(iter(train_loader))
    return plan.data_cache, train_loader, images


def the_note(out):
    """The reason of the one note line in `out` (what follows 'note: ', up to '; this
    run uses the per-image path')."""
    notes = [line for line in out.splitlines() if line.startswith('note: ')]
    ending = '; this run uses the per-image path'
    assert len(notes) == 1 and notes[0].endswith(ending), notes
    return notes[0][len('note: '):-len(ending)]


def is_black(images):
    return torch.allclose(images, ZERO_IMAGE.expand_as(images), atol=1e-6)


@shipped_only
def test_unchanged_transforms_keep_the_fused_path(demo, capsys):
    cached, loader, images = first_training_batch(demo)
    assert cached and isinstance(loader.loader.dataset, fd.CachedDataset)
    assert 'note:' not in capsys.readouterr().out and not is_black(images)


# the reason for both splits' transforms (the note names the split checked first)
REPLACED = ('(): custom_transforms.{} is not what custom_transforms.py defines (replaced at '
            'run time, or the file changed since the import)')


@shipped_only
def test_an_edited_transform_trains_on_the_per_image_path(demo, capsys, monkeypatch):
    monkeypatch.setattr(T.RandomColor, 'apply', zeroed)
    cached, loader, images = first_training_batch(demo)
    assert not cached and not isinstance(loader.loader.dataset, fd.CachedDataset)
    assert is_black(images)                            # the edit is what trains
    reason = the_note(capsys.readouterr().out)
    assert reason.startswith('get_') and reason.endswith(REPLACED.format('RandomColor.apply'))
    # asked for with --data-cache: the edit still wins, and the line says so
    first_training_batch(demo, asked=True)
    assert the_note(capsys.readouterr().out) == f'--data-cache was asked for, but {reason}'


@shipped_only
def test_an_edited_helper_trains_on_the_per_image_path(demo, capsys, monkeypatch):
    """_check_image computes no pixel of the shipped code, yet an edit of it runs."""
    monkeypatch.setattr(T, '_check_image', blackened)
    cached, _, images = first_training_batch(demo)
    assert not cached and is_black(images)
    assert the_note(capsys.readouterr().out).endswith(REPLACED.format('_check_image'))


@shipped_only
@pytest.mark.parametrize('step, why', [
    (lambda: BlackColor(0.1), 'is a subclass of custom_transforms.RandomColor'),
    (Blacken, 'is not one the fused path knows'),
    (flip_with_its_own_apply, 'has its own apply')],
    ids=['subclass', 'own class', 'method set on the object'])
def test_a_transform_of_ones_own_trains_on_the_per_image_path(demo, capsys, monkeypatch,
                                                              step, why):
    monkeypatch.setattr(loaders, 'get_train_transforms', lambda: T.Compose(
        [T.Scale(48), step(), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)]))
    cached, _, images = first_training_batch(demo)
    assert not cached and is_black(images)
    assert why in the_note(capsys.readouterr().out)


@shipped_only
def test_the_start_lines_say_why_the_cache_is_off(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T.RandomColor, 'apply', zeroed)
    logs = tmp_path / 'logs'
    code, out, err = run_main([demo, '--log-dir', str(logs), '--epochs', '1'] + FAST
                              + ['--warmup', '0'], capsys)
    assert code == 0, err
    reason = the_note(out)
    assert reason.endswith(REPLACED.format('RandomColor.apply'))
    assert f'data-cache off ({reason})' in out
    with open(os.path.join(only_run(str(logs)), 'summary.json')) as f:
        assert json.load(f)['args']['data_cache'] is False
