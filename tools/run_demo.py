#!/usr/bin/env python
"""The demo end to end (what `make demo` runs): train, then show what was learned.

    python tools/run_demo.py [--json benchmarks/demo_cpu.json] [overrides ...]

1. ``python -m carp_fast.train --cfg demo_cpu.yaml [overrides]`` (the demo dataset is
   generated under data/demo the first time; a finished run in runs/demo is kept);
2. ``python -m carp_fast.eval.knn`` on the held-out demo images: the trained teacher
   next to the same network at its random initialisation, at the demo's 48 px.

Each command is printed before it runs. The summary (training wall time, images/s, both
k-NN accuracies, machine, versions, commit) goes to OUT_DIR/summary.json and, with
``--json``, to a second file for benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carp_fast import ownership, profiling  # noqa: E402
from carp_fast.config import load_config  # noqa: E402

CONFIG = "demo_cpu.yaml"


def run(cmd: list[str]) -> float:
    """Run ``cmd`` in the repository root, echoing it; returns its wall time in seconds."""
    print("+ " + " ".join(shlex.quote(part) for part in cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for the training run")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    cfg = load_config(CONFIG, args.overrides)  # a wrong key fails here, before any work
    out_dir = Path(cfg.train.out_dir)
    out_dir = out_dir if out_dir.is_absolute() else ROOT / out_dir
    data_root = Path(cfg.data.path).parent
    load_before = os.getloadavg()
    train_s = run([sys.executable, "-m", "carp_fast.train", "--cfg", CONFIG, *args.overrides])
    knn_json = out_dir / "knn.json"
    run([sys.executable, "-m", "carp_fast.eval.knn", "--ckpt", str(out_dir),
         "--train", str(data_root / "train"), "--val", str(data_root / "val"),
         "--image-size", str(cfg.crops.global_size), "--k", "10", "20", "--num-workers",
         str(cfg.data.num_workers), "--compare-random", "--json", str(knn_json)])

    knn = json.loads(knn_json.read_text())
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = metrics[-1]["step"] if metrics else 0
    rates = sorted(m["images_per_s"] for m in metrics)
    summary = {
        "what": "the demo: CARP pretraining on the generated shape images, then 10-NN on held-out ones",
        **profiling.run_record(None if argv is None else ["tools/run_demo.py", *argv]),
        "steps": steps,
        "arch": cfg.model.arch,
        "views": f"{cfg.crops.global_number}x{cfg.crops.global_size} + {cfg.crops.local_number}x{cfg.crops.local_size}",
        "batch_size": cfg.data.batch_size,
        "train_wall_s": round(train_s, 1),
        "images_per_s": round(rates[len(rates) // 2], 1) if rates else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "load_average_before_after": [load_before, os.getloadavg()],
        "knn": {
            "num_val": knn["num_val"],
            "num_classes": knn["num_classes"],
            "trained_top1": knn["results"]["10"]["top1"],
            "random_top1": knn["random_init"]["results"]["10"]["top1"],
            "trained": knn["results"],
            "random_init": knn["random_init"]["results"],
        },
    }
    ownership.write_report(out_dir / "summary.json", summary, indent=1)
    if args.json:
        ownership.write_report(args.json, summary, indent=1)
    k = summary["knn"]
    print(f"\ndemo: {steps} steps in {train_s / 60:.1f} min; 10-NN top-1 on {k['num_val']} held-out images: "
          f"trained {k['trained_top1']:.1f} % vs random init {k['random_top1']:.1f} % "
          f"(chance {100 / k['num_classes']:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
