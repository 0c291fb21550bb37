"""Write a small synthetic dataset in MiniPlaces layout, for trying the toolkit offline.

    python code/make_demo_data.py OUT_DIR [--num-classes 10] [--train-per-class 100]
                                          [--val-per-class 20] [--size 128] [--seed 0]

OUT_DIR gets images/train/a/abbey/00000001.jpg ..., images/val/00000001.jpg ...,
train.txt, val.txt and categories.txt, like MiniPlaces (class names are borrowed from it).

Each class is a texture that fills the image: stripes (horizontal, vertical or diagonal)
at a fine or a coarse scale, a plain colour ramp, a grid of thin lines, scattered dots,
or a coarse checkerboard. Every image draws its own colours, phase, small tilt, a few
distractor shapes and pixel noise, so the class is in the structure of the pixels only:
the mean colour and the file name say nothing. The classes differ by more than the
training augmentations change an image (flip, +-15% colour, +-15 degree rotation, crops
of 25-100% of the area, i.e. up to 2x zoom): orientations are 45 degrees apart and
flip-symmetric ("diagonal" is either diagonal), scales about 4x apart. Any of the
toolkit's models learns it far above chance (10%) in a few CPU epochs (`make demo`):
it proves that the code trains, not that a recipe suits real photographs.
"""
import argparse
import os
import shutil
import sys

import cv2
import numpy as np

# the first ten MiniPlaces categories (as in its categories.txt)
CLASS_NAMES = [
    "a/abbey", "a/airport_terminal", "a/amphitheater", "a/amusement_park", "a/aquarium",
    "a/aqueduct", "a/art_gallery", "a/assembly_line", "a/auditorium", "b/badlands",
]
# (pattern, period in pixels at size 128) of each class. These were chosen by training
# SimpleNet on candidates: textures whose spectra overlap (diagonal stripes and a fine
# checkerboard, irregular blobs) or scales closer than 4x (which the crops' zoom blurs)
# were confused, these were not.
CLASS_TEXTURES = [
    ("horizontal", 6.0), ("vertical", 6.0), ("diagonal", 6.0),
    ("horizontal", 28.0), ("vertical", 28.0), ("diagonal", 28.0),
    ("plain", 128.0), ("grid", 16.0), ("dots", 16.0), ("checkerboard", 28.0),
]
MARKER = "DEMO_README.txt"     # marks a folder written by this script (safe to overwrite)


def texture_mask(rng, pattern, period, size):
    """A size x size float32 map in [0, 1] that mixes the image's two colours."""
    period = period * rng.uniform(0.9, 1.1)
    if pattern == "plain":
        # a smooth linear ramp between the two colours, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        return np.clip(0.5 + rng.uniform(0.3, 1.0) * (xx * np.cos(angle) + yy * np.sin(angle)),
                       0.0, 1.0)
    if pattern == "dots":
        # small discs scattered at random, about one per period x period cell
        mask = np.zeros((size, size), np.float32)
        for _ in range(int(size * size / period ** 2)):
            centre = tuple(int(c) for c in rng.integers(0, size, 2))
            cv2.circle(mask, centre, max(1, int(round(period / 5))), 1.0, -1, cv2.LINE_AA)
        return mask
    tilt = np.deg2rad(rng.uniform(-5, 5))
    if pattern == "diagonal":
        tilt += np.deg2rad(rng.choice([-45.0, 45.0]))
    elif pattern == "vertical":
        tilt += np.pi / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xx * np.sin(tilt) + yy * np.cos(tilt)           # across the stripes
    v = xx * np.cos(tilt) - yy * np.sin(tilt)           # along the stripes
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    if pattern == "checkerboard":
        wave = wave * np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi))
    if pattern == "grid":
        # thin lines across and along: a plaid of both orientations
        wave_v = np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi))
        return np.clip(4.0 * (np.maximum(wave, wave_v) - 0.7), 0.0, 1.0)
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)          # soft-edged square wave


def random_colour_pair(rng):
    """A random dark and a random light RGB colour: every image gets a different mean
    colour but about the same, strong contrast."""
    dark = rng.uniform(0, 100, 3).astype(np.float32)
    light = rng.uniform(155, 255, 3).astype(np.float32)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def render_image(rng, label, size):
    """One RGB uint8 image of class `label`."""
    pattern, period = CLASS_TEXTURES[label]
    period = max(3.0, period * size / 128.0)            # keep stripes >= 3 px at small sizes
    mask = texture_mask(rng, pattern, period, size)[:, :, None]
    a, b = random_colour_pair(rng)
    img = a * (1 - mask) + b * mask
    # distractors: a few solid shapes of random colour, size and place (no class information)
    for _ in range(rng.integers(0, 4)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        radius = int(rng.uniform(0.05, 0.15) * size) + 1
        if rng.random() < 0.5:
            cv2.circle(img, centre, radius, colour, thickness=-1)
        else:
            cv2.rectangle(img, (centre[0] - radius, centre[1] - radius),
                          (centre[0] + radius, centre[1] + radius), colour, thickness=-1)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def prepare_out_dir(out_dir, marker=MARKER, what="demo set",
                    files=("train.txt", "val.txt", "categories.txt")):
    """Refuse a non-empty folder unless it holds `marker` (the generator that writes
    `what` wrote it); then clear images/ and `files`. Shared with make_real_data.py."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, marker)):
            raise ValueError(f"{out_dir} is not empty and holds no {what} ({marker} "
                             f"missing); refusing to overwrite it")
        shutil.rmtree(os.path.join(out_dir, "images"), ignore_errors=True)
        for name in files:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)


def write_text(path, lines):
    # write to a temporary file and rename, so a crash never leaves half a label file
    with open(path + ".tmp", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(path + ".tmp", path)


def make_demo_dataset(out_dir, num_classes=10, train_per_class=100, val_per_class=20,
                      size=128, seed=0):
    """Write the demo set to out_dir; deterministic given `seed`. Returns
    {"train": n_train, "val": n_val}."""
    max_classes = len(CLASS_TEXTURES)
    if not 2 <= num_classes <= max_classes:
        raise ValueError(f"num_classes must be in [2, {max_classes}], got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be at least 1")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    prepare_out_dir(out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        f.write(f"Synthetic demo set written by code/make_demo_data.py: num_classes={num_classes} "
                f"train_per_class={train_per_class} val_per_class={val_per_class} "
                f"size={size} seed={seed}\n{__doc__}")
    rng = np.random.default_rng(seed)
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, 92]

    def save(rel_path, label):
        path = os.path.join(out_dir, "images", rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rgb = render_image(rng, label, size)
        if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), jpeg):
            raise OSError(f"could not write {path}")

    train_lines = []
    for label in range(num_classes):
        for i in range(1, train_per_class + 1):
            rel = f"train/{CLASS_NAMES[label]}/{i:08d}.jpg"
            save(rel, label)
            train_lines.append(f"{rel} {label}")
    # validation images are numbered in a shuffled class order, as in MiniPlaces
    val_labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    val_lines = []
    for i, label in enumerate(val_labels, start=1):
        rel = f"val/{i:08d}.jpg"
        save(rel, int(label))
        val_lines.append(f"{rel} {label}")

    return write_label_files(out_dir, CLASS_NAMES[:num_classes], train_lines, val_lines)


def write_label_files(out_dir, class_names, train_lines, val_lines):
    """categories.txt, val.txt, then train.txt: written last, it marks a complete set."""
    write_text(os.path.join(out_dir, "categories.txt"),
               [f"/{name} {c}" for c, name in enumerate(class_names)])
    write_text(os.path.join(out_dir, "val.txt"), val_lines)
    write_text(os.path.join(out_dir, "train.txt"), train_lines)
    return {"train": len(train_lines), "val": len(val_lines)}


def main():
    parser = argparse.ArgumentParser(description="Write a synthetic MiniPlaces-like demo set.")
    parser.add_argument("out_dir",
                        help="folder to write (created; a previous demo set is replaced)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        counts = make_demo_dataset(args.out_dir, args.num_classes, args.train_per_class,
                                   args.val_per_class, args.size, args.seed)
    except (ValueError, OSError) as e:
        sys.exit(f"make_demo_data.py: error: {e}")
    print(f"wrote {counts['train']} train + {counts['val']} val JPEG images "
          f"({args.size}x{args.size}, {args.num_classes} classes) to {args.out_dir}/images, "
          f"with train.txt, val.txt and categories.txt")


if __name__ == "__main__":
    main()
