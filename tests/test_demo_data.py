"""make_demo_data: MiniPlaces layout, determinism, overwrite protection, the CLI, and that
the classes are learnable from the pixels (a tiny CNN) but not from the mean colour."""
import filecmp
import os
import random
import subprocess
import sys

import cv2
import pytest
import torch
import torch.nn as nn

import custom_transforms as T
from custom_dataloader import MiniPlacesLoader
from make_demo_data import CLASS_NAMES, MARKER, make_demo_dataset

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "code", "make_demo_data.py")


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_layout_is_miniplaces(tmp_path):
    out = str(tmp_path / "demo")
    counts = make_demo_dataset(out, num_classes=3, train_per_class=2, val_per_class=2, size=32)
    assert counts == {"train": 6, "val": 6}
    assert read_lines(os.path.join(out, "categories.txt")) == \
        ["/a/abbey 0", "/a/airport_terminal 1", "/a/amphitheater 2"]
    train = read_lines(os.path.join(out, "train.txt"))
    assert train[0] == "train/a/abbey/00000001.jpg 0"
    assert train[-1] == "train/a/amphitheater/00000002.jpg 2"
    val = read_lines(os.path.join(out, "val.txt"))
    assert [line.split()[0] for line in val] == [f"val/{i:08d}.jpg" for i in range(1, 7)]
    assert sorted(int(line.split()[1]) for line in val) == [0, 0, 1, 1, 2, 2]
    for line in train + val:
        img = cv2.imread(os.path.join(out, "images", line.split()[0]))
        assert img is not None and img.shape == (32, 32, 3)
    # the loader reads it as is
    ds = MiniPlacesLoader(out, split="val", num_classes=3)
    assert len(ds) == 6 and ds[0][0].shape == (32, 32, 3)


def test_class_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match=f"num_classes must be in \\[2, {len(CLASS_NAMES)}\\]"):
        make_demo_dataset(str(tmp_path / "more"), num_classes=len(CLASS_NAMES) + 1)
    assert not os.path.exists(tmp_path / "more")


def test_deterministic_given_seed(tmp_path):
    kwargs = dict(num_classes=2, train_per_class=2, val_per_class=2, size=24)
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_demo_dataset(a, seed=3, **kwargs)
    make_demo_dataset(b, seed=3, **kwargs)
    make_demo_dataset(c, seed=4, **kwargs)
    files = ["train.txt", "val.txt", "images/train/a/abbey/00000001.jpg", "images/val/00000004.jpg"]
    for name in files:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)
    assert not filecmp.cmp(os.path.join(a, files[2]), os.path.join(c, files[2]), shallow=False)


def test_refuses_foreign_folder_but_replaces_previous_demo_set(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite") as info:
        make_demo_dataset(str(foreign), num_classes=2, train_per_class=1, val_per_class=1,
                          size=16)
    assert "\n" not in str(info.value)
    assert os.listdir(foreign) == ["chapter1.tex"]

    demo = str(tmp_path / "demo")
    make_demo_dataset(demo, num_classes=3, train_per_class=2, val_per_class=1, size=16)
    make_demo_dataset(demo, num_classes=2, train_per_class=1, val_per_class=1, size=16)
    assert os.path.isfile(os.path.join(demo, MARKER))
    assert len(read_lines(os.path.join(demo, "train.txt"))) == 2
    # nothing stale from the first, bigger set is left behind
    assert not os.path.exists(os.path.join(demo, "images", "train", "a", "amphitheater"))


def test_cli_writes_and_reports_errors_in_one_line(tmp_path):
    out = str(tmp_path / "demo")
    args = ["--num-classes", "2", "--train-per-class", "1", "--val-per-class", "1", "--size", "16"]
    done = subprocess.run([sys.executable, SCRIPT, out] + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 train + 2 val" in done.stdout
    assert os.path.isfile(os.path.join(out, "train.txt"))
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path)] + args,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "refusing to overwrite" in done.stderr


def nearest_centroid_accuracy(train_x, train_y, val_x, val_y, num_classes):
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    return (torch.cdist(val_x, centroids).argmin(1) == val_y).float().mean().item()


def stack(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_classes_are_learnable_from_pixels_not_mean_colour(tmp_path):
    num_classes, size, out = 10, 48, str(tmp_path / "demo")
    make_demo_dataset(out, num_classes=num_classes, train_per_class=20, val_per_class=10,
                      size=size, seed=1)
    train = MiniPlacesLoader(out, "train", T.ToTensor(), num_classes=num_classes)
    val = MiniPlacesLoader(out, "val", T.ToTensor(), num_classes=num_classes)
    train_y, val_x, val_y = torch.tensor(train.label_list), stack(val), torch.tensor(val.label_list)

    # the mean colour of an image says (almost) nothing about its class
    mean_colour_acc = nearest_centroid_accuracy(stack(train).mean((2, 3)), train_y,
                                                val_x.mean((2, 3)), val_y, num_classes)
    assert mean_colour_acc < 0.3

    # a tiny CNN trained with the handout's augmentations (scaled down to 48 px) learns
    # the classes in a few epochs (chance is 0.1); one thread is much faster than two
    # for a model this small on a busy machine
    train.transforms = T.Compose([T.Scale(size * 9 // 8), T.RandomHorizontalFlip(),
                                  T.RandomColor(0.15), T.RandomRotate(15),
                                  T.RandomSizedCrop(size), T.ToTensor()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        random.seed(0)
        model = nn.Sequential(
            nn.InstanceNorm2d(3),      # the colours of each image are random
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for epoch in range(6):
            train_x = stack(train)     # freshly augmented every epoch
            for idx in torch.randperm(len(train_y)).split(20):
                loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            cnn_acc = (model(val_x).argmax(1) == val_y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert cnn_acc > 0.45, \
        f"tiny CNN reached only {cnn_acc:.2f} (mean colour: {mean_colour_acc:.2f})"
