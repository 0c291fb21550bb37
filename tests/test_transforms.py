"""custom_transforms: shapes, dtypes, ranges, numerics against hand computation,
determinism under random.seed, images smaller than the crop, reprs."""
import math
import random

import cv2
import numpy as np
import pytest
import torch

import custom_transforms as T
import student_code


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gradient_orientation(img):
    """Dominant gradient direction in degrees, [0, 180), from the structure tensor."""
    gray = img.astype(np.float64).mean(axis=2)
    gy, gx = np.gradient(gray)
    jxx, jyy, jxy = (gx * gx).sum(), (gy * gy).sum(), (gx * gy).sum()
    return math.degrees(0.5 * math.atan2(2 * jxy, jxx - jyy)) % 180


# every transform that maps image -> image keeps uint8 and the number of channels
IMAGE_TRANSFORMS = [
    T.Scale(20), T.Scale((10, 15)), T.RandomHorizontalFlip(), T.RandomColor(0.15),
    T.RandomRotate(15), T.RandomSizedCrop(24), T.CenterCrop(16),
]


@pytest.mark.parametrize("t", IMAGE_TRANSFORMS, ids=repr)
@pytest.mark.parametrize("shape", [(30, 40, 3), (40, 30), (40, 30, 1)])
def test_image_transforms_keep_dtype_and_channels(t, shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for seed in range(5):
        random.seed(seed)
        out = t(img)
        assert out.dtype == np.uint8
        assert out.ndim == img.ndim and out.shape[2:] == img.shape[2:]


def test_scale_shorter_side_and_exact_size():
    t = T.Scale(20, interpolations=[cv2.INTER_LINEAR])
    assert t(rgb(40, 60)).shape == (20, 30, 3)     # landscape: height is the shorter side
    assert t(rgb(60, 40)).shape == (30, 20, 3)     # portrait
    assert t(rgb(7, 9)).shape == (20, 26, 3)       # smaller than the size: upscaled
    assert T.Scale((10, 15))(rgb(40, 60)).shape == (10, 15, 3)   # (height, width)
    img = rgb(20, 33)
    assert t(img) is img                           # already the right size
    # the resize itself is OpenCV's, with the chosen interpolation
    np.testing.assert_array_equal(
        t(rgb(40, 60)), cv2.resize(rgb(40, 60), (30, 20), interpolation=cv2.INTER_LINEAR))


def test_scale_picks_interpolations_at_random():
    img = rgb(40, 60)
    refs = [cv2.resize(img, (30, 20), interpolation=i)
            for i in (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC)]
    seen = set()
    for seed in range(30):
        random.seed(seed)
        out = T.Scale(20)(img)
        matches = [k for k, ref in enumerate(refs) if np.array_equal(out, ref)]
        assert matches
        seen.update(matches)
    assert seen == {0, 1, 2}


def test_horizontal_flip_is_mirror_or_identity_and_both_happen():
    img = rgb(5, 7)
    outcomes = set()
    for seed in range(20):
        random.seed(seed)
        out = T.RandomHorizontalFlip()(img)
        assert out.flags["C_CONTIGUOUS"]
        if np.array_equal(out, img):
            outcomes.add("same")
        else:
            np.testing.assert_array_equal(out, img[:, ::-1])
            outcomes.add("flipped")
    assert outcomes == {"same", "flipped"}


def test_random_color_scales_each_channel_within_range():
    img = np.full((4, 5, 3), 100, np.uint8)
    factors = []
    for seed in range(50):
        random.seed(seed)
        out = T.RandomColor(0.15)(img).astype(int)
        for c in range(3):
            assert (out[:, :, c] == out[0, 0, c]).all()          # one factor per channel
        assert ((out >= 85) & (out <= 115)).all()
        factors.append(out[0, 0] / 100.0)
    factors = np.array(factors)
    assert factors.min() < 0.9 and factors.max() > 1.1           # the range is used
    assert (np.abs(factors[:, 0] - factors[:, 1]) > 0.02).mean() > 0.5   # independent channels
    # bright pixels are clipped, not wrapped around
    bright = np.full((2, 2, 3), 250, np.uint8)
    for seed in range(20):
        random.seed(seed)
        out = T.RandomColor(0.15)(bright)
        assert out.dtype == np.uint8 and out.min() >= 212


def test_largest_rotated_rect_fits_and_is_maximal():
    for w, h, deg in [(150, 100, 15), (100, 150, -10), (128, 128, 45), (200, 20, 30), (64, 64, 5)]:
        a = math.radians(deg)
        wr, hr = T.largest_rotated_rect(w, h, a)

        def fits(cw, ch):
            # corners of the centred crop, rotated back into the original image frame
            for sx, sy in [(-1, -1), (-1, 1), (1, -1), (1, 1)]:
                x, y = sx * cw / 2, sy * ch / 2
                xo = x * math.cos(a) + y * math.sin(a)
                yo = -x * math.sin(a) + y * math.cos(a)
                if abs(xo) > w / 2 + 1e-6 or abs(yo) > h / 2 + 1e-6:
                    return False
            return True
        assert fits(wr, hr)
        assert not fits(wr * 1.01, hr * 1.01)
    assert T.largest_rotated_rect(150, 100, 0.0) == pytest.approx((150, 100))


def test_random_rotate_keeps_size_leaves_no_black_corners_and_rotates():
    white = np.full((100, 150, 3), 255, np.uint8)
    for seed in range(10):
        random.seed(seed)
        out = T.RandomRotate(45)(white)
        assert out.shape == white.shape and out.min() >= 250
    # horizontal stripes: gradients point along y (90 degrees); rotated stripes tilt it
    yy = np.arange(96, dtype=np.float64)[:, None] * np.ones((1, 96))
    stripes = np.repeat((127.5 + 127.5 * np.sin(2 * np.pi * yy / 12))[:, :, None], 3, axis=2)
    stripes = stripes.astype(np.uint8)
    assert abs(gradient_orientation(stripes) - 90) < 1
    tilts = []
    for seed in range(20):
        random.seed(seed)
        tilts.append(gradient_orientation(T.RandomRotate(15)(stripes)) - 90)
    assert max(abs(t) for t in tilts) <= 15 + 2
    assert min(tilts) < -5 and max(tilts) > 5
    np.testing.assert_array_equal(T.RandomRotate(0)(stripes), stripes)


def test_random_sized_crop_is_a_resized_subwindow():
    img = rgb(40, 40)
    # area fraction 0.25 and ratio 1 at size 20: a 20x20 window, resize is the identity
    t = T.RandomSizedCrop(20, interpolations=[cv2.INTER_NEAREST],
                          area_range=(0.25, 0.25), ratio_range=(1.0, 1.0))
    corners = set()
    for seed in range(10):
        random.seed(seed)
        out = t(img)
        found = [(y, x) for y in range(21) for x in range(21)
                 if np.array_equal(out, img[y:y + 20, x:x + 20])]
        assert found
        corners.add(found[0])
    assert len(corners) > 1                                      # the position is random


def test_random_sized_crop_sizes_and_small_images():
    for shape in [(200, 150, 3), (10, 12, 3), (3, 3, 3), (1, 1, 3)]:
        for seed in range(5):
            random.seed(seed)
            out = T.RandomSizedCrop(32)(rgb(*shape[:2]))
            assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert T.RandomSizedCrop((16, 24))(rgb(50, 50)).shape == (16, 24, 3)


def test_random_sized_crop_falls_back_to_scale_and_center_crop():
    img = rgb(4, 200)          # no 25%-area crop with ratio <= 1.25 fits in 4 rows
    t = T.RandomSizedCrop(16, interpolations=[cv2.INTER_LINEAR])
    ref = cv2.resize(img, (800, 16), interpolation=cv2.INTER_LINEAR)[:, 392:408]
    np.testing.assert_array_equal(t(img), ref)


def test_center_crop_region_and_small_images():
    img = rgb(40, 60)
    np.testing.assert_array_equal(T.CenterCrop(20)(img), img[10:30, 20:40])
    np.testing.assert_array_equal(T.CenterCrop((10, 30))(img), img[15:25, 15:45])
    np.testing.assert_array_equal(T.CenterCrop((40, 60))(img), img)
    assert T.CenterCrop(32)(rgb(10, 20)).shape == (32, 32, 3)   # upscaled, not a crash
    assert T.CenterCrop(32)(rgb(50, 20)).shape == (32, 32, 3)
    up = T.CenterCrop(8)(np.full((4, 4, 3), 77, np.uint8))
    assert up.shape == (8, 8, 3) and (up == 77).all()


def test_to_tensor_matches_hand_computation():
    img = rgb(5, 7)
    t = T.ToTensor()(img)
    assert t.dtype == torch.float32 and t.shape == (3, 5, 7) and t.is_contiguous()
    for c, i, j in [(0, 0, 0), (1, 2, 3), (2, 4, 6)]:
        assert t[c, i, j].item() == pytest.approx(img[i, j, c] / 255.0)
    assert t.min() >= 0 and t.max() <= 1
    # a flipped (negative-stride) view works too
    flipped = T.ToTensor()(img[:, ::-1])
    assert torch.equal(flipped, t.flip(2))
    assert T.ToTensor()(np.zeros((5, 7), np.uint8)).shape == (1, 5, 7)


def test_normalize_matches_hand_computation():
    t = torch.rand(3, 4, 5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = T.Normalize(mean, std)(t)
    for c in range(3):
        torch.testing.assert_close(out[c], (t[c] - mean[c]) / std[c])
    assert not torch.equal(out, t)             # the input is left untouched
    with pytest.raises(ValueError, match="channels"):
        T.Normalize(mean, std)(torch.rand(1, 4, 5))
    with pytest.raises(TypeError, match="ToTensor first"):
        T.Normalize(mean, std)(np.zeros((4, 5, 3)))


@pytest.mark.parametrize("make", [student_code.get_train_transforms,
                                  student_code.get_val_transforms])
def test_handout_pipelines_shape_range_and_determinism(make):
    t = make()
    for shape in [(128, 171), (300, 128), (60, 40), (128, 128)]:
        random.seed(0)
        a = t(rgb(*shape))
        random.seed(0)
        b = t(rgb(*shape))
        assert a.shape == (3, 128, 128) and a.dtype == torch.float32
        assert torch.equal(a, b)
        # normalised values of [0, 1] pixels
        assert a.min() >= (0 - 0.485) / 0.229 - 1e-5 and a.max() <= (1 - 0.406) / 0.225 + 1e-5


@pytest.mark.parametrize("shape", [(128, 171), (300, 200), (60, 40)])
def test_val_pipeline_is_deterministic_on_images_that_are_resized(shape):
    # no random.seed in between: the same image must give the same tensor every time
    t = student_code.get_val_transforms()
    random.seed(0)
    outs = [t(rgb(*shape)) for _ in range(8)]
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    # ... and it is the bilinear one
    scale = t.transforms[0]
    assert type(scale) is T.Scale and scale.interpolations == (cv2.INTER_LINEAR,)
    expected = T.Compose(t.transforms[1:])(scale.apply(rgb(*shape), cv2.INTER_LINEAR))
    assert torch.equal(outs[0], expected)


def test_train_pipeline_is_random_across_seeds():
    t = student_code.get_train_transforms()
    outs = []
    for seed in range(3):
        random.seed(seed)
        outs.append(t(rgb(128, 171)))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_reprs():
    assert repr(T.RandomColor(0.15)) == "RandomColor(color_range=0.15)"
    assert repr(T.CenterCrop(128)) == "CenterCrop(size=128)"
    assert repr(T.RandomHorizontalFlip()) == "RandomHorizontalFlip()"
    assert repr(T.Scale(144, [cv2.INTER_LINEAR])) == \
        "Scale(size=144, interpolations=[cv2.INTER_LINEAR])"
    assert repr(T.Normalize([0.5], [0.25])) == "Normalize(mean=[0.5], std=[0.25])"
    text = repr(student_code.get_train_transforms())
    assert text.startswith("Compose(\n  Scale(size=144, interpolations=[cv2.INTER_NEAREST")
    for name in ["RandomHorizontalFlip()", "RandomColor(color_range=0.15)",
                 "RandomRotate(degree_range=15", "RandomSizedCrop(size=128", "ToTensor()",
                 "Normalize(mean=[0.485, 0.456, 0.406]"]:
        assert "\n  " + name in text
    assert text.endswith("\n)")


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(TypeError, match="numpy image, got Tensor"):
        T.Scale(10)(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="size must be"):
        T.CenterCrop(0)
    with pytest.raises(ValueError, match="color_range"):
        T.RandomColor(1.5)
    with pytest.raises(ValueError, match="HxW"):
        T.RandomHorizontalFlip()(np.zeros((2, 2, 2, 2), np.uint8))
