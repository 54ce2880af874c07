"""Soak test: 2-process DDP training on CPU for many steps, watching memory and speed.

    python tools/soak.py --steps 1000 --json benchmarks/soak_cpu_ddp.json [overrides ...]

Runs ``torchrun --nproc-per-node 2 -m carp_fast.train --cfg demo_cpu.yaml`` on the demo
data, samples each worker's resident memory (VmRSS) from /proc while it runs, and reads
throughput from the run's metrics.jsonl. Reports the RSS growth between the end of
warm-up and the end of the run, and the spread of images/s over the logged windows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from carp_fast import ownership, profiling  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    found = []
    for task in Path("/proc").glob("[0-9]*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        # The parent pid is the 4th field, after the parenthesised command name.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(task.name))
    return found


def summarise(samples: list[dict], records: list[dict], warmup_steps: int) -> dict:
    """RSS growth per rank from the end of warm-up to the last sample, and speed spread."""
    # Samples taken while both workers were alive, after warm-up.
    steady = [s for s in samples if s["step"] >= warmup_steps and len(s["rss_mib"]) == 2
              and all(s["rss_mib"])]
    growth = []
    if len(steady) >= 2:
        growth = [round(b - a, 1) for a, b in zip(steady[0]["rss_mib"], steady[-1]["rss_mib"])]
    speeds = [r["images_per_s"] for r in records if r["step"] > warmup_steps]
    quarter = max(len(speeds) // 4, 1)
    return {
        "steps": records[-1]["step"],
        "warmup_steps": warmup_steps,
        "rss_growth_after_warmup_mib_per_rank": growth,
        "rss_after_warmup_mib": steady[0]["rss_mib"] if steady else None,
        "rss_end_mib": steady[-1]["rss_mib"] if steady else None,
        "rss_max_after_warmup_mib": [max(s["rss_mib"][r] for s in steady) for r in range(2)] if steady else None,
        "images_per_s": {
            "median": statistics.median(speeds) if speeds else None,
            "min": min(speeds) if speeds else None,
            "max": max(speeds) if speeds else None,
            "first_quarter_median": statistics.median(speeds[:quarter]) if speeds else None,
            "last_quarter_median": statistics.median(speeds[-quarter:]) if speeds else None,
        },
        "rss_samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "soak_cpu_ddp.json"))
    parser.add_argument("--out-dir", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()

    # The log goes to a fresh folder of the soak's own, never into the run directory
    # (which must hold only what the trainer writes) nor over an existing file.
    workspace = Path(tempfile.mkdtemp(prefix="carp_soak_"))
    out_dir = Path(args.out_dir) if args.out_dir else workspace / "run"
    overrides = [
        f"train.out_dir={out_dir}", f"train.max_steps={args.steps}", "train.epochs=1000",
        "train.log_every=20", "train.ckpt_every=250", "train.progress=lines",
        "train.loss_impl=auto", "data.num_workers=1",
        # Smaller views and batch than the demo so 1,000 steps fit in minutes on 2 cores.
        "data.batch_size=8", "crops.global_size=32", "crops.local_size=16",
        *args.overrides,
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "-m", "carp_fast.train", "--cfg", "demo_cpu.yaml", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.time()
    log_path = workspace / "soak.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    samples: list[dict] = []
    metrics_path = out_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(2.0)
        workers = sorted(children(proc.pid))
        step = 0
        if metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            if lines:
                step = json.loads(lines[-1])["step"]
        samples.append({
            "t": round(time.time() - started, 1),
            "step": step,
            "rss_mib": [rss_mib(pid) for pid in workers],
        })
    if proc.returncode != 0:
        print("\n".join(log_path.read_text().splitlines()[-40:]))
        print(f"soak run failed with status {proc.returncode}", file=sys.stderr)
        return 1

    records = [json.loads(l) for l in metrics_path.read_text().splitlines()]
    result = {
        "what": "2-process DDP (gloo) soak of the demo recipe on CPU",
        **profiling.run_record(["tools/soak.py", *sys.argv[1:]]),
        "train_command": " ".join(command[1:]),
        "wall_s": round(time.time() - started, 1),
        **summarise(samples, records, args.warmup_steps),
    }
    ownership.write_report(args.json, result, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
