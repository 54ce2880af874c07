"""Random-resized-crop parameters, drawn as torchvision's RandomResizedCrop draws them."""

from __future__ import annotations

import math

import numpy as np


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random crop of the image.

    Area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``; ten
    tries, then a centre crop at the nearest admissible ratio (torchvision's rule).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    return centre_crop(height, width, ratio[0], ratio[1])


def centre_crop(height: int, width: int, ratio_lo: float, ratio_hi: float) -> tuple[int, int, int, int]:
    """torchvision's fallback after ten misses: the whole image cut to the nearest
    admissible aspect ratio, centred, as ``(top, left, crop_height, crop_width)``.

    Plain Python that numba also compiles (the FFCV backend's draws call it from their
    compiled code), so every backend's fallback is this one function.
    """
    in_ratio = width / height
    if in_ratio < ratio_lo:
        crop_w, crop_h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        crop_h, crop_w = height, int(round(height * ratio_hi))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w
