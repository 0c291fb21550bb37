"""custom_dataloader.MiniPlacesLoader: decoding to RGB, label files, every DatasetError,
errors raised inside DataLoader workers, and worker seeding."""
import os
import random
import traceback

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import custom_transforms as T
from conftest import CODE
from custom_dataloader import DatasetError, MiniPlacesLoader, seed_worker

RED_RGB = (255, 0, 0)


def write_set(root, entries, split="train"):
    """entries: (relative path, label, BGR/gray/BGRA image or raw bytes, or None = no file)."""
    lines = []
    for rel, label, content in entries:
        path = os.path.join(root, "images", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, bytes):
            with open(path, "wb") as f:
                f.write(content)
        elif content is not None:
            assert cv2.imwrite(path, content)
        lines.append(f"{rel} {label}")
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture
def small_set(tmp_path):
    bgr_red = np.zeros((12, 16, 3), np.uint8)
    bgr_red[:, :, 2] = 255                                  # red in OpenCV's BGR order
    gray = np.full((10, 8), 90, np.uint8)
    bgra = np.zeros((9, 9, 4), np.uint8)
    bgra[:, :, 0], bgra[:, :, 3] = 200, 17                  # blue, mostly transparent
    return write_set(tmp_path, [
        ("train/a/abbey/00000001.png", 0, bgr_red),
        ("train/b/bar/00000001.png", 3, gray),
        ("train/b/bar/00000002.png", 3, bgra),
        ("train/b/bakery/shop/00000001.jpg", 1, bgr_red),
    ])


def test_images_are_decoded_to_rgb(small_set):
    ds = MiniPlacesLoader(small_set, split="train", num_classes=4)
    assert len(ds) == 4
    img, label = ds[0]
    assert label == 0 and img.shape == (12, 16, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == RED_RGB                      # BGR -> RGB
    img, label = ds[1]
    assert label == 3 and img.shape == (10, 8, 3) and (img == 90).all()   # gray -> RGB
    img, _ = ds[2]
    assert img.shape == (9, 9, 3) and tuple(img[0, 0]) == (0, 0, 200)   # BGRA -> RGB
    img, label = ds[3]                                       # nested class folder, JPEG
    assert label == 1 and abs(int(img[5, 5, 0]) - 255) <= 2 and img[5, 5, 1:].max() <= 2


def test_transforms_are_applied(small_set):
    t = T.Compose([T.Scale(8), T.CenterCrop(8), T.ToTensor()])
    ds = MiniPlacesLoader(small_set, transforms=t, num_classes=4)
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32


def test_blank_lines_are_ignored(tmp_path):
    write_set(tmp_path, [("a.png", 1, np.zeros((4, 4, 3), np.uint8))])
    with open(tmp_path / "train.txt", "w") as f:
        f.write("\n  \na.png 1\n\n")
    assert MiniPlacesLoader(str(tmp_path), num_classes=2).label_list == [1]


def one_line_error(fn, *args, **kwargs):
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_label_file(tmp_path):
    msg = one_line_error(MiniPlacesLoader, str(tmp_path / "nowhere"))
    assert "nowhere" in msg and "does not exist" in msg
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), split="val")
    assert "val.txt" in msg and "missing" in msg


@pytest.mark.parametrize("bad_line", ["a.png", "a.png two", "a.png 1.5", ""])
def test_malformed_label_line_names_file_and_line(tmp_path, bad_line):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8))])
    with open(tmp_path / "train.txt", "a") as f:
        f.write("a.png 0\n" + bad_line + "\n")
    if bad_line == "":
        # a blank line is fine; an all-blank file is not
        assert len(MiniPlacesLoader(str(tmp_path), num_classes=2)) == 2
        with open(tmp_path / "train.txt", "w") as f:
            f.write("\n\n")
        assert "lists no images" in one_line_error(MiniPlacesLoader, str(tmp_path))
        return
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=2)
    assert "train.txt, line 3" in msg and repr(bad_line) in msg


@pytest.mark.parametrize("label", [-1, 5])
def test_label_out_of_range_names_line(tmp_path, label):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", label, np.zeros((4, 4, 3), np.uint8))])
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=5)
    assert "line 2" in msg and f"label {label}" in msg and "[0, 5)" in msg


def test_missing_image_fails_at_construction(tmp_path):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("train/x/gone.jpg", 0, None)])
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=2)
    assert os.path.join("train", "x", "gone.jpg") in msg and "missing" in msg


def test_corrupt_image_fails_when_read(tmp_path):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("broken.jpg", 1, b"this is not a jpeg")])
    ds = MiniPlacesLoader(str(tmp_path), num_classes=2)
    ds[0]
    msg = one_line_error(ds.__getitem__, 1)
    assert "broken.jpg" in msg and "cannot read" in msg


def worker_error(ds):
    """The DatasetError a DataLoader worker raised for item 0, as the main process sees it:
    its last line (PyTorch puts the worker's traceback in front)."""
    loader = DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    # torch re-raises in a reference cycle that holds the loader: freed now rather than by
    # a later garbage collection, where its worker takes 5 s to stop (as main.py does)
    traceback.clear_frames(info.tb)
    return str(info.value).splitlines()[-1]


def test_error_in_worker_keeps_file_name_on_last_line(tmp_path):
    write_set(tmp_path, [("broken.jpg", 0, b"not an image at all")])
    ds = MiniPlacesLoader(str(tmp_path), transforms=T.ToTensor(), num_classes=1)
    last = worker_error(ds)
    assert last.startswith("custom_dataloader.DatasetError: cannot read image")
    assert "broken.jpg" in last


def real_jpeg_bytes(tmp_path):
    """A JPEG written by OpenCV's encoder (a smooth colour ramp, as photos are)."""
    ramp = cv2.resize(np.random.RandomState(0).randint(0, 256, (4, 4, 3), np.uint8), (64, 48))
    path = str(tmp_path / "whole.jpg")
    assert cv2.imwrite(path, ramp)
    with open(path, "rb") as f:
        return f.read()


def test_truncated_jpeg_is_named_in_main_process_and_worker(tmp_path):
    whole = real_jpeg_bytes(tmp_path)
    half = whole[:len(whole) // 2]            # an interrupted download
    write_set(tmp_path, [("train/a/abbey/00000001.jpg", 0, half),
                         ("train/a/abbey/00000002.jpg", 0, whole)])
    ds = MiniPlacesLoader(str(tmp_path), transforms=T.ToTensor(), num_classes=1)
    name = os.path.join("train", "a", "abbey", "00000001.jpg")
    msg = one_line_error(ds.__getitem__, 0)
    assert name in msg and "truncated" in msg
    last = worker_error(ds)
    assert last.startswith("custom_dataloader.DatasetError: image") and name in last
    assert "truncated" in last
    assert ds[1][0].shape == (3, 48, 64)      # the whole file still loads


def test_padding_after_jpeg_end_marker_is_accepted(tmp_path):
    whole = real_jpeg_bytes(tmp_path)
    write_set(tmp_path, [("whole.jpg", 0, whole), ("padded.jpg", 0, whole + b"\0" * 100 + b"\n")])
    ds = MiniPlacesLoader(str(tmp_path), num_classes=1)
    reference = cv2.cvtColor(cv2.imread(str(tmp_path / "whole.jpg")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(ds[0][0], reference) and np.array_equal(ds[1][0], reference)


@pytest.mark.slow
def test_empty_image_file_is_named(tmp_path):
    write_set(tmp_path, [("empty.png", 0, b"")])
    msg = one_line_error(MiniPlacesLoader(str(tmp_path), num_classes=1).__getitem__, 0)
    assert "empty.png" in msg and "empty" in msg


def test_label_file_with_bom_is_read(tmp_path):
    write_set(tmp_path, [("a.png", 1, np.zeros((4, 4, 3), np.uint8))])
    text = (tmp_path / "train.txt").read_bytes()
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + text)   # what Notepad writes
    ds = MiniPlacesLoader(str(tmp_path), num_classes=2)
    assert ds.file_list == ["a.png"] and ds.label_list == [1]
    assert ds[0][0].shape == (4, 4, 3)


def test_non_utf8_label_file_names_file_and_line(tmp_path):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8))])
    with open(tmp_path / "train.txt", "ab") as f:
        f.write(b"a.png 1\r\ncaf\xe9.png 1\n")     # Latin-1, after a CRLF line
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=2)
    assert "train.txt, line 3" in msg and "not UTF-8" in msg and "0xe9" in msg


def test_duplicate_lines_are_warned_about_once(tmp_path, capsys):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", 1, np.zeros((4, 4, 3), np.uint8))])
    ds = MiniPlacesLoader(str(tmp_path), num_classes=2)
    assert capsys.readouterr().err == ""      # no duplicates, no warning
    with open(tmp_path / "train.txt", "a") as f:
        f.write("b.png 1\na.png 0\nb.png 1\n")   # lines 3-5 repeat images of lines 1-2
    ds = MiniPlacesLoader(str(tmp_path), num_classes=2)
    assert ds.file_list == ["a.png", "b.png", "b.png", "a.png", "b.png"]   # kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "train.txt: 3 line(s)" in err and "line 3 repeats b.png of line 2" in err


@pytest.mark.parametrize("label", ["²", "1²", "١"])
def test_label_of_other_digits_than_ascii_names_file_and_line(tmp_path, label):
    # "²".isdigit() is True but int("²") raises; int("١") reads an Arabic-Indic 1
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", label, np.zeros((4, 4, 3), np.uint8))])
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=None)
    assert "train.txt, line 2" in msg and repr(f"b.png {label}") in msg and "0-9" in msg


def test_same_image_with_two_labels_names_both_lines(tmp_path, capsys):
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", 1, np.zeros((4, 4, 3), np.uint8)),
                         ("a.png", 0, None),       # the same label again: a warning
                         ("a.png", 1, None)])      # another label: which one is right?
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=2)
    assert "train.txt, lines 1 and 4" in msg and "a.png" in msg and "0 and 1" in msg
    assert capsys.readouterr().err == ""     # no warning printed before the error


def test_one_image_spelled_two_ways_with_two_labels_names_both_lines(tmp_path, capsys):
    """./a.png and a.png are one file: two labels for it are an error, as for one spelling."""
    write_set(tmp_path, [("a.png", 1, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", 0, np.zeros((4, 4, 3), np.uint8))])
    with open(tmp_path / "train.txt", "a") as f:
        f.write(".//a.png 0\n")
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=None)
    assert "train.txt, lines 1 and 3" in msg and "a.png" in msg and "1 and 0" in msg


def test_a_negative_label_says_the_class_range_of_the_file(tmp_path):
    """Without a class count (main.py counts the classes itself) the range said is the
    file's own: [0, largest label + 1), never [0, None)."""
    write_set(tmp_path, [("a.png", 0, np.zeros((4, 4, 3), np.uint8)),
                         ("b.png", -1, np.zeros((4, 4, 3), np.uint8)),
                         ("c.png", 6, np.zeros((4, 4, 3), np.uint8))])
    msg = one_line_error(MiniPlacesLoader, str(tmp_path), num_classes=None)
    assert "train.txt, line 2: label -1 is outside [0, 7)" in msg and "None" not in msg


class RandomNumbers(Dataset):
    """Each item is a draw from Python's `random`, as the random transforms make."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return random.random()


def test_seed_worker_makes_workers_repeatable_and_distinct():
    def draw(seed):
        torch.manual_seed(seed)
        loader = DataLoader(RandomNumbers(), batch_size=4, num_workers=2,
                            worker_init_fn=seed_worker)
        return torch.cat(list(loader)).tolist()
    first, again, other = draw(0), draw(0), draw(1)
    assert first == again
    assert first != other
    assert first[:4] != first[4:]                 # the two workers draw different numbers


def test_seed_worker_seeds_random_and_numpy_from_torch():
    torch.manual_seed(5)
    seed_worker(0)
    got = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    assert got == (random.random(), np.random.rand())


@pytest.mark.slow
def test_opencv_runs_without_its_thread_pool_before_workers_fork():
    """A DataLoader worker forked while an OpenCV pool thread held a lock hung forever in a
    cv2 call (seen in this suite). Importing the data loader turns OpenCV's pool off; the
    workers are the parallelism."""
    import subprocess
    import sys
    probe = ("import os, sys, cv2, numpy as np; sys.path.insert(0, sys.argv[1]); "
             "import custom_dataloader; "
             "cv2.resize(np.ones((2000, 2000), np.float32), (4000, 4000)); "
             "print(cv2.getNumThreads(), len(os.listdir('/proc/self/task')))")
    before = subprocess.run([sys.executable, '-c', probe.replace('import custom_dataloader; ',
                                                                 ''), CODE],
                            capture_output=True, text=True, check=True).stdout.split()
    after = subprocess.run([sys.executable, '-c', probe, CODE],
                           capture_output=True, text=True, check=True).stdout.split()
    assert after[0] == '1', after                 # cv2 calls run in the calling thread
    assert int(after[1]) <= int(before[1]), (before, after)   # no pool thread started


def test_data_that_is_a_file_is_named_as_a_file(tmp_path):
    """`main.py some_file.txt`: the path exists, it is a file, not a data folder."""
    some_file = tmp_path / "some_file.txt"
    some_file.write_text("not a data set\n")
    msg = one_line_error(MiniPlacesLoader, str(some_file))
    assert str(some_file) in msg and "is a file, not a folder" in msg, msg
    assert "does not exist" not in msg


@pytest.mark.parametrize("escape", ["../../elsewhere/x.jpg", "/etc/passwd",
                                    "train/../../../x.jpg"])
def test_a_label_path_that_leaves_the_image_folder_is_refused(tmp_path, escape):
    """A label file's paths are relative to DIR/images/: one that leads out of it (up
    with .., or absolute) is refused with the file and line, before any image is read,
    even where a file is there to be read (/etc/passwd, a sibling folder's image)."""
    root = tmp_path / "data"
    write_set(root, [("a.png", 0, np.zeros((4, 4, 3), np.uint8))])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cv2.imwrite(str(outside / "x.jpg"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "x.jpg"), np.zeros((4, 4, 3), np.uint8))
    with open(root / "train.txt", "a") as f:
        f.write(f"{escape} 1\n")
    msg = one_line_error(MiniPlacesLoader, str(root), num_classes=2)
    assert "train.txt, line 2" in msg and repr(escape) in msg, msg
    assert "images" in msg and "outside" in msg, msg


def test_a_label_path_that_stays_inside_is_kept_however_spelled(tmp_path):
    write_set(tmp_path, [("train/a/x.png", 0, np.zeros((4, 4, 3), np.uint8))])
    with open(tmp_path / "train.txt", "a") as f:
        f.write("train/a/../a/x.png 0\n./train//a/x.png 0\n")
    assert len(MiniPlacesLoader(str(tmp_path), num_classes=1)) == 3
