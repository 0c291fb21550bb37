"""The decoded-image cache: every image decoded once (custom_dataloader.load_image) into
one uint8 file per split, DIR/cache/<split>_<S>.npy (N x S x S x 3, memory-mapped, so the
DataLoader workers share its pages), read by the fused augmentation of fast_data.py.

Fresh or not: the cache keeps a fingerprint of the label file and of every image (path,
size, modification time, inode and inode change time: an image edited in place with its
modification time put back still changes its change time, as git's index relies on); a
stale, foreign or truncated cache is rebuilt, and `--rebuild-cache` rebuilds it on request.
A build holds a lock on DIR/cache/, so a second run waits for it and then reads its cache;
the leftovers of a killed build are removed by the next run (safe_files.py).
"""
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time

import cv2
import numpy as np
from torch.utils import data

import custom_transforms as T
from toolkit import safe_files
from custom_dataloader import DatasetError, MiniPlacesLoader
from toolkit.safe_files import FileLock


CACHE_VERSION = 2        # bump when the file layout, the stored geometry or the fingerprint
                         # changes
LOCK_NAME = ".build.lock"    # in DIR/cache/, held by every build (_build_lock)
CACHE_SIZE = 128         # side of the cached images: get_val_transforms' CenterCrop(128)

# the interpolations both executions know (grid_sample has exactly these three)


################################################################################
# 1. The cache: each image decoded once
################################################################################
def cache_paths(data_folder, split, size=CACHE_SIZE):
    """(images .npy, fingerprint .json) of a split's cache."""
    folder = os.path.join(data_folder, "cache")
    return (os.path.join(folder, f"{split}_{size}.npy"),
            os.path.join(folder, f"{split}_{size}.json"))


def cache_image(img, size=CACHE_SIZE):
    """The geometry of get_val_transforms(): Scale(size) (shorter side) + CenterCrop(size).
    A MiniPlaces image (size x size already) is stored exactly as decoded. Smaller images
    are enlarged with INTER_LINEAR, as get_val_transforms()'s Scale does; larger ones are
    shrunk with INTER_AREA (the validation Scale's bilinear would alias the training crops
    taken from the cache; for validation it then differs slightly). Only the centre
    square is kept: training crops from the cache never see the sides of a non-square
    image, and an image larger than `size` loses its extra resolution (the per-image path
    crops from the original)."""
    h, w = img.shape[:2]
    scale = T.Scale(size)
    out_h, out_w = scale.output_size(h, w)
    interpolation = cv2.INTER_AREA if out_h * out_w < h * w else cv2.INTER_LINEAR
    return T.CenterCrop(size)(scale.apply(img, interpolation))


def _fingerprint(loader):
    """What the cache was built from: the label file's bytes, and each listed image's
    path, size, modification time, inode number and status-change time (ctime). The stats
    cost what MiniPlacesLoader's existence check costs (one stat per image, 0.3-0.4 s for
    100k files with a warm cache); hashing the images' bytes would mean reading 100k files
    at every start. The modification time alone can be put back (os.utime, `touch -r`,
    an unpacker keeping the archive's times) after an edit that kept the size; the ctime
    cannot: the kernel sets it to now at every change of the file, and no call sets it
    back (git's index relies on the same). The inode tells a file replaced by another
    (a copy renamed over it). Copying the data set elsewhere changes both: one rebuild."""
    label_file = os.path.join(loader.root_folder, loader.split + ".txt")
    with open(label_file, "rb") as f:
        label_hash = hashlib.sha256(f.read()).hexdigest()
    stats = hashlib.sha256()
    for rel in loader.file_list:
        st = os.stat(os.path.join(loader.img_folder, rel))
        stats.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0"
                     f"{st.st_ctime_ns}\n".encode())
    return {"label_file_sha256": label_hash, "count": len(loader.file_list),
            "image_stats_sha256": stats.hexdigest()}


def _stale_reason(path, meta_path, fingerprint, size):
    """Why the cache on disk cannot be used as it is ("missing" if there is none), or None."""
    if not os.path.exists(meta_path):
        return "missing" if not os.path.exists(path) else "it has no fingerprint file"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return f"its fingerprint file {meta_path} is unreadable"
    if not isinstance(meta, dict):       # valid JSON, but `null` or `[]` is no fingerprint
        return f"its fingerprint file {meta_path} is damaged (not a JSON object)"
    if meta.get("version") != CACHE_VERSION or meta.get("size") != size:
        return "it was written by another version of fast_data.py"
    for key, what in [("label_file_sha256", "the label file changed"),
                      ("count", "the label file changed"),
                      ("image_stats_sha256", "images changed (edited, replaced or touched)")]:
        if meta.get(key) != fingerprint[key]:
            return f"{what} since it was built (another data set, or an updated one)"
    try:
        st = os.stat(path)
    except OSError:
        return "its image file is missing"
    if ((st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            != (meta.get("bytes"), meta.get("mtime_ns"), meta.get("ino"), meta.get("ctime_ns"))):
        return (f"its image file was truncated or replaced after it was built "
                f"({st.st_size} bytes, the fingerprint says {meta.get('bytes')})")
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"its image file is unreadable ({e})"
    if images.dtype != np.uint8 or images.shape != (fingerprint["count"], size, size, 3):
        return f"its image file holds {images.dtype} {images.shape}"
    return None


def _stack_images(batch):
    # collate_fn of the build's DataLoader: (image, label) pairs -> N x S x S x 3
    return np.stack([img for img, _ in batch])


_HINT = "or run with --no-data-cache"


def _make_cache_folder(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create the data cache folder {folder} ({e.strerror or e}); "
                           f"make it writable {_HINT}") from None


@contextlib.contextmanager
def _build_lock(folder, wait=True):
    """Hold DIR/cache/.build.lock (safe_files.FileLock) while the cache is checked and
    built; yields True, or False where wait=False and another process holds it. A second
    run started during a build waits here, saying so in one line, and then finds the
    finished cache instead of decoding the same images into a second 4.9 GB temporary
    file. The kernel releases the lock when its holder ends, kill -9 included, so a
    killed build never blocks the next run. One lock for the folder, not one per split:
    the free-space check must see no other build."""
    lock = FileLock(os.path.join(folder, LOCK_NAME))
    try:
        locked = lock.acquire(wait, waiting=lambda holder: print(
            f"=> waiting for {holder}, which is building the data cache in {folder}",
            flush=True))
    except OSError as e:
        raise DatasetError(f"cannot write the data cache folder {folder} ({e.strerror or e}); "
                           f"make it writable {_HINT}") from None
    try:
        yield locked
    finally:
        lock.release()


def _remove_leftovers(folder):
    """Delete the temporary files of killed builds (safe_files.temp_path names them): a
    killed build leaves its .npy's at full size, since _build reserves the blocks up
    front. Only those of dead processes: a build at work keeps its own."""
    for leftover, size in safe_files.remove_dead_temp_files(folder):
        print(f"=> removed {leftover} ({size / 1e9:.2f} GB), left by an interrupted build "
              f"of the data cache", flush=True)


# left free beside a cache that is built: the run's checkpoints, logs and summary need
# room on the same disk
SPACE_MARGIN = 64 * 10 ** 6


def _size(nbytes):
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def space_shortfall(what, nbytes, folder):
    """Why a cache of nbytes does not fit on the disk of `folder`, in figures that add up
    (the margin kept free included), or None where it fits."""
    free = shutil.disk_usage(folder).free
    if free >= nbytes + SPACE_MARGIN:
        return None
    return (f"{what} needs {_size(nbytes + SPACE_MARGIN)} ({_size(nbytes)} of images + "
            f"{_size(SPACE_MARGIN)} kept free for the run's other files), but {folder} has "
            f"{_size(free)} free")


def _build(loader, path, meta_path, size, fingerprint, workers):
    """Decode every image into path (via safe_files.replacing, so a crash
    leaves no half-written cache), then write the fingerprint the same way. The caller
    holds _build_lock and has created the folder."""
    n = len(loader)
    nbytes = n * size * size * 3
    folder = os.path.dirname(path)
    shortfall = space_shortfall(f"the data cache {path}", nbytes, folder)
    if shortfall is not None:
        raise DatasetError(f"{shortfall}: free some space {_HINT}")
    print(f"=> decoding the {n} images of {loader.split} once into {path} "
          f"({nbytes / 1e9:.2f} GB); later runs read it", flush=True)
    start = time.time()
    try:
        with safe_files.replacing(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(n, size, size, 3))
            if hasattr(os, "posix_fallocate"):
                # reserve the blocks now: a disk that fills up while the memory map is
                # written kills the process with SIGBUS instead of raising an error
                with open(tmp, "rb+") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            loader.transforms = functools.partial(cache_image, size=size)
            batches = data.DataLoader(loader, batch_size=256, num_workers=workers,
                                      collate_fn=_stack_images)
            done = 0
            for batch in batches:
                out[done:done + len(batch)] = batch
                done += len(batch)
            out.flush()
            del out
            if os.path.exists(meta_path):  # an old fingerprint never vouches for new images
                os.remove(meta_path)
        st = os.stat(path)
        meta = dict(fingerprint, version=CACHE_VERSION, split=loader.split, size=size,
                    bytes=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino,
                    ctime_ns=st.st_ctime_ns,
                    labels=[int(x) for x in loader.label_list])
        safe_files.atomic_write(meta_path, lambda f: json.dump(meta, f))
    except OSError as e:
        raise DatasetError(f"cannot write the data cache {path} ({e.strerror or e}); "
                           f"free some space or make {folder} writable {_HINT}") from None
    finally:
        loader.transforms = None
    print(f"=> data cache {path} written in {time.time() - start:.0f} s", flush=True)


class ImageCache:
    """A split decoded once: `images` (N x S x S x 3 uint8 RGB, memory-mapped read-only),
    `labels` (N int64), `file_list`, `path`. Pickles without its images: every DataLoader
    worker maps the file itself (the page cache is shared, nothing is copied)."""

    def __init__(self, path, labels, file_list, size):
        self.path, self.size = path, size
        self.labels = np.asarray(labels, dtype=np.int64)
        self.file_list = list(file_list)
        self._images = None

    @property
    def images(self):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    @property
    def nbytes(self):
        return len(self.labels) * self.size * self.size * 3

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        return dict(self.__dict__, _images=None)

    def __repr__(self):
        return f"ImageCache({self.path!r}, {len(self)} images of {self.size}x{self.size})"


def split_of(data_folder, split, dataset=None):
    """The split's MiniPlacesLoader: `dataset` where the caller has built it already (the
    driver's loaders: the label file is read once per run), else read now."""
    if dataset is not None:
        return dataset
    return MiniPlacesLoader(data_folder, split=split, num_classes=None)


def load_or_build_cache(data_folder, split, size=CACHE_SIZE, workers=0, rebuild=False,
                        dataset=None):
    """The cache of DIR/<split>.txt: loaded if its fingerprint matches the label file and
    the images, else (re)built with `workers` decoding processes, saying why in one line;
    rebuild=True (--rebuild-cache) rebuilds it in any case. Data problems raise
    custom_dataloader.DatasetError, as the per-image path does.

    A fresh cache is read without any lock or write (a read-only data folder works). A
    build takes _build_lock first: it waits for another process's build, removes what
    killed builds left, and checks the fingerprint again, since the build it waited for
    may have made the cache fresh. `dataset`: the split's MiniPlacesLoader, if built."""
    loader = split_of(data_folder, split, dataset)
    fingerprint = _fingerprint(loader)
    path, meta_path = cache_paths(data_folder, split, size)
    folder = os.path.dirname(path)
    requested = "a rebuild was asked for (--rebuild-cache)"
    reason = requested if rebuild else _stale_reason(path, meta_path, fingerprint, size)
    if reason is None:
        if os.access(folder, os.W_OK):  # a read-only data folder keeps what it holds
            _remove_leftovers(folder)
        return ImageCache(path, loader.label_list, loader.file_list, size)
    _make_cache_folder(folder)
    with _build_lock(folder):
        _remove_leftovers(folder)
        if not rebuild:
            reason = _stale_reason(path, meta_path, fingerprint, size)
        if reason is not None:
            if reason not in ("missing", requested):
                print(f"warning: data cache {path} is not used: {reason}; rebuilding it",
                      file=sys.stderr, flush=True)
            _build(loader, path, meta_path, size, fingerprint, workers)
    return ImageCache(path, loader.label_list, loader.file_list, size)


def cache_writable(data_folder):
    """True where this process may build the cache: DIR/cache/ is writable, or is missing
    and DIR is writable."""
    folder = os.path.dirname(cache_paths(data_folder, "any")[0])
    return os.access(folder if os.path.isdir(folder) else data_folder, os.W_OK)


def build_shortfall(data_folder, splits, rebuild=False, size=CACHE_SIZE, datasets=None):
    """Why the caches of `splits` that a run would build (missing or stale ones, all of
    them with rebuild) do not fit on the disk together, or None: said before any build
    starts. `datasets`: {split: its MiniPlacesLoader} where built."""
    nbytes = 0
    for split in splits:
        loader = split_of(data_folder, split, (datasets or {}).get(split))
        path, meta_path = cache_paths(data_folder, split, size)
        if rebuild or _stale_reason(path, meta_path, _fingerprint(loader), size) is not None:
            nbytes += len(loader) * size * size * 3
    if nbytes == 0:
        return None
    folder = os.path.dirname(cache_paths(data_folder, "any")[0])
    return space_shortfall(f"the data cache of {' and '.join(splits)}", nbytes,
                           folder if os.path.isdir(folder) else data_folder)


def cache_problem(data_folder, split, size=CACHE_SIZE, dataset=None):
    """Why the split's cache on disk cannot be used as it is ("missing" if there is none),
    or None: the check load_or_build_cache starts with, for a caller that must know
    without building (a data folder it cannot write)."""
    loader = split_of(data_folder, split, dataset)
    path, meta_path = cache_paths(data_folder, split, size)
    return _stale_reason(path, meta_path, _fingerprint(loader), size)
