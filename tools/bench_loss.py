"""Time and memory of the CARP loss, forward + backward, across implementations.

    python tools/bench_loss.py --device cpu --dtype fp32 --json benchmarks/loss_cpu_fp32.json

Implementations (--impls):
  published  the formulation users run today, written from the maths: gather each view's
             logits through the [G, P] partition indices, stack, softmax, one einsum /
             clamp / log per pair, concatenate every probability and average it
  reference  carp_fast.loss.reference_carp_loss on partition-ordered logits
  compiled   torch.compile(reference_carp_loss)
  fused      carp_fast.fused_loss.fused_carp_loss (the csrc/ kernels; on CUDA the slice
             kernels where they apply)
  fused_warp     the same on CUDA with CARP_FAST_CUDA_KERNELS=warp (the row-per-warp kernels)
  fused_blocked  the same on CUDA with CARP_FAST_CUDA_KERNELS=blocked (the any-P kernels)

Time: median of forward + backward over --reps (wall clock on CPU, CUDA events on GPU), the
implementations interleaved rep by rep, in an order shuffled each rep, so that a noisy
(shared) machine disturbs them alike and none always follows the same other.
On CUDA the fused operators are also timed alone, and set against the memory roofline: the
bytes they must move (each logit read once by the forward, once by the backward, the
gradient written once, plus their small outputs) over their time, against the
device-to-device copy bandwidth measured in the same run and against the datasheet peak of
known GPUs. Peak extra memory: what one forward + backward allocates above the inputs, the
student gradient included. On CUDA that is torch.cuda.max_memory_allocated over the step
minus what was allocated before; on CPU each implementation runs in a fresh process with
glibc told to mmap every allocation of 64 KiB and more (so freed tensors go back to the OS
at once) and the growth of the peak resident set (VmHWM, reset through
/proc/self/clear_refs) over one step is read.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carp_fast import ownership  # noqa: E402
from carp_fast.loss import EPS, draw_partition, reference_carp_loss  # noqa: E402  (after the path fix)

IMPLS = ("published", "reference", "compiled", "fused", "fused_warp", "fused_blocked")
# The fused variants that pin the CUDA kernel layout, and the setting that pins it.
KERNEL_LAYOUTS = {"fused_warp": "warp", "fused_blocked": "blocked"}
DEFAULT_IMPLS = ("published", "reference", "compiled", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def published_carp_loss(
    student: torch.Tensor, teacher: torch.Tensor, partition: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published recipe on un-grouped logits [V, B, K] and a partition [G, P]."""
    partition_size = partition.shape[1]
    student_probs = torch.stack(
        [torch.softmax(view[:, partition].float(), dim=-1) for view in student.unbind(0)]
    )
    teacher_probs = torch.stack(
        [torch.softmax(view.detach()[:, partition].float(), dim=-1) for view in teacher.unbind(0)]
    )
    pair_losses = []
    for i, p in enumerate(student_probs):
        for j, q in enumerate(teacher_probs):
            if i == j:
                continue
            agreement = torch.einsum("bgc,bgc->bg", p, q)
            pair_losses.append(-torch.log(agreement.clamp(EPS, 1.0 - EPS)).mean())
    consistency = torch.stack(pair_losses).mean()
    # Under DDP this concatenation is all-gathered; one process here.
    all_probs = torch.cat([student_probs.flatten(0, 1), teacher_probs.flatten(0, 1)])
    mean_probs = all_probs.mean(dim=0)
    neg_entropy = (mean_probs * torch.log(mean_probs.clamp(EPS, 1.0 - EPS))).sum(-1)
    entropy = (neg_entropy + torch.log(torch.tensor(float(partition_size)))).mean()
    return consistency, entropy


def make_loss(impl: str, args: argparse.Namespace):
    """fn(student, teacher) -> (consistency, entropy) for one implementation."""
    if impl == "published":
        partition = draw_partition(args.prototypes, args.group, seed=0, step=0).to(args.device)
        return lambda s, t: published_carp_loss(s, t, partition)
    if impl == "reference":
        return lambda s, t: reference_carp_loss(s, t, args.group)
    if impl == "compiled":
        compiled = torch.compile(reference_carp_loss)
        return lambda s, t: compiled(s, t, args.group)
    if impl.startswith("fused"):
        from carp_fast import fused_loss

        if not fused_loss.is_available():
            raise SystemExit(f"fused loss unavailable: {fused_loss.unavailable_reason()}")
        return lambda s, t: fused_loss.fused_carp_loss(s, t, args.group)
    raise ValueError(impl)


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.prototypes)
    dtype = DTYPES[args.dtype]
    student = torch.randn(args.views_student, *shape, generator=generator) * 3
    teacher = torch.randn(args.views_teacher, *shape, generator=generator) * 3
    student = student.to(args.device, dtype).requires_grad_(True)
    return student, teacher.to(args.device, dtype)


def kernel_choice(impl: str):
    """CARP_FAST_CUDA_KERNELS pinned while a ``fused_*`` variant runs (forward and backward)."""
    if impl not in KERNEL_LAYOUTS:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {"CARP_FAST_CUDA_KERNELS": KERNEL_LAYOUTS[impl]})


def timing_order(impls: list[str], rep: int) -> list[str]:
    """The implementations in the order rep `rep` times them: shuffled anew each rep (seeded
    by the rep, so a run is repeatable), so that none is always timed right after the same
    other. In a fixed order on the H200, the whole fused step, timed right after
    torch.compile's, read 0.1-0.25 ms slower than its own kernels explain."""
    return random.Random(rep).sample(impls, len(impls))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(
    loss_fn, student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    student.grad = None
    consistency, entropy = loss_fn(student, teacher)
    (consistency + entropy).backward()
    return consistency, entropy


# ---- CPU peak memory, in a child process ------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def child_cpu_memory(impl: str, args: argparse.Namespace) -> None:
    """Runs in the child: prints the peak RSS growth (bytes) of one forward + backward."""
    torch.set_num_threads(args.threads)
    student, teacher = make_inputs(args)
    loss_fn = make_loss(impl, args)
    step(loss_fn, student, teacher)  # compile, lazy init, thread pool
    student.grad = None
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step(loss_fn, student, teacher)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_extra_bytes": (peak - before) * 1024}))


def cpu_peak_memory(impl: str, args: argparse.Namespace) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--memory-child", impl] + forwarded_args(args)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def forwarded_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--views-student={args.views_student}",
        f"--views-teacher={args.views_teacher}",
        f"--batch={args.batch}",
        f"--prototypes={args.prototypes}",
        f"--group={args.group}",
        f"--threads={args.threads}",
    ]


def cuda_peak_memory(loss_fn, student: torch.Tensor, teacher: torch.Tensor) -> int:
    student.grad = None
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(loss_fn, student, teacher)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---- CUDA: kernels alone against the memory roofline ------------------------------------

# Datasheet HBM bandwidth (bytes/s) of the GPUs this project is measured on; leads only,
# the copy bandwidth measured in the same run is the ceiling the ratio is also given against.
DATASHEET_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
                       "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}


def datasheet_bandwidth(name: str) -> float | None:
    """The datasheet bandwidth of the most specific known name inside ``name``, or None."""
    keys = [key for key in DATASHEET_BANDWIDTH if key in name]
    return DATASHEET_BANDWIDTH[max(keys, key=len)] if keys else None


def cuda_event_ms(fn, reps: int, warmup: int = 3) -> list[float]:
    """Per-call device time of ``fn`` (ms), each call between its own pair of events."""
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def copy_bandwidth(device: str, reps: int, gib: float = 2.0) -> dict:
    """Device-to-device copy of ``gib`` GiB of random data, bytes read + written per second."""
    source = torch.randn(int(gib * 2**30) // 4, device=device)
    target = torch.empty_like(source)
    times = cuda_event_ms(lambda: target.copy_(source), reps)
    moved = 2 * source.numel() * source.element_size()
    del source, target
    return {"bytes": moved, "median_ms": statistics.median(times),
            "bytes_per_s": moved / (statistics.median(times) / 1e3)}


def fused_roofline(student: torch.Tensor, teacher: torch.Tensor, group: int, reps: int,
                   bandwidth: float, peak: float | None) -> dict:
    """The fused forward and backward operators alone, against the bytes they must move."""
    ops = torch.ops.carp_fast
    student = student.detach()
    out = ops.partition_softmax_forward(student, teacher, group)
    _, agreement, student_stats, teacher_stats, prob_sum = out
    grad_consistency = torch.ones((), device=student.device)
    grad_prob_sum = torch.randn_like(prob_sum)

    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    logits = nbytes(student, teacher)
    small_out = nbytes(*out)
    must_move = {
        "forward": logits + small_out,
        "backward": logits + nbytes(student)  # the gradient
        + nbytes(agreement, student_stats, teacher_stats, grad_prob_sum, grad_consistency),
    }
    calls = {
        "forward": lambda: ops.partition_softmax_forward(student, teacher, group),
        "backward": lambda: ops.partition_softmax_backward(
            grad_consistency, grad_prob_sum, student, teacher, agreement, student_stats,
            teacher_stats, group),
    }
    def against_roofline(median_ms: float, must_move_bytes: int) -> dict:
        achieved = must_move_bytes / (median_ms / 1e3)
        return {"median_ms": median_ms, "must_move_bytes": must_move_bytes,
                "bytes_per_s": achieved, "of_copy_bandwidth": achieved / bandwidth,
                "of_datasheet_peak": achieved / peak if peak else None}

    result = {name: against_roofline(statistics.median(cuda_event_ms(call, reps)), must_move[name])
              for name, call in calls.items()}
    result["forward_backward"] = against_roofline(
        result["forward"]["median_ms"] + result["backward"]["median_ms"],
        must_move["forward"] + must_move["backward"])
    return result


# ---- Provenance -------------------------------------------------------------------------


from carp_fast.profiling import cpu_model, git_commit  # noqa: E402


# ---- Main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--views-student", type=int, default=8)
    parser.add_argument("--views-teacher", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--group", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--slice-images",
        default="",
        help="CUDA: also time the fused kernels alone at each of these comma-separated "
        "CARP_FAST_CUDA_SLICE_IMAGES values (images per warp of the slice kernels; tuning)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        child_cpu_memory(args.memory_child, args)
        return {}
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {IMPLS}")
    torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    student, teacher = make_inputs(args)
    loss_fns = {impl: make_loss(impl, args) for impl in impls}
    values = {}
    for impl in impls:
        with kernel_choice(impl):
            for _ in range(args.warmup):
                consistency, entropy = step(loss_fns[impl], student, teacher)
        values[impl] = (consistency.item(), entropy.item())
    synchronize(args.device)

    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for rep in range(args.reps):
        for impl in timing_order(impls, rep):
            with kernel_choice(impl):
                if on_cuda:
                    # Device time of the whole step (launch gaps included) on CUDA events.
                    (ms,) = cuda_event_ms(lambda: step(loss_fns[impl], student, teacher), 1, 0)
                    times[impl].append(ms / 1e3)
                    continue
                start = time.perf_counter()
                step(loss_fns[impl], student, teacher)
                times[impl].append(time.perf_counter() - start)

    roofline = None
    if on_cuda:
        memory = {}
        for impl in impls:
            with kernel_choice(impl):
                memory[impl] = cuda_peak_memory(loss_fns[impl], student, teacher)
        if "fused" in impls:
            bandwidth = copy_bandwidth(args.device, args.reps)
            peak = datasheet_bandwidth(torch.cuda.get_device_name(args.device))
            roofline = {"copy": bandwidth, "datasheet_bytes_per_s": peak, "kernels": {}}
            for impl in ("fused", *KERNEL_LAYOUTS):
                if impl in impls:
                    with kernel_choice(impl):
                        roofline["kernels"][impl] = fused_roofline(
                            student, teacher, args.group, args.reps, bandwidth["bytes_per_s"], peak)
            for images in filter(None, args.slice_images.split(",")):
                with mock.patch.dict(os.environ, {"CARP_FAST_CUDA_SLICE_IMAGES": images.strip()}):
                    roofline["kernels"][f"fused_slice_images_{images.strip()}"] = fused_roofline(
                        student, teacher, args.group, args.reps, bandwidth["bytes_per_s"], peak)
        memory_method = "torch.cuda.max_memory_allocated during one step minus allocated before"
    else:
        del loss_fns
        memory = {impl: cpu_peak_memory(impl, args) for impl in impls}
        memory_method = (
            "fresh process per impl, MALLOC_MMAP_THRESHOLD_=65536; VmHWM after one step "
            "(reset via /proc/self/clear_refs) minus VmRSS before it"
        )

    median_ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    # Every implementation must produce the student gradient, so also report what each
    # needs beyond it: the part an implementation can actually save.
    grad_bytes = student.numel() * student.element_size()
    beyond_grad = {k: (v - grad_bytes if v is not None else None) for k, v in memory.items()}
    ratios = {}
    if "fused" in impls:
        for impl in impls:
            if impl == "fused":
                continue
            ratios[f"{impl}_time_over_fused"] = median_ms[impl] / median_ms["fused"]
            if memory.get(impl) and memory.get("fused") is not None:
                ratios[f"fused_memory_over_{impl}"] = memory["fused"] / memory[impl]
                ratios[f"fused_memory_beyond_grad_over_{impl}"] = (
                    beyond_grad["fused"] / beyond_grad[impl]
                )

    result = {
        "what": "CARP loss forward + backward (consistency + entropy), one process",
        "shape": {
            "views_student": args.views_student,
            "views_teacher": args.views_teacher,
            "batch": args.batch,
            "prototypes": args.prototypes,
            "partition_size": args.group,
            "groups": args.prototypes // args.group,
        },
        "dtype": args.dtype,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if on_cuda else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "reps": args.reps,
        "load_average_before_after": [load_before, os.getloadavg() if load_before else None],
        "median_ms": median_ms,
        "min_ms": {impl: 1e3 * min(t) for impl, t in times.items()},
        "peak_extra_memory_bytes": memory,
        "peak_extra_memory_mib": {
            k: (v / 2**20 if v is not None else None) for k, v in memory.items()
        },
        "student_grad_mib": grad_bytes / 2**20,
        "peak_extra_memory_beyond_grad_mib": {
            k: (v / 2**20 if v is not None else None) for k, v in beyond_grad.items()
        },
        "memory_method": memory_method,
        "ratios": ratios,
        "roofline": roofline,
        "values": {impl: {"consistency": c, "entropy": h} for impl, (c, h) in values.items()},
    }
    for impl in impls:
        mem = result["peak_extra_memory_mib"][impl]
        mem_text = f"{mem:9.1f} MiB" if mem is not None else "      n/a"
        print(
            f"{impl:>10}: {median_ms[impl]:9.1f} ms  {mem_text}  "
            f"c={values[impl][0]:.6f} h={values[impl][1]:.6f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if roofline:
        print(f"copy bandwidth {roofline['copy']['bytes_per_s'] / 1e12:.2f} TB/s; "
              f"datasheet {roofline['datasheet_bytes_per_s'] or float('nan'):.3g} B/s")
        for impl, kernels in roofline["kernels"].items():
            for name, entry in kernels.items():
                print(f"  {impl:>13} {name:>16}: {entry['median_ms']:7.3f} ms  "
                      f"{entry['bytes_per_s'] / 1e12:5.2f} TB/s = {entry['of_copy_bandwidth']:.0%} of copy"
                      + (f", {entry['of_datasheet_peak']:.0%} of datasheet" if entry["of_datasheet_peak"] else ""))
    if args.json:
        ownership.write_report(args.json, result)
    return result


if __name__ == "__main__":
    main()
