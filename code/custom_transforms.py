"""Image augmentations for MiniPlaces (the reference solution of HW1), OpenCV/NumPy based.

Every transform except Normalize takes an image as a NumPy array: H x W x C uint8 in
RGB order (as MiniPlacesLoader returns it); H x W and H x W x 1 (grayscale) work too.
ToTensor turns it into a C x H x W float32 tensor in [0, 1], and Normalize works on that.

Randomness: the random transforms draw only from Python's `random` module. In the main
process `random.seed(s)` makes them repeatable; inside DataLoader workers
`custom_dataloader.seed_worker` (passed as `worker_init_fn`) seeds `random` from
torch's per-worker seed, so `torch.manual_seed(s)` makes the whole pipeline repeatable.
main.py's training loader goes further: it re-seeds `random` before every image with a
seed of its own (data_order.TrainOrder), independent of the worker that loads it.

Each random transform splits into `get_params(...)` (all its random draws, in the order
__call__ makes them) and `apply(img, ...)` (the deterministic part), like torchvision's
RandomResizedCrop.get_params: fast_data.py draws the same parameters with the same calls
for its fused warp, and the tests apply fixed parameters to both paths.

Edit freely: the fused warp reproduces these classes only as they are shipped, so a class
you change (or subclass) makes main.py run this code per image instead, and a `note:` line
at start says so (docs/data.md).
"""
import math
import random
import numbers

import cv2
import numpy as np
import torch

# resizing picks one of these at random for each image (a mild augmentation in itself)
_DEFAULT_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC)
_INTERPOLATION_NAMES = {
    cv2.INTER_NEAREST: "cv2.INTER_NEAREST", cv2.INTER_LINEAR: "cv2.INTER_LINEAR",
    cv2.INTER_CUBIC: "cv2.INTER_CUBIC", cv2.INTER_AREA: "cv2.INTER_AREA",
    cv2.INTER_LANCZOS4: "cv2.INTER_LANCZOS4",
}


################################################################################
# helpers
################################################################################
def _check_image(img, who):
    """A one-line error instead of a deep OpenCV error for anything but an image array."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{who} expects an HxWxC numpy image, got {type(img).__name__}")
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{who} expects an HxW or HxWxC image, got shape {img.shape}")


def _keep_channels(out, img):
    # OpenCV returns H x W for a single-channel image; give H x W x 1 back if it came so
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def _resize(img, width, height, interpolation):
    out = cv2.resize(img, (int(width), int(height)), interpolation=interpolation)
    return _keep_channels(out, img)


def _as_size(size, who):
    """int -> (size, size); (h, w) -> (h, w)."""
    if isinstance(size, numbers.Integral) and size > 0:
        return int(size), int(size)
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, numbers.Integral) and s > 0 for s in size)):
        return int(size[0]), int(size[1])
    raise ValueError(f"{who}: size must be a positive int or an (height, width) pair, got {size!r}")


def _as_interpolations(interpolations, who):
    if interpolations is None:
        return (cv2.INTER_LINEAR,)
    if isinstance(interpolations, numbers.Integral):
        return (int(interpolations),)
    interpolations = tuple(interpolations)
    if not interpolations or not all(isinstance(i, numbers.Integral) for i in interpolations):
        raise ValueError(f"{who}: interpolations must be OpenCV flags such as cv2.INTER_LINEAR, "
                         f"got {interpolations!r}")
    return interpolations


def _interpolations_repr(interpolations):
    return "[" + ", ".join(_INTERPOLATION_NAMES.get(i, str(i)) for i in interpolations) + "]"


def _size_repr(size):
    return str(size[0]) if size[0] == size[1] else str(size)


################################################################################
# transforms
################################################################################
class Compose(object):
    """Apply a list of transforms one after the other."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self):
        lines = "".join(f"  {t!r},\n" for t in self.transforms)
        return f"{self.__class__.__name__}(\n{lines})"


class RandomHorizontalFlip(object):
    """Mirror the image left-right with probability 0.5."""

    def get_params(self):
        """True: mirror this image (one draw of random.random())."""
        return random.random() < 0.5

    def apply(self, img, flip):
        return np.ascontiguousarray(img[:, ::-1]) if flip else img

    def __call__(self, img):
        _check_image(img, "RandomHorizontalFlip")
        return self.apply(img, self.get_params())

    def __repr__(self):
        return f"{self.__class__.__name__}()"


class Scale(object):
    """Resize the image.

    size: an int resizes the SHORTER side to `size`, keeping the aspect ratio;
    an (height, width) pair resizes to exactly that size.
    interpolations: OpenCV flags; each call picks one at random.
    """

    def __init__(self, size, interpolations=_DEFAULT_INTERPOLATIONS):
        if isinstance(size, numbers.Integral):
            _as_size(size, "Scale")             # validates
            self.size = int(size)
        else:
            self.size = _as_size(size, "Scale")
        self.interpolations = _as_interpolations(interpolations, "Scale")

    def get_params(self):
        """The interpolation of this image (drawn even when no resize is needed)."""
        return random.choice(self.interpolations)

    def output_size(self, height, width):
        """(height, width) of the output for an input of height x width."""
        if isinstance(self.size, tuple):
            return self.size
        if width <= height:
            return int(round(self.size * height / width)), self.size
        return self.size, int(round(self.size * width / height))

    def apply(self, img, interpolation):
        height, width = img.shape[:2]
        out_h, out_w = self.output_size(height, width)
        if (out_h, out_w) == (height, width):
            return img
        return _resize(img, out_w, out_h, interpolation)

    def __call__(self, img):
        _check_image(img, "Scale")
        return self.apply(img, self.get_params())

    def __repr__(self):
        return (f"{self.__class__.__name__}(size={self.size}, "
                f"interpolations={_interpolations_repr(self.interpolations)})")


class CenterCrop(object):
    """Crop the central (height, width) region (an int gives a square).

    An image smaller than the crop is first upscaled (keeping the aspect ratio,
    bilinear) just enough to cover it.
    """

    def __init__(self, size):
        self.size = _as_size(size, "CenterCrop")

    def layout(self, height, width):
        """((h, w), (y0, x0)): the size the input is first upscaled to (its own size
        if it covers the crop) and the crop's top-left corner in that image."""
        th, tw = self.size
        h, w = height, width
        if h < th or w < tw:
            scale = max(th / h, tw / w)
            h, w = max(th, int(math.ceil(h * scale))), max(tw, int(math.ceil(w * scale)))
        return (h, w), (int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)))

    def __call__(self, img):
        _check_image(img, "CenterCrop")
        th, tw = self.size
        (h, w), (y0, x0) = self.layout(*img.shape[:2])
        if (h, w) != img.shape[:2]:
            img = _resize(img, w, h, cv2.INTER_LINEAR)
        return img[y0:y0 + th, x0:x0 + tw]

    def __repr__(self):
        return f"{self.__class__.__name__}(size={_size_repr(self.size)})"


class RandomSizedCrop(object):
    """Inception-style crop: a random region covering `area_range` of the image with
    aspect ratio (width / height) in `ratio_range`, resized to `size`.

    If no such region fits in `num_trials` draws (e.g. a very elongated image), fall
    back to Scale(size) + CenterCrop(size).
    """

    def __init__(self, size, interpolations=_DEFAULT_INTERPOLATIONS,
                 area_range=(0.25, 1.0), ratio_range=(0.8, 1.25), num_trials=10):
        self.size = _as_size(size, "RandomSizedCrop")
        self.interpolations = _as_interpolations(interpolations, "RandomSizedCrop")
        if not (0 < area_range[0] <= area_range[1] <= 1):
            raise ValueError(f"RandomSizedCrop: area_range must satisfy 0 < lo <= hi <= 1, "
                             f"got {area_range!r}")
        if not (0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"RandomSizedCrop: ratio_range must satisfy 0 < lo <= hi, "
                             f"got {ratio_range!r}")
        self.area_range = tuple(area_range)
        self.ratio_range = tuple(ratio_range)
        self.num_trials = int(num_trials)
        self.fallback = Compose([Scale(min(self.size), self.interpolations),
                                 CenterCrop(self.size)])

    def get_params(self, height, width):
        """(x0, y0, cw, ch, interpolation) of a crop of a height x width image, or None
        when no trial fits: then `self.fallback` (Scale + CenterCrop) is used, which
        draws its own interpolation."""
        for _ in range(self.num_trials):
            area = height * width * random.uniform(*self.area_range)
            ratio = random.uniform(*self.ratio_range)
            cw = int(round(math.sqrt(area * ratio)))
            ch = int(round(math.sqrt(area / ratio)))
            if 1 <= cw <= width and 1 <= ch <= height:
                x0, y0 = random.randint(0, width - cw), random.randint(0, height - ch)
                return x0, y0, cw, ch, random.choice(self.interpolations)
        return None

    def apply(self, img, params):
        if params is None:
            return self.fallback(img)
        x0, y0, cw, ch, interpolation = params
        crop = img[y0:y0 + ch, x0:x0 + cw]
        return _resize(crop, self.size[1], self.size[0], interpolation)

    def __call__(self, img):
        _check_image(img, "RandomSizedCrop")
        return self.apply(img, self.get_params(*img.shape[:2]))

    def __repr__(self):
        return (f"{self.__class__.__name__}(size={_size_repr(self.size)}, "
                f"interpolations={_interpolations_repr(self.interpolations)}, "
                f"area_range={self.area_range}, ratio_range={self.ratio_range}, "
                f"num_trials={self.num_trials})")


class RandomColor(object):
    """Multiply each channel by its own random factor in [1 - r, 1 + r] (clipped to [0, 255])."""

    def __init__(self, color_range):
        if not (0 <= color_range < 1):
            raise ValueError(f"RandomColor: color_range must be in [0, 1), got {color_range!r}")
        self.color_range = color_range

    def get_params(self, num_channels=3):
        """One factor per channel, each uniform in [1 - r, 1 + r]."""
        return tuple(random.uniform(1 - self.color_range, 1 + self.color_range)
                     for _ in range(num_channels))

    def apply(self, img, factors):
        factors = np.array(factors, dtype=np.float32)
        if img.ndim == 2:
            factors = factors[0]
        out = img.astype(np.float32) * factors
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def __call__(self, img):
        _check_image(img, "RandomColor")
        return self.apply(img, self.get_params(img.shape[2] if img.ndim == 3 else 1))

    def __repr__(self):
        return f"{self.__class__.__name__}(color_range={self.color_range})"


def largest_rotated_rect(width, height, angle):
    """Width and height of the largest axis-aligned rectangle inside a width x height
    rectangle rotated by `angle` radians (both centred at the same point)."""
    if width <= 0 or height <= 0:
        return 0.0, 0.0
    width_is_longer = width >= height
    side_long, side_short = (width, height) if width_is_longer else (height, width)
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    if side_short <= 2.0 * sin_a * cos_a * side_long or abs(sin_a - cos_a) < 1e-10:
        # half constrained: two corners touch the longer side, the other two lie
        # on the mid-line parallel to it
        x = 0.5 * side_short
        wr, hr = (x / sin_a, x / cos_a) if width_is_longer else (x / cos_a, x / sin_a)
    else:
        # fully constrained: the crop touches all four sides
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr = (width * cos_a - height * sin_a) / cos_2a
        hr = (height * cos_a - width * sin_a) / cos_2a
    return wr, hr


class RandomRotate(object):
    """Rotate by a random angle in [-degree_range, degree_range] degrees, crop the
    largest axis-aligned rectangle that holds no border, and resize it back to the
    original size (so the output has the input's shape and no black corners)."""

    def __init__(self, degree_range, interpolations=_DEFAULT_INTERPOLATIONS):
        if not (0 <= degree_range <= 180):
            raise ValueError(f"RandomRotate: degree_range must be in [0, 180], "
                             f"got {degree_range!r}")
        self.degree_range = degree_range
        self.interpolations = _as_interpolations(interpolations, "RandomRotate")

    def get_params(self):
        """(degree, interpolation); |degree| < 1e-3 leaves the image as it is."""
        degree = random.uniform(-self.degree_range, self.degree_range)
        return degree, random.choice(self.interpolations)

    @staticmethod
    def crop_box(height, width, degree):
        """(x0, y0, cw, ch): the upright crop of the rotated height x width canvas."""
        wr, hr = largest_rotated_rect(width, height, math.radians(degree))
        # a pixel of margin on each side: interpolation at the rim mixes in the black border
        cw, ch = max(1, int(math.floor(wr)) - 2), max(1, int(math.floor(hr)) - 2)
        return (width - cw) // 2, (height - ch) // 2, cw, ch

    def apply(self, img, degree, interpolation):
        if abs(degree) < 1e-3:
            return img
        h, w = img.shape[:2]
        # rotate about the centre of the pixel grid; the canvas keeps the input size
        matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degree, 1.0)
        rotated = _keep_channels(cv2.warpAffine(img, matrix, (w, h), flags=interpolation), img)
        x0, y0, cw, ch = self.crop_box(h, w, degree)
        crop = rotated[y0:y0 + ch, x0:x0 + cw]
        return _resize(crop, w, h, interpolation)

    def __call__(self, img):
        _check_image(img, "RandomRotate")
        return self.apply(img, *self.get_params())

    def __repr__(self):
        return (f"{self.__class__.__name__}(degree_range={self.degree_range}, "
                f"interpolations={_interpolations_repr(self.interpolations)})")


class ToTensor(object):
    """H x W x C numpy image -> C x H x W float32 tensor (uint8 is scaled to [0, 1];
    float images are kept as they are). H x W becomes 1 x H x W."""

    def __call__(self, img):
        _check_image(img, "ToTensor")
        if img.ndim == 2:
            img = img[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if tensor.dtype == torch.uint8:
            return tensor.float().div_(255.0)
        return tensor.float()

    def __repr__(self):
        return f"{self.__class__.__name__}()"


class Normalize(object):
    """(tensor - mean) / std per channel, on a C x H x W (or N x C x H x W) tensor."""

    def __init__(self, mean, std):
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean and std differ in length "
                             f"({len(mean)} vs {len(std)})")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, tensor):
        if not torch.is_tensor(tensor) or tensor.dim() < 3:
            raise TypeError("Normalize expects a C x H x W tensor (apply ToTensor first), "
                            f"got {type(tensor).__name__}")
        if tensor.shape[-3] != len(self.mean):
            raise ValueError(f"Normalize: tensor has {tensor.shape[-3]} channels but mean/std "
                             f"have {len(self.mean)}")
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device)[:, None, None]
        return (tensor - mean) / std

    def __repr__(self):
        return f"{self.__class__.__name__}(mean={self.mean}, std={self.std})"
