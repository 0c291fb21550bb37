"""make_demo_data: MiniPlaces layout, determinism, overwrite protection, the CLI, that the
classes are learnable from the pixels (a tiny CNN) but not from the mean colour, and
MiniPlaces' shape: 100 classes, several writing processes, the disk-space refusal and
what a failed write leaves."""
import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

import custom_transforms as T
import make_demo_data
from custom_dataloader import MiniPlacesLoader
from make_demo_data import CLASS_NAMES, MARKER, make_demo_dataset

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "make_demo_data.py")


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
    with pytest.raises(ValueError, match=f"--num-classes must be in \\[2, {len(CLASS_NAMES)}\\]"):
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


# ---------------------------------------------------------------- MiniPlaces' shape
def colour_signature(path):
    """(hue in degrees most common among the saturated pixels, share of the pixels that
    are saturated and light) of an image file: what tells the colour families apart."""
    hsv = cv2.cvtColor(cv2.imread(path).astype("float32") / 255, cv2.COLOR_BGR2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    saturated = (s > 0.6) & (v > 0.2)
    hist = np.bincount((h[saturated] // 10).astype(int) % 36, minlength=36)
    hist = hist + np.roll(hist, 1) + np.roll(hist, -1)       # 30-degree windows
    return int(np.argmax(hist)) * 10 + 5, float(((s > 0.5) & (v > 0.6)).mean())


def test_hundred_classes_like_miniplaces_whatever_the_workers(tmp_path):
    """100 classes: distinct names and folders, every label in both splits, a progress
    line on stderr, the same files from 2 writing processes as from one, and classes
    10-99 in the colour family of their number (classes 0-9 in none)."""
    out, one = str(tmp_path / "two_workers"), str(tmp_path / "one_worker")
    args = ["--num-classes", "100", "--train-per-class", "2", "--val-per-class", "1",
            "--size", "32", "--workers", "2"]
    done = subprocess.run([sys.executable, SCRIPT, out] + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 200 train + 100 val" in done.stdout
    assert "make_demo_data" in done.stderr and "300/300" in done.stderr, done.stderr

    names = [line.split()[0][1:] for line in read_lines(os.path.join(out, "categories.txt"))]
    assert len(set(names)) == 100 and names[:10] == CLASS_NAMES[:10]
    train_dir = os.path.join(out, "images", "train")
    folders = {os.path.relpath(root, train_dir) for root, _, files in os.walk(train_dir)
               if files}
    assert folders == set(names)
    train = [line.split() for line in read_lines(os.path.join(out, "train.txt"))]
    val = [line.split() for line in read_lines(os.path.join(out, "val.txt"))]
    assert sorted(int(label) for _, label in train) == sorted(list(range(100)) * 2)
    assert sorted(int(label) for _, label in val) == list(range(100))

    make_demo_dataset(one, num_classes=100, train_per_class=2, val_per_class=1, size=32,
                      workers=1)
    for rel in ["train.txt", "val.txt"] + [os.path.join("images", p) for p, _ in train + val]:
        assert filecmp.cmp(os.path.join(out, rel), os.path.join(one, rel), shallow=False), rel

    by_class = {}
    for rel, label in train + val:
        by_class.setdefault(int(label), []).append(colour_signature(
            os.path.join(out, "images", rel)))
    for label, signatures in by_class.items():
        family = label // 10
        light = np.median([share for _, share in signatures])
        if family == 0:      # the demo's colours: no saturated light colour
            assert light < 0.15, (label, signatures)
            continue
        assert light > 0.2, (label, signatures)
        centre = (family - 1) * 40
        for hue, _ in signatures:
            assert abs((hue - centre + 180) % 360 - 180) <= 20, (label, signatures)


def test_refuses_a_set_larger_than_the_disk_before_writing(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage._replace(free=100 * 2 ** 20))   # 100 MiB free
    out = tmp_path / "scale"
    with pytest.raises(SystemExit) as info:
        make_demo_data.main([str(out), "--num-classes", "100", "--train-per-class", "1000",
                             "--val-per-class", "100"])
    message = str(info.value.code)      # what Python prints on stderr, exit status 1
    assert message.startswith("make_demo_data.py: error: 110000 images of 128x128 need about")
    assert "GB free" in message and "\n" not in message
    assert not out.exists()
    # a set that fits is written
    assert make_demo_dataset(str(out), num_classes=2, train_per_class=1, val_per_class=1,
                             size=16) == {"train": 2, "val": 2}


def test_a_failed_write_leaves_no_label_file_and_is_replaced(tmp_path, monkeypatch):
    out, written = str(tmp_path / "demo"), []
    save = make_demo_data.save_image

    def save_three(*args):
        if len(written) == 3:
            raise OSError("No space left on device")
        written.append(args[1])
        save(*args)

    monkeypatch.setattr(make_demo_data, "save_image", save_three)
    for classes in (3, 20):          # one random stream; one generator per image
        written.clear()
        with pytest.raises(OSError, match="No space left"):
            make_demo_dataset(out, num_classes=classes, train_per_class=2, val_per_class=1,
                              size=16)
        assert len(written) == 3
        assert not any(os.path.exists(os.path.join(out, name))
                       for name in ("train.txt", "val.txt", "categories.txt"))
    monkeypatch.setattr(make_demo_data, "save_image", save)
    make_demo_dataset(out, num_classes=20, train_per_class=2, val_per_class=1, size=16)
    assert len(read_lines(os.path.join(out, "train.txt"))) == 40


def test_a_bad_setting_is_refused_before_a_set_is_replaced(tmp_path):
    out = str(tmp_path / "demo")
    make_demo_dataset(out, num_classes=2, train_per_class=1, val_per_class=1, size=16)
    before = sorted(os.path.relpath(os.path.join(root, n), out)
                    for root, _, names in os.walk(out) for n in names)
    for flag, value in (("--seed", "-1"), ("--workers", "0"), ("--size", "8")):
        done = subprocess.run([sys.executable, SCRIPT, out, flag, value],
                              capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"make_demo_data.py: error: {flag} must be"), done.stderr
        after = sorted(os.path.relpath(os.path.join(root, n), out)
                       for root, _, names in os.walk(out) for n in names)
        assert after == before  # the complete set is untouched


def sigint_as_in_a_terminal():
    """A job started in the background by a non-interactive shell (`cmd &`, as a CI
    script may be) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt: give the child the default a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_several_processes_write_is_one_line(tmp_path):
    """Ctrl-C in the terminal reaches the whole process group, the writing processes too."""
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(out), "--num-classes", "20",
                             "--train-per-class", "1000", "--size", "32", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    deadline = time.time() + 120
    while not (out / "images" / "train" / "a" / "abbey").is_dir() or \
            not os.listdir(out / "images" / "train" / "a" / "abbey"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # both writing processes at work
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = err.replace("\r", "\n").strip().splitlines()  # the progress line, then ours
    assert lines[-1].startswith("make_demo_data.py: interrupted; ") and \
        "holds no complete set (no train.txt)" in lines[-1], err
    assert not any(line.startswith("make_demo_data.py") for line in lines[:-1]), err
    assert not (out / "train.txt").exists()
