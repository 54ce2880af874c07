#!/usr/bin/env python
"""Maintainers' probes of the FFCV producer's CPU cost (docs/ffcv_producer.md cites them).

    python dev/producer/producer_probe.py loop --workers 1 --epochs 20
    perf record -F 1999 -g -D 30000 -- python dev/producer/producer_probe.py loop --epochs 20
    python dev/producer/producer_probe.py decode-flags --images 200

``loop``: the producer as the trainer takes it, with its page faults per image, (tools/bench_loaders.py's FFCV loader,
copy=False) over the benchmark's all-JPEG .beton, one warm-up epoch, then ``--epochs``
timed ones; it prints when it is ready, so ``perf -D`` (milliseconds) can skip start-up,
and leaves without Python's final garbage collection.
``decode-flags``: libjpeg-turbo's decode flags (FFCV hard-codes FASTDCT) through a ctypes
binding, and cv2.imdecode, on one thread, with PSNR against PIL's decode of the same file.
Both read the photographs and .beton files that tools/bench_loaders.py generated.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import io
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
    quality, times = {}, {label: [] for label in contenders}
    for label, run in contenders.items():
        run()
        quality[label] = [_psnr(out, reference) for out, reference in zip(outputs, references)]
    for _ in range(args.reps):  # interleaved, so other load on the machine hits all alike
        for label, run in contenders.items():
            start = time.thread_time()
            run()
            times[label].append((time.thread_time() - start) / len(blobs) * 1e6)
    ffcv = statistics.median(times["fast DCT (FFCV)"])
    for label in contenders:
        median = statistics.median(times[label])
        print(f"{label:28s} {median:7.1f} µs per image ({median / ffcv:.2f}x FFCV's; median of {args.reps}), "
              f"PSNR vs PIL worst {min(quality[label]):.1f} dB, median {statistics.median(quality[label]):.1f} dB")
    return 0


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
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
