"""Data loading: one module per backend behind one contract (:class:`MultiCropBatch`)."""

from __future__ import annotations

from pathlib import Path

import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch, to_device
from carp_fast.data.folder import DataPathError

__all__ = ["MultiCropBatch", "DataPathError", "build_loader", "DeviceLoader", "prepare_data"]


class DeviceLoader:
    """Wraps a backend: sets the epoch and yields batches on the training device."""

    def __init__(self, backend, device: torch.device, dtype: torch.dtype | None):
        self.backend = backend
        self.device = device
        self.dtype = dtype

    @property
    def num_images(self) -> int:
        return self.backend.num_images

    def __len__(self) -> int:
        return len(self.backend)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.backend.set_epoch(epoch, start_batch)

    def __iter__(self):
        for batch in self.backend:
            yield to_device(batch, self.device, self.dtype)


def prepare_data(cfg: Config) -> None:
    """Generate the demo dataset when asked to and absent (``data.generate_demo``)."""
    if not cfg.data.generate_demo:
        return
    from carp_fast import distributed
    from carp_fast.data.demo import generate_demo_dataset

    path = Path(cfg.data.path)
    if distributed.rank() == 0:
        generate_demo_dataset(path.parent if path.name in ("train", "val") else path)
    distributed.barrier()


def build_loader(
    cfg: Config,
    device: torch.device | str = "cpu",
    device_augment: bool = True,
    rank: int | None = None,
    world: int | None = None,
    dtype: torch.dtype | None = None,
) -> DeviceLoader:
    """The loader ``cfg.data.backend`` names, yielding :class:`MultiCropBatch` on ``device``.

    ``device_augment=False`` yields the producer stage alone: uint8 crops, neither
    colour-augmented nor normalised. ``rank``/``world`` default to the process group's.
    ``dtype`` casts floating images (the autocast dtype on GPU).
    """
    from carp_fast import distributed

    device = torch.device(device)
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    prepare_data(cfg)
    backend_name = cfg.data.backend
    if backend_name == "torchvision":
        from carp_fast.data.torchvision_loader import TorchvisionLoader

        backend = TorchvisionLoader(
            cfg, rank, world, pin_memory=cfg.data.pin_memory and device.type == "cuda",
            augment=device_augment,
        )
    else:
        raise NotImplementedError(f"data.backend={backend_name!r} is not available yet")
    return DeviceLoader(backend, device, dtype)
