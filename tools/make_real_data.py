"""Write sets of REAL images in MiniPlaces layout, offline: handwritten digits (small)
or Fashion-MNIST (70,000 photographs of clothes, MiniPlaces' scale).

    python tools/make_real_data.py OUT_DIR [--size 32] [--val-fraction 0.2] [--seed 0]
                                          [--max-train N]
    python tools/make_real_data.py OUT_DIR --set fashion-mnist [--idx-dir DIR] [--size 28]
                                          [--max-train N] [--max-val N]

Digits (the default set):

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

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): Zalando's product photographs, 28 x 28
grayscale, 10 classes, 60,000 training and 10,000 test images, as four IDX files. Debian's
package dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`); --idx-dir names any folder with the four files,
gzipped or not. The 60,000 training images become images/train/<letter>/<class>/*.png and
the 10,000 test images images/val/*.png, in the files' order, as lossless PNG (resized
with OpenCV's bilinear interpolation when --size is not 28). --max-train / --max-val keep
the first images of each class in turn (balanced): `--max-train 10000` is a training set
sized to a 2-core machine, validated on all 10,000 test images. sources.txt names the
index of every image in its IDX file (train-* for train/, t10k-* for val/).
"""
import gzip
import argparse
import os
import struct
import sys

import cv2
import numpy as np

import _paths  # noqa: F401  code/ and tools/ on sys.path: runs from any directory
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


def balanced_first(per_class, n):
    """Keep the first images of each class in turn: per_class is one index array per class
    (in the order to keep from); returns as many arrays, n indices in all, spread evenly."""
    order = sorted((rank, label) for label, idx in enumerate(per_class)
                   for rank in range(len(idx)))
    kept = [0] * len(per_class)
    for rank, label in order[:n]:
        kept[label] += 1
    return [idx[:k] for idx, k in zip(per_class, kept)]


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
        train = balanced_first(train, max_train)
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
        f.write(f"Real digits set written by tools/make_real_data.py: size={size} "
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


# ---- Fashion-MNIST -------------------------------------------------------------------

FASHION_DIR = "/usr/share/datasets/fashion-mnist"     # where Debian's package puts it
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ["t/t_shirt_top", "t/trouser", "p/pullover", "d/dress", "c/coat",
                   "s/sandal", "s/shirt", "s/sneaker", "b/bag", "a/ankle_boot"]
FASHION_MARKER = "FASHION_README.txt"


def idx_path(idx_dir, name):
    """The IDX file `name` in idx_dir, gzipped or not; ValueError naming what to do."""
    for path in (os.path.join(idx_dir, name + ".gz"), os.path.join(idx_dir, name)):
        if os.path.isfile(path):
            return path
    raise ValueError(f"Fashion-MNIST file {name}[.gz] not found in {idx_dir} (install it "
                     f"with `apt-get install dataset-fashion-mnist`, or give the folder "
                     f"of the four IDX files with --idx-dir)")


def read_idx(path, dims):
    """An IDX file of unsigned bytes (the format of MNIST's files: a magic number 0x08
    0x0D, dims big-endian sizes, then the bytes) -> numpy uint8 array. numpy has no
    reader for it; it is 10 lines."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        raise ValueError(f"{path} is not an IDX file of {dims}-dimensional unsigned bytes")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != np.prod(shape):
        raise ValueError(f"{path} holds {body.size} bytes where its header says "
                         f"{int(np.prod(shape))} (a truncated file?)")
    return body.reshape(shape)


def load_fashion_mnist(idx_dir=FASHION_DIR):
    """{"train": (images N x 28 x 28 uint8, labels N), "val": (...)} from the IDX files."""
    sets = {}
    for split, (image_name, label_name) in FASHION_FILES.items():
        images = read_idx(idx_path(idx_dir, image_name), 3)
        labels = read_idx(idx_path(idx_dir, label_name), 1)
        if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_CLASSES):
            raise ValueError(f"{idx_dir}: {image_name} and {label_name} do not match "
                             f"({len(images)} images, {len(labels)} labels up to "
                             f"{labels.max(initial=0)})")
        sets[split] = (images, labels)
    return sets


def kept_indices(labels, max_count):
    """Indices of the images to write, in the file's order: all, or the first of each
    class in turn (balanced) up to max_count."""
    if max_count is None:
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in range(len(FASHION_CLASSES))]
    return np.sort(np.concatenate(balanced_first(per_class, max_count)))


def check_fashion_options(size, max_train, max_val):
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    for flag, value in (("max_train", max_train), ("max_val", max_val)):
        if value is not None and value < len(FASHION_CLASSES):
            raise ValueError(f"{flag} must be at least {len(FASHION_CLASSES)} (one image "
                             f"per class), got {value}")


def make_fashion_mnist(out_dir, idx_dir=FASHION_DIR, size=28, max_train=None,
                       max_val=None):
    """Write Fashion-MNIST to out_dir; deterministic given the arguments. Returns
    {"train": n_train, "val": n_val}."""
    check_fashion_options(size, max_train, max_val)
    sets = load_fashion_mnist(idx_dir)       # every file is read before anything is deleted
    prepare_out_dir(out_dir, FASHION_MARKER, "Fashion-MNIST set", OUR_FILES)
    with open(os.path.join(out_dir, FASHION_MARKER), "w") as f:
        f.write(f"Fashion-MNIST written by tools/make_real_data.py from {idx_dir}: size={size} "
                f"max_train={max_train} max_val={max_val}\n")
    lines = {"train": [], "val": []}
    sources, per_class_count = [], [0] * len(FASHION_CLASSES)
    for split, max_count in (("train", max_train), ("val", max_val)):
        images, labels = sets[split]
        for n, index in enumerate(kept_indices(labels, max_count), start=1):
            label = int(labels[index])
            if split == "train":
                per_class_count[label] += 1
                rel = f"train/{FASHION_CLASSES[label]}/{per_class_count[label]:08d}.png"
            else:
                rel = f"val/{n:08d}.png"
            image = images[index]
            if size != image.shape[0]:
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            path = os.path.join(out_dir, "images", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not cv2.imwrite(path, image):
                raise OSError(f"could not write {path}")
            lines[split].append(f"{rel} {label}")
            sources.append(f"{rel} {index}")
    write_text(os.path.join(out_dir, "sources.txt"), sources)
    return write_label_files(out_dir, FASHION_CLASSES, lines["train"], lines["val"])


def main():
    parser = argparse.ArgumentParser(
        description="Write a real image set in MiniPlaces layout, offline: scikit-learn's "
                    "handwritten digits or Debian's Fashion-MNIST.")
    parser.add_argument("out_dir",
                        help="folder to write (created; a previous set of the same kind is "
                             "replaced)")
    parser.add_argument("--set", choices=("digits", "fashion-mnist"), default="digits",
                        help="which real images (default: digits)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: 32 for digits, 28 for "
                             "fashion-mnist, its own size)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="keep at most N training images (balanced over the classes)")
    digits = parser.add_argument_group("digits")
    digits.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of every class put into validation")
    digits.add_argument("--seed", type=int, default=0, help="seed of the split")
    fashion = parser.add_argument_group("fashion-mnist")
    fashion.add_argument("--idx-dir", default=FASHION_DIR,
                         help=f"folder of the four IDX files (default: {FASHION_DIR}, "
                              f"where Debian's dataset-fashion-mnist puts them)")
    fashion.add_argument("--max-val", type=int, default=None,
                         help="keep at most N validation images (balanced; default all "
                              "10,000)")
    args = parser.parse_args()
    try:
        if args.set == "fashion-mnist":
            size = args.size or 28
            counts = make_fashion_mnist(args.out_dir, args.idx_dir, size, args.max_train,
                                        args.max_val)
            what = "Fashion-MNIST photographs"
        else:
            size = args.size or 32
            counts = make_real_dataset(args.out_dir, size, args.val_fraction, args.seed,
                                       args.max_train)
            what = "real handwritten digits"
    except (ValueError, OSError) as e:
        sys.exit(f"make_real_data.py: error: {e}")
    print(f"wrote {counts['train']} train + {counts['val']} val images ({size}x{size}, "
          f"{NUM_CLASSES} classes of {what}) to {args.out_dir}/images, with train.txt, "
          f"val.txt, categories.txt and sources.txt")


if __name__ == "__main__":
    main()
