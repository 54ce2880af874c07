"""Data loading: one module per backend behind one contract (:class:`MultiCropBatch`)."""

from __future__ import annotations

from pathlib import Path

import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch, to_device
from carp_fast.data.folder import DataPathError

__all__ = ["MultiCropBatch", "DataPathError", "build_loader", "DeviceLoader", "prepare_data"]


class DeviceLoader:
    """Wraps a backend: sets the epoch and yields batches on the training device.

    For a two-stage backend, ``augment`` (a :class:`~carp_fast.data.augment.MultiCropAugment`)
    turns the producer's uint8 views into augmented, normalised ones on the device, with
    the draws of (epoch, batch index in the epoch), so a resumed epoch repeats them.
    """

    def __init__(self, backend, device: torch.device, dtype: torch.dtype | None, augment=None):
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.augment = augment
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_images(self) -> int:
        return self.backend.num_images

    def __len__(self) -> int:
        return len(self.backend)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch
        self.backend.set_epoch(epoch, start_batch)

    def __iter__(self):
        if self.augment is None:
            for batch in self.backend:
                yield to_device(batch, self.device, self.dtype)
            return
        for step, batch in enumerate(self.backend, start=self.start_batch):
            batch = to_device(batch, self.device)
            yield self.augment(batch, self.epoch, step, self.dtype)


def prepare_data(cfg: Config, device: torch.device | str = "cpu") -> None:
    """Generate the demo dataset when asked to and where nothing is yet (``data.generate_demo``).

    Rank 0 generates (or refuses, see :func:`carp_fast.data.demo.prepare_demo`); the
    other ranks wait for it and raise too when it failed, rather than hang.
    """
    if not cfg.data.generate_demo:
        return
    from carp_fast import distributed
    from carp_fast.data.demo import prepare_demo

    failure = None
    if distributed.rank() == 0:
        try:
            prepare_demo(cfg.data.path)
        except Exception as error:  # re-raised below, once every rank knows
            failure = error
    if not distributed.all_ok(failure is None, torch.device(device)):
        if failure is not None:
            raise failure
        raise DataPathError(f"rank 0 could not prepare the demo dataset at {cfg.data.path} (see its error)")


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
    prepare_data(cfg, device)
    backend_name = cfg.data.backend
    if backend_name == "synthetic":
        from carp_fast.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, device, dtype)
    if backend_name == "torchvision":
        from carp_fast.data.torchvision_loader import TorchvisionLoader

        backend = TorchvisionLoader(
            cfg, rank, world, pin_memory=cfg.data.pin_memory and device.type == "cuda",
            augment=device_augment,
        )
    elif backend_name == "ffcv":
        from carp_fast.data.augment import MultiCropAugment
        from carp_fast.data.ffcv_loader import FFCVLoader

        # Without the augmentation stage the caller keeps the uint8 batches, so they must
        # not live in FFCV's recycled buffers; the augmentation stage reads them at once.
        backend = FFCVLoader(cfg, rank, world, device, copy=not device_augment)
        augment = MultiCropAugment.from_config(cfg, rank) if device_augment else None
        return DeviceLoader(backend, device, dtype, augment)
    elif backend_name == "dali":
        from carp_fast.data.augment import MultiCropAugment
        from carp_fast.data.dali_loader import DALILoader

        # Decoded and cropped on `device` (nvJPEG and CUDA kernels, or CPU threads); every
        # batch is a fresh tensor, so the producer's output needs no copy when kept.
        backend = DALILoader(cfg, rank, world, device)
        augment = MultiCropAugment.from_config(cfg, rank) if device_augment else None
        return DeviceLoader(backend, device, dtype, augment)
    elif backend_name == "nvjpeg":
        from carp_fast.data.augment import MultiCropAugment
        from carp_fast.data.nvjpeg_loader import NvjpegLoader

        # Decoded by nvJPEG and cropped on `device` (libjpeg-turbo and CPU kernels on a CPU
        # device); every batch is a fresh tensor.
        backend = NvjpegLoader(cfg, rank, world, device)
        augment = MultiCropAugment.from_config(cfg, rank) if device_augment else None
        return DeviceLoader(backend, device, dtype, augment)
    else:
        raise NotImplementedError(f"data.backend={backend_name!r} is not available yet")
    return DeviceLoader(backend, device, dtype)
