#!/usr/bin/env python
"""CPU loader throughput: the FFCV producer against the published torchvision recipe.

    python tools/bench_loaders.py [--images 512] [--batch-size 64] [--workers 2] [--reps 5]
                                  [--data-dir data/bench_photos] [--json benchmarks/loaders_cpu.json]

On a GPU node the producer (decode once, eight crops with flips, uint8 to the device) is
the only work left on the CPU per image, so its images/s per core is what decides whether
the GPU waits. Measured here, all in one process and interleaved rep by rep so that
other load on the machine hits every contender alike (medians, then ratios):

  torchvision     the published recipe, all of it on CPU workers (device_augment=True)
  ffcv_producer   the FFCV producer alone (device_augment=False), same worker count
  ffcv_full       the FFCV producer plus the augmentation module on CPU tensors
  augment_only    the augmentation module alone on one producer batch (CPU, per batch)

The images are generated "photographs" (1/f-spectrum textures, soft-edged textured
objects, sensor noise; about 400x350 px, JPEG quality 90, about as many bytes per pixel
as ImageNet's photos), cached under --data-dir with the .beton converted from them (all
JPEG, so the producer decodes every image as the torchvision backend does). Crops:
2x224 + 6x96 with the production scales (configs/fast_400ep.yaml).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 8


def _field(rng: np.random.Generator, height: int, width: int, slope: float) -> np.ndarray:
    """A zero-mean, unit-variance random field with a 1/f^slope amplitude spectrum.

    Natural images have slope ~1: detail at every scale, which is what makes JPEG
    decoding of photographs cost what it does (flat synthetic images decode far faster).
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fx * fx + fy * fy)
    frequency[0, 0] = 1.0
    shape = (height, fx.shape[1])
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / frequency**slope
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return (field - field.mean()) / (field.std() + 1e-9)


def photograph(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image with the statistics that matter for decoding and cropping."""
    luma = 0.5 + 0.18 * _field(rng, height, width, 1.1)
    tint = rng.uniform(-0.1, 0.1, 2)
    cb = 0.05 * _field(rng, height, width, 1.6) + tint[0]
    cr = 0.05 * _field(rng, height, width, 1.6) + tint[1]
    image = np.stack([luma + 1.402 * cr, luma - 0.344 * cb - 0.714 * cr, luma + 1.772 * cb], -1)
    for _ in range(int(rng.integers(3, 8))):
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.08, 0.35) * min(height, width)
        if rng.random() < 0.5:
            aspect = rng.uniform(0.5, 1.5)
            draw.ellipse((cx - radius, cy - radius * aspect, cx + radius, cy + radius * aspect), fill=255)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=255)
        blurred = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
        alpha = np.asarray(blurred, np.float32)[..., None] / 255
        texture = _field(rng, height, width, rng.uniform(0.7, 1.3))[..., None]
        shade = np.linspace(rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0), height)[:, None, None]
        colour = np.clip(rng.uniform(0.1, 0.9, 3) * shade + 0.12 * texture, 0, 1)
        image = image * (1 - alpha) + colour * alpha
    image = image + rng.normal(0, 2 / 255, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_photo(args: tuple[Path, int, int]) -> int:
    folder, index, seed = args
    rng = np.random.default_rng([seed, index])
    height, width = int(rng.integers(330, 371)), int(rng.integers(380, 421))
    path = folder / f"c{index % CLASSES}" / f"{index:05d}.jpg"
    Image.fromarray(photograph(rng, height, width)).save(path, quality=90)
    return path.stat().st_size


def make_photos(folder: Path, count: int, seed: int = 0, workers: int = 2) -> Path:
    """``count`` JPEG photographs in ImageFolder layout under ``folder``, generated once.

    ``folder`` must be new, empty, or a set of photographs this tool wrote (sealed, see
    carp_fast/ownership.py); anything else there is refused and left alone.
    """
    from carp_fast import ownership

    def fill(staging: Path) -> None:
        for k in range(CLASSES):
            (staging / f"c{k}").mkdir(parents=True)
        with Pool(workers) as pool:
            pool.map(_write_photo, [(staging, i, seed) for i in range(count)], chunksize=16)

    return ownership.generated_folder(folder, "benchmark photographs", f"{count} {seed}", fill,
                                      "Choose a new or empty --data-dir.")


def _converter():
    spec = importlib.util.spec_from_file_location("convert_imagenet_ffcv", ROOT / "tools" / "convert_imagenet_ffcv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dataset_stats(folder: Path) -> dict:
    files = sorted(folder.rglob("*.jpg"))
    pixels, sizes = [], []
    for path in files:
        with Image.open(path) as image:
            pixels.append(image.width * image.height)
            sizes.append((image.width, image.height))
    total_bytes = sum(p.stat().st_size for p in files)
    return {
        "images": len(files),
        "mean_width": round(float(np.mean([w for w, _ in sizes])), 1),
        "mean_height": round(float(np.mean([h for _, h in sizes])), 1),
        "mean_bytes": round(total_bytes / len(files)),
        "bytes_per_pixel": round(total_bytes / sum(pixels), 3),
        "jpeg_quality": 90,
    }


def config(backend: str, path: Path, args):
    from carp_fast.config import load_config

    return load_config("fast_400ep.yaml", [
        f"data.backend={backend}", f"data.path={path}", f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", "data.generate_demo=false", "data.pin_memory=false",
        "train.device=cpu",
    ])


def timed_epoch(loader) -> tuple[float, int]:
    """(seconds, images) of one full epoch."""
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += batch.batch_size
    return time.perf_counter() - start, images


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict:
    import numba
    import PIL
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
           "numba": numba.__version__}
    try:
        from importlib.metadata import version

        out["ffcv"] = version("ffcv")
    except Exception:
        out["ffcv"] = None
    return out


def commit() -> str | None:
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain"], cwd=ROOT, text=True).strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="generated photographs (default 512)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of every backend (default 2)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved epochs per contender (default 5)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench_photos")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from carp_fast.data import build_loader
    from carp_fast.data.augment import MultiCropAugment

    torch.set_num_threads(args.workers)
    photos = make_photos(args.data_dir / "train", args.images, workers=args.workers)
    beton = args.data_dir / f"train_{args.images}_jpeg.beton"
    if not beton.exists():
        _converter().convert(photos, beton, max_side=500, quality=90, raw_fraction=0.0,
                             workers=args.workers, progress=False)
    cfg_tv = config("torchvision", photos, args)
    cfg_ffcv = config("ffcv", beton, args)
    loaders = {
        "torchvision": build_loader(cfg_tv, "cpu", device_augment=True, rank=0, world=1),
        "ffcv_producer": build_loader(cfg_ffcv, "cpu", device_augment=False, rank=0, world=1),
        "ffcv_full": build_loader(cfg_ffcv, "cpu", device_augment=True, rank=0, world=1),
    }
    # One untimed epoch each: worker start-up and numba compilation are not throughput.
    for loader in loaders.values():
        timed_epoch(loader)
    augment = MultiCropAugment.from_config(cfg_ffcv)
    sample = next(iter(loaders["ffcv_producer"]))
    augment(sample, 0, 0)

    load_before = os.getloadavg()
    rates = {name: [] for name in loaders}
    augment_ms, augment_one_ms = [], []
    for rep in range(args.reps):
        for name, loader in loaders.items():
            loader.set_epoch(rep + 1)
            seconds, images = timed_epoch(loader)
            rates[name].append(images / seconds)
            print(f"rep {rep}: {name:14s} {images / seconds:8.1f} images/s", flush=True)
        start = time.perf_counter()
        augment(sample, rep + 1, 0)
        augment_ms.append((time.perf_counter() - start) * 1000)
        print(f"rep {rep}: augment_only   {augment_ms[-1]:8.1f} ms/batch", flush=True)
        # On a shared or small machine one torch thread can beat several; record both.
        torch.set_num_threads(1)
        start = time.perf_counter()
        augment(sample, rep + 1, 0)
        augment_one_ms.append((time.perf_counter() - start) * 1000)
        torch.set_num_threads(args.workers)
        print(f"rep {rep}: augment_only   {augment_one_ms[-1]:8.1f} ms/batch (1 thread)", flush=True)
    load_after = os.getloadavg()

    median = {name: statistics.median(values) for name, values in rates.items()}
    augment_median = statistics.median(augment_ms)
    result = {
        "what": "CPU loader throughput, images/s (median of interleaved epochs); producer = decode "
                "+ 2x224 + 6x96 crops with flips, uint8 out; torchvision = the whole published recipe",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": commit(),
        "machine": machine(),
        "versions": versions(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "dataset": dataset_stats(photos) | {"beton_bytes": beton.stat().st_size, "stored": "all JPEG"},
        "settings": {"batch_size": args.batch_size, "workers": args.workers, "reps": args.reps,
                     "crops": "2x224 (scale 0.2-1) + 6x96 (scale 0.05-0.2)",
                     "torch_threads": torch.get_num_threads()},
        "images_per_s": {name: {"median": round(median[name], 1), "reps": [round(v, 1) for v in values]}
                         for name, values in rates.items()},
        "augment_only": {
            "ms_per_batch_median": round(augment_median, 1),
            "ms_per_batch_reps": [round(v, 1) for v in augment_ms],
            "images_per_s": round(args.batch_size / augment_median * 1000, 1),
            "device": "cpu",
            "torch_threads": args.workers,
            "ms_per_batch_median_1_thread": round(statistics.median(augment_one_ms), 1),
            "ms_per_batch_reps_1_thread": [round(v, 1) for v in augment_one_ms],
        },
        # Ratios of the medians, and the median of each rep's ratio (contenders of one rep
        # ran back to back, so the latter cancels slow drifts in the machine's load).
        "ratios": {
            "ffcv_producer_over_torchvision": round(median["ffcv_producer"] / median["torchvision"], 2),
            "ffcv_full_over_torchvision": round(median["ffcv_full"] / median["torchvision"], 2),
            "ffcv_producer_over_torchvision_per_rep_median": round(statistics.median(
                p / t for p, t in zip(rates["ffcv_producer"], rates["torchvision"])), 2),
        },
    }
    print(json.dumps(result["images_per_s"], indent=1))
    print(json.dumps(result["ratios"]))
    if args.json:
        from carp_fast import ownership

        ownership.write_report(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
