"""The contract every loader backend obeys: :class:`MultiCropBatch`."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class MultiCropBatch(NamedTuple):
    """One step's views, view-major: rows ``v*B .. (v+1)*B-1`` are view ``v``.

    ``global_views`` is ``[Vg*B, 3, Hg, Wg]`` and ``local_views`` ``[Vl*B, 3, Hl, Wl]``
    or None; normalised, channels-last, on the training device; fp32 on CPU and the
    autocast dtype on GPU. A producer stage (``device_augment=False``) yields the same
    shapes as uint8, neither augmented nor normalised. ``labels`` is ``[B]`` (unused by
    training, kept for evaluation and tests).
    """

    global_views: torch.Tensor
    local_views: torch.Tensor | None
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def num_views(self) -> int:
        local = 0 if self.local_views is None else self.local_views.shape[0]
        return (self.global_views.shape[0] + local) // self.batch_size


def host_to_device(value: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host array or tensor on ``device`` without making the host wait for the GPU.

    Only a copy from pinned memory is truly asynchronous (from pageable memory the driver
    stages it while the host waits), so on CUDA the value is pinned first.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_device(
    batch: MultiCropBatch, device: torch.device, dtype: torch.dtype | None = None
) -> MultiCropBatch:
    """Move a host batch to ``device`` (asynchronously from pinned memory), channels-last."""

    def move(images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None:
            return None
        images = images.to(device, non_blocking=True)
        if dtype is not None and images.is_floating_point():
            images = images.to(dtype)
        return images.contiguous(memory_format=torch.channels_last)

    return MultiCropBatch(
        move(batch.global_views), move(batch.local_views), host_to_device(batch.labels, device)
    )
