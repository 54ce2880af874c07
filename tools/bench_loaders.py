#!/usr/bin/env python
"""CPU producer throughput: the FFCV producer per core against its decoder and the published recipe.

    python tools/bench_loaders.py --json benchmarks/ffcv_producer_cpu.json

On a GPU node the producer (decode once, 2x224 + 6x96 crops with flips, uint8 out) is
the only per-image work left on the CPU, so its images/s per core decides how many
cores each GPU needs. Measured in one process, interleaved rep by rep so that other
load on the machine hits every contender alike (medians, then ratios):

  decode_only        libjpeg-turbo through FFCV on one thread, every JPEG of the all-JPEG
                     .beton (the ceiling: the producer cannot beat its own decoder)
  producer           this tree's FFCV producer, --workers threads (and 1 thread), on the
                     all-JPEG .beton and on the converter's defaults (max side 500, half raw)
  producer_before    the producer at --before (git revision), the same runs
  torchvision        the published recipe, all of it on --workers CPU worker processes
  ffcv_full          (--augment) the producer plus the augmentation module on CPU tensors

Per core = images per CPU-second of this process (every producer thread, FFCV's batch
thread and the consumer loop; robust to other load on a shared machine, unlike wall
clock), next to the wall-clock images/s; both from each epoch's first batch on (see
timed_epoch_cpu). The profile split (decode, box draws,
resampling into the batch buffer, hand-off) is timed on one thread for both
producers. The cores per GPU come from the recorded GPU step (carp_fast.profiling).

The images are generated "photographs" (1/f-spectrum textures, soft-edged textured
objects, sensor noise; about 400x350 px, JPEG quality 90, about as many bytes per pixel
as ImageNet's photos), cached under --data-dir with the .beton files converted from them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


def producer_module(revision: str | None):
    """carp_fast.data.ffcv_loader of this tree, or as it was at git ``revision``."""
    if revision is None:
        from carp_fast.data import ffcv_loader

        return ffcv_loader
    source = subprocess.check_output(["git", "show", f"{revision}:carp_fast/data/ffcv_loader.py"], cwd=ROOT)
    folder = Path(tempfile.mkdtemp(prefix="ffcv_loader_before_"))
    path = folder / "ffcv_loader_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("ffcv_loader_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class BetonSamples:
    """The encoded images of a .beton and numba kernels that decode or cut them on one thread."""

    def __init__(self, path: Path, module):
        from ffcv.reader import Reader

        reader = Reader(str(path))
        table = np.sort(reader.alloc_table, order="ptr")
        data = np.memmap(path, np.uint8, mode="r")
        meta = reader.metadata["f0"]  # the image field (the converter writes it first)
        chunks = []
        for field in meta:
            pointer = int(field["data_ptr"])
            size = int(table["size"][np.searchsorted(table["ptr"], pointer)])
            chunks.append(np.array(data[pointer:pointer + size]))
        self.buffer = np.concatenate(chunks)
        offsets = np.cumsum([0] + [len(c) for c in chunks])
        self.addresses = (self.buffer.ctypes.data + offsets[:-1]).astype(np.int64)
        self.nbytes = np.diff(offsets).astype(np.int64)
        self.modes = meta["mode"].astype(np.int64)
        self.heights = meta["height"].astype(np.int64)
        self.widths = meta["width"].astype(np.int64)
        self.images = [np.empty((h, w, 3), np.uint8) for h, w in zip(self.heights, self.widths)]
        self.image_addresses = np.array([image.ctypes.data for image in self.images], np.int64)
        self.module = module
        self.kernels = _kernels(module)

    def decode(self) -> None:
        """Decode every JPEG sample (raw ones are pixels already: copied)."""
        self.kernels[0](self.addresses, self.nbytes, self.modes, self.heights, self.widths,
                        self.image_addresses, _jpeg_mode())


def _jpeg_mode() -> int:
    from ffcv.fields.rgb_image import IMAGE_MODES

    return IMAGE_MODES["jpg"]


def _kernels(module):
    """(decode all, draw all boxes, cut all views) compiled against ``module``'s kernels."""
    import numba
    from ffcv.libffcv import ctypes_imdecode

    pointer = module._address_as_pointer

    @numba.njit(nogil=True)
    def decode_all(addresses, nbytes, modes, heights, widths, targets, jpeg):
        for i in range(addresses.shape[0]):
            h, w = heights[i], widths[i]
            if modes[i] == jpeg:
                ctypes_imdecode(pointer(addresses[i]), nbytes[i], h, w, pointer(targets[i]), h, w, 0, 0, 1, 1,
                                False, False)
            else:
                source = numba.carray(pointer(addresses[i]), (h * w * 3,), np.uint8)
                numba.carray(pointer(targets[i]), (h * w * 3,), np.uint8)[:] = source

    @numba.njit(nogil=True)
    def draw_all(heights, widths, sizes, scales, log_ratio, seed, epoch, out):
        for i in range(heights.shape[0]):
            state = module.sample_stream(seed, epoch, np.uint64(i))
            for v in range(sizes.shape[0]):
                top, left, crop_h, crop_w, state = module.sample_crop_box(
                    heights[i], widths[i], scales[v, 0], scales[v, 1], log_ratio[0], log_ratio[1], state)
                u, state = module._uniform(state)
                out[i, v, 0], out[i, v, 1], out[i, v, 2], out[i, v, 3] = top, left, crop_h, crop_w
                out[i, v, 4] = u < 0.5

    @numba.njit(nogil=True)
    def cut_all(targets, heights, widths, sizes, scales, log_ratio, destination, starts, view_bytes, batch):
        for i in range(targets.shape[0]):
            image = numba.carray(pointer(targets[i]), (heights[i], widths[i], 3), np.uint8)
            state = module.sample_stream(np.uint64(0), np.uint64(1), np.uint64(i))
            module.cut_views(image, state, sizes, scales, log_ratio, 0.5, destination,
                             starts + (i % batch) * view_bytes)

    return decode_all, draw_all, cut_all


def thread_seconds(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def profile_split(samples: BetonSamples, views, batch_size: int, reps: int) -> dict:
    """Microseconds per image on one thread: decode, box draws, resampling into the batch buffer."""
    _, draw_all, cut_all = samples.kernels
    sizes = np.array([size for size, _ in views], np.int64)
    scales = np.array([scale for _, scale in views], np.float64)
    log_ratio = np.log(np.array([3 / 4, 4 / 3]))
    view_bytes = sizes * sizes * 3
    destination = np.zeros(int(view_bytes.sum()) * batch_size, np.uint8)
    starts = np.concatenate([[0], np.cumsum(view_bytes * batch_size)[:-1]]).astype(np.int64)
    boxes = np.zeros((len(samples.images), len(views), 5), np.int64)
    stages = {
        "decode": samples.decode,
        "box_draws": lambda: draw_all(samples.heights, samples.widths, sizes, scales, log_ratio,
                                      np.uint64(0), np.uint64(1), boxes),
        "draws_and_resample_into_batch_buffer": lambda: cut_all(
            samples.image_addresses, samples.heights, samples.widths, sizes, scales, log_ratio,
            destination.ctypes.data, starts, view_bytes, batch_size),
    }
    times = {name: [] for name in stages}
    for name, fn in stages.items():
        fn()  # compile
    for _ in range(reps):
        for name, fn in stages.items():
            times[name].append(thread_seconds(fn) / len(samples.images) * 1e6)
    return {name: round(statistics.median(values), 1) for name, values in times.items()}


def ffcv_loader(module, path: Path, args, workers: int):
    cfg = config("ffcv", path, args)
    cfg.data.num_workers = workers
    # Revisions before the nested config (data.ffcv.*) read the flat data.ffcv_* names.
    cfg.data.__dict__.update(ffcv_os_cache=cfg.data.ffcv.os_cache, ffcv_order=cfg.data.ffcv.order)
    # As the trainer runs it: the augmentation stage reads each batch at once, so the
    # loader hands out FFCV's buffers without a copy (the copy's cost is reported apart).
    return module.FFCVLoader(cfg, 0, 1, torch.device("cpu"), copy=False)


def timed_epoch_cpu(loader) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, images) of one epoch after its first batch.

    An epoch's start (FFCV allocates its batch buffers and starts its thread, torchvision
    its workers) is paid once per epoch: over ImageNet's 1.28 M images it is nothing, over
    the few hundred images here it would be a large share. So the clock starts when the
    first batch arrives, and counts the batches after it.
    """
    images, start, cpu = 0, None, None
    for batch in loader:
        if start is None:
            start, cpu = time.perf_counter(), time.process_time()
            continue
        images += batch.batch_size
    return time.perf_counter() - start, time.process_time() - cpu, images


def _median(values) -> float:
    return round(statistics.median(values), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # FFCV allocates its batch buffers (prefetch + 2 of them, 30 MB each at the published
    # crops) for every epoch, and their first writes fault every page in: 8 batches per
    # epoch would pay that on half of them, ImageNet's 20,000 on none. 32 batches make it
    # small next to the producer's work, for every contender alike.
    parser.add_argument("--images", type=int, default=2048, help="generated photographs (default 2048)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of every backend (default 2)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved epochs per contender (default 5)")
    parser.add_argument("--before", default="0bd6d15",
                        help="git revision whose producer is 'before' (default 0bd6d15, the triangle-filter "
                             "producer); '' to skip")
    parser.add_argument("--augment", action="store_true",
                        help="also time the producer plus the augmentation module on CPU (slow)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench_photos")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from carp_fast import profiling
    from carp_fast.data import build_loader

    torch.set_num_threads(args.workers)
    photos = make_photos(args.data_dir / "train", args.images, workers=args.workers)
    betons = {"jpeg": (args.data_dir / f"train_{args.images}_jpeg.beton", 0.0),
              "default": (args.data_dir / f"train_{args.images}_default.beton", 0.5)}
    for path, raw_fraction in betons.values():
        if not path.exists():
            _converter().convert(photos, path, max_side=500, quality=90, raw_fraction=raw_fraction,
                                 workers=args.workers, progress=False)
    modules = {"producer": producer_module(None)}
    if args.before:
        modules["producer_before"] = producer_module(args.before)
    cfg_tv = config("torchvision", photos, args)
    contenders = {"torchvision": build_loader(cfg_tv, "cpu", device_augment=True, rank=0, world=1)}
    for name, module in modules.items():
        for beton, (path, _) in betons.items():
            contenders[f"{name}/{beton}/{args.workers}w"] = ffcv_loader(module, path, args, args.workers)
        if args.workers != 1:
            contenders[f"{name}/jpeg/1w"] = ffcv_loader(module, betons["jpeg"][0], args, 1)
    if args.augment:
        contenders["ffcv_full"] = build_loader(config("ffcv", betons["jpeg"][0], args), "cpu",
                                               device_augment=True, rank=0, world=1)
    # One untimed epoch each: worker start-up and numba compilation are not throughput.
    for loader in contenders.values():
        timed_epoch_cpu(loader)
    samples = BetonSamples(betons["jpeg"][0], modules["producer"])
    samples.decode()

    load_before = os.getloadavg()
    wall = {name: [] for name in contenders}
    per_cpu = {name: [] for name in contenders}
    decode_rates = []
    for rep in range(args.reps):
        seconds = thread_seconds(samples.decode)
        decode_rates.append(len(samples.images) / seconds)
        print(f"rep {rep}: {'decode_only':24s} {decode_rates[-1]:8.1f} images per CPU-s (1 thread)", flush=True)
        for name, loader in contenders.items():
            loader.set_epoch(rep + 1)
            seconds, cpu, images = timed_epoch_cpu(loader)
            wall[name].append(images / seconds)
            per_cpu[name].append(images / cpu)
            print(f"rep {rep}: {name:26s} {images / seconds:8.1f} images/s, {images / cpu:8.1f} per CPU-s"
                  + (" (workers' CPU not counted)" if name == "torchvision" else ""), flush=True)
    load_after = os.getloadavg()

    views = [(224, (0.2, 1.0))] * 2 + [(96, (0.05, 0.2))] * 6
    split = {}
    for name, module in modules.items():
        for beton, (path, _) in betons.items():
            stages = profile_split(BetonSamples(path, module), views, args.batch_size, args.reps)
            per_image_cpu_us = 1e6 / statistics.median(per_cpu[f"{name}/{beton}/1w"]) \
                if beton == "jpeg" and f"{name}/jpeg/1w" in per_cpu else None
            if per_image_cpu_us is not None:
                stages["producer_1_thread_total"] = round(per_image_cpu_us, 1)
                stages["hand_off_and_loader"] = round(
                    per_image_cpu_us - stages["decode"] - stages["draws_and_resample_into_batch_buffer"], 1)
            split[f"{name}/{beton}"] = stages

    # The copy the loader makes of each batch (copy=True: FFCV recycles its buffers).
    sample_batch = next(iter(contenders[f"producer/jpeg/{args.workers}w"]))
    clone_us = []
    for _ in range(args.reps):
        start = time.thread_time()
        sample_batch.global_views.clone(), sample_batch.local_views.clone()
        clone_us.append((time.thread_time() - start) / sample_batch.batch_size * 1e6)

    ceiling = statistics.median(decode_rates)
    figures = {name: {"images_per_s_wall": _median(wall[name]), "images_per_cpu_s": _median(per_cpu[name]),
                      "reps_wall": [round(v, 1) for v in wall[name]],
                      "reps_per_cpu_s": [round(v, 1) for v in per_cpu[name]]} for name in contenders}
    # torchvision's work runs in worker processes, outside this process's CPU time.
    figures["torchvision"]["images_per_cpu_s"] = figures["torchvision"]["reps_per_cpu_s"] = None
    figures["decode_only"] = {"images_per_cpu_s": round(ceiling, 1), "reps_per_cpu_s": [round(v, 1) for v in decode_rates],
                              "threads": 1, "files": betons["jpeg"][0].name}
    step = profiling.recorded_gpu_step()
    key = f"producer/jpeg/{args.workers}w"
    summary = {}
    for beton in betons:
        now = f"producer/{beton}/{args.workers}w"
        entry = {"producer_per_core": figures[now]["images_per_cpu_s"],
                 "share_of_decode_ceiling": round(figures[now]["images_per_cpu_s"] / ceiling, 2),
                 "producer_over_torchvision_wall": round(figures[now]["images_per_s_wall"]
                                                         / figures["torchvision"]["images_per_s_wall"], 2),
                 "producer_over_torchvision_wall_per_rep_median": round(statistics.median(
                     p / t for p, t in zip(wall[now], wall["torchvision"])), 2)}
        before = f"producer_before/{beton}/{args.workers}w"
        if before in figures:
            entry["before_per_core"] = figures[before]["images_per_cpu_s"]
            entry["producer_over_before_per_core"] = round(
                figures[now]["images_per_cpu_s"] / figures[before]["images_per_cpu_s"], 2)
            entry["producer_over_before_per_core_per_rep_median"] = round(statistics.median(
                p / b for p, b in zip(per_cpu[now], per_cpu[before])), 2)
        if step:
            entry["cores_per_gpu"] = profiling.producer_cores_per_gpu(entry["producer_per_core"], step["images_per_s"])
            entry["verdict"] = profiling.cores_per_gpu_verdict(entry["producer_per_core"], step["images_per_s"],
                                                               step["source"])
            if "before_per_core" in entry:
                entry["cores_per_gpu_before"] = profiling.producer_cores_per_gpu(entry["before_per_core"],
                                                                                 step["images_per_s"])
        summary[beton] = entry
    jpeg_photos = dataset_stats(photos)
    record = profiling.run_record(["tools/bench_loaders.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "what": "FFCV producer per core (decode + 2x224 + 6x96 bicubic crops with flips, uint8 out) against "
                "its decoder alone (the ceiling), the producer before this change, and the published "
                "torchvision recipe; images/s (medians of interleaved epochs)",
        **record,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "dataset": jpeg_photos | {"betons": {beton: {"file": path.name, "bytes": path.stat().st_size,
                                                     "stored": "all JPEG q90" if raw == 0 else
                                                     f"converter defaults: max side 500, {raw:.0%} raw, rest JPEG q90"}
                                             for beton, (path, raw) in betons.items()}},
        "settings": {"batch_size": args.batch_size, "workers": args.workers, "reps": args.reps,
                     "crops": "2x224 (scale 0.2-1) + 6x96 (scale 0.05-0.2), flips",
                     "resampling": "bicubic (PIL, antialiased); before: triangle (PIL bilinear)",
                     "before_revision": args.before or None, "per_core": "images per CPU-second of the process",
                     "timed": "each epoch from its first batch on (epoch start-up excluded)",
                     "batches": "FFCV's buffers handed out as the trainer takes them (copy=False); "
                                "batch_copy_us_per_image is what a consumer that keeps them adds"},
        "gpu_step": step,
        "summary": summary,
        "figures": figures,
        "profile_split_us_per_image_1_thread": split,
        "batch_copy_us_per_image": round(statistics.median(clone_us), 1),
    }
    print(json.dumps(summary, indent=1))
    print(json.dumps(split, indent=1))
    if args.json:
        from carp_fast import ownership

        ownership.write_report(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
