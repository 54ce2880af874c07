"""The embedded demo dataset: small JPEGs of shapes a network can learn to tell apart.

Generated deterministically from a seed when absent, in ImageFolder layout
(``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``), so every backend reads it.
Colour carries no class information (colour jitter and grayscale would erase it anyway):
the classes differ in shape, so the encoder has to learn geometry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes")


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _draw(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    base = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    colour = _random_colour(rng)
    # Keep the shape distinguishable from the background whatever colours come up.
    if sum(abs(c - int(b)) for c, b in zip(colour, background)) < 150:
        colour = tuple(255 - int(b) for b in background)
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        angle = rng.uniform(0, np.pi / 2)
        corners = [
            (cx + radius * np.cos(angle + k * np.pi / 2), cy + radius * np.sin(angle + k * np.pi / 2))
            for k in range(4)
        ]
        draw.polygon(corners, fill=colour)
    elif kind == "triangle":
        angle = rng.uniform(0, 2 * np.pi)
        corners = [
            (cx + radius * np.cos(angle + k * 2 * np.pi / 3), cy + radius * np.sin(angle + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        draw.polygon(corners, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.3)))
    elif kind == "cross":
        arm = max(2, int(radius * 0.35))
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    elif kind == "stripes":
        period = rng.uniform(0.1, 0.18) * size
        vertical = rng.random() < 0.5
        for k in range(int(size / period) + 1):
            start = k * period
            if vertical:
                draw.rectangle((start, 0, start + period / 2, size), fill=colour)
            else:
                draw.rectangle((0, start, size, start + period / 2), fill=colour)
    else:
        raise ValueError(f"unknown demo class {kind!r}")
    return image


def generate_demo_dataset(
    root: str | Path,
    train_per_class: int = 100,
    val_per_class: int = 25,
    size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write the demo dataset under ``root`` unless it is already complete; returns root.

    Written into a temporary sibling folder and renamed into place, so an interrupted
    generation never leaves a half-filled dataset that looks complete.
    """
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    if root.exists() and any(root.iterdir()):
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
        (staging / ".complete").write_text("demo dataset v1\n")
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if marker.exists():  # another process finished the same dataset first
            return root
        raise
    return root
