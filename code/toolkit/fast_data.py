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

What it reproduces: custom_transforms.py as it is shipped, as a whole (its code, that is;
comments and docstrings may change), and pipelines of exactly its classes in which no
object holds an attribute its class does not set. Anything else, such as a student's edit,
takes the per-image path, which runs it, with one note line saying what differs
(module_difference, make_plan).

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
import ast
import functools
import hashlib
import inspect
import math
import os
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


# The fused path reproduces custom_transforms.py as it is shipped, as a whole: any part may
# call any other (every __call__ calls _check_image first), so a list of the parts that
# matter would miss one. Its code is compared, not its text: the fingerprint is taken of
# the syntax tree without docstrings (comments are not in it), so notes and docstrings
# may change. Any other edit makes the run take the per-image path, which calls the
# edited code, with one note line. Changing the file on purpose: make the fused path
# reproduce it, then put here what this prints, run in code/:
#   python -c "from toolkit import fast_data as f; print(f.source_fingerprint(f.T))"
SHIPPED_FINGERPRINT = "79fcbffbc4f0f16f44e84d9c04a4e4c8514fb4fca7976f814c6555220260877f"


def source_fingerprint(module):
    """sha256 of the code of a module's file: its syntax tree without docstrings."""
    return _on_disk(module.__file__, module.__name__)[0]


def module_difference(module):
    """Why `module` (custom_transforms, or a copy of its file) is not the code the fused
    path reproduces, or None: its file's code differs from the shipped one, or a name of
    the imported module differs from what a fresh run of the file defines (a function or
    method replaced at run time, or the file changed since the import)."""
    name = os.path.basename(module.__file__)
    try:
        fingerprint, _, fresh = _on_disk(module.__file__, module.__name__)
    except (OSError, SyntaxError, ValueError) as e:
        return (f"{name} cannot be read ({' '.join(str(e).split())}), so the fused cache "
                f"path cannot check it")
    if fingerprint != SHIPPED_FINGERPRINT:
        return (f"{name} differs from the version the fused cache path reproduces (in its "
                f"code: comments and docstrings do not count)")
    part = _first_difference(_names(vars(module)), _names(fresh), "")
    if part is not None:
        return (f"{module.__name__}.{part} is not what {name} defines (replaced at run "
                f"time, or the file changed since the import)")
    return None


def check_shipped(parts=()):
    """Unsupported saying why, unless custom_transforms is the code the fused path
    reproduces (module_difference). The whole module counts, whatever `parts` (the
    (name, class) pairs a caller stands in for) are: any part may call any other."""
    why = module_difference(T)
    if why is not None:
        raise Unsupported(why)


@functools.lru_cache(maxsize=None)
def _on_disk(path, name):
    """(source fingerprint, {class: the attributes its methods set on self}, namespace)
    of the module file at `path`, read once and kept (a run may drop the right to read it
    later). The namespace is that of a fresh run of the file as module `name`, made only
    where the code is the shipped one (a student's file is never run twice)."""
    with open(path, "rb") as f:
        source = f.read()
    tree = ast.parse(source, path)
    attributes = {node.name: _attributes_set(node) for node in tree.body
                  if isinstance(node, ast.ClassDef)}
    fingerprint = hashlib.sha256(_canonical(_without_docstrings(tree)).encode()).hexdigest()
    fresh = None
    if fingerprint == SHIPPED_FINGERPRINT:
        fresh = {"__name__": name, "__file__": path}
        exec(compile(source, path, "exec", dont_inherit=True), fresh)   # as an import does
    return fingerprint, attributes, fresh


def _attributes_set(class_node):
    """The names a class's own code assigns as self.NAME: all an instance of it holds."""
    return frozenset(node.attr for node in ast.walk(class_node)
                     if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                     and isinstance(node.value, ast.Name) and node.value.id == "self")


def _without_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                node.body = node.body[1:]
    return tree


def _canonical(node):
    """A syntax tree written out field by field, without the empty ones: ast.dump's text
    changes between Pythons (3.12 adds type_params=[] to every def), this does not."""
    if isinstance(node, ast.AST):
        fields = [f"{field}={_canonical(value)}" for field, value in ast.iter_fields(node)
                  if value is not None and value != []]
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_canonical(value) for value in node)}]"
    return repr(node)


def _names(namespace):
    # a module's own dunders (__file__, __loader__, __builtins__, ...) differ by nature
    return {k: v for k, v in namespace.items() if not (k.startswith("__") and k.endswith("__"))}


def _first_difference(live, fresh, prefix):
    """The first name (prefix + name) whose value differs between two namespaces, or None."""
    for name in sorted(set(live) | set(fresh)):
        if name not in live or name not in fresh:
            return prefix + name
        found = _difference(prefix + name, live[name], fresh[name])
        if found is not None:
            return found
    return None


def _difference(name, live, fresh):
    """None where `live` (a value of the imported module) is `fresh` (the same name in a
    fresh run of its file), else the dotted name of the part that differs: a class's
    attributes and bases are compared one by one, a function by its code and defaults."""
    if live is fresh:                     # modules, builtins, object
        return None
    if inspect.isclass(live) and inspect.isclass(fresh):
        if len(live.__bases__) != len(fresh.__bases__) or any(
                _difference(name, a, b) for a, b in zip(live.__bases__, fresh.__bases__)):
            return name
        per_class = ("__dict__", "__weakref__")   # descriptors of each class object
        return _first_difference({k: v for k, v in vars(live).items() if k not in per_class},
                                 {k: v for k, v in vars(fresh).items() if k not in per_class},
                                 name + ".")
    if type(live) is not type(fresh):
        return name
    if isinstance(live, (staticmethod, classmethod)):
        return _difference(name, live.__func__, fresh.__func__)
    if inspect.isfunction(live):
        same = (live.__code__ == fresh.__code__ and live.__defaults__ == fresh.__defaults__
                and live.__kwdefaults__ == fresh.__kwdefaults__)
        return None if same else name
    try:
        return None if bool(live == fresh) else name
    except Exception:                     # no comparison: count it as changed
        return name


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
    CenterCrop in any order and number, then ToTensor and optionally Normalize (3 channels),
    all of the shipped custom_transforms (check_shipped) and none with an attribute of its
    own (_check_objects)."""
    items, mean, std = _image_steps(transforms)
    kinds = [_step_kind(t, position) for position, t in enumerate(items, start=1)]
    check_shipped()
    _check_objects(transforms)
    steps, hw = [], tuple(in_hw)
    for kind, t in zip(kinds, items):
        if kind == "scale":
            out = t.output_size(*hw)
        elif kind in ("sized_crop", "center_crop"):
            out = t.size
        else:
            out = hw
        steps.append((kind, t, hw, tuple(out)))
        hw = tuple(out)
    return FusedPlan(steps, tuple(in_hw), hw, [float(m) for m in mean], [float(s) for s in std])


def _image_steps(transforms):
    """(the steps before ToTensor, mean, std of the Normalize after it), or Unsupported."""
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
    return items[:to_tensor[0]], mean, std


def _step_kind(t, position):
    """The kind of an image step (_STEP_KINDS), or Unsupported: another class, a
    subclass, an interpolation the warp lacks, a fallback other than RandomSizedCrop's."""
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
    if kind == "sized_crop":
        fallback = t.fallback
        if type(fallback) is not T.Compose or [type(f) for f in fallback.transforms] != \
                [T.Scale, T.CenterCrop]:
            raise Unsupported(f"transform {position} ({_one_line(t)}) has a fallback other "
                              f"than Compose([Scale, CenterCrop]), which the fused cache "
                              f"path cannot reproduce")
        _check_interpolations(fallback.transforms[0], position)
    return kind


def _check_objects(transforms):
    """Unsupported naming the first object of the pipeline (the Compose, a step, a
    RandomSizedCrop's fallback and its steps) with an attribute that its class's code
    never sets, such as `flip.apply = f`: the fused path would not run it. Call it once
    check_shipped passed: the classes' code is the one read here."""
    attributes = _on_disk(T.__file__, T.__name__)[1]
    objects = [("the Compose", transforms)]
    for position, t in enumerate(transforms.transforms, start=1):
        where = f"transform {position} ({_one_line(t)})"
        objects.append((where, t))
        if type(t) is T.RandomSizedCrop:
            objects += [(f"{where}'s fallback", t.fallback)] + [
                (f"{where}'s fallback {type(f).__name__}", f) for f in t.fallback.transforms]
    for where, obj in objects:
        allowed = set().union(*(attributes.get(c.__name__, ()) for c in type(obj).__mro__))
        extra = sorted(set(vars(obj)) - allowed)
        if extra:
            raise Unsupported(f"{where} has its own {extra[0]} (set on the object, not by "
                              f"its class), which the fused cache path cannot reproduce")


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
