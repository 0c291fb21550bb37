"""MiniPlaces dataset: label files + JPEG images decoded with OpenCV.

Layout of a data folder (MiniPlaces, and the demo set of make_demo_data.py):
    DIR/train.txt, DIR/val.txt      lines "relative/path.jpg label", paths relative to DIR/images/
    DIR/images/train/a/abbey/00000001.jpg, DIR/images/val/00000001.jpg, ...
"""
import os
import random
import re
import sys

import cv2
import numpy as np
import torch
from torch.utils import data

from utils import ToolkitError

# OpenCV's own thread pool does not survive fork(): a DataLoader worker forked while a
# pool thread held one of OpenCV's locks waits on it forever (seen here: a worker stuck
# in a cv2 call on a mutex, the training silent). Every image is small and the
# DataLoader's workers already run in parallel, so OpenCV runs single-threaded, set
# before any cv2 call starts the pool (main.py imports this module at start-up).
cv2.setNumThreads(0)


class DatasetError(ToolkitError):
    """A problem with the data on disk. The message is one line naming the file, so the
    driver can print it as is, also when a DataLoader worker re-raises it (PyTorch puts
    the worker's traceback in front; the message stays the last line)."""


def read_label_file(label_file, num_classes):
    """Parse "relative/path.jpg label" lines (blank lines ignored) -> (paths, labels);
    num_classes=None accepts any label >= 0 (main.py then counts the classes). A UTF-8
    byte-order mark is ignored. An image listed more than once with the same label is kept,
    and named in one warning line on stderr (a merged or hand-edited list, trained on
    twice); with two different labels it is an error naming both lines (which one is right
    cannot be guessed). A path that leads outside DIR/images/ (up with .., or absolute) is
    an error naming the line."""
    with open(label_file, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")    # -sig: drop the BOM some Windows editors write
    except UnicodeDecodeError as e:       # its message names neither file nor line
        line_no = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{label_file}, line {line_no}: not UTF-8 text "
                           f"(byte 0x{raw[e.start]:02x}; save it as UTF-8)") from None
    file_list, label_list, first_line, repeats, negative = [], [], {}, [], None
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)      # the label is the last field
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses
        # with a traceback naming neither file nor line, and int() itself reads the
        # digits of other scripts ("١" is 1)
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]+", parts[1]):
            raise DatasetError(f"{label_file}, line {line_no}: expected "
                               f"'relative/path.jpg label' (the label in digits 0-9), "
                               f"got {line!r}")
        label = int(parts[1])
        if num_classes is not None and not 0 <= label < num_classes:
            raise DatasetError(f"{label_file}, line {line_no}: label {label} is outside "
                               f"[0, {num_classes}) (is --num-classes right?)")
        if label < 0 and negative is None:  # said once the file's class count is known
            negative = (line_no, label)
        # one image however its path is spelled: ./a/x.jpg, a//x.jpg and a/x.jpg
        image = os.path.normpath(parts[0])
        if os.path.isabs(image) or image == os.pardir or image.startswith(os.pardir + os.sep):
            # a list that reaches outside the data set trains on files it does not hold
            # (or fails later, far from this line: /etc/passwd is "not an image")
            images = os.path.join(os.path.dirname(label_file), "images")
            raise DatasetError(f"{label_file}, line {line_no}: image path {parts[0]!r} "
                               f"leads outside the data set's images folder (the paths are "
                               f"relative to {images})")
        if image in first_line:
            first_no, first_index = first_line[image]
            if label_list[first_index] != label:  # which label is right cannot be guessed
                raise DatasetError(f"{label_file}, lines {first_no} and {line_no}: image "
                                   f"{file_list[first_index]} is listed with two labels, "
                                   f"{label_list[first_index]} and {label}; keep one line")
            repeats.append((line_no, image))
        # (line number, index in the lists) of the image's first line
        first_line.setdefault(image, (line_no, len(file_list)))
        file_list.append(parts[0])
        label_list.append(label)
    if not file_list:
        raise DatasetError(f"{label_file} lists no images")
    if negative is not None:
        line_no, label = negative
        count = max(label_list) + 1
        raise DatasetError(f"{label_file}, line {line_no}: label {label} is outside "
                           f"[0, {count}) (the file's largest label is {count - 1})" if count > 0 else
                           f"{label_file}, line {line_no}: label {label} is negative "
                           f"(labels are class numbers 0, 1, 2, ...)")
    if repeats:
        line_no, path = repeats[0]
        print(f"warning: {label_file}: {len(repeats)} line(s) list an image listed before, "
              f"e.g. line {line_no} repeats {path} of line {first_line[path][0]}; kept",
              file=sys.stderr)
    return file_list, label_list


def jpeg_is_complete(buf):
    """False for a JPEG (starts with the SOI marker FF D8) that lacks its end marker FF D9:
    the first part of an interrupted download. OpenCV decodes such a file as an image
    whose missing part is grey and only prints libjpeg's warning, without the file name.
    Zero or whitespace padding after the marker, which some encoders add, is allowed."""
    if buf[:2].tobytes() != b"\xff\xd8":
        return True                       # not a JPEG: the decoder alone judges it
    return buf.tobytes().rstrip(b"\x00 \t\r\n").endswith(b"\xff\xd9")


def load_image(filename):
    """Read and decode one image -> H x W x 3 uint8 RGB, or DatasetError naming the file.
    The bytes are read once: the JPEG check and the decoder share them."""
    try:
        buf = np.fromfile(filename, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read image {filename} ({e.strerror})") from None
    if buf.size == 0:
        raise DatasetError(f"image {filename} is empty (an interrupted download?)")
    if not jpeg_is_complete(buf):
        raise DatasetError(f"image {filename} is truncated: the JPEG has no end marker "
                           f"(an interrupted download?)")
    # IMREAD_UNCHANGED: we convert gray / BGRA / BGR to RGB ourselves (to_rgb)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {filename} (corrupt or not an image)")
    return to_rgb(img, filename)


def to_rgb(img, filename):
    """Decoded OpenCV image (BGR, BGRA or gray; 8 or 16 bit) -> H x W x 3 uint8 RGB."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DatasetError(f"unsupported pixel type {img.dtype} in image {filename}")
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    raise DatasetError(f"image {filename} has {img.shape[2]} channels, expected 1, 3 or 4")


# how to get data, said by every "not there" error below
GET_DATA_HINT = ("MiniPlaces: `sh ./download_dataset.sh`; a demo set: "
                 "`python tools/make_demo_data.py DIR`")


class MiniPlacesLoader(data.Dataset):
    """Returns (image, label): the image is an H x W x 3 uint8 RGB array, or whatever
    `transforms` makes of it (a C x H x W tensor with the handout's transforms)."""

    def __init__(self, root_folder, split="train", transforms=None, num_classes=100):
        if os.path.isfile(root_folder):
            raise DatasetError(f"data folder {root_folder} is a file, not a folder (DATA is "
                               f"the folder that holds train.txt, val.txt and images/)")
        if not os.path.isdir(root_folder):
            raise DatasetError(f"data folder {root_folder} does not exist ({GET_DATA_HINT})")
        label_file = os.path.join(root_folder, split + ".txt")
        if not os.path.isfile(label_file):
            raise DatasetError(f"label file {label_file} is missing ({GET_DATA_HINT})")
        self.root_folder = root_folder
        self.img_folder = os.path.join(root_folder, "images")
        self.split = split
        self.num_classes = num_classes
        self.transforms = transforms
        self.file_list, self.label_list = read_label_file(label_file, num_classes)

        # fail fast on missing files: one stat per image is cheap (0.3-0.4 s for
        # 100k files here, warm cache); corrupt files show up in __getitem__
        missing = [p for p in self.file_list
                   if not os.path.isfile(os.path.join(self.img_folder, p))]
        if missing:
            raise DatasetError(f"{len(missing)} of the {len(self.file_list)} images listed in "
                               f"{label_file} are missing, e.g. "
                               f"{os.path.join(self.img_folder, missing[0])}")

    def __len__(self):
        return len(self.label_list)

    def __getitem__(self, index):
        img = load_image(os.path.join(self.img_folder, self.file_list[index]))
        if self.transforms is not None:
            img = self.transforms(img)
        return img, self.label_list[index]

    def __repr__(self):
        return (f"{self.__class__.__name__}({self.root_folder!r}, split={self.split!r}, "
                f"{len(self)} images, num_classes={self.num_classes})")


def seed_worker(worker_id):
    """DataLoader(worker_init_fn=seed_worker): seed `random` (used by custom_transforms)
    and NumPy from torch's per-worker seed, itself derived from the loader's generator
    (so torch.manual_seed in the main process fixes every worker's augmentations).
    Recent PyTorch seeds `random` the same way by itself; this makes it explicit."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
