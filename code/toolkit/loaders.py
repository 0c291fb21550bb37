"""The data loaders of a run: the datasets and their class count, the per-image path
(custom_dataloader + student_code's transforms in DataLoader workers) or the cached
path (fast_data: decoded once, one fused warp per image), and batches that arrive on
the device normalized and in the run's memory format (OnDevice).

The training order and every image's augmentation depend on (seed, epoch) only
(data_order.TrainOrder), so a resumed run, and a run on any number of processes or
workers, sees the same batches.
"""
import functools
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit import distributed
from toolkit import data_cache
from toolkit import data_order
from toolkit import fast_data
import custom_transforms as T
from custom_dataloader import DatasetError, MiniPlacesLoader, load_image, seed_worker
from toolkit.distributed import world
from toolkit.speed import memory_format
from student_code import get_train_transforms, get_val_transforms
from utils import CheckpointError, ToolkitError, UsageError, one_line

def seed_everything(seed):
    """Seed every generator the training touches (python, numpy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def train_size(plan, epoch, full):
    """The side of the training batches in `epoch` (0-based), for batches of full x full
    pixels from the transforms: --image-size (else full), and under --min-train-size from
    that minimum in the first epoch linearly up to it in the last. A multiple of 8 while
    it grows, and a function of the epoch only, so a resumed run trains at the sizes of an
    uninterrupted one. None: as the transforms made them (neither flag given)."""
    if not plan.image_size and not plan.min_train_size:
        return None
    top = plan.image_size or full
    if not plan.min_train_size or plan.epochs == 1 or epoch >= plan.epochs - 1:
        return top
    size = plan.min_train_size + (top - plan.min_train_size) * epoch / (plan.epochs - 1)
    return min(top, max(8, int(round(size / 8)) * 8))


def val_size(plan, full):
    """The side of the validation batches (training and -e/-a alike): --image-size, else
    the transforms' own (None)."""
    return plan.image_size or None


def seed_epoch(seed, epoch, train_loader):
    """The training order and every image's augmentation depend only on (seed, epoch)
    (data_order.TrainOrder); the process's own generators (dropout, PGD's random starts)
    on (seed, epoch, rank). So a resumed run replays exactly what an uninterrupted one
    does."""
    seed_everything(seed * 1000 + epoch + (1 << 40) * world().rank)
    train_loader.sampler.set_epoch(seed, epoch)


def load_datasets(data_folder, train=True):
    """{'train': ..., 'val': ...} (no 'train' for -e/-a), each a MiniPlacesLoader with the
    run's transforms; their labels are checked by class_count."""
    datasets = {'val': MiniPlacesLoader(data_folder, split='val',
                                        transforms=get_val_transforms(), num_classes=None)}
    if train:
        datasets['train'] = MiniPlacesLoader(data_folder, split='train',
                                             transforms=get_train_transforms(),
                                             num_classes=None)
    return datasets


# a class count the data can support: one with an image each at most, and at least this
# many (a small subset of a 100- or 1000-class set keeps its class count)
MIN_CLASS_LIMIT = 1000


def class_limit(datasets):
    """The largest class count the data can support: no more classes than images (of
    the training set, or of the validation set for -e/-a), and MIN_CLASS_LIMIT anyway.
    Beyond it a label is a typo, and its count would be allocated (the classifier's
    outputs) before anything else could say so."""
    images = datasets['train'] if 'train' in datasets else datasets['val']
    return max(len(images), MIN_CLASS_LIMIT), f'{len(images)} {images.split} images'


def line_of_label(dataset, label):
    """The number of the first line of the dataset's label file with `label`."""
    label_file = os.path.join(dataset.root_folder, dataset.split + '.txt')
    with open(label_file, encoding='utf-8-sig') as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if fields and fields[-1].lstrip('0') == str(label).lstrip('0'):
                return line_no
    return None


def class_count(requested, source, datasets):
    """The class count: `requested` (given by `source`: '--num-classes' or the checkpoint's
    words), else the largest label + 1 of the label files. Fewer outputs than labels is
    refused, more is warned about, and so are classes without a training image. A label
    or a count beyond what the data can support (class_limit) is refused before anything
    of that size is allocated, whichever path the count came by."""
    labels = {name: set(ds.label_list) for name, ds in datasets.items()}
    needed = max(max(found) for found in labels.values()) + 1
    limit, images = class_limit(datasets)
    if needed > limit:
        name = next(n for n, found in labels.items() if max(found) == needed - 1)
        line_no = line_of_label(datasets[name], needed - 1)
        raise DatasetError(f"{name}.txt, line {line_no}: label {needed - 1} is far beyond what "
                           f"the data can support ({images}: at most {limit} classes); a typo?")
    if requested is None:
        print(f'=> {needed} classes (the largest label in the label files is {needed - 1})')
        requested = needed
    elif requested > limit and source == '--num-classes':
        raise UsageError(f"--num-classes {requested} is more than the data can support "
                         f"({images}: at most {limit} classes)")
    elif requested > limit:
        raise CheckpointError(f"{source} gives {requested} classes, more than the data can "
                              f"support ({images}: at most {limit} classes)")
    elif requested < needed:
        name = next(n for n, found in labels.items() if max(found) >= requested)
        raise UsageError(f"{source} gives {requested} classes, but {name}.txt has label "
                         f"{max(labels[name])}: the model needs at least {needed} outputs")
    elif requested > needed:
        print(f'warning: {source} gives {requested} classes but the labels use only '
              f'0..{needed - 1}: the extra outputs are never trained (and PGD targets them '
              f'as the least-confident labels)')
    if 'train' in labels:
        missing = sorted(set(range(needed)) - labels['train'])
        if missing:
            shown = ', '.join(map(str, missing[:10])) + (', ...' if len(missing) > 10 else '')
            print(f'warning: train.txt has no image of {len(missing)} of the labels '
                  f'0..{needed - 1} ({shown}): the model can never learn them')
    return requested


class OnDevice(object):
    """A loader whose batches arrive on the device, ready for the model: images as
    normalized float32 batches in the run's memory format, labels beside them. uint8
    batches (what the workers hand over: a quarter of the bytes of float32) are normalized
    here as ToTensor + Normalize would have done in the worker, x / 255 then (x - mean) / std,
    in that order, so fp32 training is bit for bit what it was with the float hand-over
    (fast_data.normalize_on_device folds them into one multiply-add: last-bit differences)."""

    def __init__(self, loader, device, normalization, fmt):
        self.loader, self.device, self.fmt = loader, device, fmt
        self.size_for = None        # full side -> the side to resize to (None: as is)
        self.mean = self.std = None
        if normalization is not None:
            mean, std = normalization
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
            self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]

    @property
    def device_bytes(self):
        """Bytes of the decoded cache this loader holds in the device's memory (the GPU
        path of --data-cache; 0 otherwise)."""
        images = getattr(self.loader, 'images', None)
        return images.nbytes if torch.is_tensor(images) else 0

    @property
    def sampler(self):  # the TrainOrder of a training loader, set by seed_epoch
        return self.loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        # asynchronous copies only from CUDA's pinned memory: from pageable memory the
        # source may be freed before an MPS copy has read it
        non_blocking = self.device.type == 'cuda'
        for input, target in self.loader:
            input = input.to(self.device, non_blocking=non_blocking)
            raw = input.dtype == torch.uint8
            if raw:
                input = input.float()
            size = self.size_for(input.shape[-1]) if self.size_for else None
            if size is not None and tuple(input.shape[-2:]) != (size, size):
                # one resize of the whole batch, antialiased when it shrinks (the cached
                # path's warp and the per-image transforms stay as they are). Before the
                # normalization: a linear resize commutes with it (last-bit differences),
                # which then runs on the smaller batch (docs/benchmarks.md, "The fast recipe")
                input = torch.nn.functional.interpolate(
                    input, size=(size, size), mode='bilinear',
                    antialias=size < input.shape[-1], align_corners=False)
            if raw:
                input = input.div_(255.0)
                if self.mean is not None:
                    input = (input - self.mean) / self.std
            yield (input.contiguous(memory_format=self.fmt),
                   target.to(self.device, non_blocking=non_blocking))


# The per-image path's hand-over: its workers send uint8 images (a quarter of the bytes
# of float32) and OnDevice normalizes them on the device, as the cached path does
class ToUint8Tensor:
    """H x W x C uint8 image -> C x H x W uint8 tensor (no scaling: that is done on the
    device by OnDevice)."""

    def __call__(self, img):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise TypeError(f'ToUint8Tensor expects a uint8 numpy image, got '
                            f'{getattr(img, "dtype", type(img).__name__)}: a transform before '
                            f'it returns another type; the uint8 hand-over cannot be used')
        if img.ndim == 2:
            img = img[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def __repr__(self):
        return f'{self.__class__.__name__}()'


def uint8_transforms(transforms):
    """(transforms ending in ToUint8Tensor instead of ToTensor [+ Normalize], mean, std)
    for the per-image path's workers, or None when the pipeline does not end that way."""
    items = list(getattr(transforms, 'transforms', ()))
    if items and type(items[-1]) is T.Normalize:
        items, (mean, std) = items[:-1], (items[-1].mean, items[-1].std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if type(transforms) is not T.Compose or not items or type(items[-1]) is not T.ToTensor:
        return None
    try:            # the hand-over stands in for the shipped ToTensor and Normalize
        fast_data.check_shipped([('ToTensor', T.ToTensor), ('Normalize', T.Normalize)])
    except fast_data.Unsupported:
        return None
    return T.Compose(items[:-1] + [ToUint8Tensor()]), list(mean), list(std)


def uint8_handover(dataset):
    """(uint8 transforms, (mean, std)) for a per-image dataset's workers, or None where its
    transforms do not end in ToTensor [+ Normalize] or a step before them yields no uint8
    image (tried on the first image, the random state put back afterwards)."""
    found = uint8_transforms(dataset.transforms)
    if found is None:
        return None
    transforms, mean, std = found
    state = random.getstate(), np.random.get_state()
    try:
        transforms(load_image(os.path.join(dataset.img_folder, dataset.file_list[0])))
    except TypeError:
        return None
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    return transforms, (mean, std)


def cache_refusal(data_folder, rebuild, splits, datasets):
    """Why the cached path cannot be used (printed as a note), or None. splits: {split:
    its transforms}; datasets: {split: its MiniPlacesLoader}; rebuild: --rebuild-cache."""
    for split, transforms in splits.items():
        supported, reason = fast_data.fused_path_supported(transforms)
        if not supported:
            return f'get_{split}_transforms(): {reason}'
    if data_cache.cache_writable(data_folder):
        return None             # a missing or stale cache is (re)built
    # read-only: usable only where every cache is there and fresh (the same check the
    # cached path makes first: one stat per image)
    if rebuild:
        return f'{data_folder} is read-only: --rebuild-cache cannot rebuild its cache'
    for split in splits:
        problem = data_cache.cache_problem(data_folder, split, dataset=datasets[split])
        if problem == 'missing':
            return f'{data_folder} is read-only and holds no cache of {split}'
        if problem is not None:
            return f'{data_folder} is read-only and its cache of {split} is stale ({problem})'
    return None


def cached_loader(plan, device, dataset, transforms, **kw):
    """A loader of the decoded cache: on CUDA whole batches warped on the GPU (DeviceLoader,
    the cache in GPU memory), elsewhere DataLoader workers warping uint8 with OpenCV."""
    # several processes: rank 0 builds a missing cache (or rebuilds it with
    # --rebuild-cache), the others then read it
    rebuild = plan.rebuild_cache and world().rank == 0
    split = dataset.split
    cache = distributed.rank0_first(lambda: data_cache.load_or_build_cache(
        plan.data_folder, split, workers=plan.workers, rebuild=rebuild, dataset=dataset))
    if device.type == 'cuda':
        try:
            loader = fast_data.DeviceLoader(cache, transforms, device, **kw)
            return OnDevice(loader, device, None, memory_format(plan))
        except ToolkitError as exc:  # no room for it in GPU memory
            print(f'note: {one_line(exc)}; the {split} cache stays in host memory')
    dataset = fast_data.CachedDataset(cache, transforms)
    loader = DataLoader(dataset, num_workers=plan.workers, pin_memory=device.type == 'cuda',
                        worker_init_fn=seed_worker, **kw)
    return OnDevice(loader, device, dataset.normalization, memory_format(plan))


def per_image_loader(plan, device, dataset, **kw):
    handover = uint8_handover(dataset)
    if handover is not None:
        dataset.transforms = handover[0]
    if isinstance(kw['sampler'], data_order.TrainOrder):  # (index, seed) pairs
        dataset = data_order.SeededSamples(dataset)
    loader = DataLoader(dataset, num_workers=plan.workers, pin_memory=device.type == 'cuda',
                        worker_init_fn=seed_worker, **kw)
    return OnDevice(loader, device, handover and handover[1], memory_format(plan))


def cache_fallback(data_folder, rebuild, datasets, asked):
    """Why the cached path cannot serve the run (the run then takes the per-image path,
    and one note says so), or None where it can. A cache that does not fit on the disk is
    left out when the cache was on by default, and refused when it was `asked` for (or is
    the resumed run's). datasets: {split: its MiniPlacesLoader}, 'val' and, for training,
    'train'."""
    splits = {'val': get_val_transforms()}
    if 'train' in datasets:
        splits['train'] = get_train_transforms()
    refusal = cache_refusal(data_folder, rebuild, splits, datasets)
    if refusal is None:
        refusal = data_cache.build_shortfall(data_folder, list(splits), rebuild=rebuild,
                                             datasets=datasets)
        if refusal is not None and asked:
            raise DatasetError(f'--data-cache: {refusal}: free some space or run with '
                               f'--no-data-cache')
    if refusal is not None:
        print(f"note: {'--data-cache was asked for, but ' if asked else ''}{refusal}; this "
              f"run uses the per-image path")
    return refusal


def train_transforms(strength):
    """get_train_transforms(), its augmentation scaled by --augment: RandomRotate's angle
    and RandomColor's range times `strength`, and the part of the image RandomSizedCrop
    may cut away (1 - its smallest area) too. The parameters are those the classes' own
    __init__ sets, so both input paths follow them (the fused path reads them)."""
    transforms = get_train_transforms()
    if strength == 1:
        return transforms
    for t in getattr(transforms, 'transforms', ()):
        if isinstance(t, T.RandomRotate):
            t.degree_range = t.degree_range * strength
        elif isinstance(t, T.RandomColor):
            t.color_range = t.color_range * strength
        elif isinstance(t, T.RandomSizedCrop):
            low, high = t.area_range
            t.area_range = (min(high, max(0.01, 1 - (1 - low) * strength)), high)
    return transforms


def build_loaders(plan, device, datasets):
    """(train loader or None, val loader), both yielding this process's batches on the
    device: the cached path (fast_data) with plan.data_cache, else the per-image path.
    The training order is a TrainOrder (set each epoch by seed_epoch), validation this
    process's share of the images (data_order.py)."""
    train_set, val_set = datasets.get('train'), datasets['val']
    val_kw = dict(batch_size=plan.val_batch_size, sampler=data_order.val_share(len(val_set)))
    if train_set is not None:
        order = data_order.TrainOrder(len(train_set), plan.batch_size)
        train_kw = dict(batch_size=order.share, sampler=order)
        transforms = train_transforms(plan.augment)
        if plan.augment != 1:   # --augment: the per-image path's transforms too
            train_set.transforms = transforms
    if plan.data_cache:
        val_loader = cached_loader(plan, device, val_set, get_val_transforms(), **val_kw)
        train_loader = None if train_set is None else \
            cached_loader(plan, device, train_set, transforms, **train_kw)
    else:
        val_loader = per_image_loader(plan, device, val_set, **val_kw)
        train_loader = None if train_set is None else \
            per_image_loader(plan, device, train_set, **train_kw)
    val_loader.size_for = functools.partial(val_size, plan)   # --image-size
    return train_loader, val_loader


# images per validation batch (all of a process's share of the validation set, for
# training and for -e/-a alike)
VAL_BATCH = 100
