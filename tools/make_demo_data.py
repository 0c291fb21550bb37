"""Write a synthetic dataset in MiniPlaces layout, for trying the toolkit offline.

    python tools/make_demo_data.py OUT_DIR [--num-classes 10] [--train-per-class 100]
                                          [--val-per-class 20] [--size 128] [--seed 0]
                                          [--workers N]

OUT_DIR gets images/train/a/abbey/00000001.jpg ..., images/val/00000001.jpg ...,
train.txt, val.txt and categories.txt, like MiniPlaces. The first ten class names are
MiniPlaces' first ten; the others are scene names made up in its style. MiniPlaces' own
shape (100 classes, 100,000 training and 10,000 validation images, about 1.4 GB):

    python tools/make_demo_data.py data/scale --num-classes 100 --train-per-class 1000 \
        --val-per-class 100

Each of the first ten classes is a texture that fills the image: stripes (horizontal,
vertical or diagonal) at a fine or a coarse scale, a plain colour ramp, a grid of thin
lines, scattered dots, or a coarse checkerboard. Every image draws its own colours,
phase, small tilt, a few distractor shapes and pixel noise, so the class is in the
structure of the pixels only: the mean colour and the file name say nothing. The classes
differ by more than the training augmentations change an image (flip, +-15% colour,
+-15 degree rotation, crops of 25-100% of the area, i.e. up to 2x zoom): orientations
are 45 degrees apart and flip-symmetric ("diagonal" is either diagonal), scales about 4x
apart. Any of the toolkit's models learns it far above chance (10%) in a few CPU epochs
(`make demo`): it proves that the code trains, not that a recipe suits real photographs.

Classes 10-99 cross those ten textures with nine colour families: class c is texture
c % 10 in family c // 10, both of its colours strongly saturated and of the family's hue
(hues 40 degrees apart). The first ten classes never have a light colour that saturated
(saturation at most 0.39 against at least 0.7; after the +-15% colour augmentation at
most 0.49 against at least 0.59), so colour tells the families apart and the texture the
classes of a family. In a set of more than ten classes colour does say something.

Randomness: a set of up to ten classes draws all its images from one generator, in order,
in one process (so the demo set, and the sets the tests and the recorded figures use,
keep their files). A larger set gives every image a generator of its own, seeded by
(seed, split, number), so that --workers processes (default: one per core) write the
same files as one.

Safety: every setting is checked, and a set that would not fit on the disk is refused
(the estimate: about 0.6 bytes per pixel of JPEG, in whole 4 KB blocks), before a
previous set is touched. Replacing one removes its train.txt first, and train.txt is
written last, after every image: a folder without it is no complete set, whatever
stopped the writing (a full disk, a kill, Ctrl-C, which stops every writing process and
says so in one line, exit status 130). A progress line goes to stderr.
"""
import argparse
import math
import multiprocessing
import os
import shutil
import signal
import sys

import cv2
import numpy as np
from tqdm import tqdm

import _paths  # noqa: F401  code/ and tools/ on sys.path: runs from any directory
from toolkit import safe_files

# the first ten MiniPlaces categories (as in its categories.txt), then 90 scene names made
# up in its style (<letter>/<name>, alphabetical), not MiniPlaces' own: 100 in all
CLASS_NAMES = [
    "a/abbey", "a/airport_terminal", "a/amphitheater", "a/amusement_park", "a/aquarium",
    "a/aqueduct", "a/art_gallery", "a/assembly_line", "a/auditorium", "b/badlands",
    "b/bakery", "b/ballroom", "b/bamboo_forest", "b/banquet_hall", "b/bar",
    "b/baseball_field", "b/bathroom", "b/beach", "b/bedroom", "b/boat_deck",
    "b/bookstore", "b/botanical_garden", "b/bowling_alley", "b/boxing_ring", "b/bridge",
    "b/bus_interior", "b/butchers_shop", "c/campsite", "c/candy_store", "c/canyon",
    "c/cemetery", "c/chalet", "c/classroom", "c/clothing_store", "c/coast",
    "c/cockpit", "c/coffee_shop", "c/conference_room", "c/construction_site", "c/corn_field",
    "c/corridor", "c/courtyard", "d/dam", "d/dining_room", "d/driveway",
    "f/fire_station", "f/food_court", "f/fountain", "g/gas_station", "g/golf_course",
    "h/harbor", "h/highway", "h/hospital_room", "h/hot_spring", "i/iceberg",
    "k/kitchen", "l/laundromat", "l/lighthouse", "l/living_room", "l/lobby",
    "l/locker_room", "m/mansion", "m/martial_arts_gym", "m/mountain", "o/office",
    "p/palace", "p/parking_lot", "p/pasture", "p/patio", "p/playground",
    "p/plaza", "p/pond", "r/racecourse", "r/raceway", "r/restaurant",
    "r/river", "r/rock_arch", "r/runway", "s/shed", "s/shoe_shop",
    "s/shopfront", "s/shower", "s/ski_resort", "s/ski_slope", "s/sky",
    "s/skyscraper", "s/slum", "s/staircase", "s/supermarket", "s/swamp",
    "t/topiary_garden", "t/tower", "t/train_station", "t/tree_farm", "t/trench",
    "v/valley", "v/vegetable_garden", "v/veranda", "v/viaduct", "v/volcano",
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
# colour family 0 is the first ten classes' random colours, families 1-9 one hue each
NUM_FAMILIES = 10
MAX_CLASSES = len(CLASS_TEXTURES) * NUM_FAMILIES             # 100, as MiniPlaces
SEQUENTIAL_MAX_CLASSES = len(CLASS_TEXTURES)  # up to here, one random stream in order
MARKER = "DEMO_README.txt"     # marks a folder written by this script (safe to overwrite)
JPEG = [cv2.IMWRITE_JPEG_QUALITY, 92]
CHUNK = 256                    # images per task of a writing process


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


def hsv_colour(hue, saturation, value):
    """An RGB float32 colour (0-255) from a hue in degrees, saturation and value in [0, 1]."""
    hsv = np.array([[[hue % 360.0, saturation, value]]], np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0


def family_colour_pair(rng, family):
    """A dark and a light colour of family 1-9: one hue (40 degrees between families, +-8
    drawn), both saturated (>= 0.7); random_colour_pair's light colours stay below 0.39.
    The contrast is as strong as random_colour_pair's."""
    hue = (family - 1) * 360.0 / (NUM_FAMILIES - 1) + rng.uniform(-8, 8)
    dark = hsv_colour(hue, rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.4))
    light = hsv_colour(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def render_image(rng, label, size):
    """One RGB uint8 image of class `label` (0-99): texture label % 10 in colour family
    label // 10. Classes 0-9 draw exactly what they always drew."""
    pattern, period = CLASS_TEXTURES[label % len(CLASS_TEXTURES)]
    family = label // len(CLASS_TEXTURES)
    period = max(3.0, period * size / 128.0)            # keep stripes >= 3 px at small sizes
    mask = texture_mask(rng, pattern, period, size)[:, :, None]
    a, b = random_colour_pair(rng) if family == 0 else family_colour_pair(rng, family)
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
    `what` wrote it); then clear `files` (train.txt, the mark of a complete set, first)
    and images/: a set cut short here never looks complete. Shared with make_real_data.py."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, marker)):
            raise ValueError(f"{out_dir} is not empty and holds no {what} ({marker} "
                             f"missing); refusing to overwrite it")
        for name in files:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        shutil.rmtree(os.path.join(out_dir, "images"), ignore_errors=True)
        safe_files.remove_dead_temp_files(out_dir)  # label files of a killed writer
    os.makedirs(out_dir, exist_ok=True)


def write_text(path, lines):
    # written atomically (safe_files.py), so a crash never leaves half a label file
    safe_files.atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines)))


def estimated_image_bytes(size, block=4096):
    """Disk bytes of one JPEG of size x size, as measured at quality 92: about 700 bytes
    of headers and 0.6 per pixel (9.1 KB at 128 px, 1.3 KB at 32 px), in whole blocks."""
    return math.ceil((700 + 0.6 * size * size) / block) * block


def folder_bytes(folder):
    """Disk bytes of the files under `folder` (0 if it does not exist)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def check_disk_space(out_dir, num_images, size):
    """Refuse (ValueError, one line) a set that will not fit on the disk, before anything
    is written. The images of a previous demo set in out_dir count as free: they are
    deleted first."""
    need = num_images * (estimated_image_bytes(size) + 64)   # + its lines in the label files
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if os.path.isfile(os.path.join(out_dir, MARKER)):
        free += folder_bytes(os.path.join(out_dir, "images"))
    if need > free:
        raise ValueError(f"{num_images} images of {size}x{size} need about {need / 1e9:.2f} GB "
                         f"but {existing} has {free / 1e9:.2f} GB free: free some space or "
                         f"ask for fewer images")


def save_image(out_dir, rel_path, rgb):
    path = os.path.join(out_dir, "images", rel_path)
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), JPEG):
        raise OSError(f"could not write {path}")


def write_chunk(task):
    """Write a run of images, each from its own generator (seed, split, number); returns
    how many. A task of a writing process: it depends on nothing but its arguments."""
    out_dir, size, seed, split, first, jobs = task
    for number, (rel_path, label) in enumerate(jobs, start=first):
        rng = np.random.default_rng([seed, split, number])
        save_image(out_dir, rel_path, render_image(rng, label, size))
    return len(jobs)


def write_images(out_dir, jobs, size, bar, rng=None, seed=0, split=0, workers=1):
    """Write `jobs`, [(path under images/, label)], counting them on the progress bar:
    all from the one generator `rng`, in order, or else each from its own generator
    (write_chunk), in `workers` processes."""
    for folder in sorted({os.path.dirname(rel_path) for rel_path, _ in jobs}):
        os.makedirs(os.path.join(out_dir, "images", folder), exist_ok=True)
    if rng is not None:
        for rel_path, label in jobs:
            save_image(out_dir, rel_path, render_image(rng, label, size))
            bar.update(1)
        return
    tasks = [(out_dir, size, seed, split, first, jobs[first:first + CHUNK])
             for first in range(0, len(jobs), CHUNK)]
    if workers <= 1:
        for task in tasks:
            bar.update(write_chunk(task))
        return
    # Ctrl-C reaches every process of the terminal's group: the writers ignore it, and this
    # process stops them (the pool's exit terminates them) and says so in one line
    with multiprocessing.Pool(workers, initializer=signal.signal,
                              initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        # an error in a writing process is raised here
        for done in pool.imap_unordered(write_chunk, tasks):
            bar.update(done)


def check_settings(num_classes, train_per_class, val_per_class, size, seed, workers):
    """Refuse (ValueError, one line naming the flag) a setting the writing would fail on,
    before anything is deleted or written."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--num-classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    for flag, value in (("--train-per-class", train_per_class),
                        ("--val-per-class", val_per_class), ("--workers", workers)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if size < 16:
        raise ValueError(f"--size must be at least 16 pixels, got {size}")
    if seed < 0:  # numpy's generators take no negative seed
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")


def make_demo_dataset(out_dir, num_classes=10, train_per_class=100, val_per_class=20,
                      size=128, seed=0, workers=1, progress=False):
    """Write the demo set to out_dir; deterministic given `seed` (whatever `workers`).
    `progress`: a progress line on stderr. Returns {"train": n_train, "val": n_val}."""
    check_settings(num_classes, train_per_class, val_per_class, size, seed, workers)
    num_train, num_val = num_classes * train_per_class, num_classes * val_per_class
    check_disk_space(out_dir, num_train + num_val, size)
    prepare_out_dir(out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        f.write(f"Synthetic demo set written by tools/make_demo_data.py: num_classes={num_classes} "
                f"train_per_class={train_per_class} val_per_class={val_per_class} "
                f"size={size} seed={seed}\n{__doc__}")
    rng = np.random.default_rng(seed)
    # up to ten classes: every image from `rng`, in order (the demo set's files as they
    # always were); more: each image from its own generator, in several processes
    stream = rng if num_classes <= SEQUENTIAL_MAX_CLASSES else None
    write = dict(size=size, rng=stream, seed=seed, workers=workers)
    train_jobs = [(f"train/{CLASS_NAMES[label]}/{i:08d}.jpg", label)
                  for label in range(num_classes) for i in range(1, train_per_class + 1)]
    with tqdm(total=num_train + num_val, desc="make_demo_data", unit=" images",
              file=sys.stderr, mininterval=0.5, disable=not progress) as bar:
        write_images(out_dir, train_jobs, bar=bar, split=0, **write)
        # validation images are numbered in a shuffled class order, as in MiniPlaces
        val_labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
        val_jobs = [(f"val/{i:08d}.jpg", int(label)) for i, label in enumerate(val_labels, 1)]
        write_images(out_dir, val_jobs, bar=bar, split=1, **write)
    # the label files only now, train.txt last: an interrupted set has no train.txt
    train_lines = [f"{rel_path} {label}" for rel_path, label in train_jobs]
    val_lines = [f"{rel_path} {label}" for rel_path, label in val_jobs]
    return write_label_files(out_dir, CLASS_NAMES[:num_classes], train_lines, val_lines)


def write_label_files(out_dir, class_names, train_lines, val_lines):
    """categories.txt, val.txt, then train.txt: written last, it marks a complete set."""
    write_text(os.path.join(out_dir, "categories.txt"),
               [f"/{name} {c}" for c, name in enumerate(class_names)])
    write_text(os.path.join(out_dir, "val.txt"), val_lines)
    write_text(os.path.join(out_dir, "train.txt"), train_lines)
    return {"train": len(train_lines), "val": len(val_lines)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic MiniPlaces-like demo set.")
    parser.add_argument("out_dir",
                        help="folder to write (created; a previous demo set is replaced)")
    parser.add_argument("--num-classes", type=int, default=10,
                        help=f"2 to {MAX_CLASSES} (MiniPlaces: 100)")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing a set of more than 10 classes (default: one "
                             "per core; the files do not depend on it)")
    args = parser.parse_args(argv)
    try:
        counts = make_demo_dataset(args.out_dir, args.num_classes, args.train_per_class,
                                   args.val_per_class, args.size, args.seed, args.workers,
                                   progress=True)
    except (ValueError, OSError) as e:
        sys.exit(f"make_demo_data.py: error: {e}")
    except KeyboardInterrupt:  # train.txt comes last: what was written is no complete set
        complete = os.path.isfile(os.path.join(args.out_dir, "train.txt"))
        print(f"\nmake_demo_data.py: interrupted; " + (
            f"{args.out_dir} still holds a complete set" if complete else
            f"{args.out_dir} holds no complete set (no train.txt): run it again"),
            file=sys.stderr)
        sys.exit(130)
    print(f"wrote {counts['train']} train + {counts['val']} val JPEG images "
          f"({args.size}x{args.size}, {args.num_classes} classes) to {args.out_dir}/images, "
          f"with train.txt, val.txt and categories.txt")


if __name__ == "__main__":
    main()
