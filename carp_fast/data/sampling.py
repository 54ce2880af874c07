"""Which samples a rank reads in an epoch, and the random stream of each sample.

Shared by every backend, so that the same (seed, epoch, index) gives the same images in the
same order on any backend, worker count or thread count, and a resumed run continues with
exactly the samples it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index, 0xCA4F])


class EpochShardSampler(Sampler):
    """This rank's share of a per-epoch permutation, yielding ``(index, epoch)`` keys.

    The permutation is drawn from (seed, epoch); rank r takes positions r, r + world, ...
    and every rank gets the same number of whole batches (the tail that does not fill a
    batch on every rank is left out this epoch and comes back in the next shuffle).
    ``start_batch`` skips batches already consumed, for mid-epoch resume.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self.batches_per_epoch = (num_samples // world) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} images cannot fill one batch of {batch_size} on each of "
                f"{world} process(es); lower data.batch_size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        shard = order[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
        for index in shard[self.start_batch * self.batch_size :].tolist():
            yield (index, self.epoch)


class ShardedLoader:
    """The loader contract's bookkeeping for a backend that reads through ``self.sampler``
    (an :class:`EpochShardSampler`): images in the data set, batches per epoch, the epoch."""

    sampler: EpochShardSampler

    @property
    def num_images(self) -> int:
        return self.sampler.num_samples

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
