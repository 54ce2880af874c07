"""Synthetic batches already on the device: the model's speed without any loader."""

from __future__ import annotations

import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch, to_device


class SyntheticLoader:
    """Yields one fixed random, normalised batch of the configured shapes, ``length`` times.

    The batch is made once, moved to the device and reused, so the loop measures compute
    only. ``data.path`` is not read.
    """

    num_images = 0

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype | None = None,
                 length: int = 100, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        b, crops = cfg.data.batch_size, cfg.crops

        def views(number: int, size: int) -> torch.Tensor | None:
            if number == 0:
                return None
            return torch.randn(number * b, 3, size, size, generator=generator)

        host = MultiCropBatch(
            views(crops.global_number, crops.global_size),
            views(crops.local_number, crops.local_size),
            torch.zeros(b, dtype=torch.long),
        )
        self.batch = to_device(host, device, dtype)
        self.length = length
        self.num_images = length * b

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __iter__(self):
        for _ in range(self.length - getattr(self, "start_batch", 0)):
            yield self.batch
