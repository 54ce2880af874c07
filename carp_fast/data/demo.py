"""The embedded demo dataset: small JPEGs of shapes a network can learn to tell apart.

Generated deterministically from a seed when absent, in ImageFolder layout
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

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes")
VERSION = "demo dataset v2"


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


def generate_demo_dataset(
    root: str | Path,
    train_per_class: int = 200,
    val_per_class: int = 100,
    size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write the demo dataset under ``root`` unless it is already complete; returns root.

    Written into a temporary sibling folder and renamed into place, so an interrupted
    generation never leaves a half-filled dataset that looks complete. A dataset that an
    older version of this generator wrote (its marker names another version) is replaced,
    with whatever was derived from it inside ``root``; anything else already at ``root``
    is left alone and refused.
    """
    root = Path(root)
    marker = root / ".complete"
    outdated = None
    if marker.exists():
        if marker.read_text().strip() == VERSION:
            return root
        outdated = marker.read_text().strip()
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and is not a complete demo dataset")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
            rng = np.random.default_rng([split_seed, 17])
            for name in classes:
                folder = staging / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    _draw(name, size, rng).save(folder / f"{name}_{index:04d}.jpg", quality=90)
        (staging / ".complete").write_text(VERSION + "\n")
        if outdated is not None:
            retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            os.replace(root, retired / root.name)
            shutil.rmtree(retired)
        elif root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if marker.exists() and marker.read_text().strip() == VERSION:
            return root  # another process finished the same dataset first
        raise
    return root
