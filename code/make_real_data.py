"""Write a small set of REAL images in MiniPlaces layout, offline: handwritten digits.

    python code/make_real_data.py OUT_DIR [--size 32] [--val-fraction 0.2] [--seed 0]
                                          [--max-train N]

The images are the 1797 handwritten digits that scikit-learn ships inside its package
(sklearn.datasets.load_digits, no download): the test set of the UCI "Optical
Recognition of Handwritten Digits" data (Alpaydin and Kaynak, 1998), scans of forms
filled in by 13 writers, each digit reduced by NIST's preprocessing to 8 x 8 pixels of
17 grey levels (0..16, ink is high). The textures of make_demo_data.py were chosen so
that the handout's SimpleNet learns them; these were not chosen by us at all, and vary
as handwriting does, so accuracy on them says more about a model.

Each digit is scaled to 0..255 and upscaled with OpenCV's bilinear interpolation to
size x size pixels, then written as a grayscale JPEG (MiniPlacesLoader turns it into
RGB). The 10 classes are d/digit_0 .. d/digit_9; a stratified split (same seed, same
split) puts about `val_fraction` of every class into validation: 1438 training and 359
validation images by default. OUT_DIR gets images/train/d/digit_0/00000001.jpg ...,
images/val/00000001.jpg ..., train.txt, val.txt and categories.txt, like MiniPlaces, and
sources.txt, which names the index in load_digits() of every image.
"""
import argparse
import os
import sys

import cv2
import numpy as np

from make_demo_data import prepare_out_dir, write_label_files, write_text

NUM_CLASSES = 10
CLASS_NAMES = [f"d/digit_{k}" for k in range(NUM_CLASSES)]   # <letter>/<class>, as MiniPlaces
MARKER = "REAL_README.txt"     # marks a folder written by this script (safe to overwrite)
OUR_FILES = ("train.txt", "val.txt", "categories.txt", "sources.txt")
MAX_LEVEL = 16.0               # the digits' pixels are counts of 0..16 "on" pixels


def load_digits():
    """(images N x 8 x 8 float, labels N int) as scikit-learn ships them."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ValueError("scikit-learn is not installed (pip install -r requirements.txt)")
    digits = sklearn_digits()
    return digits.images, digits.target


def render_digit(pixels, size):
    """One 8 x 8 digit (0..16) -> size x size uint8 grayscale image (0..255)."""
    img = np.asarray(pixels, np.float32) * (255.0 / MAX_LEVEL)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def split_indices(labels, val_fraction, seed, max_train=None):
    """Stratified split -> (train: one index array per class, val: shuffled indices).
    With max_train, training keeps the first images of each class in turn (balanced)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(idx) * val_fraction))
        if not 1 <= n_val < len(idx):
            raise ValueError(f"val_fraction {val_fraction} leaves class {label} ({len(idx)} "
                             f"images) without training or validation images")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    if max_train is not None:
        # rank within its class, then class: the first max_train are spread evenly
        order = sorted((rank, label) for label, idx in enumerate(train) for rank in range(len(idx)))
        kept = [0] * NUM_CLASSES
        for rank, label in order[:max_train]:
            kept[label] += 1
        train = [idx[:n] for idx, n in zip(train, kept)]
    return train, rng.permutation(np.concatenate(val))


def check_options(size, val_fraction, max_train):
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels (the digits' own size), got {size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_train is not None and max_train < NUM_CLASSES:
        raise ValueError(f"max_train must be at least {NUM_CLASSES} (one image per class), "
                         f"got {max_train}")


def make_real_dataset(out_dir, size=32, val_fraction=0.2, seed=0, max_train=None):
    """Write the digits to out_dir; deterministic given the arguments. Returns
    {"train": n_train, "val": n_val}."""
    check_options(size, val_fraction, max_train)
    images, labels = load_digits()
    train, val = split_indices(labels, val_fraction, seed, max_train)
    prepare_out_dir(out_dir, MARKER, "real digits set", OUR_FILES)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        f.write(f"Real digits set written by code/make_real_data.py: size={size} "
                f"val_fraction={val_fraction} seed={seed} max_train={max_train}\n{__doc__}")
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, 95]

    def save(rel_path, index):
        path = os.path.join(out_dir, "images", rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not cv2.imwrite(path, render_digit(images[index], size), jpeg):
            raise OSError(f"could not write {path}")
        sources.append(f"{rel_path} {index}")

    sources, train_lines, val_lines = [], [], []
    for label, indices in enumerate(train):
        for i, index in enumerate(sorted(indices), start=1):
            rel = f"train/{CLASS_NAMES[label]}/{i:08d}.jpg"
            save(rel, index)
            train_lines.append(f"{rel} {label}")
    for i, index in enumerate(val, start=1):     # numbered in shuffled order, as MiniPlaces
        rel = f"val/{i:08d}.jpg"
        save(rel, index)
        val_lines.append(f"{rel} {labels[index]}")

    write_text(os.path.join(out_dir, "sources.txt"), sources)
    return write_label_files(out_dir, CLASS_NAMES, train_lines, val_lines)


def main():
    parser = argparse.ArgumentParser(
        description="Write scikit-learn's real handwritten digits in MiniPlaces layout.")
    parser.add_argument("out_dir",
                        help="folder to write (created; a previous real set is replaced)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of every class put into validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--max-train", type=int, default=None,
                        help="keep at most N training images (balanced over the classes)")
    args = parser.parse_args()
    try:
        counts = make_real_dataset(args.out_dir, args.size, args.val_fraction, args.seed,
                                   args.max_train)
    except (ValueError, OSError) as e:
        sys.exit(f"make_real_data.py: error: {e}")
    print(f"wrote {counts['train']} train + {counts['val']} val JPEG images "
          f"({args.size}x{args.size}, {NUM_CLASSES} classes of real handwritten digits) to "
          f"{args.out_dir}/images, with train.txt, val.txt, categories.txt and sources.txt")


if __name__ == "__main__":
    main()
