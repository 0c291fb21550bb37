"""fast_data: the decoded-image cache (build, reuse, rebuild when stale / foreign /
truncated, one-line refusals), the fused parameters (the per-image path's draws and
ranges), the fused warp on the CPU (OpenCV) and on a device (the torch code, run here on
the CPU) against the per-image transforms with fixed parameters, normalization, seeding."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import custom_transforms as T
from toolkit import data_cache
from toolkit import fast_data as fd
from toolkit import loaders
import student_code
from conftest import CODE, shipped_transforms_only
from custom_dataloader import DatasetError, MiniPlacesLoader, load_image, seed_worker
from toolkit.data_order import TrainOrder
from make_demo_data import make_demo_dataset, render_image

pytestmark = [pytest.mark.usefixtures('one_thread'), shipped_transforms_only]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train_transforms(interpolation=None, degrees=15, colour=0.15, **crop):
    """get_train_transforms()'s pipeline, with one interpolation everywhere if given."""
    kw = {} if interpolation is None else {'interpolations': [interpolation]}
    return T.Compose([T.Scale(144, **kw), T.RandomHorizontalFlip(), T.RandomColor(colour),
                      T.RandomRotate(degrees, **kw), T.RandomSizedCrop(128, **kw, **crop),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def smooth_image(size=128):
    """Low-frequency RGB content: interpolation kernels barely differ on it, a geometric
    error of a fraction of a pixel does (gradients of up to ~14 grey levels per pixel)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([127 + 100 * np.sin(xx / 9 + yy / 13), 127 + 100 * np.cos(yy / 7),
                     60 + xx + 0.5 * yy], axis=-1).clip(0, 255).astype(np.uint8)


def per_image_fixed(plan, img, params):
    """The per-image transforms applied with fixed parameters (their `apply`), up to the
    uint8 image before ToTensor."""
    for (kind, t, _, _), p in zip(plan.steps, params):
        if kind == 'rotate':
            img = t.apply(img, *p)
        elif kind == 'sized_crop' and p[0] == 'fallback':
            scale, crop = t.fallback.transforms
            img = crop(scale.apply(img, p[1]))
        elif kind == 'center_crop':
            img = t(img)
        else:
            img = t.apply(img, p)
    return img


def fused_cpu(plan, img, params):
    matrices = fd.affine_matrices(plan, params)
    flags = fd.warp_interpolations(plan, params)
    factors = fd.colour_factors(plan, params)
    return np.stack([fd.warp_image(img, matrices[k], flags[k], factors[k], plan.out_hw)
                     for k in range(len(params))])


def fused_device(plan, img, params):
    """augment_on_device on the CPU, de-normalized back to grey levels, N x H x W x C."""
    batch = torch.from_numpy(np.stack([img] * len(params)))
    out = fd.augment_on_device(batch, params, plan)
    mean, std = torch.tensor(plan.mean)[:, None, None], torch.tensor(plan.std)[:, None, None]
    return ((out * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def interior_diff(a, b, border=4):
    """Mean absolute difference in grey levels, away from the border (where the per-image
    path's three resamplings and the fused warp replicate different edge pixels)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return diff[border:-border, border:-border].mean()


################################################################################
# parameters
################################################################################
@pytest.mark.parametrize('seed', range(25))
def test_fused_params_are_the_per_image_paths_draws(seed):
    """Same seed, same draws: the per-image pipeline (default random interpolations) equals
    the per-image transforms applied with the fused path's parameters, exactly, and both
    leave Python's `random` in the same state."""
    t = student_code.get_train_transforms()
    plan = fd.make_plan(t)
    img = render_image(np.random.default_rng(seed), seed % 10, 128)
    random.seed(seed)
    expected, after = t(img), random.random()
    random.seed(seed)
    (params,) = fd.draw_params(plan, 1)
    assert random.random() == after
    got = T.Normalize(MEAN, STD)(T.ToTensor()(per_image_fixed(plan, img, params)))
    assert torch.equal(got, expected)


def ks_uniform(values, lo, hi):
    """Kolmogorov-Smirnov distance of the sample from U(lo, hi)."""
    values = np.sort((np.asarray(values, float) - lo) / (hi - lo))
    n = len(values)
    return max(np.max(np.arange(1, n + 1) / n - values), np.max(values - np.arange(n) / n))


@pytest.mark.parametrize('degrees,colour,area,ratio', [
    (15, 0.15, (0.25, 1.0), (0.8, 1.25)),           # the handout's get_train_transforms()
    (30, 0.3, (0.5, 0.9), (0.6, 1.0)),               # a student's edit is followed
])
def test_parameter_ranges_follow_the_transforms(degrees, colour, area, ratio):
    t = train_transforms(degrees=degrees, colour=colour, area_range=area, ratio_range=ratio)
    plan = fd.make_plan(t)
    random.seed(0)
    n = 4000
    params = fd.draw_params(plan, n)
    kinds = [kind for kind, *_ in plan.steps]
    column = {kind: [p[k] for p in params] for k, kind in enumerate(kinds)}
    crit = 1.95 / np.sqrt(n)                          # KS critical value, alpha = 0.001

    flips = np.array(column['flip'])
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
    factors = np.array(column['colour'])
    assert factors.min() >= 1 - colour and factors.max() <= 1 + colour
    for c in range(3):
        assert ks_uniform(factors[:, c], 1 - colour, 1 + colour) < crit
    assert abs(np.corrcoef(factors[:, 0], factors[:, 1])[0, 1]) < 0.1    # independent
    angles = np.array([p[0] for p in column['rotate']])
    assert angles.min() >= -degrees and angles.max() <= degrees
    assert ks_uniform(angles, -degrees, degrees) < crit
    for kind in ('scale', 'rotate', 'sized_crop'):    # each interpolation about 1/3
        flags = np.array([p if kind == 'scale' else p[-1] for p in column[kind]])
        for flag in (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC):
            assert abs((flags == flag).mean() - 1 / 3) < 4 * np.sqrt(2 / 9 / n)

    boxes = np.array([p[:4] for p in column['sized_crop'] if p[0] != 'fallback'], float)
    h, w = plan.steps[kinds.index('sized_crop')][2]
    x0, y0, cw, ch = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + cw <= w).all() and (y0 + ch <= h).all()
    # areas and aspect ratios within the ranges, up to the rounding of the crop's sides
    fraction, aspect = cw * ch / (h * w), cw / ch
    assert fraction.min() >= area[0] * 0.98 and fraction.max() <= area[1] * 1.02
    assert aspect.min() >= ratio[0] * 0.98 and aspect.max() <= ratio[1] * 1.02
    assert fraction.min() < area[0] * 1.05 and aspect.max() > ratio[1] * 0.95   # reached
    # rejection sampling: the accepted draws are the per-image path's, so compare them
    # with a direct simulation of RandomSizedCrop's trials
    crop = plan.steps[kinds.index('sized_crop')][1]
    random.seed(1)
    direct = [crop.get_params(h, w) for _ in range(n)]
    direct = np.array([d[2] * d[3] / (h * w) for d in direct if d is not None])
    hist = np.histogram(fraction, bins=10, range=area)[0] / len(fraction)
    hist_direct = np.histogram(direct, bins=10, range=area)[0] / len(direct)
    assert np.abs(hist - hist_direct).max() < 0.04


def test_sized_crop_fallback_is_the_scale_and_center_crop():
    # no crop of the whole area at aspect 1.25 fits in a square: always the fallback
    t = train_transforms(cv2.INTER_LINEAR, area_range=(1.0, 1.0), ratio_range=(1.25, 1.25))
    plan = fd.make_plan(t)
    img = smooth_image()
    random.seed(3)
    params = fd.draw_params(plan, 4)
    assert all(p[-1][0] == 'fallback' for p in params)
    for k, p in enumerate(params):
        ref = per_image_fixed(plan, img, p)
        assert interior_diff(fused_cpu(plan, img, [p])[0], ref) < 1.0


def test_fused_path_supported_and_refused():
    ok, why = fd.fused_path_supported(student_code.get_train_transforms())
    assert ok and 'RandomRotate' in why
    assert fd.fused_path_supported(student_code.get_val_transforms())[0]
    assert fd.make_plan(student_code.get_val_transforms()).is_identity()
    assert not fd.make_plan(student_code.get_train_transforms()).is_identity()

    class MyRotate(T.RandomRotate):                  # a subclass may do anything
        pass

    cases = {
        'MyRotate': T.Compose([T.Scale(144), MyRotate(10), T.CenterCrop(128), T.ToTensor()]),
        'interpolation 4': T.Compose([T.Scale(144, [cv2.INTER_LANCZOS4]), T.ToTensor()]),
        'exactly one ToTensor': T.Compose([T.Scale(144)]),
        'only one Normalize': T.Compose([T.ToTensor(), T.Normalize(MEAN, STD),
                                         T.Normalize(MEAN, STD)]),
        'not a custom_transforms.Compose': [T.Scale(144), T.ToTensor()],
    }
    for expected, transforms in cases.items():
        ok, why = fd.fused_path_supported(transforms)
        assert not ok and expected in why and '\n' not in why
    with pytest.raises(fd.Unsupported):
        fd.CachedDataset(data_cache.ImageCache('unused.npy', [0], ['a.jpg'], 128), cases['MyRotate'])


################################################################################
# the image: fused warp (CPU and device) vs the per-image transforms
################################################################################
# Tolerance: mean absolute difference of at most 1.0 grey level (of 255) inside a 4-pixel
# border, on smooth_image(). Measured: 0.45-0.49 (linear), 0.55-0.64 (cubic) for the CPU
# warp and 0.50-0.69 for the device warp; what remains is the per-image path's three
# resamplings and uint8 roundings against one. A geometric error of a quarter of a cache
# pixel gives 1.9-2.0 grey levels, one of a degree of rotation 2.3-4.1 (measured on the
# FIXED parameters; test_tolerance_catches_geometric_errors).
# Nearest is left out: OpenCV's INTER_NEAREST resize uses floor(x * scale), not pixel
# centres, so the per-image path itself is up to half a pixel off (mean ~6.6 here).
TOLERANCE = 1.0
FIXED = [  # (flip, colour factors, degrees, sized crop x0, y0, cw, ch) on the 144 x 144 stage
    (False, (1.0, 1.0, 1.0), 0.0, 0, 0, 144, 144),
    (True, (0.9, 1.1, 1.0), 12.0, 10, 20, 100, 90),
    (False, (1.15, 0.85, 0.95), -14.5, 40, 5, 72, 80),
    (True, (1.0, 1.0, 1.0), 3.0, 70, 70, 74, 74),
    (False, (0.87, 1.02, 1.13), -7.0, 0, 30, 130, 104),
]


def fixed_params(interpolation, flip, colour, degrees, x0, y0, cw, ch):
    return (interpolation, flip, colour, (degrees, interpolation),
            (x0, y0, cw, ch, interpolation))


@pytest.mark.parametrize('interpolation', [cv2.INTER_LINEAR, cv2.INTER_CUBIC])
def test_fixed_params_cpu_and_device_match_per_image(interpolation):
    plan = fd.make_plan(train_transforms(interpolation))
    img = smooth_image()
    params = [fixed_params(interpolation, *f) for f in FIXED]
    cpu, device = fused_cpu(plan, img, params), fused_device(plan, img, params)
    assert cpu.dtype == np.uint8 and cpu.shape == (len(FIXED), 128, 128, 3)
    for k, p in enumerate(params):
        ref = per_image_fixed(plan, img, p)
        assert interior_diff(cpu[k], ref) < TOLERANCE, FIXED[k]
        assert interior_diff(device[k], ref) < TOLERANCE, FIXED[k]
        assert interior_diff(cpu[k], device[k]) < 0.5          # the two executions
    # the identity parameters reproduce the per-image path exactly up to rounding
    assert np.abs(cpu[0].astype(int) - per_image_fixed(plan, img, params[0])).max() <= 1


def test_fixed_params_on_a_textured_image():
    """On the demo set's high-frequency textures (stripes, pixel noise) the per-image
    path's extra resamplings blur more: measured 3.4 grey levels, bounded at 5."""
    plan = fd.make_plan(train_transforms(cv2.INTER_LINEAR))
    img = render_image(np.random.default_rng(0), 3, 128)
    params = [fixed_params(cv2.INTER_LINEAR, *f) for f in FIXED[1:]]
    cpu, device = fused_cpu(plan, img, params), fused_device(plan, img, params)
    for k, p in enumerate(params):
        ref = per_image_fixed(plan, img, p)
        assert interior_diff(cpu[k], ref) < 5.0 and interior_diff(device[k], ref) < 5.0


def test_tolerance_catches_geometric_errors():
    plan = fd.make_plan(train_transforms(cv2.INTER_LINEAR))
    img = smooth_image()
    p = fixed_params(cv2.INTER_LINEAR, *FIXED[2])
    ref = per_image_fixed(plan, img, p)
    (m,) = fd.affine_matrices(plan, [p])
    factors = fd.colour_factors(plan, [p])[0]
    shifted = m + [[0, 0, 0.25], [0, 0, 0.25]]
    a = np.radians(1.0)
    rotated = m @ np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    for wrong in (shifted, rotated):
        out = fd.warp_image(img, wrong, cv2.INTER_LINEAR, factors, (128, 128))
        assert interior_diff(out, ref) > 1.5 * TOLERANCE


def test_mixed_interpolations_in_one_device_batch():
    """A batch mixing nearest, linear and cubic: each image as if warped alone."""
    plan = fd.make_plan(student_code.get_train_transforms())
    img = smooth_image()
    random.seed(5)
    params = fd.draw_params(plan, 12)
    assert len(set(fd.warp_interpolations(plan, params))) == 3
    together = fused_device(plan, img, params)
    for k in range(len(params)):
        alone = fused_device(plan, img, params[k:k + 1])[0]
        np.testing.assert_allclose(together[k], alone, atol=1e-3)
        assert interior_diff(together[k], fused_cpu(plan, img, params[k:k + 1])[0]) < 0.5


def test_colour_is_exactly_random_color():
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(16, 16, 3)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rng = random.Random(0)
    for _ in range(200):
        factors = T.RandomColor(0.15).get_params(3) if rng.random() < 0.5 else \
            tuple(rng.uniform(0.5, 1.5) for _ in range(3))
        out = fd.warp_image(levels, identity, cv2.INTER_LINEAR, factors, (16, 16))
        np.testing.assert_array_equal(out, T.RandomColor(0.15).apply(levels, factors))


def test_grid_theta_maps_pixel_centres():
    """affine_grid(align_corners=False) with grid_theta samples exactly where the pixel
    matrix points: a pure integer shift moves pixels without interpolating."""
    img = torch.arange(5 * 7 * 3, dtype=torch.float32).reshape(1, 3, 5, 7)
    m = np.array([[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])          # out (x, y) <- in (x+2, y+1)
    theta = torch.from_numpy(fd.grid_theta(m, (5, 7), (3, 4))).float()
    grid = torch.nn.functional.affine_grid(theta, [1, 3, 3, 4], align_corners=False)
    out = torch.nn.functional.grid_sample(img, grid, align_corners=False)
    torch.testing.assert_close(out, img[:, :, 1:4, 2:6])


################################################################################
# normalization on the device, the uint8 hand-over of the per-image path
################################################################################
def test_normalize_on_device_is_to_tensor_and_normalize():
    img = render_image(np.random.default_rng(1), 0, 32)
    batch = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(img))
    torch.testing.assert_close(fd.normalize_on_device(batch, MEAN, STD)[0], expected)


def test_uint8_handover_of_the_per_image_path():
    transforms, mean, std = loaders.uint8_transforms(student_code.get_train_transforms())
    assert (mean, std) == (MEAN, STD) and 'ToUint8Tensor()' in repr(transforms)
    img = render_image(np.random.default_rng(2), 4, 100)
    random.seed(7)
    expected = student_code.get_train_transforms()(img)
    random.seed(7)
    handed = transforms(img)
    assert handed.dtype == torch.uint8 and handed.shape == (3, 128, 128)
    torch.testing.assert_close(fd.normalize_on_device(handed[None], mean, std)[0], expected)
    assert loaders.uint8_transforms(T.Compose([T.Scale(10)])) is None


################################################################################
# the cache
################################################################################
@pytest.fixture
def data_copy(demo, tmp_path):
    """A private copy of the demo set (4 classes, 48 x 48 JPEGs), free to damage."""
    root = str(tmp_path / 'data')
    shutil.copytree(demo, root, ignore=shutil.ignore_patterns('cache'))
    return root


def test_cache_is_built_once_then_loaded(data_copy, capsys):
    cache = data_cache.load_or_build_cache(data_copy, 'train')
    out = capsys.readouterr().out
    assert 'decoding the 24 images of train once' in out
    path, meta_path = data_cache.cache_paths(data_copy, 'train')
    assert cache.path == path and os.path.isfile(meta_path)
    assert sorted(os.listdir(os.path.dirname(path))) == [data_cache.LOCK_NAME, 'train_128.json',
                                                         'train_128.npy']
    loader = MiniPlacesLoader(data_copy, 'train', num_classes=None)
    assert cache.images.shape == (24, 128, 128, 3) and cache.images.dtype == np.uint8
    assert list(cache.labels) == loader.label_list and cache.file_list == loader.file_list
    for i in (0, 23):                                 # what the validation geometry gives
        decoded = load_image(os.path.join(loader.img_folder, loader.file_list[i]))
        np.testing.assert_array_equal(cache.images[i], data_cache.cache_image(decoded))
    with open(meta_path) as f:
        assert json.load(f)['labels'] == loader.label_list
    mtime = os.stat(path).st_mtime_ns
    again = data_cache.load_or_build_cache(data_copy, 'train')
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err == '' and os.stat(path).st_mtime_ns == mtime
    np.testing.assert_array_equal(again.images, cache.images)
    # at the images' own size, the cache holds them exactly as decoded
    small = data_cache.load_or_build_cache(data_copy, 'val', size=48)
    decoded = load_image(os.path.join(data_copy, 'images', small.file_list[5]))
    np.testing.assert_array_equal(small.images[5], decoded)


def rebuild_reason(data_copy, capsys):
    data_cache.load_or_build_cache(data_copy, 'train')
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'rebuilding it' in err
    return err


def test_stale_foreign_truncated_caches_are_rebuilt(data_copy, tmp_path, capsys):
    first = data_cache.load_or_build_cache(data_copy, 'train')
    path, meta_path = data_cache.cache_paths(data_copy, 'train')
    capsys.readouterr()

    # an image rewritten: the new pixels end up in the cache
    target = os.path.join(data_copy, 'images', first.file_list[3])
    cv2.imwrite(target, np.zeros((48, 48, 3), np.uint8))
    assert 'images changed' in rebuild_reason(data_copy, capsys)
    assert data_cache.load_or_build_cache(data_copy, 'train').images[3].max() <= 2

    # the label file edited: one image fewer
    label_file = os.path.join(data_copy, 'train.txt')
    with open(label_file) as f:
        lines = f.read().splitlines()
    with open(label_file, 'w') as f:
        f.write('\n'.join(lines[1:]) + '\n')
    assert 'label file changed' in rebuild_reason(data_copy, capsys)
    assert len(data_cache.load_or_build_cache(data_copy, 'train')) == 23

    # truncated (a full disk, a killed copy)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 1000)
    assert 'truncated' in rebuild_reason(data_copy, capsys)

    # a damaged fingerprint, or none (the images file of an interrupted build)
    with open(meta_path, 'w') as f:
        f.write('{"version": ')
    assert 'unreadable' in rebuild_reason(data_copy, capsys)
    os.remove(meta_path)
    assert 'no fingerprint' in rebuild_reason(data_copy, capsys)

    # another data set's cache copied over this one's
    other = str(tmp_path / 'other')
    make_demo_dataset(other, num_classes=2, train_per_class=23, val_per_class=1, size=48,
                      seed=9)
    data_cache.load_or_build_cache(other, 'train')
    for src, dst in zip(data_cache.cache_paths(other, 'train'), (path, meta_path)):
        shutil.copy2(src, dst)
    capsys.readouterr()
    assert 'label file changed' in rebuild_reason(data_copy, capsys)
    rebuilt = data_cache.load_or_build_cache(data_copy, 'train')
    assert list(rebuilt.labels) == MiniPlacesLoader(data_copy, 'train', num_classes=None).label_list


def test_cache_refusals_are_one_line(data_copy, monkeypatch):
    # the cache folder cannot be created
    with open(os.path.join(data_copy, 'cache'), 'w') as f:
        f.write('in the way')
    with pytest.raises(DatasetError, match='cannot create the data cache folder') as info:
        data_cache.load_or_build_cache(data_copy, 'train')
    assert '\n' not in str(info.value) and '--no-data-cache' in str(info.value)
    os.remove(os.path.join(data_copy, 'cache'))

    # not enough disk space
    monkeypatch.setattr(data_cache.shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(1, 0, 1))
    with pytest.raises(DatasetError, match=r'needs 65\.2 MB \(1\.2 MB of images \+ '
                                           r'64\.0 MB kept free .* 0\.0 MB free') as info:
        data_cache.load_or_build_cache(data_copy, 'train')
    assert '\n' not in str(info.value) and '--no-data-cache' in str(info.value)
    monkeypatch.undo()

    # not enough device memory
    with pytest.raises(DatasetError, match=r'needs 4\.6 GiB on cuda:0, which has 3\.0 GiB '
                                           r'free \(2 GiB kept for training\)$'):
        fd.check_device_memory(100000 * 128 * 128 * 3, 3 << 30, 'cuda:0')


def test_a_corrupt_image_leaves_no_cache_behind(data_copy):
    loader = MiniPlacesLoader(data_copy, 'train', num_classes=None)
    with open(os.path.join(loader.img_folder, loader.file_list[10]), 'r+b') as f:
        f.truncate(200)
    with pytest.raises(DatasetError, match='truncated'):
        data_cache.load_or_build_cache(data_copy, 'train')
    assert os.listdir(os.path.join(data_copy, 'cache')) == [data_cache.LOCK_NAME]


def same_size_edit(path, pixels):
    """Rewrite the JPEG `path` in place (same inode) with other pixels, padded with zeros
    to its old size (the loader allows padding after the end marker), then put its
    access and modification times back: only the inode's ctime tells."""
    before = os.stat(path)
    ok, encoded = cv2.imencode('.jpg', pixels)
    assert ok and len(encoded) < before.st_size
    with open(path, 'r+b') as f:
        f.write(encoded.tobytes() + b'\0' * (before.st_size - len(encoded)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)


def test_an_edit_that_puts_the_mtime_back_is_seen(data_copy, tmp_path, capsys):
    first = data_cache.load_or_build_cache(data_copy, 'train')
    assert first.images[3].max() > 100
    capsys.readouterr()
    # edited in place, size and modification time as before
    same_size_edit(os.path.join(data_copy, 'images', first.file_list[3]),
                   np.zeros((48, 48, 3), np.uint8))
    assert 'images changed' in rebuild_reason(data_copy, capsys)
    assert data_cache.load_or_build_cache(data_copy, 'train').images[3].max() <= 2
    # replaced by another file (a copy renamed over it) with the same size and times
    target = os.path.join(data_copy, 'images', first.file_list[5])
    st = os.stat(target)
    with open(target, 'rb') as f:
        raw = f.read()
    ok, white = cv2.imencode('.jpg', np.full((48, 48, 3), 255, np.uint8))
    with open(str(tmp_path / 'new.jpg'), 'wb') as f:
        f.write(white.tobytes() + b'\0' * (len(raw) - len(white)))
    os.utime(str(tmp_path / 'new.jpg'), ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(str(tmp_path / 'new.jpg'), target)
    capsys.readouterr()
    assert 'images changed' in rebuild_reason(data_copy, capsys)
    assert data_cache.load_or_build_cache(data_copy, 'train').images[5].min() >= 253


@pytest.mark.parametrize('content', ['null', '[]', '3', '"fingerprint"'])
def test_a_fingerprint_that_is_no_json_object_is_damaged(data_copy, capsys, content):
    data_cache.load_or_build_cache(data_copy, 'train')
    with open(data_cache.cache_paths(data_copy, 'train')[1], 'w') as f:
        f.write(content)
    capsys.readouterr()
    assert 'damaged (not a JSON object)' in rebuild_reason(data_copy, capsys)
    data_cache.load_or_build_cache(data_copy, 'train')
    assert capsys.readouterr().err == ''               # rebuilt: fresh again


def cpu_plan(data_folder, rebuild_cache=False):
    from toolkit.run_plan import plan_from_argv
    argv = [data_folder, '-j', '0', '-b', '1', '--no-channels-last', '--data-cache', '--seed', '0']
    return plan_from_argv(argv + (['--rebuild-cache'] if rebuild_cache else []),
                          torch.device('cpu'))[0]


def test_rebuild_cache_flag_rebuilds_a_fresh_cache(data_copy, capsys):
    import main as driver
    assert driver.parser.parse_args([data_copy]).rebuild_cache is False
    assert driver.parser.parse_args([data_copy, '--rebuild-cache']).rebuild_cache is True
    path = data_cache.cache_paths(data_copy, 'val')[0]

    def val_loader(**flags):
        val_set = MiniPlacesLoader(data_copy, 'val', num_classes=None)
        plan = cpu_plan(data_copy, **flags)
        capsys.readouterr()                            # what resolving the plan said
        return loaders.cached_loader(plan, torch.device('cpu'), val_set,
                                     student_code.get_val_transforms(), batch_size=4)

    val_loader()
    built = os.stat(path).st_ino, os.stat(path).st_ctime_ns
    capsys.readouterr()
    val_loader()                                       # fresh: read as it is
    assert capsys.readouterr().out == ''
    assert (os.stat(path).st_ino, os.stat(path).st_ctime_ns) == built
    val_loader(rebuild_cache=True)                     # fresh, but asked for
    captured = capsys.readouterr()
    assert 'decoding the 12 images of val once' in captured.out and captured.err == ''
    assert (os.stat(path).st_ino, os.stat(path).st_ctime_ns) != built


# a build that takes about 5 s (0.2 s per image of the 24 of the train split), in a process
# of its own: argv data folder, "build" or "rebuild"
SLOW_BUILD = """
import sys, time
from toolkit import data_cache
decode = data_cache.cache_image
def slow(img, size):
    time.sleep(0.2)
    return decode(img, size=size)
data_cache.cache_image = slow
data_cache.load_or_build_cache(sys.argv[1], 'train', rebuild=sys.argv[2] == 'rebuild')
"""


TRAIN_CACHE_BYTES = 24 * 128 * 128 * 3 + 128     # the train split's .npy: images + header


def start_slow_build(data_folder, how='build'):
    """The slow build's process, returned once its temporary file has its full size (it
    then decodes for seconds, holding the lock until its end). Not at the file's first
    appearance: numpy writes the 128-byte header before it sizes the file."""
    proc = subprocess.Popen([sys.executable, '-c', SLOW_BUILD, data_folder, how], cwd=CODE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pattern = os.path.join(data_folder, 'cache', f'.*.tmp-*-{proc.pid}')

    def sized():
        try:
            return any(os.path.getsize(f) == TRAIN_CACHE_BYTES for f in glob.glob(pattern))
        except FileNotFoundError:           # renamed into place between glob and stat
            return False
    deadline = time.time() + 120
    while not sized():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f'the slow build did not start: {proc.communicate()[0]}')
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_a_second_build_waits_for_the_first_then_reads_its_cache(data_copy, capsys):
    builder = start_slow_build(data_copy)
    try:
        cache = data_cache.load_or_build_cache(data_copy, 'train')   # waits for the lock
    finally:
        out, _ = builder.communicate(timeout=120)
    assert builder.returncode == 0 and 'decoding the 24 images' in out, out
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'=> waiting for pid {builder.pid} on ')
    assert 'building the data cache' in lines[0] and captured.err == ''   # not rebuilt
    loader = MiniPlacesLoader(data_copy, 'train', num_classes=None)
    decoded = load_image(os.path.join(loader.img_folder, loader.file_list[7]))
    np.testing.assert_array_equal(cache.images[7], data_cache.cache_image(decoded))


def leftovers(folder):
    return glob.glob(os.path.join(folder, '.*.tmp-*'))


@pytest.mark.slow
def test_leftovers_of_killed_builds_are_removed_at_the_next_start(data_copy, capsys):
    folder = os.path.join(data_copy, 'cache')
    # killed while building a missing cache: the next start removes it, then builds
    proc = start_slow_build(data_copy)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (leftover,) = leftovers(folder)
    assert os.path.getsize(leftover) == TRAIN_CACHE_BYTES              # reserved up front
    data_cache.load_or_build_cache(data_copy, 'train')                         # the lock is free
    out = capsys.readouterr().out
    assert f'removed {leftover}' in out and 'decoding the 24 images' in out
    assert leftovers(folder) == []
    # killed while rebuilding a fresh cache (--rebuild-cache): the cache stays in use, and
    # the next start removes the leftover without rebuilding
    proc = start_slow_build(data_copy, 'rebuild')
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    (leftover,) = leftovers(folder)
    data_cache.load_or_build_cache(data_copy, 'train')
    captured = capsys.readouterr()
    assert f'removed {leftover}' in captured.out and 'decoding' not in captured.out
    assert captured.err == '' and leftovers(folder) == []


# the driver's choice for data folders it cannot write, each printed as JSON after the
# notes it printed; argv: pairs of a data folder and "rebuild" (for --rebuild-cache) or
# "-". Root writes into a chmod a-w folder anyway: it becomes the user nobody, after the
# imports and a first pass over the checks (which import modules lazily, from files only
# root may read; they only read the folders). One process for every case: each pays the
# imports of torch and torchvision, seconds here.
SETTLE = """
import json, os, sys
from toolkit import loaders
cases = list(zip(sys.argv[1::2], sys.argv[2::2]))
for folder, _ in cases:
    for split in ('train', 'val'):
        loaders.MiniPlacesLoader(folder, split, num_classes=None)
        loaders.np.load(loaders.data_cache.cache_paths(folder, split)[0], mmap_mode='r')
# the transforms' source, read once and kept: a clone in a folder only root may enter
from student_code import get_train_transforms, get_val_transforms
for transforms in (get_train_transforms(), get_val_transforms()):
    loaders.fast_data.fused_path_supported(transforms)
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    except PermissionError:            # a container without the right to change users
        print(json.dumps('root only'))
        sys.exit(0)
for folder, how in cases:
    datasets = loaders.load_datasets(folder)
    used = loaders.cache_fallback(folder, how == 'rebuild', datasets, asked=True) is None
    if used:
        loaders.data_cache.load_or_build_cache(folder, 'val')   # reads, writes nothing
    print(json.dumps(used))
"""


def settle_read_only(*cases):
    """[(whether the cache serves, what it printed)] of cache_fallback for each (data folder,
    how) in a process that cannot write the folders (chmod a-w; see SETTLE)."""
    argv = [word for case in cases for word in case]
    proc = subprocess.run([sys.executable, '-c', SETTLE] + argv, cwd=CODE,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    if proc.stdout.strip() == json.dumps('root only'):
        pytest.skip('root writes into read-only folders, and cannot become another user here')
    results, notes = [], []
    for line in proc.stdout.splitlines():
        if line in ('true', 'false'):
            results.append((json.loads(line), '\n'.join(notes)))
            notes = []
        else:
            notes.append(line)
    assert len(results) == len(cases), proc.stdout
    return results


@pytest.mark.slow
def test_read_only_folder_with_a_stale_cache_uses_the_per_image_path(demo):
    # folders of their own that the user nobody can reach (pytest's are private to root)
    top = tempfile.mkdtemp(prefix='read_only_')
    fresh, stale = os.path.join(top, 'fresh'), os.path.join(top, 'stale')
    made_read_only = []
    try:
        os.chmod(top, 0o755)
        for data_folder in (fresh, stale):
            shutil.copytree(demo, data_folder, ignore=shutil.ignore_patterns('cache'))
            for split in ('train', 'val'):
                data_cache.load_or_build_cache(data_folder, split)
        # stale: an image touched after its cache was built
        loader = MiniPlacesLoader(stale, 'train', num_classes=None)
        os.utime(os.path.join(loader.img_folder, loader.file_list[0]))
        for data_folder in (fresh, stale):
            for folder in (os.path.join(data_folder, 'cache'), data_folder):
                os.chmod(folder, 0o555)
                made_read_only.append(folder)
        (used_fresh, out_fresh), (used_stale, out), (used_rebuild, out_rebuild) = \
            settle_read_only((fresh, '-'), (stale, '-'), (stale, 'rebuild'))
        # fresh: used as it is, nothing written
        assert (used_fresh, out_fresh) == (True, '')
        # stale: the per-image path, with a note saying why
        assert used_stale is False and out.count('\n') == 0, out
        assert out.startswith('note: --data-cache was asked for, but ') and 'is read-only '\
            'and its cache of train is stale (images changed' in out \
            and out.endswith('this run uses the per-image path')
        # --rebuild-cache cannot be done there either
        assert used_rebuild is False and '--rebuild-cache cannot rebuild' in out_rebuild
    finally:
        for folder in made_read_only:
            os.chmod(folder, 0o755)
        shutil.rmtree(top)


################################################################################
# datasets and loaders over the cache, seeding
################################################################################
@pytest.fixture
def cache(data_copy):
    return data_cache.load_or_build_cache(data_copy, 'train')


def test_cached_dataset_train_and_val(cache):
    train = fd.CachedDataset(cache, student_code.get_train_transforms())
    img, label = train[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 128, 128) and img.is_contiguous()
    assert label == cache.labels[5] and train.label_list == list(cache.labels)
    assert train.normalization == (MEAN, STD)
    val = fd.CachedDataset(cache, student_code.get_val_transforms())
    img, _ = val[5]                                   # the identity: the cached image
    assert torch.equal(img, torch.from_numpy(cache.images[5].copy()).permute(2, 0, 1))
    # ... and normalized on the device it is what the per-image val path gives
    per_image = student_code.get_val_transforms()(np.array(cache.images[5]))
    torch.testing.assert_close(fd.normalize_on_device(img[None], *val.normalization)[0],
                               per_image)


def test_val_transforms_on_the_fused_path_give_the_per_image_result():
    """get_val_transforms()'s fixed (bilinear) Scale is accepted by the fused path, which
    only normalizes the cached image; for images of 128 px or smaller the cache holds
    exactly what the per-image validation path computes (larger ones are shrunk with
    INTER_AREA in the cache: cache_image)."""
    val = student_code.get_val_transforms()
    assert fd.fused_path_supported(val)[0]
    plan, normalization = fd.plan_for_cache(val, data_cache.ImageCache('unused', [0], ['a'], 128))
    assert plan is None and normalization == (MEAN, STD)
    for shape in [(128, 128), (48, 48), (60, 40), (100, 128)]:
        img = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
        cached = torch.from_numpy(data_cache.cache_image(img)).permute(2, 0, 1)
        for seed in range(4):                      # whatever Python's random holds
            random.seed(seed)
            torch.testing.assert_close(fd.normalize_on_device(cached[None], *normalization)[0],
                                       val(img))


def batches(dataset, seed, workers):
    torch.manual_seed(seed)
    random.seed(seed)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                        worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))
    return [images for images, _ in loader]


@pytest.mark.parametrize('workers', [0, 2])
def test_seeded_runs_repeat(cache, workers):
    train = fd.CachedDataset(cache, student_code.get_train_transforms())
    a, b, c = batches(train, 1, workers), batches(train, 1, workers), batches(train, 2, workers)
    assert len(a) == 3 and a[0].shape == (8, 3, 128, 128) and a[0].dtype == torch.uint8
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_device_loader_on_the_cpu(cache):
    order = TrainOrder(len(cache), 10)
    train = fd.DeviceLoader(cache, student_code.get_train_transforms(), 'cpu', batch_size=10,
                            sampler=order)
    assert len(train) == 2

    def run(seed):
        order.set_epoch(seed, 0)
        return list(train)

    first, second = run(3), run(3)
    assert not torch.equal(first[0][0], run(4)[0][0])
    (x, y), _ = first
    assert x.dtype == torch.float32 and x.shape == (10, 3, 128, 128) and y.shape == (10,)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    # within the normalized range of [0, 255] pixels
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (x >= low[:, None, None] - 1e-5).all() and (x <= high[:, None, None] + 1e-5).all()

    val = fd.DeviceLoader(cache, student_code.get_val_transforms(), 'cpu', batch_size=16)
    assert len(val) == 2
    (x, y), (x2, _) = list(val)
    assert x2.shape[0] == 8 and torch.equal(y, torch.as_tensor(cache.labels[:16]))
    expected = student_code.get_val_transforms()(np.array(cache.images[3]))
    torch.testing.assert_close(x[3], expected)


def test_a_run_reads_each_label_file_once(demo, tmp_path, capsys, monkeypatch):
    """The datasets the driver builds serve the cache's checks and build too: each split's
    label file is read (and its images' fingerprint taken) once per run, not three times."""
    from conftest import FAST, run_main
    built = []
    real_init = MiniPlacesLoader.__init__

    def counting_init(self, root_folder, split='train', *args, **kwargs):
        built.append(split)
        real_init(self, root_folder, split, *args, **kwargs)
    monkeypatch.setattr(MiniPlacesLoader, '__init__', counting_init)
    data = str(tmp_path / 'data')
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns('cache'))
    code, _, err = run_main([data, '--log-dir', str(tmp_path / 'logs'), '--epochs', '2',
                             '--data-cache'] + FAST, capsys)
    assert code == 0, err
    assert sorted(built) == ['train', 'val']
