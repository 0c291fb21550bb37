"""make_real_data.py --set fashion-mnist: Debian's Fashion-MNIST IDX files in MiniPlaces
layout. The reference is the IDX files read here by their published layout (a 16-byte
header for images, 8 for labels), and a tiny IDX set written here by hand."""
import gzip
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import student_code
from custom_dataloader import MiniPlacesLoader
from conftest import needs_fashion_mnist
from make_real_data import FASHION_CLASSES, FASHION_DIR, idx_path, make_fashion_mnist
from test_real_data import read_pairs

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "make_real_data.py")


def reference(prefix):
    """(images N x 28 x 28, labels N) read straight from the package's files (gzipped
    as Debian ships them, or not)."""
    def raw(name):
        path = idx_path(FASHION_DIR, name)
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return f.read()
    images = np.frombuffer(raw(f"{prefix}-images-idx3-ubyte"), np.uint8, offset=16)
    labels = np.frombuffer(raw(f"{prefix}-labels-idx1-ubyte"), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fashion"))
    counts = make_fashion_mnist(out, max_train=1000, max_val=500)
    return out, counts


@pytest.mark.slow
@needs_fashion_mnist
def test_the_whole_set_converts_with_its_counts(tmp_path):
    out = str(tmp_path / "fashion")
    counts = make_fashion_mnist(out)
    assert counts == {"train": 60000, "val": 10000}
    train_labels = [label for _, label in read_pairs(os.path.join(out, "train.txt"))]
    val_labels = [label for _, label in read_pairs(os.path.join(out, "val.txt"))]
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    assert np.array_equal(np.bincount(train_labels), [6000] * 10)
    assert np.array_equal(np.bincount(val_labels), [1000] * 10)
    assert np.array_equal(val_labels, reference("t10k")[1])


@needs_fashion_mnist
def test_a_subset_is_balanced_and_its_pixels_are_the_idx_files(fashion_subset):
    out, counts = fashion_subset
    assert counts == {"train": 1000, "val": 500}
    train = read_pairs(os.path.join(out, "train.txt"))
    assert np.array_equal(np.bincount([label for _, label in train]), [100] * 10)
    # a training image's folder names its class
    assert all(path.split("/")[1] + "/" + path.split("/")[2] == FASHION_CLASSES[label]
               for path, label in train)
    labels = dict(train + read_pairs(os.path.join(out, "val.txt")))
    refs = {"train": reference("train"), "val": reference("t10k")}
    sources = read_pairs(os.path.join(out, "sources.txt"))
    assert len(sources) == 1500
    for path, index in sources[::37]:           # a few dozen images of both splits
        images, ref_labels = refs[path.split("/")[0]]
        img = cv2.imread(os.path.join(out, "images", path), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(img, images[index]), path      # lossless PNG
        assert labels[path] == ref_labels[index]


@needs_fashion_mnist
def test_the_loader_reads_it_with_the_handout_transforms(fashion_subset):
    out, _ = fashion_subset
    val = MiniPlacesLoader(out, "val", student_code.get_val_transforms(), num_classes=10)
    image, label = val[0]
    assert tuple(image.shape) == (3, 128, 128) and label == reference("t10k")[1][0]


def write_idx(path, array):
    """An IDX file of unsigned bytes, by its published layout."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_idx_dir(folder, n_train=30, n_val=20):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"),
                  rng.integers(0, 256, (n, 28, 28)))
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), np.arange(n) % 10)
    return folder


def test_any_folder_of_uncompressed_idx_files_converts(tmp_path):
    idx = tiny_idx_dir(str(tmp_path))
    out = str(tmp_path / "out")
    done = subprocess.run([sys.executable, SCRIPT, out, "--set", "fashion-mnist",
                           "--idx-dir", idx, "--size", "14"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 30 train + 20 val images (14x14" in done.stdout
    img = cv2.imread(os.path.join(out, "images", "val", "00000001.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (14, 14)


@pytest.mark.parametrize("damage, message", [
    ("missing", "t10k-labels-idx1-ubyte[.gz] not found"),
    ("truncated", "a truncated file?"),
    ("not idx", "is not an IDX file"),
])
def test_missing_or_damaged_files_are_one_line_errors(tmp_path, damage, message):
    os.makedirs(tmp_path / "idx")
    idx = tiny_idx_dir(str(tmp_path / "idx"))
    labels = os.path.join(idx, "t10k-labels-idx1-ubyte")
    if damage == "missing":
        os.remove(labels)
    elif damage == "truncated":
        with open(labels, "r+b") as f:
            f.truncate(12)
    else:
        with open(labels, "wb") as f:
            f.write(b"<html>not found</html>")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, str(out), "--set", "fashion-mnist",
                           "--idx-dir", idx], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not out.exists()                     # nothing written before the files are read
