#!/usr/bin/env python
"""A Copydays-layout copy-detection set made from the demo's held-out images.

    python tools/make_demo_copydays.py [--val data/demo/val] [--out data/demo_copydays]

The demo has no instance-level benchmark, so this derives one in Copydays' own layout
(what :mod:`carp_fast.eval.copydetection` reads): ``original/`` holds ``--originals``
val images renamed ``<4-digit id>00.jpg``; ``strong/`` holds ``--copies`` attacked
copies of each, ``<id>01.jpg``, ``<id>02.jpg``... (a random crop of 60-90 % of the
area, colour and brightness jitter, blur, JPEG quality 50: Copydays' "strong" attacks
in kind, much milder in degree, as the demo evaluates at 48 px; with 40-70 % crops and
JPEG quality 30 both networks sat near chance); ``distractors/`` holds the remaining
val images. Seeded, so the set is the same on every machine. An existing output folder
is left as it is.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def attack(image, rng: random.Random):
    from PIL import ImageEnhance, ImageFilter

    width, height = image.size
    area = rng.uniform(0.6, 0.9)
    w, h = int(width * area ** 0.5), int(height * area ** 0.5)
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((x, y, x + w, y + h)).resize((width, height))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=Path, default=ROOT / "data/demo/val")
    parser.add_argument("--out", type=Path, default=ROOT / "data/demo_copydays")
    parser.add_argument("--originals", type=int, default=60, help="originals (spread over the classes)")
    parser.add_argument("--copies", type=int, default=2, help="strong copies per original")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    from carp_fast.data.folder import list_image_folder

    if args.out.exists():
        print(f"{args.out} exists; leaving it as it is")
        return 0
    samples, _ = list_image_folder(args.val)
    rng = random.Random(args.seed)
    rng.shuffle(samples)
    originals, distractors = samples[: args.originals], samples[args.originals :]
    for name in ("original", "strong", "distractors"):
        (args.out / name).mkdir(parents=True)
    for number, (path, _) in enumerate(originals):
        image_id = f"{2000 + number:04d}"
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.save(args.out / "original" / f"{image_id}00.jpg", quality=95)
            for copy in range(1, args.copies + 1):
                attack(image, rng).save(args.out / "strong" / f"{image_id}{copy:02d}.jpg", quality=50)
    for number, (path, _) in enumerate(distractors):
        with Image.open(path) as image:
            image.convert("RGB").save(args.out / "distractors" / f"d{number:05d}.jpg", quality=95)
    print(f"wrote {args.out}: {len(originals)} originals, {len(originals) * args.copies} strong copies, "
          f"{len(distractors)} distractors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
