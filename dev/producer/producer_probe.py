#!/usr/bin/env python
"""Maintainers' probes of the FFCV producer's CPU cost (docs/ffcv_producer.md cites them).

    python dev/producer/producer_probe.py loop --workers 1 --epochs 20
    perf record -F 1999 -g -D 30000 -- python dev/producer/producer_probe.py loop --epochs 20
    python dev/producer/producer_probe.py decode-flags --images 200
    python dev/producer/producer_probe.py resample --images 64

``loop``: the producer as the trainer takes it, with its page faults per image, (tools/bench_loaders.py's FFCV loader,
copy=False) over the benchmark's all-JPEG .beton, one warm-up epoch, then ``--epochs``
timed ones; it prints when it is ready, so ``perf -D`` (milliseconds) can skip start-up,
and leaves without Python's final garbage collection.
``decode-flags``: libjpeg-turbo's decode flags (FFCV hard-codes FASTDCT) through a ctypes
binding, and cv2.imdecode, on one thread, with PSNR against PIL's decode of the same file.
``resample``: the producer's resampler (``resize_crop``) against PIL's BICUBIC resize of
the same boxes, the recipe's 2 + 6 crops per photograph, on one thread; PIL is whichever
``import PIL`` finds, so a Pillow-SIMD build put first on PYTHONPATH is measured the same way.
All read the photographs and .beton files that tools/bench_loaders.py generated.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import io
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

# libjpeg-turbo's TJFLAG_* (turbojpeg.h)
FLAGS = {"accurate DCT": 0, "fast DCT (FFCV)": 2048, "fast DCT + fast upsampling": 2048 | 256}


def loop(args) -> int:
    import torch

    import bench_loaders

    beton = args.data_dir / f"train_{args.images}_jpeg.beton"
    if not beton.is_file():
        raise SystemExit(f"{beton} is missing: run `python tools/bench_loaders.py --images {args.images}` first")
    started = time.perf_counter()
    options = argparse.Namespace(images=args.images, batch_size=args.batch_size, workers=args.workers, reps=1,
                                 data_dir=args.data_dir)
    torch.set_num_threads(args.workers)
    loader = bench_loaders.ffcv_loader(bench_loaders.producer_module(None), beton, options, args.workers)
    bench_loaders.timed_epoch_cpu(loader)
    print(f"ready after {time.perf_counter() - started:.1f} s", flush=True)
    faults, total = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch + 1)
        seconds, cpu, images = bench_loaders.timed_epoch_cpu(loader)
        total += images + args.batch_size  # timed_epoch_cpu leaves the first batch out of its count
        print(f"epoch {epoch}: {images / seconds:.1f} images/s, {images / cpu:.1f} per CPU-s", flush=True)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(f"page faults: {faults / total:.1f} per image ({faults} over {total} images)", flush=True)
    # Leave without the interpreter's final collection, which would otherwise be the
    # largest Python entry of a perf profile of this loop.
    sys.stdout.flush()
    os._exit(0)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse else float("inf")


def _interleaved(contenders: dict, reps: int, items: int) -> dict[str, list[float]]:
    """Thread-CPU µs per item of each contender, ``reps`` rounds of all of them in turn, so
    other load on the machine hits all alike."""
    times = {label: [] for label in contenders}
    for _ in range(reps):
        for label, run in contenders.items():
            start = time.thread_time()
            run()
            times[label].append((time.thread_time() - start) / items * 1e6)
    return times


def decode_flags(args) -> int:
    import cv2
    from PIL import Image

    files = sorted((args.data_dir / "train").rglob("*.jpg"))[: args.images]
    if not files:
        raise SystemExit(f"no photographs under {args.data_dir / 'train'}: run tools/bench_loaders.py first")
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    turbo = ctypes.CDLL(name)
    turbo.tjInitDecompress.restype = ctypes.c_void_p
    handle = ctypes.c_void_p(turbo.tjInitDecompress())
    blobs = [path.read_bytes() for path in files]
    references = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in blobs]
    outputs = [np.empty_like(reference) for reference in references]
    cv2.setNumThreads(1)

    def turbo_decode(flags):
        def run():
            for blob, out in zip(blobs, outputs):
                status = turbo.tjDecompress2(handle, blob, ctypes.c_ulong(len(blob)),
                                             out.ctypes.data_as(ctypes.c_void_p), out.shape[1], 0,
                                             out.shape[0], 0, flags)
                if status != 0:
                    raise RuntimeError("tjDecompress2 failed")
        return run

    def cv2_decode():
        for blob, out in zip(blobs, outputs):
            out[:] = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR),
                                  cv2.COLOR_BGR2RGB)

    contenders = {**{label: turbo_decode(flags) for label, flags in FLAGS.items()}, "cv2.imdecode": cv2_decode}
    quality = {}
    for label, run in contenders.items():
        run()
        quality[label] = [_psnr(out, reference) for out, reference in zip(outputs, references)]
    times = _interleaved(contenders, args.reps, len(blobs))
    ffcv = statistics.median(times["fast DCT (FFCV)"])
    for label in contenders:
        median = statistics.median(times[label])
        print(f"{label:28s} {median:7.1f} µs per image ({median / ffcv:.2f}x FFCV's; median of {args.reps}), "
              f"PSNR vs PIL worst {min(quality[label]):.1f} dB, median {statistics.median(quality[label]):.1f} dB")
    return 0


def resample(args) -> int:
    import PIL
    from PIL import Image

    from carp_fast.config import CropsConfig
    from carp_fast.data.ffcv_loader import _uniform, resize_crop, sample_crop_box, sample_stream
    from carp_fast.data.recipe import FLIP_P, view_specs

    files = sorted((args.data_dir / "train").rglob("*.jpg"))[: args.images]
    if not files:
        raise SystemExit(f"no photographs under {args.data_dir / 'train'}: run tools/bench_loaders.py first")
    crops = CropsConfig()
    log_ratio = (math.log(crops.ratio[0]), math.log(crops.ratio[1]))
    photographs = []  # (PIL image, HWC array, [(top, left, height, width, out, flip)])
    for index, path in enumerate(files):
        picture = Image.open(path).convert("RGB")
        pixels = np.ascontiguousarray(np.asarray(picture))
        state, boxes = np.uint64(sample_stream(np.uint64(0), np.uint64(0), np.uint64(index))), []
        for size, (low, high) in view_specs(crops):
            top, left, height, width, state = sample_crop_box(pixels.shape[0], pixels.shape[1], low, high,
                                                              *log_ratio, np.uint64(state))
            u, state = _uniform(np.uint64(state))
            state = np.uint64(state)
            boxes.append((top, left, height, width, np.empty((size, size, 3), np.uint8), u < FLIP_P))
        photographs.append((picture, pixels, boxes))

    def ours():
        for _, pixels, boxes in photographs:
            for box in boxes:
                resize_crop(pixels, *box)

    def pil_crop(picture, top, left, height, width, out):
        return picture.resize(out.shape[:2], Image.BICUBIC, box=(left, top, left + width, top + height))

    def pil():  # no flip: PIL's costs extra, the producer's is free
        for picture, _, boxes in photographs:
            for *box, _ in boxes:
                pil_crop(picture, *box)

    worst = math.inf
    for picture, pixels, boxes in photographs:
        for *box, flip in boxes:
            resize_crop(pixels, *box, flip)
            expected = np.asarray(pil_crop(picture, *box))
            worst = min(worst, _psnr(box[-1], expected[:, ::-1] if flip else expected))
    pil_label = _pil_distribution(PIL)
    contenders = {"producer (resize_crop)": ours, pil_label: pil}
    times = _interleaved(contenders, args.reps, len(photographs))
    ours_median = statistics.median(times["producer (resize_crop)"])
    views = len(view_specs(crops))
    for label in contenders:
        median = statistics.median(times[label])
        print(f"{label:28s} {median:8.1f} µs per photograph ({views} crops; {median / ours_median:.2f}x the "
              f"producer's; median of {args.reps})")
    print(f"producer vs PIL, same boxes: worst PSNR {worst:.1f} dB over {len(photographs) * views} crops")
    if args.json:
        from carp_fast import ownership, profiling

        pil_median = statistics.median(times[pil_label])
        record = {
            "what": "the FFCV producer's resampler (resize_crop) against PIL's BICUBIC resize of the same boxes, "
                    "one thread, µs per photograph for all its crops (medians of interleaved reps)",
            "command": " ".join(["python", "dev/producer/producer_probe.py", *sys.argv[1:]]),
            "commit": profiling.git_commit(),
            "machine": profiling.machine_info(),
            "versions": {**profiling.versions(), "pil": pil_label, "pil_path": str(Path(PIL.__file__).parent)},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {"photographs": len(photographs), "reps": args.reps,
                         "crops": (f"{crops.global_number}x{crops.global_size} (scale {crops.global_scale[0]:g}-"
                                   f"{crops.global_scale[1]:g}) + {crops.local_number}x{crops.local_size} (scale "
                                   f"{crops.local_scale[0]:g}-{crops.local_scale[1]:g})"),
                         "flips": "the producer's flips are part of its resize (free); PIL is timed without them",
                         "timer": "thread CPU time"},
            "resample_us_per_photograph": {
                "producer": {"median": round(ours_median, 1),
                             "reps": [round(t, 1) for t in times["producer (resize_crop)"]]},
                "pil": {"median": round(pil_median, 1), "reps": [round(t, 1) for t in times[pil_label]]},
                "pil_over_producer": round(pil_median / ours_median, 2),
            },
            "worst_psnr_producer_vs_pil_db": round(worst, 1),
        }
        ownership.write_report(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _pil_distribution(pil) -> str:
    """"Pillow 13.0.0" or "Pillow-SIMD 12.1.1.post0": which distribution the imported PIL is
    (both call their package PIL and report only a version)."""
    import importlib.metadata

    names = {"pillow": "Pillow", "pillow-simd": "Pillow-SIMD"}
    for distribution in importlib.metadata.distributions(path=[str(Path(pil.__file__).parents[1])]):
        name = names.get(distribution.metadata["Name"].lower())
        if name:
            return f"{name} {distribution.version}"
    return f"PIL {pil.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench_photos")
    sub = parser.add_subparsers(dest="probe", required=True)
    run = sub.add_parser("loop", help="the producer over the benchmark's all-JPEG .beton")
    run.add_argument("--images", type=int, default=512, help="which .beton (train_N_jpeg.beton)")
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--epochs", type=int, default=20)
    run.set_defaults(fn=loop)
    flags = sub.add_parser("decode-flags", help="libjpeg-turbo's flags and cv2 against PIL's decode")
    flags.add_argument("--images", type=int, default=200)
    flags.add_argument("--reps", type=int, default=5)
    flags.set_defaults(fn=decode_flags)
    resampling = sub.add_parser("resample", help="the producer's resampler against PIL's BICUBIC, same boxes")
    resampling.add_argument("--images", type=int, default=64)
    resampling.add_argument("--reps", type=int, default=11)
    resampling.add_argument("--json", type=Path, default=None, help="write the figures here (benchmarks/...)")
    resampling.set_defaults(fn=resample)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
