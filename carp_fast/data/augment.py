"""The shared second stage of fast backends: the recipe's colour augmentations, batched.

A producer (FFCV on CPU workers, DALI on the GPU) delivers uint8 crops with flips;
:class:`MultiCropAugment` then applies colour jitter (random order per sample, as
torchvision's ColorJitter), grayscale, Gaussian blur, solarize and ImageNet normalisation
to whole batches on whatever device they are on, with the per-view probabilities of
:func:`carp_fast.data.recipe.view_augments`.

Every random decision and parameter of a step is drawn on the host from
(seed, epoch, step, rank) and sent to the device as one small tensor: the result is
reproducible, identical on CPU and GPU up to float rounding, and the step needs no
device-to-host synchronisation (which samples take which branch is known on the host).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from carp_fast.data import recipe
from carp_fast.data.batch import MultiCropBatch, host_to_device

# ITU-R 601-2 luma, the weights of PIL's "L" mode and torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


@dataclass
class ViewParams:
    """Per-row random parameters of one group of views (host arrays, ``n`` rows)."""

    jitter: np.ndarray  # bool [n]: colour jitter applied
    factors: np.ndarray  # float [n, 4]: brightness, contrast, saturation, hue shift
    order: np.ndarray  # int [n, 4]: the jitter operations, in the order applied
    grayscale: np.ndarray  # bool [n]
    blur: np.ndarray  # bool [n]
    sigma: np.ndarray  # float [n]
    solarize: np.ndarray  # bool [n]


class MultiCropAugment:
    """Colour augmentation and normalisation of a uint8 :class:`MultiCropBatch`.

    ``views`` gives each view's blur and solarize probabilities (default: the recipe's);
    ``jitter_p`` and ``grayscale_p`` apply to every view. Rows are view-major, as the
    batch contract says, so row ``r`` of a group belongs to view ``r // B``.
    """

    def __init__(
        self,
        global_number: int,
        local_number: int,
        seed: int = 0,
        rank: int = 0,
        views: list[recipe.ViewAugment] | None = None,
        jitter_p: float = recipe.JITTER_P,
        grayscale_p: float = recipe.GRAYSCALE_P,
    ):
        self.global_number = global_number
        self.local_number = local_number
        self.views = views if views is not None else recipe.view_augments(global_number, local_number)
        if len(self.views) != global_number + local_number:
            raise ValueError(
                f"{len(self.views)} view augmentations for {global_number + local_number} views"
            )
        self.seed = seed
        self.rank = rank
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_config(cls, cfg, rank: int = 0) -> "MultiCropAugment":
        return cls(cfg.crops.global_number, cfg.crops.local_number, cfg.train.seed, rank)

    def __call__(
        self, batch: MultiCropBatch, epoch: int, step: int, dtype: torch.dtype | None = None
    ) -> MultiCropBatch:
        """The batch normalised and augmented with the draws of ``(epoch, step)``."""
        rng = np.random.default_rng([self.seed, epoch, step, self.rank, 0xA06])
        b = batch.batch_size
        dtype = dtype or torch.float32
        global_params = self.draw(rng, b, self.views[: self.global_number])
        global_views = self.apply(batch.global_views, global_params, dtype)
        local_views = None
        if batch.local_views is not None:
            local_params = self.draw(rng, b, self.views[self.global_number :])
            local_views = self.apply(batch.local_views, local_params, dtype)
        return MultiCropBatch(global_views, local_views, batch.labels)

    def draw(self, rng: np.random.Generator, batch_size: int, views: list[recipe.ViewAugment]) -> ViewParams:
        """Random parameters for ``len(views) * batch_size`` view-major rows."""
        n = len(views) * batch_size
        blur_p = np.repeat([v.blur_p for v in views], batch_size)
        solarize_p = np.repeat([v.solarize_p for v in views], batch_size)
        factors = np.stack(
            [
                rng.uniform(1 - recipe.JITTER_BRIGHTNESS, 1 + recipe.JITTER_BRIGHTNESS, n),
                rng.uniform(1 - recipe.JITTER_CONTRAST, 1 + recipe.JITTER_CONTRAST, n),
                rng.uniform(1 - recipe.JITTER_SATURATION, 1 + recipe.JITTER_SATURATION, n),
                rng.uniform(-recipe.JITTER_HUE, recipe.JITTER_HUE, n),
            ],
            axis=1,
        )
        return ViewParams(
            jitter=rng.random(n) < self.jitter_p,
            factors=factors,
            order=np.argsort(rng.random((n, 4)), axis=1),
            grayscale=rng.random(n) < self.grayscale_p,
            blur=rng.random(n) < blur_p,
            sigma=rng.uniform(recipe.BLUR_SIGMA[0], recipe.BLUR_SIGMA[1], n),
            solarize=rng.random(n) < solarize_p,
        )

    def apply(self, views: torch.Tensor, params: ViewParams, dtype: torch.dtype) -> torch.Tensor:
        """Augment uint8 ``[n, 3, H, W]`` rows with ``params``; normalised ``dtype`` out."""
        if views.dtype != torch.uint8:
            raise TypeError(f"MultiCropAugment expects uint8 views, got {views.dtype}")
        device = views.device
        luma, scale, shift = self._device_constants(device)
        x = views.to(torch.float32).contiguous(memory_format=torch.channels_last).div_(255)
        rows = host_to_device(_host_rows(params), device)
        for slot in range(4):
            op = np.where(params.jitter, params.order[:, slot], -1)
            x = _blend_step(x, op, rows, slot, luma)
            hue_rows = np.flatnonzero(op == _HUE)
            if hue_rows.size:
                index = host_to_device(hue_rows, device)
                hue_shift = rows[index, 3]
                _put_rows(x, index, adjust_hue(_take_rows(x, index), hue_shift))
        gray_rows = np.flatnonzero(params.grayscale)
        if gray_rows.size:
            index = host_to_device(gray_rows, device)
            _put_rows(x, index, _luma(_take_rows(x, index), luma).expand(-1, 3, -1, -1))
        blur_rows = np.flatnonzero(params.blur)
        if blur_rows.size:
            index = host_to_device(blur_rows, device)
            sigma = rows[index, 9]
            half = int(math.ceil(3 * float(params.sigma[blur_rows].max())))
            _put_rows(x, index, gaussian_blur(_take_rows(x, index), sigma, half))
        solarize_rows = np.flatnonzero(params.solarize)
        if solarize_rows.size:
            index = host_to_device(solarize_rows, device)
            sub = _take_rows(x, index)
            threshold = recipe.SOLARIZE_THRESHOLD / 255
            _put_rows(x, index, torch.where(sub >= threshold, 1 - sub, sub))
        # (x - mean) / std as one multiply-add.
        x = torch.addcmul(shift, x, scale)
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    def _device_constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._constants:
            mean = torch.tensor(recipe.IMAGENET_MEAN, dtype=torch.float64)
            std = torch.tensor(recipe.IMAGENET_STD, dtype=torch.float64)
            self._constants[device] = (
                torch.tensor(_LUMA, device=device),
                (1 / std).to(device, torch.float32).view(1, 3, 1, 1),
                (-mean / std).to(device, torch.float32).view(1, 3, 1, 1),
            )
        return self._constants[device]


def _host_rows(params: ViewParams) -> np.ndarray:
    """One float32 [n, 11] table of every per-row number the device needs.

    Columns: 0-3 jitter factors, 4-7 the jitter operation of each slot (-1: none),
    8 grayscale, 9 blur sigma, 10 solarize.
    """
    order = np.where(params.jitter[:, None], params.order, -1)
    return np.concatenate(
        [
            params.factors,
            order,
            params.grayscale[:, None],
            params.sigma[:, None],
            params.solarize[:, None],
        ],
        axis=1,
    ).astype(np.float32)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # Indexing the contiguous NHWC view copies whole rows and keeps channels-last
    # (index_select on CPU is an order of magnitude slower here).
    return x.permute(0, 2, 3, 1)[index].permute(0, 3, 1, 2)


def _put_rows(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    x.permute(0, 2, 3, 1)[index] = values.permute(0, 2, 3, 1)


def _luma(x: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """``[n, 1, H, W]`` gray levels, as a product of the NHWC view with the weights."""
    return (x.permute(0, 2, 3, 1) @ luma).unsqueeze(1)


def _blend_step(x: torch.Tensor, op: np.ndarray, rows: torch.Tensor, slot: int, luma: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of one jitter slot, in one blend.

    All three are ``clamp(f·x + (1 − f)·ref)`` with ref = 0, the mean gray level, or the
    gray image (torchvision's definitions); rows doing something else at this slot get
    f = 1, which leaves them exactly unchanged.
    """
    if not np.isin(op, (_BRIGHTNESS, _CONTRAST, _SATURATION)).any():
        return x
    op_t = rows[:, 4 + slot]
    factor = torch.where(op_t == _BRIGHTNESS, rows[:, 0], torch.ones_like(op_t))
    factor = torch.where(op_t == _CONTRAST, rows[:, 1], factor)
    factor = torch.where(op_t == _SATURATION, rows[:, 2], factor).view(-1, 1, 1, 1)
    # In place: on CPU a fresh full-size tensor per step costs more than the arithmetic.
    if np.isin(op, (_CONTRAST, _SATURATION)).any():
        gray = _luma(x, luma)
        mean = gray.mean((2, 3), keepdim=True) * (op_t == _CONTRAST).view(-1, 1, 1, 1)
        ref = torch.where((op_t == _SATURATION).view(-1, 1, 1, 1), gray, mean)
        return x.mul_(factor).add_(ref.mul_(1 - factor)).clamp_(0, 1)
    return x.mul_(factor).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue with a per-row shift (in turns) on [0, 1] float RGB.

    A hue rotation keeps each pixel's max (V) and chroma (C = max − min). With the hue H
    in sixths of a turn, the rotated colour is V − C·clamp(min(k, 4 − k), 0, 1) with
    k = (n + H) mod 6 and n = 5, 3, 1 for R, G, B: the HSV round trip of torchvision
    without building S or the six-way case split.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    chroma = maxc - x.amin(1)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    numerator = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    # Gray pixels (C = 0) have numerator 0; any hue gives them back V.
    hue = numerator.div_(chroma.clamp_min(1e-12)).add_(sector).add_(6.0 * shift.view(-1, 1, 1))
    k = torch.remainder(hue.unsqueeze(1) + _hue_offsets(x.device, x.dtype), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * ramp


@functools.lru_cache(maxsize=None)
def _hue_offsets(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """n = 5, 3, 1 for R, G, B as ``[1, 3, 1, 1]``: built once per device and dtype, since
    a tensor made from a Python list on a GPU is a blocking host-to-device copy."""
    return torch.tensor([5.0, 3.0, 1.0], dtype=dtype).view(1, 3, 1, 1).to(device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, half: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-row sigma, as one grouped convolution per axis.

    Each row's kernel spans ±ceil(3σ) (zero weights beyond, inside the common half-width
    ``half``); borders repeat edge pixels, as PIL's GaussianBlur (the reference) does.
    """
    n, c, h, w = x.shape
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / sig) ** 2) * (offsets.abs() <= torch.ceil(3 * sig))
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = kernel.repeat_interleave(c, 0)  # [n*c, K]
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (half, half, half, half), mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)
