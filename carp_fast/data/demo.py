"""The embedded demo dataset: small JPEGs of shapes a network can learn to tell apart.

Generated deterministically from a seed where nothing is yet, in ImageFolder layout
(``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``), so every backend reads it.

Designed so that what two random crops of one image share is the kind of shape, and
little else: every image holds three to five light shapes of its class, at random
sizes and places, on a noisy grey background of random brightness. Self-supervised
methods learn whatever is most consistent between crops, so the images deliberately
avoid per-image colours (in an earlier version each image had its own background and
shape colour; colour jitter keeps enough of a colour to tell images apart, so the
network learnt colour, and k-NN on shape classes stayed near chance).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from carp_fast import ownership
from carp_fast.data.folder import DataPathError, list_image_folder

log = logging.getLogger(__name__)

CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes")
# v3: the same images as v2, sealed by carp_fast's marker (v2 wrote a bare .complete).
VERSION = "demo dataset v3"


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float,
                shade: int, rng: np.random.Generator) -> None:
    colour = (shade, shade, shade)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind in ("square", "triangle"):
        corners = 4 if kind == "square" else 3
        angle = rng.uniform(0, 2 * np.pi / corners)
        points = [
            (cx + radius * np.cos(angle + k * 2 * np.pi / corners),
             cy + radius * np.sin(angle + k * 2 * np.pi / corners))
            for k in range(corners)
        ]
        draw.polygon(points, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    elif kind == "cross":
        arm = max(2, int(radius * 0.35))
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    elif kind == "stripes":  # a patch of parallel bars
        period = radius * rng.uniform(0.45, 0.6)
        vertical = rng.random() < 0.5
        offset = -radius
        while offset < radius:
            if vertical:
                draw.rectangle((cx + offset, cy - radius, cx + offset + period / 2, cy + radius), fill=colour)
            else:
                draw.rectangle((cx - radius, cy + offset, cx + radius, cy + offset + period / 2), fill=colour)
            offset += period
    else:
        raise ValueError(f"unknown demo class {kind!r}")


def _draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    grey = rng.uniform(90, 150)
    noise = rng.normal(0, 14, size=(size, size, 1))
    pixels = np.repeat(np.clip(grey + noise, 0, 255), 3, axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 6))):
        radius = rng.uniform(0.11, 0.2) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        _draw_shape(draw, kind, cx, cy, radius, int(rng.uniform(215, 255)), rng)
    return image


KIND = "demo dataset"
WHAT_TO_DO = ("Point data.path at a new or empty folder for the demo images, or set "
              "data.generate_demo=false to train on what is there.")


def is_current_demo(root: str | Path) -> bool:
    """Whether ``root`` holds a demo dataset this version of carp_fast wrote."""
    marker = ownership.read_marker(root, KIND)
    return marker is not None and marker["version"] == VERSION


def prepare_demo(path: str | Path) -> Path:
    """What ``data.generate_demo`` does for ``data.path``; returns the dataset root.

    The root is ``path``'s parent when ``path`` names a ``train`` or ``val`` split. A
    current demo dataset there is used; an outdated one carp_fast wrote is regenerated;
    an image folder at ``path`` that carp_fast did not write is simply used (nothing is
    generated or changed); otherwise the demo is generated where nothing is yet (absent
    or empty root), and anything else is refused (:class:`~carp_fast.ownership.OwnershipError`).
    """
    path = Path(path)
    root = path.parent if path.name in ("train", "val") else path
    if is_current_demo(root):
        return root
    if ownership.read_marker(root, KIND) is None and _holds_images(path):
        log.info("data.generate_demo: %s already holds images; training on them as they are", path)
        return root
    return generate_demo_dataset(root)


def _holds_images(path: Path) -> bool:
    try:
        list_image_folder(path)
    except DataPathError:
        return False
    return True


def generate_demo_dataset(
    root: str | Path,
    train_per_class: int = 200,
    val_per_class: int = 100,
    size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write the demo dataset under ``root`` unless it is already there; returns root.

    ``root`` may be absent, an empty folder, or a demo dataset carp_fast wrote (sealed by
    its marker, see :mod:`carp_fast.ownership`). A current one is used as it is; one an
    older version wrote is regenerated, removing only the files its marker lists, and
    only when nothing else is in the folder. Anything else raises
    :class:`~carp_fast.ownership.OwnershipError` and is left untouched.

    The images go to a temporary sibling folder, the marker is written last and the
    folder renamed into place, so an interrupted generation never leaves anything at
    ``root`` that looks complete.
    """

    def fill(staging: Path) -> None:
        for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
            rng = np.random.default_rng([split_seed, 17])
            for name in classes:
                folder = staging / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    _draw(name, size, rng).save(folder / f"{name}_{index:04d}.jpg", quality=90)

    params = {"train_per_class": train_per_class, "val_per_class": val_per_class,
              "size": size, "seed": seed, "classes": list(classes)}
    return ownership.generated_folder(root, KIND, VERSION, fill, WHAT_TO_DO, parameters=params)
