"""Fused augmentation of the decoded cache (data_cache.py): the fast input pipeline.

Why: the per-image path (custom_dataloader + get_train_transforms()) decodes a JPEG and
resamples every image three times (Scale, RandomRotate, RandomSizedCrop), then colours,
converts and normalizes it in float: several times slower per core than this path
(docs/benchmarks.md measures both), so a few workers cannot keep a GPU busy. Here, top to
bottom:

  1. the cache: every image decoded once (data_cache.py);
  2. parameters: drawn by the transforms' own get_params, in the order their __call__ draws
     them, so the ranges are the transforms' (a student's RandomRotate(30) is followed) and a
     seed gives the same augmentation as the per-image path;
  3. one 2 x 3 affine matrix per image: every geometric step composed, output pixel -> cache
     pixel; the colour factors are kept apart (they commute with the warp);
  4. CPU execution: DataLoader workers warp with cv2.warpAffine on uint8, then scale the
     channels with cv2.transform (CachedDataset);
  5. device execution: the cache lives in GPU memory and whole batches are warped with
     affine_grid/grid_sample (augment_on_device, DeviceLoader);
  6. normalization happens on the device (normalize_on_device): workers hand over uint8,
     a quarter of the bytes of float32 (the per-image path does the same: loaders.py).

Pixel coordinates. A pixel's centre is at its integer index (x, y) (OpenCV's convention):
an image of width W covers x in [-0.5, W - 0.5]. cv2.resize(src -> dst) maps a destination
pixel to x_src = (x_dst + 0.5) * W_src / W_dst - 0.5 (INTER_LINEAR / INTER_CUBIC; OpenCV's
INTER_NEAREST resize uses floor(x_dst * W_src / W_dst) instead, up to half a pixel off).
cv2.warpAffine(src, M, flags=... | WARP_INVERSE_MAP) reads dst(x, y) = src(M @ (x, y, 1)),
so our matrices map output pixels to cache pixels. affine_grid(theta, align_corners=False)
works in normalized coordinates u = (2x + 1) / W - 1 (-1 and 1 are the outer edges of the
border pixels), hence theta = N_cache @ M @ inverse(N_out) (grid_theta).

Interpolation. The per-image path picks nearest/linear/cubic at random for each of its
resamplings; the fused path resamples once, with the interpolation drawn by the last step
that resamples the image (RandomSizedCrop's, normally), so its distribution is the same
as the per-image path's last resize.
"""
import functools
import hashlib
import inspect
import math
import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import data

import custom_transforms as T
from custom_dataloader import DatasetError
from toolkit.data_cache import CACHE_SIZE

WARP_MODES = {cv2.INTER_NEAREST: "nearest", cv2.INTER_LINEAR: "bilinear",
              cv2.INTER_CUBIC: "bicubic"}


################################################################################
# 2. Which transforms the fused path knows, and their parameters
################################################################################
# exact types: a subclass may change what __call__ does
_STEP_KINDS = {T.Scale: "scale", T.RandomHorizontalFlip: "flip", T.RandomColor: "colour",
               T.RandomRotate: "rotate", T.RandomSizedCrop: "sized_crop",
               T.CenterCrop: "center_crop"}


class FusedPlan:
    """The image steps of a transform pipeline, with the image size before and after
    each (fixed, since every cached image has the same size), and its normalization.
    steps: [(kind, transform, (h_in, w_in), (h_out, w_out))]."""

    def __init__(self, steps, in_hw, out_hw, mean, std):
        self.steps, self.in_hw, self.out_hw = steps, in_hw, out_hw
        self.mean, self.std = mean, std

    def is_identity(self):
        """True when no step is random and the geometry is the identity (the validation
        transforms on a cache of their own size): the cached image is the output."""
        if any(kind not in ("scale", "center_crop") for kind, *_ in self.steps):
            return False
        params = [tuple(cv2.INTER_LINEAR if kind == "scale" else None
                        for kind, *_ in self.steps)]
        return (self.out_hw == self.in_hw
                and np.allclose(affine_matrices(self, params)[0], np.eye(3)[:2]))


class Unsupported(ValueError):
    """The fused path cannot reproduce this pipeline (the message says why)."""


# The fused path reproduces these parts of custom_transforms.py as they are shipped: the
# sha256 of each one's source (source_fingerprint). A part whose source differs (a student
# tried another augmentation) makes the run take the per-image path, which calls the
# edited code. Changing one on purpose: make the fused path match it, then put the new
# fingerprint here (tests/test_edited_transforms.py fails until then, and prints it).
# The module's functions that compute the classes' pixels count too (PIXEL_HELPERS).
PIXEL_HELPERS = ("_resize", "_keep_channels", "largest_rotated_rect")
SHIPPED_FINGERPRINTS = {
    'Compose': '7b994fe32ffb926fb626e1174fff521bf6666bde8bb15913b3ea21f6fdb3b3b3',
    'Scale': '69d4d8e53277ecf194af238fc0f4d742fd8687820f1928b46dee4e9efbc6aa1f',
    'RandomHorizontalFlip': 'b247ceac7ef5db43d23513b0ac0cffe7eccbf3f20d9d0959685b43d80e61e710',
    'RandomColor': 'f4de28af1d856536e4bb52b1b1541771c4b8b29b93930d5a6ba15d11614c7b4a',
    'RandomRotate': '1064a826b8c13eee66ad2153f3494ce7acae1acbe80de65ddaa84a625eb0b8c5',
    'RandomSizedCrop': 'd83c795d716a5b6685354c4ba85e1a50efc48e9bfd1738c729a91b4b80e1eda5',
    'CenterCrop': '76b437ec001c2f541adf4fb6754a9d87c1cbdbf9ae68ca358a4a48f3c0653224',
    'ToTensor': '941908f2afe9b4b57af0db8579f6678d6ba14ee960f3589dcd2f8eeb86b28279',
    'Normalize': 'd90e1d80705bf9b9d2ff362f762a228f5a73015b9e6ad60d9f0b96eb5cfe68a9',
    '_resize': '29504d17813f785652a373d57c8e7bb22cc86652806fe2242248679286e5d28a',
    '_keep_channels': '6ff0fe22d3fe8f34188c91828ff8949e8a0acf12d6d932a56ac270f2899931c0',
    'largest_rotated_rect': 'a309d2c3f7d4b7a93c1622278effd5898d8788da07546dd201dcbb5430d5d763',
}


def source_fingerprint(obj):
    """sha256 of what a function or class of custom_transforms does now: a function's
    source; for a class, its bases and every attribute it defines (a function's source,
    else its repr; not the docstring), so a method replaced at run time counts too."""
    if not inspect.isclass(obj):
        return hashlib.sha256(_source(obj).encode()).hexdigest()
    parts = [f"{obj.__name__}({', '.join(base.__qualname__ for base in obj.__bases__)})"]
    for name, value in sorted(vars(obj).items()):
        value = getattr(value, "__func__", getattr(value, "fget", value))  # static, property
        if callable(value):
            parts.append(_source(value))
        elif not name.startswith("__"):  # not __doc__, __module__, __firstlineno__, ...
            parts.append(f"{name} = {value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _source(function):
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):         # typed in at a prompt, a builtin, a partial
        return f"{getattr(function, '__qualname__', function)}: no source"


def check_shipped(parts):
    """Unsupported naming the first of `parts`, (name, class or function) pairs of
    custom_transforms, whose source is not the version the fused path reproduces."""
    for name, part in parts:
        if source_fingerprint(part) != SHIPPED_FINGERPRINTS.get(name):
            raise Unsupported(f"custom_transforms.{name} differs from the version the fused "
                              f"cache path reproduces")


def _one_line(t):
    return " ".join(repr(t).split())      # a student's repr may span lines


def _check_interpolations(t, position):
    unknown = [i for i in getattr(t, "interpolations", ()) if i not in WARP_MODES]
    if unknown:
        raise Unsupported(f"transform {position} ({_one_line(t)}) uses interpolation "
                          f"{unknown[0]}; the fused warp knows only nearest, linear and cubic")


def make_plan(transforms, in_hw=(CACHE_SIZE, CACHE_SIZE)):
    """FusedPlan of a custom_transforms.Compose applied to in_hw images, or Unsupported.
    Known: Scale, RandomHorizontalFlip, RandomColor, RandomRotate, RandomSizedCrop and
    CenterCrop in any order and number, then ToTensor and optionally Normalize (3 channels)."""
    if type(transforms) is not T.Compose:
        raise Unsupported(f"the transforms are a {type(transforms).__name__}, not a "
                          f"custom_transforms.Compose")
    items = list(transforms.transforms)
    to_tensor = [i for i, t in enumerate(items) if type(t) is T.ToTensor]
    if len(to_tensor) != 1:
        raise Unsupported("the transforms need exactly one ToTensor")
    tail = items[to_tensor[0] + 1:]
    if len(tail) > 1 or (tail and type(tail[0]) is not T.Normalize):
        raise Unsupported(f"after ToTensor the fused path knows only one Normalize, got "
                          f"{', '.join(_one_line(t) for t in tail)}")
    mean, std = (tail[0].mean, tail[0].std) if tail else ([0.0] * 3, [1.0] * 3)
    if len(mean) != 3:
        raise Unsupported(f"Normalize has {len(mean)} channels, the images have 3")
    steps, hw = [], tuple(in_hw)
    for position, t in enumerate(items[:to_tensor[0]], start=1):
        kind = _STEP_KINDS.get(type(t))
        parent = next((k for k in _STEP_KINDS if isinstance(t, k)), None)
        if kind is None and parent is not None:
            raise Unsupported(f"transform {position} ({_one_line(t)}) is a subclass of "
                              f"custom_transforms.{parent.__name__}, which the fused cache "
                              f"path cannot reproduce")
        if kind is None:
            raise Unsupported(f"transform {position} ({_one_line(t)}) is not one the fused "
                              f"path knows ({', '.join(k.__name__ for k in _STEP_KINDS)})")
        _check_interpolations(t, position)
        if kind == "scale":
            out = t.output_size(*hw)
        elif kind in ("sized_crop", "center_crop"):
            out = t.size
        else:
            out = hw
        steps.append((kind, t, hw, tuple(out)))
        hw = tuple(out)
    # every class whose code the plan stands for (a RandomSizedCrop's fallback is a
    # Scale and a CenterCrop), and the helpers they compute pixels with
    used = {type(t) for t in [transforms] + items}
    for kind, t, *_ in steps:
        if kind == "sized_crop":
            used |= {type(f) for f in t.fallback.transforms}
    check_shipped(sorted(((part.__name__, part) for part in used), key=lambda p: p[0])
                  + [(name, getattr(T, name)) for name in PIXEL_HELPERS])
    return FusedPlan(steps, tuple(in_hw), hw, [float(m) for m in mean], [float(s) for s in std])


def fused_path_supported(transforms):
    """(True, what the fused path does) or (False, why the per-image path must be used)."""
    try:
        plan = make_plan(transforms)
    except Unsupported as e:
        return False, str(e)
    names = ", ".join(type(t).__name__ for _, t, _, _ in plan.steps)
    return True, f"{names} as one affine warp and a colour factor per image"


def _draw_step(kind, t, hw):
    """One step's parameters: the transform's own get_params (the same draws, in the same
    order, as its __call__). RandomSizedCrop's fallback draws its Scale's interpolation,
    as the fallback Compose does: ("fallback", interpolation)."""
    if kind == "colour":
        return t.get_params(3)
    if kind == "sized_crop":
        box = t.get_params(*hw)
        return box if box is not None else ("fallback", t.fallback.transforms[0].get_params())
    if kind == "center_crop":
        return None
    return t.get_params()            # scale: interpolation; flip: bool; rotate: (deg, interp)


def draw_params(plan, n, seeds=None):
    """n per-image parameter tuples, one entry per step of the plan, drawn from Python's
    `random` as it is, or re-seeded with seeds[k] before image k (data_order.TrainOrder
    gives every training image its own seed, as the per-image path's SeededSamples does)."""
    params = []
    for k in range(n):
        if seeds is not None:
            random.seed(seeds[k])
        params.append(tuple(_draw_step(kind, t, hw) for kind, t, hw, _ in plan.steps))
    return params


def split_items(items):
    """(indices, seeds or None) of a batch of image indices or (index, seed) pairs."""
    items = list(items)
    if items and isinstance(items[0], (tuple, list)):
        return [int(i) for i, _ in items], [s for _, s in items]
    return [int(i) for i in items], None


################################################################################
# 3. Parameters -> one affine matrix per image (output pixel -> cache pixel)
################################################################################
def _matrices(n, a, b, c, d, e, f):
    """(n, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]] from scalars or (n,) arrays."""
    m = np.zeros((n, 3, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, b, c
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = d, e, f
    m[:, 2, 2] = 1.0
    return m


def _crop_resize(n, x0, y0, cw, ch, out_hw):
    """Crop (x0, y0, cw, ch) resized to out_hw, as cv2.resize samples it:
    x_in = x0 + (x_out + 0.5) * cw / W_out - 0.5."""
    sx, sy = np.asarray(cw, float) / out_hw[1], np.asarray(ch, float) / out_hw[0]
    return _matrices(n, sx, 0.0, x0 + 0.5 * sx - 0.5, 0.0, sy, y0 + 0.5 * sy - 0.5)


def _scale_matrix(n, scale, in_hw):
    out_hw = scale.output_size(*in_hw)
    return _crop_resize(n, 0, 0, in_hw[1], in_hw[0], out_hw)


def _center_crop_matrix(n, crop, in_hw):
    (h, w), (y0, x0) = crop.layout(*in_hw)        # upscaled size (if any), then crop
    upscale = _crop_resize(n, 0, 0, in_hw[1], in_hw[0], (h, w))
    return upscale @ _matrices(n, 1.0, 0.0, x0, 0.0, 1.0, y0)


def _rotate_matrices(degrees, hw):
    """RandomRotate: rotation about the pixel grid's centre (cv2.getRotationMatrix2D maps
    src -> dst; this is its inverse), then the upright crop resized back to hw."""
    h, w = hw
    n = len(degrees)
    degrees = np.asarray(degrees, float)
    boxes = np.array([T.RandomRotate.crop_box(h, w, d) if abs(d) >= 1e-3 else (0, 0, w, h)
                      for d in degrees], float).reshape(n, 4)
    rad = np.radians(np.where(np.abs(degrees) >= 1e-3, degrees, 0.0))
    cos, sin = np.cos(rad), np.sin(rad)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # src = [[cos, -sin], [sin, cos]] @ (dst - c) + c
    unrotate = _matrices(n, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return unrotate @ _crop_resize(n, boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], hw)


def _step_matrices(kind, t, in_hw, out_hw, column):
    """(n, 3, 3): this step's output pixel -> its input pixel, for each image's parameters."""
    n = len(column)
    if kind == "scale":
        return _scale_matrix(n, t, in_hw)
    if kind == "center_crop":
        return _center_crop_matrix(n, t, in_hw)
    if kind == "flip":
        flip = np.array(column, bool)
        return _matrices(n, np.where(flip, -1.0, 1.0), 0.0, np.where(flip, in_hw[1] - 1.0, 0.0),
                         0.0, 1.0, 0.0)
    if kind == "rotate":
        return _rotate_matrices([p[0] for p in column], in_hw)
    if kind == "sized_crop":
        boxes = np.array([p[:4] if p[0] != "fallback" else (0, 0, 0, 0) for p in column],
                         float).reshape(n, 4)
        m = _crop_resize(n, boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], out_hw)
        fallback = np.array([p[0] == "fallback" for p in column])
        if fallback.any():           # Scale(min(size)) + CenterCrop(size), fixed geometry
            scale, crop = t.fallback.transforms
            mid_hw = scale.output_size(*in_hw)
            m[fallback] = (_scale_matrix(1, scale, in_hw)
                           @ _center_crop_matrix(1, crop, mid_hw))[0]
        return m
    return np.broadcast_to(np.eye(3), (n, 3, 3))   # colour: no geometry


def affine_matrices(plan, params):
    """(N, 2, 3) float64: output pixel (x, y, 1) -> cache pixel, every step composed
    (the first step's matrix is on the left: it maps to the cache)."""
    m = np.broadcast_to(np.eye(3), (len(params), 3, 3))
    for k, (kind, t, in_hw, out_hw) in enumerate(plan.steps):
        m = m @ _step_matrices(kind, t, in_hw, out_hw, [p[k] for p in params])
    return np.ascontiguousarray(m[:, :2])


def warp_interpolations(plan, params):
    """(N,) OpenCV flags: the interpolation of the last step that resamples each image
    (a resize to another size, a rotation, a sized crop); INTER_LINEAR if none does."""
    flags = []
    for p in params:
        flag = cv2.INTER_LINEAR
        for (kind, t, in_hw, out_hw), q in zip(plan.steps, p):
            if kind == "scale" and out_hw != in_hw:
                flag = q
            elif kind == "rotate" and abs(q[0]) >= 1e-3:
                flag = q[1]
            elif kind == "sized_crop":
                flag = q[-1]
        flags.append(flag)
    return np.array(flags, dtype=np.int64)


def colour_factors(plan, params):
    """(N, 3) float32 per-channel factors (the product of all RandomColor steps)."""
    factors = np.ones((len(params), 3), np.float32)
    for k, (kind, *_) in enumerate(plan.steps):
        if kind == "colour":
            factors *= np.array([p[k] for p in params], np.float32)
    return factors


def grid_theta(matrices, in_hw, out_hw):
    """(N, 2, 3) pixel matrices -> affine_grid's theta (align_corners=False):
    theta = N_in @ M @ inverse(N_out), with N(h, w): x -> (2x + 1) / w - 1."""
    def normalizer(h, w):
        return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0],
                         [0.0, 0.0, 1.0]])
    n = len(matrices)
    m = np.concatenate([matrices, np.broadcast_to([[[0.0, 0.0, 1.0]]], (n, 1, 3))], axis=1)
    theta = normalizer(*in_hw) @ m @ np.linalg.inv(normalizer(*out_hw))
    return theta[:, :2]


################################################################################
# 4. CPU execution: OpenCV on uint8, in DataLoader workers
################################################################################
def warp_image(image, matrix, interpolation, factors, out_hw):
    """One H x W x 3 uint8 image -> out_hw uint8: cv2.warpAffine with the output -> cache
    matrix (WARP_INVERSE_MAP; the border replicated, as grid_sample's 'border'), then the
    colour factors: cv2.transform with a diagonal float32 matrix computes clip(rint(v * f))
    in float32, exactly what RandomColor computes (the tests check all 256 levels), at a
    third of the time of a 3-channel cv2.LUT (11 vs 34 us per 128 x 128 image here)."""
    out = cv2.warpAffine(image, matrix, (out_hw[1], out_hw[0]),
                         flags=int(interpolation) | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    if factors is not None:
        out = cv2.transform(out, np.diag(np.asarray(factors, np.float32)))
    return out


def plan_for_cache(transforms, cache):
    """(the fused plan of `transforms` on the cache's images, or None where they leave
    the images as they are; (mean, std) of their Normalize)."""
    plan = make_plan(transforms, (cache.size, cache.size))
    return (None if plan.is_identity() else plan), (plan.mean, plan.std)


class CachedDataset(data.Dataset):
    """(3 x H x W uint8 tensor, label) from an ImageCache: the cached image as it is when
    `transforms` (get_val_transforms()) is the identity on it, else warped by freshly drawn
    fused parameters (get_train_transforms()). Normalize with normalize_on_device(batch,
    *dataset.normalization) after the batch reached the device. Raises Unsupported for
    transforms the fused path does not know (check fused_path_supported first).
    `label_list` / `file_list` as MiniPlacesLoader has them."""

    def __init__(self, cache, transforms):
        self.cache = cache
        self.plan, self.normalization = plan_for_cache(transforms, cache)
        self.label_list = [int(x) for x in cache.labels]
        self.file_list = cache.file_list

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, items):
        # the DataLoader hands a whole batch of indices (or (index, seed) pairs, see
        # draw_params) here: the parameters and the matrices are computed for the batch
        # at once, only the warp runs per image
        indices, seeds = split_items(items)
        images = self.cache.images
        if self.plan is None:
            return [(_chw(images[i]), self.label_list[i]) for i in indices]
        params = draw_params(self.plan, len(indices), seeds)
        matrices = affine_matrices(self.plan, params)
        flags = warp_interpolations(self.plan, params)
        factors = colour_factors(self.plan, params)
        return [(_chw(warp_image(images[i], matrices[k], flags[k], factors[k], self.plan.out_hw)),
                 self.label_list[i]) for k, i in enumerate(indices)]


def _chw(image):
    # H x W x C -> contiguous C x H x W: NumPy's transposing copy takes 17 us per image
    # here, and the DataLoader's collate then stacks with plain copies (4 us); stacking
    # permuted views instead costs 20-45 us per image in torch's strided copy
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


################################################################################
# 5. Device execution: whole batches with affine_grid / grid_sample
################################################################################
def normalize_on_device(batch, mean, std, dtype=torch.float32):
    """uint8 N x C x H x W (on any device) -> (batch / 255 - mean) / std in `dtype`: what
    ToTensor + Normalize compute, as one multiply-add on the device."""
    mean = torch.tensor(mean, dtype=dtype, device=batch.device)[:, None, None]
    std = torch.tensor(std, dtype=dtype, device=batch.device)[:, None, None]
    return batch.to(dtype).mul_(1.0 / (255.0 * std)).sub_(mean / std)


def augment_on_device(images, params, plan, layout="NHWC"):
    """uint8 batch (N x H x W x C as the cache stores it, or layout="NCHW") on any device,
    and its draw_params(plan, N) -> the normalized float32 N x C x h x w batch: one
    grid_sample per interpolation present in the batch, colour factors, clip to [0, 255]
    (as RandomColor's uint8 result is), normalization."""
    device = images.device
    x = (images.permute(0, 3, 1, 2) if layout == "NHWC" else images).float()
    n, c, h, w = x.shape
    out_h, out_w = plan.out_hw
    theta = torch.from_numpy(grid_theta(affine_matrices(plan, params), (h, w), plan.out_hw))
    grid = F.affine_grid(theta.to(device, torch.float32), [n, c, out_h, out_w],
                         align_corners=False)
    flags = warp_interpolations(plan, params)
    out = None
    for flag, mode in WARP_MODES.items():
        chosen = np.flatnonzero(flags == flag)
        if len(chosen) == n:
            out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
        elif len(chosen):
            if out is None:
                out = x.new_empty(n, c, out_h, out_w)
            idx = torch.from_numpy(chosen).to(device)
            out[idx] = F.grid_sample(x[idx], grid[idx], mode=mode, padding_mode="border",
                                     align_corners=False)
    factors = torch.from_numpy(colour_factors(plan, params)).to(device)[:, :, None, None]
    return normalize_on_device(out.mul_(factors).clamp_(0.0, 255.0), plan.mean, plan.std)


def check_device_memory(needed, free, device, reserve=2 << 30):
    """DatasetError (one line) when `needed` bytes of cache plus `reserve` for training do
    not fit in the device's `free` bytes."""
    if needed + reserve > free:
        raise DatasetError(f"the data cache needs {needed / 2**30:.1f} GiB on {device}, which "
                           f"has {free / 2**30:.1f} GiB free ({reserve / 2**30:.0f} GiB kept for "
                           f"training)")


def cache_to_device(cache, device, reserve=2 << 30):
    """The cache's images as one uint8 N x S x S x 3 tensor on `device`, copied in chunks
    (no second full copy in host memory); on a CUDA device, first a memory check."""
    device = torch.device(device)
    if device.type == "cuda":
        check_device_memory(cache.nbytes, torch.cuda.mem_get_info(device)[0], device, reserve)
    images = cache.images
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    chunk = max(1, (256 << 20) // (cache.size * cache.size * 3))
    for start in range(0, len(images), chunk):
        out[start:start + chunk].copy_(torch.from_numpy(np.array(images[start:start + chunk])))
    return out


class DeviceLoader:
    """A DataLoader stand-in for a cache held on the device (GPU path): yields
    (normalized float batch, labels), both on `device`. The CPU only walks the sampler
    and draws the parameters (Python's `random`, re-seeded per image where the sampler
    gives (index, seed) pairs, as data_order.TrainOrder does); warp, colour and
    normalization run on the device. Without a sampler: every image in order, the last
    batch partial (validation)."""

    def __init__(self, cache, transforms, device, batch_size, sampler=None):
        self.device = torch.device(device)
        self.plan, self.normalization = plan_for_cache(transforms, cache)
        self.images = cache_to_device(cache, self.device)
        self.labels = torch.as_tensor(cache.labels).to(self.device)
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else range(len(self.labels))

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        items = list(self.sampler)
        for start in range(0, len(items), self.batch_size):
            indices, seeds = split_items(items[start:start + self.batch_size])
            idx = torch.as_tensor(indices).to(self.device)
            images = self.images.index_select(0, idx)
            if self.plan is None:
                batch = normalize_on_device(images.permute(0, 3, 1, 2), *self.normalization)
            else:
                params = draw_params(self.plan, len(indices), seeds)
                batch = augment_on_device(images, params, self.plan)
            yield batch, self.labels.index_select(0, idx)
