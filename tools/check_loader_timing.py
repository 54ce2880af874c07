#!/usr/bin/env python
"""Check the profiler's loader figures against an independent timing of the same loaders.

    python tools/check_loader_timing.py [--backends torchvision,ffcv,dali] [--steps 8]
        [--tolerance 0.2] [--json benchmarks/profiler_check_cpu.json]
        [--profile-json benchmarks/profile_cpu_demo.json]

Runs ``tools/profile_throughput.py --baseline`` on CPU at the demo's small shape
(demo_cpu.yaml: ResNet-18, 2x48 + 4x24 crops, batch 48), timing its whole run, then times each loader
again in a fresh process of its own with a plain loop: build the loader from the same
config, let it warm up, and read the wall clock once around the next batches (the
profiler instead sums per-batch waits). The check passes when every loader figure (the
full MultiCropBatch, and the producer alone for ffcv and dali) agrees within
``--tolerance`` and the profiler finished within ``--budget-s``; the exit status is 1
otherwise. Backends that are not installed are reported and left out.

The demo dataset is generated under data/demo where nothing is yet (as data.generate_demo does); the FFCV backend reads
data/demo/train.beton, converted here the first time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carp_fast import ownership, profiling  # noqa: E402

CONFIG = "demo_cpu.yaml"
DEMO = ROOT / "data" / "demo"
PRODUCER_BACKENDS = ("ffcv", "dali")


def data_paths(backends: list[str]) -> dict[str, str]:
    """Where each backend reads the demo's training images, preparing what is missing."""
    from carp_fast.data import demo

    demo.prepare_demo(DEMO / "train")  # what data.generate_demo does: never over anyone's files
    paths = {b: str((DEMO / "train").relative_to(ROOT)) for b in backends}
    if "ffcv" in backends:
        beton = DEMO / "train.beton"
        if not beton.exists():
            subprocess.run([sys.executable, str(ROOT / "tools" / "convert_imagenet_ffcv.py"),
                            str(DEMO / "train"), str(beton), "--workers", "2"], check=True)
            if demo.is_current_demo(DEMO):
                # Listed in the demo's marker: derived from these images, it goes with them
                # when a newer demo version replaces them.
                ownership.record_file(DEMO, demo.KIND, beton.name)
        paths["ffcv"] = str(beton.relative_to(ROOT))
    return paths


def time_independently(backend: str, path: str, device_augment: bool, warmup: int, batches: int,
                       min_seconds: float) -> dict:
    """Images/s of one loader: one wall-clock interval over at least ``batches`` batches
    and ``min_seconds``, after ``warmup``."""
    import torch

    from carp_fast.config import load_config
    from carp_fast.data import build_loader

    cfg = load_config(CONFIG, [f"data.backend={backend}", f"data.path={path}", "data.generate_demo=false",
                               "train.device=cpu"])
    loader = build_loader(cfg, torch.device("cpu"), device_augment=device_augment)
    if len(loader) == 0:
        raise ValueError(f"{path} holds fewer images than one batch of {cfg.data.batch_size}")

    def endless():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = endless()
    for _ in range(warmup):
        next(stream)
    images = count = 0
    start = time.perf_counter()
    while count < batches or time.perf_counter() - start < min_seconds:
        images += next(stream).batch_size
        count += 1
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "images": images, "batches": count, "seconds": seconds}


def child(args: argparse.Namespace) -> int:
    result = time_independently(args.child, args.path, not args.producer, args.warmup, args.batches,
                                args.seconds)
    print(json.dumps(result))
    return 0


def run_child(backend: str, path: str, producer: bool, warmup: int, batches: int, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, "--path", path, "--warmup", str(warmup),
           "--batches", str(batches), "--seconds", str(seconds)] + (["--producer"] if producer else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torchvision,ffcv,dali")
    parser.add_argument("--steps", type=int, default=8, help="batches the profiler times per loader")
    parser.add_argument("--loader-seconds", type=float, default=5.0,
                        help="the profiler times each loader for at least this long")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--budget-s", type=float, default=300.0, help="the profiler's time limit")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile-json", type=Path, default=ROOT / "runs" / "profiler_check" / "profile.json",
                        help="where the profiler's own JSON goes (every stage, with --baseline)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--producer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    backends = [b for b in args.backends.split(",") if b]
    paths = data_paths(backends)
    report = {**profiling.run_record(), "config": CONFIG, "tolerance": args.tolerance,
              "budget_s": args.budget_s}
    load_before = os.getloadavg()

    profile_json = args.profile_json
    # Paths relative to the repository root (the cwd of both runs), so records read the same anywhere.
    cmd = [sys.executable, "tools/profile_throughput.py", "--cfg", CONFIG,
           "--device", "cpu", "--backends", ",".join(backends), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--loader-seconds", str(args.loader_seconds),
           "--baseline", "--json", str(profile_json),
           *[f"--data-path={b}={p}" for b, p in paths.items()]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    profiler_s = time.perf_counter() - start
    profile = json.loads(profile_json.read_text())
    report["profiler"] = {"command": " ".join(cmd[1:]), "wall_s": round(profiler_s, 1),
                          "within_budget": profiler_s <= args.budget_s,
                          "loaders": profile["loaders"], "verdict": profile["verdict"]}

    # The independent loop times twice the profiler's minimum batches and seconds, so the
    # two figures do not share their sampling window either.
    batches, seconds = 2 * args.steps, 2 * args.loader_seconds
    comparisons = {}
    for backend in backends:
        entry = profile["loaders"].get(backend, {})
        if "images_per_s" not in entry:
            comparisons[backend] = {"skipped": entry.get("error", "not measured by the profiler")}
            continue
        kinds = [("images_per_s", False)]
        if backend in PRODUCER_BACKENDS and entry.get("producer_images_per_s"):
            kinds.append(("producer_images_per_s", True))
        for key, producer in kinds:
            independent = run_child(backend, paths[backend], producer, args.warmup, batches, seconds)
            name = f"{backend}.{key}"
            if "error" in independent:
                comparisons[name] = {"profiler": entry[key], "independent_error": independent["error"]}
                continue
            ratio = entry[key] / independent["images_per_s"]
            comparisons[name] = {"profiler": round(entry[key], 2),
                                 "independent": round(independent["images_per_s"], 2),
                                 "profiler_batches": entry["producer_batches" if producer else "batches"],
                                 "independent_batches": independent["batches"],
                                 "independent_seconds": round(independent["seconds"], 2),
                                 "ratio": round(ratio, 3),
                                 "agrees": abs(ratio - 1) <= args.tolerance}
    report["comparisons"] = comparisons
    report["load_average_before_after"] = [load_before, os.getloadavg()]
    compared = [c for c in comparisons.values() if "agrees" in c]
    report["passed"] = bool(compared) and all(c["agrees"] for c in compared) and profiler_s <= args.budget_s

    print(f"\nprofiler wall time {profiler_s:.0f} s (budget {args.budget_s:.0f} s)")
    for name, entry in comparisons.items():
        if "agrees" in entry:
            print(f"  {name:32s} profiler {entry['profiler']:8.1f}  independent {entry['independent']:8.1f}"
                  f"  ratio {entry['ratio']:.2f}  {'ok' if entry['agrees'] else 'DISAGREES'}")
        else:
            print(f"  {name:32s} {entry}")
    print("passed" if report["passed"] else "FAILED")
    if args.json:
        ownership.write_report(args.json, report, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
