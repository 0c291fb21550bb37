"""The order of the data: which images each process sees in each epoch, and the seed of
each training image's augmentation. The training order depends on (seed, epoch) alone, so
the global batches and every image's augmentation are the same on any number of
processes (distributed.py) and DataLoader workers, and a resumed run replays exactly what
an uninterrupted one does; loaders.seed_epoch sets it before each epoch."""
import random

import torch
from torch.utils.data import Sampler

from toolkit.distributed import per_process_batch, world


class TrainOrder(Sampler):
    """One process's training samples of an epoch, as (image index, augmentation seed)
    pairs. The permutation and the seeds come from (seed, epoch) alone; global batches
    of `batch_size` are consecutive slices of the permutation (the last partial one is
    dropped), and process r takes the r-th share of each. So the global batches, and
    the augmentation of every image in them, are the same for any number of processes
    and DataLoader workers. Call set_epoch before each epoch."""

    def __init__(self, num_images, batch_size):
        self.num_images, self.batch_size = num_images, batch_size
        self.share = per_process_batch(batch_size)
        self.seed = self.epoch = 0

    def set_epoch(self, seed, epoch):
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return self.num_images // self.batch_size * self.share

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.num_images, generator=g).tolist()
        seeds = torch.randint(2 ** 62, (self.num_images,), generator=g).tolist()
        full_batches = self.num_images // self.batch_size
        for start in range(0, full_batches * self.batch_size, self.batch_size):
            first = start + world().rank * self.share
            for k in range(first, first + self.share):
                yield order[k], seeds[k]


def val_share(num_images):
    """This process's contiguous share of the validation images (all for one process)."""
    return range(num_images * world().rank // world().size,
                 num_images * (world().rank + 1) // world().size)


class SeededSamples(torch.utils.data.Dataset):
    """dataset[(index, seed)]: image `index`, its random transforms drawn from Python's
    `random` seeded with `seed` (custom_transforms draw from nothing else), wherever the
    DataLoader worker that loads it is."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        return self.dataset[index]
