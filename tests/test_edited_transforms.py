"""A student's edit of custom_transforms.py is what trains. The fused cache path (fast_data)
reproduces the shipped transform classes from their parameters, so it runs only on classes
whose source is the shipped one; an edited, replaced or subclassed transform takes the
per-image path, which calls the student's code, and one line says which class and why."""
import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conftest import CODE, FAST, only_run, run_main
import custom_transforms as T
from toolkit import fast_data as fd
from toolkit import loaders
import student_code

pytestmark = pytest.mark.usefixtures('one_thread')

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# what a zeroed image becomes after ToTensor + Normalize
ZERO_IMAGE = (-torch.tensor(MEAN) / torch.tensor(STD))[:, None, None]


def zeroed(self, img, factors):
    """An edited RandomColor.apply: every pixel black (a change no batch can hide)."""
    return np.zeros_like(img)


class BlackColor(T.RandomColor):
    """A student's subclass: the same parameters, its own pixels."""

    def apply(self, img, factors):
        return np.zeros_like(img)


# ------------------------------------------------------------------ the fingerprints
def test_the_fingerprints_are_those_of_the_shipped_transforms():
    """Fails when a class the fused path reproduces is changed: make the fused path match
    the change, then put the fingerprint this prints into fast_data.SHIPPED_FINGERPRINTS."""
    now = {name: fd.source_fingerprint(getattr(T, name)) for name in fd.SHIPPED_FINGERPRINTS}
    changed = [f"    '{name}': '{now[name]}'," for name in now
               if now[name] != fd.SHIPPED_FINGERPRINTS[name]]
    assert not changed, 'custom_transforms changed; new fingerprints:\n' + '\n'.join(changed)
    # every class the fused plan accepts, and the helpers they compute pixels with
    known = ({kind.__name__ for kind in fd._STEP_KINDS} | {'Compose', 'ToTensor', 'Normalize'}
             | set(fd.PIXEL_HELPERS))
    assert known <= set(fd.SHIPPED_FINGERPRINTS)


def load_copy(folder, name, edit=None):
    """custom_transforms.py copied to folder/name.py, with edit = (old, new) applied, and
    imported as the module `name`."""
    with open(os.path.join(CODE, 'custom_transforms.py')) as f:
        source = f.read()
    if edit is not None:
        assert edit[0] in source
        source = source.replace(*edit)
    path = os.path.join(folder, name + '.py')
    with open(path, 'w') as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_edited_file_changes_the_fingerprint_of_the_edited_class_only(tmp_path):
    copy = load_copy(str(tmp_path), 'copied_transforms')
    edited = load_copy(str(tmp_path), 'edited_transforms',
                       ('out = img.astype(np.float32) * factors',
                        'out = img.astype(np.float32) * factors * 0.5'))
    for name, shipped in fd.SHIPPED_FINGERPRINTS.items():
        assert fd.source_fingerprint(getattr(copy, name)) == shipped, name
        assert (fd.source_fingerprint(getattr(edited, name)) == shipped) == \
            (name != 'RandomColor'), name


def test_edited_replaced_and_subclassed_transforms_are_refused_by_name(monkeypatch):
    train = student_code.get_train_transforms
    assert fd.fused_path_supported(train())[0]
    monkeypatch.setattr(T.RandomRotate, 'get_params', lambda self: (0.0, 1))
    ok, why = fd.fused_path_supported(train())
    assert not ok and why == ('custom_transforms.RandomRotate differs from the version the '
                              'fused cache path reproduces')
    assert fd.fused_path_supported(student_code.get_val_transforms())[0]   # no RandomRotate
    monkeypatch.undo()
    monkeypatch.setattr(T, '_resize', lambda img, width, height, interpolation: img)
    ok, why = fd.fused_path_supported(train())
    assert not ok and 'custom_transforms._resize differs' in why
    monkeypatch.undo()
    ok, why = fd.fused_path_supported(T.Compose([T.Scale(144), BlackColor(0.1), T.ToTensor()]))
    assert not ok and 'transform 2 (BlackColor(color_range=0.1)) is a subclass of ' \
        'custom_transforms.RandomColor' in why


def test_an_edited_to_tensor_turns_the_uint8_handover_off(monkeypatch):
    """The per-image path's uint8 hand-over replaces ToTensor and Normalize by a
    normalization on the device: only where they are the shipped ones."""
    assert loaders.uint8_transforms(student_code.get_train_transforms()) is not None
    monkeypatch.setattr(T.ToTensor, '__call__', lambda self, img: torch.zeros(3, 4, 4))
    assert loaders.uint8_transforms(student_code.get_train_transforms()) is None


# ------------------------------------------------------------------ what trains
def first_training_batch(data_folder, auto):
    """The data part of a training run as main.py does it, on the CPU with the cache
    asked for (`auto`: the flags chosen automatically): (the fallback's reason,
    args.data_cache after it, the training loader, its first batch)."""
    args = argparse.Namespace(data_folder=data_folder, workers=0, channels_last=False,
                              data_cache=True, rebuild_cache=False, batch_size=8)
    train_set, val_set = loaders.load_datasets(args)
    reason = loaders.settle_data_cache(args, {'train': train_set, 'val': val_set}, auto=auto)
    train_loader, _ = loaders.build_loaders(args, torch.device('cpu'), train_set, val_set)
    loaders.seed_epoch(0, 0, train_loader)
    images, _ = next(iter(train_loader))
    return reason, args.data_cache, train_loader, images


def is_black(images):
    return torch.allclose(images, ZERO_IMAGE.expand_as(images), atol=1e-6)


def test_unchanged_transforms_keep_the_fused_path(demo, capsys):
    reason, cached, loader, images = first_training_batch(demo, {'data_cache': 'auto'})
    assert reason is None and cached and isinstance(loader.loader.dataset, fd.CachedDataset)
    assert 'note:' not in capsys.readouterr().out and not is_black(images)


def test_an_edited_transform_trains_on_the_per_image_path(demo, capsys, monkeypatch):
    monkeypatch.setattr(T.RandomColor, 'apply', zeroed)
    reason, cached, loader, images = first_training_batch(demo, {'data_cache': 'auto'})
    assert not cached and not isinstance(loader.loader.dataset, fd.CachedDataset)
    assert is_black(images)                            # the edit is what trains
    expected = ('get_train_transforms(): custom_transforms.RandomColor differs from the '
                'version the fused cache path reproduces')
    assert reason == expected
    assert capsys.readouterr().out == f'note: {expected}; this run uses the per-image path\n'
    # asked for with --data-cache: the edit still wins, and the line says so
    first_training_batch(demo, auto={})
    assert capsys.readouterr().out == (f'note: --data-cache was asked for, but {expected}; '
                                       f'this run uses the per-image path\n')


def test_a_subclassed_transform_trains_on_the_per_image_path(demo, capsys, monkeypatch):
    monkeypatch.setattr(loaders, 'get_train_transforms', lambda: T.Compose(
        [T.Scale(48), BlackColor(0.1), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)]))
    reason, cached, _, images = first_training_batch(demo, {'data_cache': 'auto'})
    assert not cached and is_black(images)
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and 'is a subclass of custom_transforms.RandomColor' in out


def test_the_start_lines_say_why_the_cache_is_off(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T.RandomColor, 'apply', zeroed)
    logs = tmp_path / 'logs'
    code, out, err = run_main([demo, '--log-dir', str(logs), '--epochs', '1'] + FAST
                              + ['--warmup', '0'], capsys)
    assert code == 0, err
    why = ('get_train_transforms(): custom_transforms.RandomColor differs from the version '
           'the fused cache path reproduces')
    assert f'note: {why}; this run uses the per-image path' in out.splitlines()
    assert f'data-cache off ({why})' in out
    with open(os.path.join(only_run(str(logs)), 'summary.json')) as f:
        assert json.load(f)['args']['data_cache'] is False
