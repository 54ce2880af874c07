#!/usr/bin/env python
"""The first epoch from JPEG files on a GPU: data.backend=nvjpeg against torchvision.

    python tools/gpu_check_nvjpeg.py [--images 3000] [--batch-size 256] [--workers N]
        [--steps 20] [--warmup 5] [--budget 330] [--json OUT/gpu_check_nvjpeg.json]
        [--device cuda|cpu] [--tiny] [overrides ...]

On the machine it runs on (tools/gpu_check.sh calls it on a lent GPU), in one process:

  photos      generates --images photographs at ImageNet's mean size (tools/bench_loaders.py's
              generator: about 400x350 px, JPEG quality 90) on all cores;
  decode      decode alone: nvJPEG batched decode of those bytes (decode_images, batches of
              --batch-size), next to PIL's decode on all cores (the published recipe's decoder);
  producer    the nvjpeg producer (decode + 2x224 + 6x96 crops with flips, uint8 on the GPU),
              next to the torchvision backend's crops without colour augmentation;
  loader      both full loaders (augmented, normalised batches on the device);
  trainer     the real training step end to end from those files with each backend, next to
              the same step on a synthetic batch already on the device.

Every backend has --workers loader workers (default: all of the machine's cores). One JSON
(the machine, versions, command and commit first) gives images/s per stage, the verdict
(does the nvjpeg producer reach 5,000 images/s; does training from files reach 95 % of the
synthetic step) and the projected ImageNet epoch time (1,281,167 images) on one GPU for
each backend. Stages stop starting once --budget seconds have passed; the JSON says which
were skipped. ``--tiny`` shrinks the model and crops so that the script runs in seconds
on a CPU (its test does that).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loaders import dataset_stats, make_photos  # noqa: E402
from profile_throughput import _Repeat, carp_fast_steps, time_loader  # noqa: E402

from carp_fast import ownership  # noqa: E402
from carp_fast import profiling  # noqa: E402
from carp_fast.config import load_config  # noqa: E402
from carp_fast.data import build_loader  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
PRODUCER_GOAL = 5000.0  # images/s of the producer on one H100 or H200
END_TO_END_GOAL = 0.95  # training from files against the synthetic step
TINY = [
    "model.arch=resnet18", "model.num_prototypes=256", "model.partition_size=64",
    "model.hidden_dim=64", "model.bottleneck_dim=32", "crops.global_size=64",
    "crops.local_number=2", "crops.local_size=32", "train.loss_impl=reference",
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pil_decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").width


def time_decode(files: list[Path], device: torch.device, batch_size: int, workers: int) -> dict:
    """nvJPEG (or the CPU's decoder on a CPU device) through the backend's one decode
    function, and PIL's decode on ``workers`` processes, on the same files."""
    from carp_fast.data.nvjpeg_loader import decode_images, sample_kind, select_codec

    codec = select_codec("auto")
    encoded = [path.read_bytes() for path in files]
    kinds = [sample_kind(data) for data in encoded]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    batches = [range(i, min(i + batch_size, len(files))) for i in range(0, len(files), batch_size)]
    decode_images([tensors[i] for i in batches[0]], [kinds[i] for i in batches[0]], device, codec)
    synchronize(device)  # intended: the warm-up batch is done before the clock starts
    failed = 0
    start = time.perf_counter()
    for batch in batches:
        images = decode_images([tensors[i] for i in batch], [kinds[i] for i in batch], device, codec)
        failed += sum(isinstance(image, str) for image in images)
    synchronize(device)  # intended: every decode has finished when the clock stops
    seconds = time.perf_counter() - start
    with Pool(workers) as pool:
        pool.map(_pil_decode, [str(p) for p in files[: 4 * workers]])  # warm the pool
        start = time.perf_counter()
        pool.map(_pil_decode, [str(p) for p in files], chunksize=16)
        pil_seconds = time.perf_counter() - start
    return {
        "nvjpeg": {"images_per_s": len(files) / seconds, "decoder": codec.name, "device": str(device),
                   "batch_size": batch_size, "undecodable": failed},
        "pil_all_cores": {"images_per_s": len(files) / pil_seconds, "processes": workers},
    }


def time_trainer(cfg, device: torch.device, backend: str | None, steps: int, warmup: int) -> dict:
    """The real training step from ``backend``'s batches (None: a synthetic batch)."""
    if backend is None:
        return carp_fast_steps(cfg, device, steps, warmup, timed_phases=False)
    cfg = copy.deepcopy(cfg)
    cfg.data.backend = backend
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    loader = build_loader(cfg, device, dtype=dtype)
    result = carp_fast_steps(cfg, device, steps, warmup, loader=_Repeat(loader))
    result["loader_workers"] = cfg.data.num_workers
    return result


def verdict(report: dict) -> dict:
    """Goals met or not, and the projected ImageNet epoch on one GPU per backend."""
    out: dict = {"goals": {"producer_images_per_s": PRODUCER_GOAL,
                           "end_to_end_over_synthetic": END_TO_END_GOAL}}
    stages = report["stages"]
    producer = stages.get("producer", {}).get("nvjpeg", {}).get("images_per_s")
    trainer = stages.get("trainer", {})
    synthetic = trainer.get("synthetic", {}).get("images_per_s")
    lines = []
    if producer is not None:
        out["producer_goal_met"] = producer >= PRODUCER_GOAL
        lines.append(f"nvjpeg producer {producer:,.0f} images/s "
                     f"({'meets' if producer >= PRODUCER_GOAL else 'misses'} the {PRODUCER_GOAL:,.0f} goal)")
    out["projected_imagenet_epoch_s_per_gpu"] = {}
    for name in ("nvjpeg", "torchvision", "synthetic"):
        ips = trainer.get(name, {}).get("images_per_s")
        if ips:
            out["projected_imagenet_epoch_s_per_gpu"][name] = IMAGENET_TRAIN_IMAGES / ips
    for name in ("nvjpeg", "torchvision"):
        ips = trainer.get(name, {}).get("images_per_s")
        if ips and synthetic:
            share = ips / synthetic
            out[f"{name}_end_to_end_over_synthetic"] = share
            hours = IMAGENET_TRAIN_IMAGES / ips / 3600
            lines.append(f"{name} from files {ips:,.0f} images/s = {share:.0%} of the synthetic step "
                         f"({hours:.2f} h per ImageNet epoch on one GPU)")
    if "nvjpeg_end_to_end_over_synthetic" in out:
        out["end_to_end_goal_met"] = out["nvjpeg_end_to_end_over_synthetic"] >= END_TO_END_GOAL
    out["text"] = "; ".join(lines) or "no stage finished"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) on fast_400ep.yaml")
    parser.add_argument("--images", type=int, default=3000, help="photographs to generate (default 3000)")
    parser.add_argument("--batch-size", type=int, default=256, help="per-GPU batch (the recipe's 256)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="loader workers of every backend (default: all cores)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per contender")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="time each loader at least this long")
    parser.add_argument("--budget", type=float, default=330.0, help="start no stage after this many seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the photographs go (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="a small model and small crops, to test the script on a CPU")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "benchmarks")) / "gpu_check_nvjpeg.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data_dir = args.data_dir
    if data_dir is None:
        import tempfile

        data_dir = Path(tempfile.mkdtemp(prefix="carp_nvjpeg_photos_"))
    overrides = (TINY if args.tiny else []) + [
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        "data.generate_demo=false", f"train.device={device.type}", "train.compile=false",
        f"train.out_dir={data_dir / 'run'}",  # the trainer writes nothing here, nor resumes
        *args.overrides,
    ]
    report: dict = {**profiling.run_record(None if argv is None else ["tools/gpu_check_nvjpeg.py", *argv]),
                    "device": str(device), "settings": {"images": args.images, "batch_size": args.batch_size,
                    "workers": args.workers, "steps": args.steps, "warmup": args.warmup,
                    "overrides": overrides, "budget_s": args.budget},
                    "stages": {}, "skipped": [], "errors": {}}

    def stage(name: str, run) -> None:
        if time.perf_counter() - started > args.budget:
            report["skipped"].append(name)
            print(f"== {name}: skipped (budget of {args.budget:.0f} s spent)", flush=True)
            return
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["stages"][name] = run()
        except Exception as error:  # one stage failing must not lose the others' figures
            report["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"   failed: {report['errors'][name]}", flush=True)
        report.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(f"   {json.dumps(report['stages'].get(name), default=str)[:400]}", flush=True)

    photos = data_dir / "train"

    def make() -> dict:
        make_photos(photos, args.images, workers=args.workers)
        return dataset_stats(photos)

    stage("photos", make)
    cfg = load_config("fast_400ep.yaml", [f"data.path={photos}", *overrides])
    files = sorted(photos.rglob("*.jpg"))
    stage("decode", lambda: time_decode(files, device, args.batch_size, args.workers))

    def loaders(device_augment: bool) -> dict:
        out = {}
        for backend in ("nvjpeg", "torchvision"):
            try:
                out[backend] = time_loader(cfg, device, backend, device_augment, args.steps, 2,
                                           args.loader_seconds)
            except Exception as error:
                out[backend] = {"error": f"{type(error).__name__}: {error}"}
        return out

    stage("producer", lambda: loaders(False))
    stage("loader", lambda: loaders(True))

    def trainer() -> dict:
        out = {}
        for name, backend in (("synthetic", None), ("nvjpeg", "nvjpeg"), ("torchvision", "torchvision")):
            if time.perf_counter() - started > args.budget:
                report["skipped"].append(f"trainer.{name}")
                continue
            try:
                out[name] = time_trainer(cfg, device, backend, args.steps, args.warmup)
            except Exception as error:
                out[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"   trainer {name}: {out[name].get('images_per_s', out[name].get('error'))}", flush=True)
        return out

    stage("trainer", trainer)
    report["verdict"] = verdict(report)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print("verdict:", report["verdict"]["text"], flush=True)
    ownership.write_report(args.json, report, indent=1, default=str)  # replaces only its own reports
    print(f"wrote {args.json}")
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
