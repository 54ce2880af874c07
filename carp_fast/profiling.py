"""Measuring: per-phase step timing, and the machine/version record every benchmark carries."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class PhaseTimer:
    """Splits steps into named phases: CUDA events on GPU, wall clock on CPU.

    ``start()`` opens a step, each ``mark(phase)`` closes the phase that ran since the
    previous mark. On GPU nothing is read until :meth:`totals`, so timing adds no host
    sync inside the step; CPU timings are exact because CPU work is synchronous.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._totals: dict[str, float] = defaultdict(float)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks.append(("", self._now()))

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def totals(self) -> dict[str, float]:
        """Seconds per phase over all steps (synchronises the GPU once)."""
        if self.cuda and self._marks:
            torch.cuda.synchronize()
        previous = None
        for phase, stamp in self._marks:
            if phase and previous is not None:
                if self.cuda:
                    self._totals[phase] += previous.elapsed_time(stamp) / 1000
                else:
                    self._totals[phase] += stamp - previous
            previous = stamp
        self._marks = []
        return dict(self._totals)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD (+dirty), or CARP_FAST_COMMIT where the tree arrived without its history (a
    copied working tree on a benchmark machine)."""
    if os.environ.get("CARP_FAST_COMMIT"):
        return os.environ["CARP_FAST_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """CPU model and cores, memory, and the GPU with its driver when there is one."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def versions() -> dict:
    """Versions of everything that decides speed; absent optional backends are null."""
    import torchvision

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    # Read from the installed distributions, not by importing: importing FFCV sets torch
    # to one thread, which would change every figure measured after the record is taken.
    for name, distributions in (
        ("ffcv", ("ffcv",)),
        ("dali", ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110", "nvidia-dali")),
        ("numba", ("numba",)),
        ("torchcodec", ("torchcodec",)),  # the nvjpeg backend's decoder where installed
    ):
        found[name] = _installed_version(distributions)
    return found


def _installed_version(distributions: tuple[str, ...]) -> str | None:
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def run_record(argv: list[str] | None = None) -> dict:
    """What every benchmark JSON starts with: command, commit, machine, versions."""
    argv = sys.argv if argv is None else argv
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "commit": git_commit(),
        "machine": machine_info(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# The GPU step the producer has to keep fed: the compiled compute step of the published
# shape, as recorded by tools/profile_throughput.py on the GPU machine.
RECORDED_GPU_STEP = ROOT / "benchmarks" / "profile_gpu_h200.json"


def recorded_gpu_step(path: Path = RECORDED_GPU_STEP) -> dict | None:
    """``{"images_per_s", "source"}`` of the recorded GPU compute step (compiled where it was
    measured, else eager), or None where no record is readable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for key in ("compute_compiled", "compute"):
        images_per_s = record.get(key, {}).get("images_per_s")
        if images_per_s:
            gpu = record.get("machine", {}).get("gpu") or "GPU"
            return {"images_per_s": float(images_per_s),
                    "source": f"{Path(path).name} {key} ({gpu}, batch {record[key].get('batch_size')})"}
    return None


def producer_cores_per_gpu(producer_images_per_core_s: float, gpu_images_per_s: float) -> int:
    """Producer cores one GPU needs: its step's images/s over one core's, rounded up."""
    if producer_images_per_core_s <= 0:
        raise ValueError(f"producer rate must be positive, got {producer_images_per_core_s}")
    return math.ceil(gpu_images_per_s / producer_images_per_core_s)


def cores_per_gpu_verdict(producer_images_per_core_s: float, gpu_images_per_s: float, source: str) -> str:
    """The sentence both the loader benchmark and the profiler print."""
    cores = producer_cores_per_gpu(producer_images_per_core_s, gpu_images_per_s)
    return (f"this recipe needs {cores} producer cores per GPU ({producer_images_per_core_s:.0f} images/s "
            f"per producer core against {gpu_images_per_s:.0f} images/s per GPU step, {source})")
