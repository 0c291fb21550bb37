"""The scale benchmark: the input pipeline at MiniPlaces' size, and what the handout's
60-epoch run would take (`python tools/benchmark.py scale`).

The other benchmarks run on a thousand images; this one measures what grows with the
data set, at several sizes up to MiniPlaces' 110,000 images: the decoded cache (build
time, bytes on disk), a full training epoch of each input path as main.py builds it
(loaders.build_loaders, no model), a validation pass, and the memory of the main process
and of every DataLoader worker as proportional set size (PSS, from /proc; Linux). PSS
divides each page among the processes that map it, so the memory-mapped cache that the
workers share counts once, and a worker holding a copy of its own would show it as
private memory.
"""
import math
import os
import time
from statistics import median

from benchmarks.bench_recipe import REPO, RecipeError
from benchmarks.bench_timing import interleaved_times, machine, sync
from benchmarks.bench_scale_tables import (MB, PRIVATE, assumptions, growth_table, private_copy,
                                           projection, size_table, split_counts, worker_peak)

SCALE_SIZES = [10000, 30000, 110000]   # images, training + validation
VAL_BATCH = 100                        # main.py's validation batch (loaders.build_loaders)
# seconds between memory samples in an epoch: reading smaps_rollup walks a process's page
# tables, 30-40 ms for a process with torch loaded on a busy 2-core machine
SAMPLE_INTERVAL = 2.0





# ---------------------------------------------------------------- the data
def scale_data(args):
    """The data folder: --data, or data/scale, where a set of --classes classes as large
    as the largest of --sizes is written (make_demo_data.py) if it holds no train.txt."""
    from make_demo_data import make_demo_dataset
    data = args.data or os.path.join(REPO, 'data', 'scale')
    if os.path.isfile(os.path.join(data, 'train.txt')):
        return data
    train, val = split_counts(max(args.sizes))
    per_class = (math.ceil(train / args.classes), math.ceil(val / args.classes))
    print(f'scale: writing {args.classes} classes x ({per_class[0]} + {per_class[1]}) '
          f'images of {args.image_size} px into {data} (make_demo_data.py; once)', flush=True)
    try:
        make_demo_dataset(data, args.classes, *per_class, size=args.image_size, seed=0,
                          workers=max(1, args.workers), progress=True)
    except (ValueError, OSError) as e:
        raise RecipeError(f'make_demo_data.py: {e}') from None
    return data


def read_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def subset_folder(data, total):
    """DATA/subsets/<total>/: train.txt and val.txt listing `total` of DATA's images (10
    training to 1 validation image; the training images spread evenly over the classes),
    and images/, a link to DATA/images. The caches of the subset are built inside it."""
    from make_demo_data import write_text
    n_train, n_val = split_counts(total)
    train = read_lines(os.path.join(data, 'train.txt'))
    val = read_lines(os.path.join(data, 'val.txt'))
    if n_train > len(train) or n_val > len(val):
        raise RecipeError(f'{data} holds {len(train)} + {len(val)} images, fewer than the '
                          f'{n_train} + {n_val} of size {total}: delete it (a set that large '
                          f'is then written) or give another --data folder')
    # the k-th image of every class before the (k+1)-th of any, in the label file's order
    seen, ranked = {}, []
    for line in train:
        label = line.rsplit(None, 1)[1]
        ranked.append((seen.get(label, 0), int(label), line))
        seen[label] = seen.get(label, 0) + 1
    chosen = {line for _, _, line in sorted(ranked)[:n_train]}
    folder = os.path.join(data, 'subsets', str(total))
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, 'train.txt'), [line for line in train if line in chosen])
    write_text(os.path.join(folder, 'val.txt'), val[:n_val])
    if not os.path.islink(os.path.join(folder, 'images')):
        os.symlink(os.path.join(os.pardir, os.pardir, 'images'), os.path.join(folder, 'images'))
    return folder


def cache_files(folder):
    from toolkit import data_cache
    return [p for split in ('train', 'val') for p in data_cache.cache_paths(folder, split)]


def build_caches(folder, workers):
    """(seconds, bytes on disk) of decoding both splits of `folder` into their caches, as
    a first run with --data-cache does (an old cache is removed first)."""
    from toolkit import data_cache
    remove_caches(folder)
    start = time.perf_counter()
    for split in ('train', 'val'):
        data_cache.load_or_build_cache(folder, split, workers=workers)
    seconds = time.perf_counter() - start
    return seconds, sum(os.stat(p).st_blocks * 512 for p in cache_files(folder))


def remove_caches(folder):
    for path in cache_files(folder):
        if os.path.exists(path):
            os.remove(path)


# ---------------------------------------------------------------- memory
def read_memory(pid):
    """(PSS, private bytes) of process `pid` from /proc/PID/smaps_rollup, or None once it
    has exited (or without /proc). PSS: every page divided by the number of processes
    that map it, so that summed over processes each page counts once. Private:
    Private_Dirty, the pages only this process has written (its own copies)."""
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            lines = f.read().splitlines()[1:]      # the first line is the address range
    except OSError:
        return None
    kb = {}
    for line in lines:
        name, _, value = line.partition(':')
        kb[name] = int(value.split()[0])
    return kb['Pss'] * 1024, kb['Private_Dirty'] * 1024


def child_pids(pid):
    """The processes that `pid`'s threads started (the DataLoader workers)."""
    pids = set()
    for task in os.listdir(f'/proc/{pid}/task'):
        try:
            with open(f'/proc/{pid}/task/{task}/children') as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:      # a thread that ended, or a kernel without the file
            pass
    return sorted(pids)


class MemoryPeaks:
    """Peak PSS of this process (`main`), of each child process (`workers`: pid -> (peak
    PSS, peak private bytes)) and of all together at one moment (`total`), over samples
    that sample() takes between batches, at most every SAMPLE_INTERVAL seconds unless
    forced. A spike shorter than the interval can be missed; `seconds` is the time the
    sampling itself took."""

    def __init__(self):
        self.main = self.total = self.samples = 0
        self.workers = {}
        self.seconds, self._last = 0.0, -math.inf

    def sample(self, force=False):
        now = time.perf_counter()
        if not force and now - self._last < SAMPLE_INTERVAL:
            return
        self._last = now
        own = read_memory(os.getpid())
        if own is None:      # no /proc here: nothing to report
            return
        self.main, total = max(self.main, own[0]), own[0]
        for pid in child_pids(os.getpid()):
            found = read_memory(pid)
            if found is not None:
                pss, private = self.workers.get(pid, (0, 0))
                self.workers[pid] = (max(pss, found[0]), max(private, found[1]))
                total += found[0]
        self.total = max(self.total, total)
        self.samples += 1
        self.seconds += time.perf_counter() - now


# ---------------------------------------------------------------- one size
def timed_pass(loader, device, peaks=None):
    """(images, seconds) of one full pass over `loader`, with memory samples between
    batches: always at the first and the last batch, while the workers live."""
    start = time.perf_counter()
    images, last = 0, len(loader) - 1
    for i, (_, target) in enumerate(loader):
        images += len(target)
        if peaks is not None:
            peaks.sample(force=i in (0, last))
    sync(device)
    return images, time.perf_counter() - start


def default_cnn_name():
    """The --arch name of student_code.default_cnn_model, whose speed settings apply."""
    import student_code as sc
    from toolkit.run_plan import registry_name
    return registry_name(sc.default_cnn_model, sc.cnn_models, 'default_cnn_model')


def measure_path(folder, path, args, device):
    """One training epoch and one validation pass of `path` ('cached' or 'per-image')
    over `folder`, through the loaders main.py builds (its default memory format on this
    device; batches normalized on arrival), with the memory sampled during the epoch."""
    from toolkit import loaders
    from toolkit.run_plan import plan_from_argv
    plan, datasets = plan_from_argv(
        [folder, '-b', str(args.batch_size), '-j', str(args.workers), '--seed', '0',
         '--data-cache' if path == 'cached' else '--no-data-cache'], device)
    train_loader, val_loader = loaders.build_loaders(plan, device, datasets)
    loaders.seed_epoch(0, 0, train_loader)
    peaks = MemoryPeaks()
    images, seconds = timed_pass(train_loader, device, peaks)
    val_images, val_seconds = timed_pass(val_loader, device)
    return dict(images=images, seconds=seconds, val_images=val_images,
                val_seconds=val_seconds, peaks=peaks)


def measure_size(data, total, args, device):
    """Every figure of one size: the caches' build, then each path's epoch and pass."""
    from toolkit import data_cache
    folder = None
    try:
        folder = subset_folder(data, total)
        build_s, cache_bytes = build_caches(folder, args.workers)
        train_cache = data_cache.cache_paths(folder, 'train')[0]
        result = dict(total=total, build_s=build_s, cache_bytes=cache_bytes,
                      train_cache_bytes=os.path.getsize(train_cache))
        print(f'  {total:,} images: caches built in {build_s:.1f} s (-j {args.workers}), '
              f'{cache_bytes / MB:,.0f} MB on disk', flush=True)
        for path in ('cached', 'per-image'):
            result[path] = measure_path(folder, path, args, device)
            print('    ' + path_line(path, result[path]), flush=True)
    except (ValueError, OSError) as e:       # DatasetError, UsageError, a full disk
        from utils import one_line
        raise RecipeError(one_line(e)) from None
    finally:
        if folder is not None and not args.keep_caches:
            remove_caches(folder)
    return result


def path_line(path, m):
    """One path's figures as they are measured, every worker's peaks among them."""
    peaks = m['peaks']
    workers = ' / '.join(f'{pss / MB:.0f} ({private / MB:.0f})'
                         for pss, private in peaks.workers.values()) or 'none'
    epoch = max(m['seconds'], 1e-9)
    return (f"{path}: {m['images']:,} training images in {m['seconds']:.1f} s "
            f"({m['images'] / epoch:,.0f} images/s), {m['val_images']:,} validation images "
            f"in {m['val_seconds']:.1f} s; PSS MB: main {peaks.main / MB:.0f}, workers "
            f"(private) {workers}, all {peaks.total / MB:.0f} ({peaks.samples} samples, "
            f"{100 * peaks.seconds / epoch:.1f} % of the epoch)")


# ---------------------------------------------------------------- the model
def model_times(args, device):
    """(seconds of one training step of the default CNN at --batch-size, seconds of the
    validation of one image), medians of --repeats interleaved calls. The step is
    benchmark.py step's (bench_speed.bench_step), in main.py's default speed settings on
    this device; validation is main.py's: eval mode, no gradient, each image and its
    mirror image (utils.predict_with_flip), at main.py's batch of 100 or less."""
    import torch
    import torch.nn as nn
    import student_code as sc
    from toolkit.speed import amp_dtype_for, auto_speed_settings
    from utils import predict_with_flip
    settings = auto_speed_settings(device, default_cnn_name())
    amp, channels_last = settings['amp'][0], settings['channels_last'][0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = getattr(torch, amp_dtype_for(device))
    torch.manual_seed(0)
    model = sc.default_cnn_model(num_classes=100).to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, 128, 128, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    val_x = x[:min(VAL_BATCH, args.batch_size)]

    def step():
        model.train()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def validate():
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            predict_with_flip(model, val_x)

    times = interleaved_times({'step': step, 'val': validate}, device, args.repeats)
    print(f'  default CNN, batch {args.batch_size}, amp {"on" if amp else "off"}, '
          f'channels-last {"on" if channels_last else "off"}: training step '
          f'{median(times["step"]) * 1000:,.0f} ms, validation of {len(val_x)} images '
          f'(with their mirror images) {median(times["val"]) * 1000:,.0f} ms '
          f'(medians of {args.repeats})', flush=True)
    return median(times['step']), median(times['val']) / len(val_x)


def bench_scale(args):
    """The input pipeline at MiniPlaces' size: a set of --classes classes (made with
    make_demo_data.py in --data, default data/scale, if absent), measured at --sizes
    images (training + validation, 10 to 1) in DATA/subsets/<size>: the decoded caches'
    build time with -j workers and bytes on disk; one full training epoch of the cached
    and of the per-image path through loaders.build_loaders (batch --batch-size, as
    main.py builds them, no model), with peak PSS of the main process and of each
    DataLoader worker (/proc/PID/smaps_rollup, sampled every 2 s; Linux) and whether a
    worker holds a private copy of the cache; a validation pass of each; each figure per
    image and its growth with the image count. Then a training step of the default CNN
    (--repeats) and the projected wall time of the handout's 60-epoch run on this
    machine, and on one GPU on paper (--gpu-step-ms, an estimate). Prints markdown
    tables for docs/benchmarks.md. The caches are removed afterwards (--keep-caches)."""
    import cv2
    import torch
    device = torch.device(args.device)
    sizes = sorted(set(args.sizes))
    too_small = [n for n in sizes if split_counts(n)[0] < args.batch_size or
                 split_counts(n)[1] < 1]
    if too_small:
        raise RecipeError(f'size {too_small[0]} holds fewer training images than one batch '
                          f'of {args.batch_size} (or no validation image)')
    data = scale_data(args)
    print(f'scale benchmark: {data}, sizes {", ".join(f"{n:,}" for n in sizes)} images, '
          f'batch {args.batch_size}, -j {args.workers}, {machine(device)}, '
          f'torch {torch.__version__}, OpenCV {cv2.__version__}', flush=True)
    results = [measure_size(data, n, args, device) for n in sizes]
    step_s, val_s = model_times(args, device)
    print('\n' + '\n'.join(size_table(results)))
    print('\n' + '\n'.join(growth_table(results)))
    print('\n' + '\n'.join(projection(results, step_s, val_s, args, device)))
    print('\n' + '\n'.join(assumptions(results, args)))
    largest = results[-1]
    private = {path: (worker_peak(largest[path], PRIVATE) or 0) / MB
               for path in ('cached', 'per-image')}
    print(f"\nA private copy of the cache in a worker at {largest['total']:,} images: "
          f"{private_copy(largest)} (training cache {largest['train_cache_bytes'] / MB:,.0f} "
          f"MB; a worker's private memory: cached path {private['cached']:,.0f} MB, "
          f"per-image path {private['per-image']:,.0f} MB)")
    return results
