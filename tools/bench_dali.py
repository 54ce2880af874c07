"""Images/s of the DALI producer in CPU mode against the torchvision backend, in one run.

    python tools/bench_dali.py --json benchmarks/loaders_dali_cpu.json

On a GPU node the producer (decode once, cut every crop) is the only per-image CPU work
of data.backend=dali, so this measures it the way it runs without a GPU: DALI's CPU
pipeline with ``data.num_workers`` threads, ``device_augment=False``. Against it: the
torchvision backend with as many worker processes running the whole published recipe
(decode, crops, colour jitter, grayscale, blur, solarize, normalisation), which is what a
run without carp_fast pays per image, and for reference the torchvision backend's
producer alone (decode and crops in PIL, ``device_augment=False``).

Data: realistic photographs generated in code (no download): 1/f ("pink") amplitude
spectra in correlated colour channels, as natural images have, with textured objects,
optical blur and sensor noise; 370-430 x 320-380 px (an average ImageNet training
image is about 400x350), JPEG quality 90, about 75 KB each. Crops: the production recipe
(2 x 224 px + 6 x 96 px).

Method: every loader is built once; each repetition runs one epoch of each, in an order
that alternates between repetitions, so a shared machine's load falls on all alike. A
repetition's rate counts the batches after the first (the first includes worker or
pipeline start-up); the report gives medians over repetitions and the ratio of medians.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from carp_fast import ownership, profiling  # noqa: E402
from carp_fast.config import load_config  # noqa: E402
from carp_fast.data import build_loader  # noqa: E402

# name -> (data.backend, device_augment, what it measures)
LOADERS = {
    "dali_producer": ("dali", False, "DALI CPU pipeline: decode once, 8 crops with flips, uint8"),
    "torchvision": ("torchvision", True, "torchvision backend, the whole published recipe"),
    "torchvision_producer": ("torchvision", False, "torchvision backend, decode and crops only"),
}


def photograph(rng: np.random.Generator, height: int = 350, width: int = 400) -> Image.Image:
    """A synthetic photograph with natural-image statistics (see the module docstring)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fx**2 + fy**2)
    frequency[0, 0] = 1.0
    channels, luminance = [], None
    for c in range(3):
        spectrum = (rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape))
        spectrum /= frequency ** rng.uniform(0.9, 1.2)
        spectrum[0, 0] = 0
        field = np.fft.irfft2(spectrum, s=(height, width))
        field = (field - field.mean()) / (field.std() + 1e-9)
        if luminance is None:
            luminance = field
        # Colour channels of photographs are strongly correlated.
        channels.append(field if c == 0 else 0.7 * luminance + 0.3 * field)
    texture = np.stack(channels, -1) * rng.uniform(30, 55)
    background = np.clip(texture + rng.uniform(60, 190, size=3), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(20, width / 2), rng.uniform(20, height / 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            sides = int(rng.integers(3, 7))
            corners = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(sides)]
            draw.polygon(corners, fill=colour)
    optics = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))), dtype=np.float32)
    noise = rng.normal(0, rng.uniform(4, 12), size=(height, width, 1))
    pixels = optics + 0.5 * (texture - texture.mean((0, 1))) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_photographs(root: Path, count: int, classes: int, quality: int, seed: int) -> Path:
    """An ImageFolder of ``count`` photographs under ``root`` (kept and reused when complete).

    ``root`` must be new, empty, or photographs this tool wrote (sealed, see
    carp_fast/ownership.py); anything else there is refused and left alone.
    """

    def fill(staging: Path) -> None:
        rng = np.random.default_rng(seed)
        for i in range(count):
            folder = staging / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = int(rng.integers(320, 381)), int(rng.integers(370, 431))
            buffer = io.BytesIO()
            photograph(rng, height, width).save(buffer, "JPEG", quality=quality)
            (folder / f"photo_{i:05d}.jpg").write_bytes(buffer.getvalue())

    return ownership.generated_folder(root, "benchmark photographs", f"{count} {classes} {quality} {seed}",
                                      fill, "Choose a new or empty --data folder.")


def epoch_rate(loader, epoch: int) -> tuple[float, float]:
    """``(images/s after the first batch, seconds to the first batch)`` of one epoch."""
    loader.set_epoch(epoch)
    start = time.perf_counter()
    iterator = iter(loader)
    batch = next(iterator)
    first = time.perf_counter()
    images = 0
    for batch in iterator:
        images += batch.batch_size
    elapsed = time.perf_counter() - first
    del iterator
    return images / elapsed, first - start


def git_commit_and_dirty() -> tuple[str | None, bool | None]:
    commit = profiling.git_commit()
    if commit is None:
        return None, None
    return commit.removesuffix("+dirty"), commit.endswith("+dirty")


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def versions() -> dict:
    import PIL
    import torchvision

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": np.__version__}
    try:
        import nvidia.dali

        found["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        found["nvidia-dali"] = None
    return found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the generated photographs (kept; default: a temporary one)")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2,
                        help="DALI threads and torchvision worker processes")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"subset of {','.join(LOADERS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = args.loaders.split(",")
    unknown = sorted(set(names) - set(LOADERS))
    if unknown:
        raise SystemExit(f"unknown loaders {unknown}; choose from {list(LOADERS)}")
    temporary = None
    if args.data is None:
        temporary = tempfile.TemporaryDirectory(prefix="bench_dali_")
        args.data = Path(temporary.name)
    started = time.perf_counter()
    make_photographs(args.data, args.images, args.classes, args.quality, args.seed)
    print(f"photographs ready in {time.perf_counter() - started:.0f} s", flush=True)
    sizes = [p.stat().st_size for p in args.data.rglob("*.jpg")]
    overrides = [
        f"data.path={args.data}", f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", "data.generate_demo=false", f"train.seed={args.seed}",
    ]
    loaders = {}
    for name in names:
        backend, device_augment, _ = LOADERS[name]
        cfg = load_config(None, overrides + [f"data.backend={backend}"])
        loaders[name] = build_loader(cfg, "cpu", device_augment=device_augment, rank=0, world=1)
    load_start = os.getloadavg()
    rates = {name: [] for name in names}
    startup = {name: [] for name in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            rate, first = epoch_rate(loaders[name], rep)
            rates[name].append(rate)
            startup[name].append(first)
            print(f"rep {rep} {name:22s} {rate:8.1f} images/s (first batch after {first:.2f} s)",
                  flush=True)
    load_end = os.getloadavg()
    commit, dirty = git_commit_and_dirty()
    results = {
        name: {
            "what": LOADERS[name][2],
            "images_per_s_median": round(statistics.median(rates[name]), 1),
            "images_per_s_reps": [round(r, 1) for r in rates[name]],
            "first_batch_s_median": round(statistics.median(startup[name]), 3),
        }
        for name in names
    }
    report = {
        "benchmark": "producer throughput: DALI CPU mode vs the torchvision backend",
        "command": " ".join(["python", _relative(sys.argv[0]), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "uncommitted_changes": dirty,
        "machine": {
            "cpu": profiling.cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "gpu": None,
            "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_start],
                                        "end": [round(x, 2) for x in load_end]},
            "note": "shared machine: absolute rates vary with other users' load; the ratios are "
                    "measured within one run",
        },
        "versions": versions(),
        "data": {
            "images": len(sizes), "height_px": [320, 380], "width_px": [370, 430],
            "jpeg_quality": args.quality, "mean_file_kib": round(sum(sizes) / len(sizes) / 1024, 1),
            "source": "generated photographs (tools/bench_dali.py:photograph)",
        },
        "setup": {
            "batch_size": args.batch_size,
            "crops": "2 x 224 px (scale 0.2-1) + 6 x 96 px (scale 0.05-0.2)",
            "dali_threads": args.workers, "torchvision_workers": args.workers, "device": "cpu",
            "reps": args.reps, "images_per_rep": len(loaders[names[0]]) * args.batch_size,
        },
        "method": "loaders built once; per rep one epoch each, order alternating per rep; rate over the "
                  "batches after the first; medians over reps",
        "results": results,
    }
    if "dali_producer" in names:
        dali = rates["dali_producer"]
        for other in names:
            if other == "dali_producer":
                continue
            per_rep = [d / o for d, o in zip(dali, rates[other])]
            report[f"speedup_dali_producer_over_{other}"] = {
                "ratio_of_medians": round(statistics.median(dali) / statistics.median(rates[other]), 2),
                "median_of_per_rep_ratios": round(statistics.median(per_rep), 2),
            }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        ownership.write_report(args.json, report)
    if temporary is not None:
        temporary.cleanup()
    return report


if __name__ == "__main__":
    main()
