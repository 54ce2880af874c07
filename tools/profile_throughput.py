"""Where a CARP step's time goes, whether a run is data- or compute-bound, and the
speed-up over the published recipe on the same machine.

    python tools/profile_throughput.py --cfg fast_400ep.yaml data.path=... \
        [--device cpu|cuda] [--backends torchvision,ffcv,dali] [--data-path ffcv=X.beton] \
        [--steps N] [--baseline] [--compile] [--json OUT.json]

Measures, each on its own and then together:
  1. loaders: images/s of finished MultiCropBatch on the device per backend, and of the
     producer stage alone where the backend has one (ffcv, dali);
  2. compute: training steps on a synthetic batch already on the device;
  3. loss: forward+backward time per implementation (reference, compiled, fused);
  4. the full step with the first backend's loader, split into data wait, forward, loss,
     backward and optimiser+EMA (CUDA events on GPU, wall clock on CPU).
``--baseline`` also runs the published recipe's way of training on identical inputs
(NCHW, fp16 autocast + GradScaler on GPU, the published loss formulation, per-parameter
Python LARS and EMA loops) and reports carp_fast's speed-up over it. ``--compile``
measures compute with and without torch.compile of the backbone. ``--data-path``
gives one backend its own input (a .beton for ffcv, shards for dali), so that one run
times backends whose data formats differ.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loss import published_carp_loss  # noqa: E402

from carp_fast import ownership, profiling  # noqa: E402
from carp_fast.config import load_config  # noqa: E402
from carp_fast.data import build_loader  # noqa: E402
from carp_fast.data.synthetic import SyntheticLoader  # noqa: E402
from carp_fast.loss import carp_loss, draw_partition  # noqa: E402
from carp_fast.model import CarpModel  # noqa: E402
from carp_fast.trainer import Trainer  # noqa: E402

PRODUCER_BACKENDS = ("ffcv", "dali", "nvjpeg")
PHASES = ("data", "forward", "loss", "backward", "optimizer")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------- loaders
# Per-backend data paths (``--data-path ffcv=train.beton``): one run can time backends
# whose inputs differ (an ImageFolder tree, a .beton file, webdataset shards).
DATA_PATHS: dict[str, str] = {}


def config_for_backend(cfg, backend: str):
    cfg = copy.deepcopy(cfg)
    cfg.data.backend = backend
    if backend in DATA_PATHS:
        cfg.data.path = DATA_PATHS[backend]
        cfg.data.generate_demo = False  # an explicit input: nothing to generate there
    return cfg


def time_loader(cfg, device, backend: str, device_augment: bool, steps: int, warmup: int,
                min_seconds: float = 0.0) -> dict:
    """Images/s of one loader, after ``warmup`` batches (workers started, caches warm).

    Times at least ``steps`` batches and at least ``min_seconds`` of waiting: a producer
    that makes a batch in milliseconds would otherwise be timed over a window short
    enough for its prefetch queue and the machine's noise to decide the figure.
    """
    cfg = config_for_backend(cfg, backend)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.amp == "bf16" else None
    loader = build_loader(cfg, device, device_augment=device_augment, dtype=dtype)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"{cfg.data.path} holds fewer images than one batch of {cfg.data.batch_size}")
    most = warmup + max(steps, 100 * per_epoch)  # a bound for loaders faster than the clock
    times = []
    done = 0
    epoch = 0

    def finished() -> bool:
        return done >= most or (len(times) >= steps and sum(times) >= min_seconds)

    # Ending and starting epochs (order, workers, queues) is part of what a loader costs:
    # the clock runs from one batch to the next, so it is charged to each epoch's first.
    start = time.perf_counter()
    while not finished():
        loader.set_epoch(epoch)
        iterator = iter(loader)
        for _ in range(per_epoch):
            if finished():
                break
            batch = next(iterator)
            # Intended sync: the batch must really be on the device before the clock stops.
            synchronize(device)
            now = time.perf_counter()
            if done >= warmup:
                times.append(now - start)
            done += 1
            start = time.perf_counter()
        del iterator
        epoch += 1
    batch_size = batch.batch_size
    total = sum(times)
    return {
        "images_per_s": images_per_second(batch_size * len(times), total),
        "median_batch_s": statistics.median(times),
        "batches": len(times),
        "batch_size": batch_size,
    }


# ----------------------------------------------------------------------------- compute
def carp_fast_steps(cfg, device, steps: int, warmup: int, loader=None, timed_phases=True) -> dict:
    """Optimiser steps of the real trainer; synthetic data unless ``loader`` is given."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if device.type == "cuda" else None
    source = loader or SyntheticLoader(cfg, device, dtype, length=steps + warmup)
    # Timed steps write nothing, but a Trainer takes its run directory: a private one, so
    # that profiling never waits on (or writes into) a real run's directory.
    cfg = copy.deepcopy(cfg)
    cfg.train.out_dir = tempfile.mkdtemp(prefix="carp_profile_run_")
    trainer = Trainer(cfg, loader=source)
    trainer.student.train()
    trainer.teacher.train()
    timer = profiling.PhaseTimer(device)
    iterator = iter(source)
    step_times = []
    for index in range(steps + warmup):
        measuring = index >= warmup
        if measuring and timed_phases:
            trainer.phase_hook = timer.mark
            timer.start()
        start = time.perf_counter()
        batch = next(iterator)
        if trainer.phase_hook is not None:
            trainer.phase_hook("data")
        trainer.train_step([batch])
        if measuring:
            # Intended sync per measured step: step time on the host clock.
            synchronize(device)
            step_times.append(time.perf_counter() - start)
        trainer.phase_hook = None
    totals = timer.totals() if timed_phases else {}
    total_time = sum(step_times)
    batch_size = cfg.data.batch_size
    result = {
        "images_per_s": images_per_second(batch_size * len(step_times), total_time),
        "median_step_s": statistics.median(step_times),
        "steps": len(step_times),
        "batch_size": batch_size,
    }
    if totals:
        phase_sum = sum(totals.values())
        result["phase_s_per_step"] = {p: totals.get(p, 0.0) / len(step_times) for p in PHASES}
        result["phase_share"] = {p: totals.get(p, 0.0) / phase_sum for p in PHASES}
    return result


class LoopLARS(torch.optim.Optimizer):
    """The published LARS: one Python iteration (and a handful of kernels) per parameter."""

    def __init__(self, params, lr, weight_decay, momentum, trust_coefficient):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim != 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(
                        update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


class PublishedRecipe:
    """The published training step: NCHW, fp16 autocast + GradScaler, full logits then
    the published partition/loss formulation, per-parameter LARS and EMA loops, and a
    read of the loss every step."""

    def __init__(self, cfg, device: torch.device):
        torch.manual_seed(cfg.train.seed)
        self.student = CarpModel(cfg.model, memory_format=torch.contiguous_format).to(device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        opt = cfg.optim
        self.optimizer = LoopLARS(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=opt.base_lr * cfg.data.batch_size / 256, weight_decay=opt.weight_decay,
            momentum=opt.momentum, trust_coefficient=opt.trust_coefficient,
        )
        self.device = device
        self.cfg = cfg
        self.fp16 = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)
        self.step_index = 0

    def step(self, batch) -> None:
        cfg = self.cfg
        num_student = batch.num_views()
        num_teacher = batch.global_views.shape[0] // batch.batch_size
        global_views = batch.global_views.contiguous()
        local_views = None if batch.local_views is None else batch.local_views.contiguous()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            student = self.student(global_views, local_views, None, num_views=num_student)
            with torch.no_grad():
                teacher = self.teacher(global_views, None, None, num_views=num_teacher)
        partition = draw_partition(cfg.model.num_prototypes, cfg.model.partition_size,
                                   cfg.train.seed, self.step_index).to(self.device)
        consistency, entropy = published_carp_loss(student.float(), teacher.float(), partition)
        loss = consistency + entropy
        with torch.no_grad():
            m = cfg.optim.teacher_momentum
            for q, k in zip(self.student.parameters(), self.teacher.parameters()):
                k.data.mul_(m).add_((1 - m) * q.detach().data)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if not torch.isfinite(loss).item():  # the published loop syncs here every step
            raise FloatingPointError("baseline loss is not finite")
        self.step_index += 1


def baseline_steps(cfg, device, steps: int, warmup: int) -> dict:
    source = SyntheticLoader(cfg, device, None, length=steps + warmup)
    recipe = PublishedRecipe(cfg, device)
    recipe.student.train()
    recipe.teacher.train()
    times = []
    for index, batch in enumerate(source):
        start = time.perf_counter()
        recipe.step(batch)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "images_per_s": images_per_second(cfg.data.batch_size * len(times), sum(times)),
        "median_step_s": statistics.median(times),
        "steps": len(times),
    }


# ------------------------------------------------------------------------- batch size
def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_fitting_batch(cfg, device, candidates: list[int], baseline: bool) -> dict:
    """The first of ``candidates`` (largest first) at which a carp_fast step, and the
    baseline's when it is measured too, run without running out of device memory."""
    tried = {}
    for batch_size in sorted(candidates, reverse=True):
        trial = copy.deepcopy(cfg)
        trial.data.batch_size = batch_size
        fits = True
        try:
            carp_fast_steps(trial, device, 1, 1, timed_phases=False)
            release_device_memory()
            if baseline:
                baseline_steps(trial, device, 1, 1)
        except Exception as error:  # noqa: BLE001 - only out-of-memory is a verdict here
            if not is_out_of_memory(error):
                raise
            fits = False
        # Outside the except block, so the traceback (and the tensors its frames hold) is gone.
        release_device_memory()
        tried[batch_size] = "fits" if fits else "out of memory"
        if fits:
            return {"chosen": batch_size, "tried": tried}
    raise RuntimeError(f"no batch size in {sorted(candidates, reverse=True)} fits on {device}")


# -------------------------------------------------------------------------------- loss
LOSS_IMPLS = ("reference", "compiled", "fused")


def time_losses(cfg, device, reps: int, num_student: int, num_teacher: int,
                impls: tuple[str, ...] = LOSS_IMPLS) -> dict:
    width = (cfg.model.num_prototypes // cfg.model.partition_size) * cfg.model.partition_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    b = cfg.data.batch_size
    student = (torch.randn(num_student, b, width, generator=generator) * 3).to(device, dtype)
    teacher = (torch.randn(num_teacher, b, width, generator=generator) * 3).to(device, dtype)
    results = {}
    for name in impls:
        if name == "compiled":
            fn = torch.compile(lambda s, t: carp_loss(s, t, cfg.model.partition_size, impl="reference"))
        else:
            fn = (lambda impl: lambda s, t: carp_loss(s, t, cfg.model.partition_size, impl=impl))(name)
        try:
            times = []
            for rep in range(reps + 2):
                leaf = student.detach().requires_grad_()
                synchronize(device)
                start = time.perf_counter()
                c, h = fn(leaf, teacher)
                (c + h).backward()
                synchronize(device)
                if rep >= 2:
                    times.append(time.perf_counter() - start)
            results[name] = {"median_s": statistics.median(times)}
        except Exception as error:  # fused not built, compile unsupported here
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    results["shape"] = {"student": list(student.shape), "teacher": list(teacher.shape),
                        "partition_size": cfg.model.partition_size, "dtype": str(dtype)}
    return results


# ----------------------------------------------------------------------------- report
def verdict(loader_ips: float | None, compute_ips: float) -> str:
    if loader_ips is None:
        return "no loader measured"
    if loader_ips < compute_ips:
        return f"data-bound: the loader delivers {loader_ips / compute_ips:.0%} of what compute could use ({compute_ips / loader_ips:.2f}x short)"
    return f"compute-bound: the loader has {loader_ips / compute_ips:.2f}x the images/s compute uses"


def producer_cores(report: dict, cfg, device: torch.device) -> dict | None:
    """Producer cores per GPU at the fastest measured producer's rate per worker thread.

    The GPU step is this run's compute (compiled where measured) on a GPU, else the
    recorded GPU step (profiling.RECORDED_GPU_STEP): on a CPU machine the producer is
    what is measured, the GPU it would feed is not here.
    """
    rates = {name: entry["producer_images_per_s"] for name, entry in report["loaders"].items()
             if entry.get("producer_images_per_s")}
    if not rates:
        return None
    backend = max(rates, key=rates.get)
    per_core = rates[backend] / max(1, cfg.data.num_workers)
    if device.type == "cuda":
        key = "compute_compiled" if "images_per_s" in report.get("compute_compiled", {}) else "compute"
        step = {"images_per_s": report[key]["images_per_s"], "source": f"{key} measured in this run"}
    else:
        step = profiling.recorded_gpu_step()
        if step is None:
            return None
    return {"backend": backend, "producer_images_per_s_per_core": per_core,
            "gpu_step_images_per_s": step["images_per_s"], "gpu_step_source": step["source"],
            "cores": profiling.producer_cores_per_gpu(per_core, step["images_per_s"]),
            "verdict": profiling.cores_per_gpu_verdict(per_core, step["images_per_s"], step["source"])}


def print_table(report: dict) -> None:
    print("\n== loaders (images/s on the device)")
    for name, entry in report["loaders"].items():
        if "error" in entry:
            print(f"  {name:12s} unavailable: {entry['error']}")
            continue
        producer = entry.get("producer_images_per_s")
        extra = f"   producer alone {producer:9.1f}" if producer else ""
        print(f"  {name:12s} full {entry['images_per_s']:9.1f}{extra}")
    compute = report["compute"]
    print(f"\n== compute on synthetic batches: {compute['images_per_s']:.1f} images/s "
          f"({compute['median_step_s'] * 1000:.1f} ms/step)")
    if "compute_compiled" in report:
        cc = report["compute_compiled"]
        if "error" in cc:
            print(f"   with torch.compile(backbone): failed: {cc['error'][:200]}")
        else:
            print(f"   with torch.compile(backbone): {cc['images_per_s']:.1f} images/s "
                  f"({cc['images_per_s'] / compute['images_per_s']:.2f}x eager)")
    print("\n== loss forward+backward (median)")
    for name, entry in report.get("loss", {}).items():
        if name == "shape":
            continue
        text = f"{entry['median_s'] * 1000:9.2f} ms" if "median_s" in entry else entry["error"][:80]
        print(f"  {name:12s} {text}")
    if "full_step" in report:
        full = report["full_step"]
        print(f"\n== full step with {full['backend']}: {full['images_per_s']:.1f} images/s")
        for phase, share in full.get("phase_share", {}).items():
            print(f"  {phase:10s} {share:6.1%}  {full['phase_s_per_step'][phase] * 1000:8.1f} ms/step")
    if "baseline" in report:
        print(f"\n== published recipe: {report['baseline']['images_per_s']:.1f} images/s; "
              f"carp_fast speed-up {report['speedup_over_baseline']:.2f}x (compute, identical inputs)")
        if "speedup_over_baseline_compiled" in report:
            print(f"   with torch.compile(backbone): {report['speedup_over_baseline_compiled']:.2f}x")
    print(f"\nverdict: {report['verdict']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--backends", default="torchvision")
    parser.add_argument("--data-path", action="append", default=[], metavar="BACKEND=PATH",
                        help="data.path for one backend (repeatable), e.g. ffcv=data/train.beton")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loader-seconds", type=float, default=3.0,
                        help="time each loader for at least this long (and at least --steps batches)")
    parser.add_argument("--loss-reps", type=int, default=5)
    parser.add_argument("--loss-impls", default=",".join(LOSS_IMPLS),
                        help=f"loss implementations to time, a subset of {','.join(LOSS_IMPLS)}")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(backbone)")
    parser.add_argument("--compute-only", action="store_true",
                        help="measure compute on synthetic batches only (no loaders, loss or full step)")
    parser.add_argument("--fit-batch", metavar="B1,B2,...",
                        help="per-process batch sizes to try, largest first: profile at the largest "
                             "that fits in device memory (with --baseline, for both recipes)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for item in args.data_path:
        backend, sep, path = item.partition("=")
        if not sep or not path:
            parser.error(f"--data-path takes BACKEND=PATH, got {item!r}")
        DATA_PATHS[backend] = path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = [*args.overrides, f"train.device={device.type}"]
    cfg = load_config(args.cfg, overrides)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch_fit = None
    if args.fit_batch:
        try:
            candidates = [int(b) for b in args.fit_batch.split(",") if b.strip()]
        except ValueError:
            parser.error(f"--fit-batch takes comma-separated integers, got {args.fit_batch!r}")
        batch_fit = largest_fitting_batch(cfg, device, candidates, args.baseline)
        cfg.data.batch_size = batch_fit["chosen"]
        print(f"batch size per process: {batch_fit['chosen']} ({batch_fit['tried']})", flush=True)
    record = profiling.run_record(None if argv is None else ["tools/profile_throughput.py", *argv])
    report = {**record, "device": str(device),
              "shape": {"batch_per_process": cfg.data.batch_size,
                        "views": f"{cfg.crops.global_number}x{cfg.crops.global_size}"
                                 f"+{cfg.crops.local_number}x{cfg.crops.local_size}",
                        "arch": cfg.model.arch, "prototypes": cfg.model.num_prototypes,
                        "partition": cfg.model.partition_size, "amp": cfg.train.amp,
                        "loss_impl": cfg.train.loss_impl},
              "batch_fit": batch_fit}

    loss_impls = tuple(name for name in args.loss_impls.split(",") if name)
    if set(loss_impls) - set(LOSS_IMPLS):
        parser.error(f"--loss-impls takes names from {','.join(LOSS_IMPLS)}, got {args.loss_impls!r}")
    backends = [] if args.compute_only else [b for b in args.backends.split(",") if b]
    report["loaders"] = {}
    for backend in backends:
        try:
            entry = time_loader(cfg, device, backend, True, args.steps, args.warmup, args.loader_seconds)
            if backend in PRODUCER_BACKENDS:
                producer = time_loader(cfg, device, backend, False, args.steps, args.warmup,
                                       args.loader_seconds)
                entry["producer_images_per_s"] = producer["images_per_s"]
                entry["producer_batches"] = producer["batches"]
            report["loaders"][backend] = entry
        except Exception as error:  # an optional backend missing here
            report["loaders"][backend] = {"error": f"{type(error).__name__}: {error}"}
    working = {k: v for k, v in report["loaders"].items() if "images_per_s" in v}
    report["loaders_flat"] = {k: {"images_per_s": v["images_per_s"],
                                  "producer_images_per_s": v.get("producer_images_per_s")}
                              for k, v in working.items()}

    # --compile measures both settings of train.compile: "compute" eager, "compute_compiled"
    # compiled. Without it "compute" runs as the config says.
    compute_cfg = cfg
    if args.compile:
        compute_cfg = copy.deepcopy(cfg)
        compute_cfg.train.compile = False
    report["shape"]["compile"] = compute_cfg.train.compile
    report["compute"] = carp_fast_steps(compute_cfg, device, args.steps, args.warmup)
    if args.compile:
        compiled_cfg = copy.deepcopy(cfg)
        compiled_cfg.train.compile = True
        try:
            report["compute_compiled"] = carp_fast_steps(compiled_cfg, device, args.steps, args.warmup)
        except Exception as error:
            report["compute_compiled"] = {"error": f"{type(error).__name__}: {error}"}
    if not args.compute_only:
        report["loss"] = time_losses(cfg, device, args.loss_reps,
                                     cfg.crops.global_number + cfg.crops.local_number,
                                     cfg.crops.global_number, loss_impls)

    if working:
        backend = next(iter(working))
        loader_cfg = config_for_backend(cfg, backend)
        dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.amp == "bf16" else None
        loader = build_loader(loader_cfg, device, dtype=dtype)
        full = carp_fast_steps(loader_cfg, device, min(args.steps, len(loader) - args.warmup),
                               args.warmup, loader=_Repeat(loader))
        full["backend"] = backend
        report["full_step"] = full

    if args.baseline:
        report["baseline"] = baseline_steps(cfg, device, args.steps, args.warmup)
        report["speedup_over_baseline"] = report["compute"]["images_per_s"] / report["baseline"]["images_per_s"]
        if "images_per_s" in report.get("compute_compiled", {}):
            report["speedup_over_baseline_compiled"] = (
                report["compute_compiled"]["images_per_s"] / report["baseline"]["images_per_s"])

    # The synthetic "loader" repeats one batch already on the device: not a data source.
    best_loader = max((v["images_per_s"] for k, v in working.items() if k != "synthetic"), default=None)
    report["verdict"] = verdict(best_loader, report["compute"]["images_per_s"])
    cores = producer_cores(report, cfg, device)
    if cores:
        report["producer_cores_per_gpu"] = cores
        report["verdict"] += "; " + cores["verdict"]
    print_table(report)
    if args.json:
        ownership.write_report(args.json, report, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


class _Repeat:
    """A loader that restarts its epoch when exhausted (for more steps than one epoch)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        epoch = 0
        while True:
            self.loader.set_epoch(epoch)
            yield from self.loader
            epoch += 1


if __name__ == "__main__":
    sys.exit(main())
