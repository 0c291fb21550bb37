"""make_real_data: scikit-learn's real digit scans in MiniPlaces layout. References are
sklearn's own arrays (load_digits), decoded with OpenCV here, and the loader of the driver."""
import filecmp
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

import student_code
from custom_dataloader import MiniPlacesLoader
from make_real_data import MARKER, make_real_dataset

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "make_real_data.py")
DIGITS = load_digits()


def read_pairs(path):
    """[(relative path, int)] of a "path number" file."""
    with open(path) as f:
        return [(p, int(n)) for p, n in (line.split() for line in f.read().splitlines())]


def test_loader_reads_it_with_the_handout_transforms(real_data):
    train = MiniPlacesLoader(real_data, "train", student_code.get_train_transforms(),
                             num_classes=10)
    val = MiniPlacesLoader(real_data, "val", student_code.get_val_transforms(), num_classes=10)
    assert len(train) + len(val) == len(DIGITS.target)
    for dataset in (train, val):
        image, label = dataset[len(dataset) - 1]
        assert tuple(image.shape) == (3, 128, 128) and 0 <= label < 10
    # the paths follow MiniPlaces: train/<letter>/<class>/NNNNNNNN.jpg, val/NNNNNNNN.jpg
    assert all(re.fullmatch(r"train/d/digit_\d/\d{8}\.jpg", p) for p in train.file_list)
    assert val.file_list == [f"val/{i:08d}.jpg" for i in range(1, len(val) + 1)]


def test_every_class_is_split_about_four_to_one(real_data):
    train = read_pairs(os.path.join(real_data, "train.txt"))
    val = read_pairs(os.path.join(real_data, "val.txt"))
    # the folder of a training image names its label
    assert all(p.split("/")[2] == f"digit_{label}" for p, label in train)
    n_train = np.bincount([label for _, label in train], minlength=10)
    n_val = np.bincount([label for _, label in val], minlength=10)
    per_class = np.bincount(DIGITS.target)
    assert np.array_equal(n_train + n_val, per_class)
    assert np.all(np.abs(n_val - 0.2 * per_class) <= 1), n_val


def test_images_are_sklearn_digits_within_jpeg_error(real_data):
    sources = read_pairs(os.path.join(real_data, "sources.txt"))
    labels = dict(read_pairs(os.path.join(real_data, "train.txt"))
                  + read_pairs(os.path.join(real_data, "val.txt")))
    # every digit of sklearn appears exactly once, with sklearn's label
    assert sorted(index for _, index in sources) == list(range(len(DIGITS.target)))
    assert all(labels[p] == DIGITS.target[index] for p, index in sources)
    errors = []
    for path, index in sources:
        img = cv2.imread(os.path.join(real_data, "images", path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32), path          # a grayscale JPEG
        # the digit (0..16) scaled to 0..255 and upscaled bilinearly, as documented
        ref = cv2.resize(DIGITS.images[index] * (255 / 16), (32, 32),
                         interpolation=cv2.INTER_LINEAR)
        errors.append(np.abs(img - ref))
    errors = np.stack(errors)
    # JPEG at quality 95 moves a pixel by a few grey levels, much less than the ink
    assert errors.mean() < 1.5 and errors.max() < 16, (errors.mean(), errors.max())


def test_deterministic_given_seed_and_size_is_an_option(tmp_path):
    kwargs = dict(size=16, val_fraction=0.05, max_train=20)
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_real_dataset(a, seed=3, **kwargs)
    make_real_dataset(b, seed=3, **kwargs)
    make_real_dataset(c, seed=4, **kwargs)
    for name in ["train.txt", "val.txt", "sources.txt", "images/train/d/digit_3/00000002.jpg",
                 "images/val/00000005.jpg"]:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)
    assert not filecmp.cmp(os.path.join(a, "sources.txt"), os.path.join(c, "sources.txt"),
                           shallow=False)
    img = cv2.imread(os.path.join(a, "images", "val", "00000001.jpg"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (16, 16)


def test_max_train_keeps_the_classes_balanced(tmp_path):
    out = str(tmp_path / "real")
    counts = make_real_dataset(out, size=8, val_fraction=0.05, max_train=23)
    assert counts["train"] == 23
    n_train = np.bincount([label for _, label in read_pairs(os.path.join(out, "train.txt"))],
                          minlength=10)
    assert n_train.max() - n_train.min() <= 1
    # validation is untouched by max_train
    full = make_real_dataset(str(tmp_path / "full"), size=8, val_fraction=0.05)
    assert counts["val"] == full["val"] and full["train"] > 23


def test_refuses_foreign_folder_but_replaces_previous_real_set(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite") as info:
        make_real_dataset(str(foreign), size=8, max_train=10)
    assert "\n" not in str(info.value)
    assert os.listdir(foreign) == ["chapter1.tex"]

    out = str(tmp_path / "real")
    make_real_dataset(out, size=8, val_fraction=0.1)
    counts = make_real_dataset(out, size=8, val_fraction=0.05, max_train=10)
    assert os.path.isfile(os.path.join(out, MARKER))
    # nothing stale from the first, bigger set is left behind
    n_files = sum(len(files) for _, _, files in os.walk(os.path.join(out, "images")))
    assert n_files == len(read_pairs(os.path.join(out, "sources.txt"))) == \
        counts["train"] + counts["val"] < len(DIGITS.target) // 10


@pytest.mark.parametrize("args, message", [
    (["--size", "4"], "size must be at least 8"),
    (["--val-fraction", "1.5"], "val_fraction must be in (0, 1)"),
    (["--val-fraction", "0.001"], "without training or validation images"),
    (["--max-train", "3"], "max_train must be at least 10"),
])
def test_cli_reports_bad_options_in_one_line(tmp_path, args, message):
    out = tmp_path / "real"
    done = subprocess.run([sys.executable, SCRIPT, str(out)] + args,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not out.exists()


def test_cli_writes_the_set(tmp_path):
    out = str(tmp_path / "real")
    done = subprocess.run([sys.executable, SCRIPT, out, "--size", "8", "--max-train", "10"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    n_val = len(read_pairs(os.path.join(out, "val.txt")))
    assert f"wrote 10 train + {n_val} val" in done.stdout
    assert len(read_pairs(os.path.join(out, "train.txt"))) == 10
