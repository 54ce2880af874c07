"""The published augmentation recipe, as numbers every backend shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FLIP_P = 0.5
JITTER_P = 0.8
JITTER_BRIGHTNESS = 0.4
JITTER_CONTRAST = 0.4
JITTER_SATURATION = 0.2
JITTER_HUE = 0.1
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class ViewAugment:
    """Probabilities of the view-dependent steps for one view."""

    blur_p: float
    solarize_p: float


def view_augments(global_number: int, local_number: int) -> list[ViewAugment]:
    """Per-view probabilities, global views first: blur 1.0 on global 1, 0.1 and solarize
    0.2 on global 2 (and any further global view), blur 0.5 on every local view."""
    views = []
    for v in range(global_number):
        views.append(ViewAugment(1.0, 0.0) if v == 0 else ViewAugment(0.1, 0.2))
    views += [ViewAugment(0.5, 0.0)] * local_number
    return views


class ViewSpec(NamedTuple):
    """One random-resized crop of the recipe: output side and area-fraction range."""

    size: int
    scale: tuple[float, float]


def view_specs(crops) -> list[ViewSpec]:
    """Every view of ``crops`` (a :class:`~carp_fast.config.CropsConfig`), global views first:
    the order of the views in a batch, and of :func:`view_augments`, for every backend."""
    return ([ViewSpec(crops.global_size, tuple(crops.global_scale))] * crops.global_number
            + [ViewSpec(crops.local_size, tuple(crops.local_scale))] * crops.local_number)
