"""The training loop: steps, accumulation, EMA teacher, schedules, logging, checkpoints.

Everything the loop needs per step is derived from (seed, step) or reduced across
ranks; nothing on the host waits for the device except at log intervals (and, with
train.amp=fp16 only, the GradScaler's read of its found-inf flag each step).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from carp_fast import checkpoint, distributed, run_lock
from carp_fast.config import Config, config_from_dict, dump_config
from carp_fast.data import build_loader
from carp_fast.data.batch import host_to_device
from carp_fast.loss import carp_loss, draw_partition
from carp_fast.model import CarpModel
from carp_fast.optim import LARS, Schedules, ema_update, param_groups, scaled_lr, set_hyperparameters

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank)


def amp_dtype_for(cfg: Config, device: torch.device, is_main: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on this device (None: fp32; AMP is GPU-only)."""
    if cfg.train.amp == "off":
        return None
    if device.type == "cuda":
        return AMP_DTYPES[cfg.train.amp]
    if is_main:
        log.info("train.amp=%s ignored on CPU: training in fp32", cfg.train.amp)
    return None


def steps_per_epoch_of(loader, accumulation: int) -> int:
    """Optimiser steps in one epoch of ``loader`` (whole accumulation groups only)."""
    steps = len(loader) // accumulation
    if steps == 0:
        raise ValueError(
            f"an epoch has {len(loader)} batches per process, fewer than "
            f"train.accumulation_steps={accumulation}"
        )
    return steps


def build_schedules(cfg: Config, steps_per_epoch: int, global_batch: int) -> Schedules:
    """Learning rate (linear scaling of ``optim.base_lr``), weight decay and teacher momentum."""
    return Schedules(
        peak_lr=scaled_lr(cfg.optim.base_lr, global_batch),
        min_lr=cfg.optim.min_lr,
        warmup_steps=int(round(cfg.optim.warmup_epochs * steps_per_epoch)),
        total_steps=cfg.train.epochs * steps_per_epoch,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        teacher_momentum=cfg.optim.teacher_momentum,
    )


def build_models(cfg: Config, device: torch.device) -> tuple[CarpModel, CarpModel]:
    """Student and teacher from the same initial weights (seeded); the teacher has no grads."""
    torch.manual_seed(cfg.train.seed)
    student = CarpModel(cfg.model).to(device)
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return student, teacher


def warm_start(cfg: Config, student: CarpModel, teacher: CarpModel, is_main: bool) -> None:
    """``model.init_weights`` (a carp_fast or published CARP checkpoint) into both networks."""
    checkpoint.init_from_weights(cfg.model.init_weights, student, teacher)
    if is_main:
        log.info("initialised student and teacher from %s", cfg.model.init_weights)


def convert_sync_bn(model: CarpModel, where: str) -> CarpModel:
    if where == "all":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if where == "head":
        model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
    return model


def build_optimizer(cfg: Config, student: CarpModel, peak_lr: float) -> LARS:
    return LARS(
        param_groups(student),
        lr=peak_lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )


def compile_backbones(student: CarpModel, teacher: CarpModel) -> None:
    """``train.compile``: torch.compile both backbones in place.

    In-place compile keeps state-dict keys free of `_orig_mod.` prefixes. Static shapes: the
    two crop sizes get a graph each, rather than the second size recompiling both into one
    dynamic-shape graph with slower kernels.
    """
    student.backbone.compile(dynamic=False)
    teacher.backbone.compile(dynamic=False)


def wrap_ddp(student: CarpModel, env: distributed.DistEnv, device: torch.device) -> nn.Module:
    """The module the student's forward goes through: DDP over several processes, else itself."""
    if env.world_size == 1:
        return student
    return nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None
    )


@dataclass
class StepOutput:
    consistency: torch.Tensor
    entropy: torch.Tensor
    skipped: torch.Tensor  # 1.0 when the step was dropped for a non-finite loss


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: the step finished, last.pt holds it; rerun to resume."""


class NonFiniteLoss(FloatingPointError):
    """``train.nonfinite=stop`` and a loss was not finite; last.pt holds the last good state."""


PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    """Owns the models, optimiser, loader and run directory of one process."""

    def __init__(self, cfg: Config, env: distributed.DistEnv | None = None, loader=None):
        """``loader`` replaces the one ``cfg.data`` describes (profiling, synthetic data)."""
        self.cfg = cfg
        self.env = env or distributed.DistEnv(0, 1, 0)
        self.device = resolve_device(cfg.train.device, self.env.local_rank)
        self.out_dir = Path(cfg.train.out_dir)
        # First of all: this process becomes the run directory's one writer, or stops.
        run_lock.lock_run_dir(self.out_dir, self.env, self.device, cfg.train.run_dir_lock)
        self.amp_dtype = amp_dtype_for(cfg, self.device, self.env.is_main)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.loader = loader if loader is not None else build_loader(cfg, self.device, dtype=self.amp_dtype)
        accumulation = cfg.train.accumulation_steps
        self.steps_per_epoch = steps_per_epoch_of(self.loader, accumulation)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * self.env.world_size * accumulation
        self.schedules = build_schedules(cfg, self.steps_per_epoch, self.global_batch)

        self.student, self.teacher = build_models(cfg, self.device)
        if cfg.model.init_weights and not (self.out_dir / checkpoint.LAST).is_file():
            warm_start(cfg, self.student, self.teacher, self.env.is_main)  # a resume wins over it
        if self.env.world_size > 1 and self.device.type == "cuda":
            self.student = convert_sync_bn(self.student, cfg.model.sync_bn)
            self.teacher = convert_sync_bn(self.teacher, cfg.model.sync_bn)
        self.optimizer = build_optimizer(cfg, self.student, self.schedules.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Parameter lists for the multi-tensor EMA, fixed once so the step builds none.
        self.ema_student = list(self.student.parameters())
        self.ema_teacher = list(self.teacher.parameters())
        if cfg.train.compile:
            compile_backbones(self.student, self.teacher)
        self.student_forward = wrap_ddp(self.student, self.env, self.device)

        self.step = 0
        self.metrics_file = None
        self.tensorboard = None
        self.stop_requested = False  # set by the preemption signal handler, nothing else
        self.phase_hook: Callable[[str], None] | None = None
        """Called with each phase's name as it ends ("forward", "loss", "backward",
        "optimizer"), for profilers (tools/profile_throughput.py); None when training."""
        self.skipped_total = 0

    @property
    def epoch(self) -> int:
        """Epochs completed: derived from the step, the one counter the loop advances."""
        return self.step // self.steps_per_epoch

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "student": checkpoint.strip_prefixes(self.student.state_dict()),
            "teacher": checkpoint.strip_prefixes(self.teacher.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "rng": checkpoint.rng_state(),
            "format": "carp_fast/1",
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        saved_cfg = config_from_dict(state["config"])
        if saved_cfg.model != self.cfg.model:
            differing = [
                f"model.{k}: checkpoint {v!r} vs run {getattr(self.cfg.model, k)!r}"
                for k, v in vars(saved_cfg.model).items()
                if getattr(self.cfg.model, k) != v
            ]
            raise checkpoint.CheckpointError(
                f"{source} was trained with another model: " + "; ".join(differing)
            )
        checkpoint.check_compatible(state["student"], self.student, f"student of {source}")
        checkpoint.check_compatible(state["teacher"], self.teacher, f"teacher of {source}")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])  # the epoch follows from it; "epoch" is kept for readers
        checkpoint.set_rng_state(state.get("rng", {}))

    def save(self, numbered: bool = False) -> None:
        if not self.env.is_main:
            return
        state = self.state_dict()
        checkpoint.save_atomic(state, self.out_dir / checkpoint.LAST)
        if numbered:
            checkpoint.save_numbered(state, self.out_dir, self.step, self.cfg.train.keep_last)

    def request_stop(self, signum, frame) -> None:
        """Signal handler: only raise a flag; the loop stops at the next agreed point."""
        self.stop_requested = True

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self.request_stop) for sig in PREEMPT_SIGNALS}

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (one all-reduce, at log-interval sync points)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        distributed.all_reduce_sum(flag)
        return bool(flag.item() > 0)  # intended sync: only at agreed points

    def maybe_resume(self) -> bool:
        last = self.out_dir / checkpoint.LAST
        if not last.is_file():
            return False
        state = checkpoint.load(last, map_location=self.device)
        self.load_state_dict(state, str(last))
        if self.env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", last, self.step, self.epoch)
        return True

    # ------------------------------------------------------------------------------ step
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: list) -> StepOutput:
        """One optimiser step over ``len(batches)`` accumulated batches."""
        cfg = self.cfg
        lr = self.schedules.lr(self.step)
        weight_decay = self.schedules.weight_decay(self.step)
        momentum = self.schedules.teacher_momentum(self.step)
        set_hyperparameters(self.optimizer, lr, weight_decay)
        partition = host_to_device(draw_partition(
            cfg.model.num_prototypes, cfg.model.partition_size, cfg.train.seed, self.step
        ), self.device)

        consistency_sum = entropy_sum = None
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            no_sync = (
                self.student_forward.no_sync()
                if isinstance(self.student_forward, nn.parallel.DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with no_sync:
                num_student = batch.num_views()
                num_teacher = batch.global_views.shape[0] // batch.batch_size
                with self.autocast():
                    student_logits = self.student_forward(
                        batch.global_views, batch.local_views, partition, num_views=num_student
                    )
                    with torch.no_grad():
                        teacher_logits = self.teacher(
                            batch.global_views, None, partition, num_views=num_teacher
                        )
                self._phase_done("forward")
                consistency, entropy = carp_loss(
                    student_logits, teacher_logits, cfg.model.partition_size, impl=cfg.train.loss_impl
                )
                loss = (consistency + entropy) / len(batches)
                self._phase_done("loss")
                self.scaler.scale(loss).backward()
                self._phase_done("backward")
            finite = finite & torch.isfinite(loss.detach())
            consistency_sum = consistency.detach() if consistency_sum is None else consistency_sum + consistency.detach()
            entropy_sum = entropy.detach() if entropy_sum is None else entropy_sum + entropy.detach()

        apply_update = self._all_ranks_finite(finite)
        # Intended sync, fp16 only (train.amp=fp16): GradScaler reads its found-inf flag on
        # the host to decide whether to step. Disabled under bf16/off: no sync there.
        self.scaler.step(self.optimizer, apply_update=apply_update)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema_teacher, self.ema_student, momentum)
        self._phase_done("optimizer")
        self.step += 1
        return StepOutput(
            consistency_sum / len(batches), entropy_sum / len(batches), 1.0 - apply_update.float()
        )

    def _phase_done(self, phase: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(phase)

    def _all_ranks_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """Whether every rank's loss was finite, as a device tensor (no host sync).

        A tiny all-reduce makes the ranks agree, so they all drop the same step and none
        waits on a collective the others skipped. On a dropped step the gradients are
        zeroed so that LARS's skippable update sees finite numbers.
        """
        bad = (~finite).float().reshape(1)
        distributed.all_reduce_sum(bad)
        all_finite = (bad[0] == 0)
        # One masked_fill per parameter: NaN * 0 is NaN, so masking is the only safe zeroing.
        for param in self.ema_student:
            if param.grad is not None:
                param.grad.masked_fill_(~all_finite, 0.0)
        return all_finite

    # ------------------------------------------------------------------------------ loop
    def open_logs(self) -> None:
        if not self.env.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temporaries(self.out_dir)
        (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        self.metrics_file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError(
                    "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from error
            self.tensorboard = SummaryWriter(str(self.out_dir / "tb"))

    def close_logs(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def max_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        # ru_maxrss is in KiB on Linux: the process's peak resident memory.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def log_metrics(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def stop_step(self) -> int:
        cap = self.cfg.train.max_steps
        return self.total_steps if cap is None else min(cap, self.total_steps)

    def fit(self) -> dict:
        """Train until the last epoch or ``train.max_steps``; returns the last metrics.

        Raises :class:`Preempted` after saving when SIGTERM/SIGUSR1 arrived,
        :class:`NonFiniteLoss` under ``train.nonfinite=stop``, and
        :class:`~carp_fast.checkpoint.CheckpointError` when last.pt cannot be written (the
        previous one stays valid).
        """
        cfg = self.cfg
        self.maybe_resume()
        self.open_logs()
        previous_handlers = self._install_signal_handlers()
        stop = self.stop_step()
        if self.env.is_main:
            log.info(
                "training %s for %d steps (%d per epoch, global batch %d, peak lr %.4g) on %s, "
                "%d process(es), run dir %s",
                cfg.model.arch, stop, self.steps_per_epoch, self.global_batch,
                self.schedules.peak_lr, self.device, self.env.world_size, self.out_dir,
            )
        progress = Progress(self, stop)
        last_record: dict = {}
        accumulation = cfg.train.accumulation_steps
        try:
            while self.step < stop:
                start_in_epoch = self.step - self.epoch * self.steps_per_epoch
                self.loader.set_epoch(self.epoch, start_batch=start_in_epoch * accumulation)
                iterator = iter(self.loader)
                self.student.train()
                self.teacher.train()
                window = Window(self)
                for _ in range(start_in_epoch, self.steps_per_epoch):
                    if self.step >= stop:
                        break
                    wait_start = time.perf_counter()
                    batches = [next(iterator) for _ in range(accumulation)]
                    window.data_time += time.perf_counter() - wait_start
                    out = self.train_step(batches)
                    window.add(out, batches[0].batch_size * accumulation)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    keep_numbered = bool(cfg.train.keep_every) and self.step % cfg.train.keep_every == 0
                    save = (
                        self.step % cfg.train.ckpt_every == 0 or end_of_epoch
                        or self.step == stop or keep_numbered
                    )
                    if self.step % cfg.train.log_every == 0 or self.step == stop or end_of_epoch or save:
                        # The agreed point of all ranks: losses, dropped steps, stop requests.
                        last_record = window.flush()
                        self.log_metrics(last_record)
                        progress.update(last_record)
                        self._apply_nonfinite_policy(last_record)
                        preempted = self._stop_agreed()
                        if save or preempted:
                            self.save(numbered=keep_numbered)
                        if preempted:
                            raise Preempted(
                                f"stopped by signal at step {self.step}; {self.out_dir / checkpoint.LAST} "
                                "holds it: rerun the same command to resume"
                            )
                del iterator
        finally:
            progress.close()
            self.close_logs()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return last_record

    def _apply_nonfinite_policy(self, record: dict) -> None:
        skipped = record.get("skipped_steps", 0)
        if not skipped:
            return
        self.skipped_total += skipped
        if self.env.is_main:
            log.warning(
                "dropped %d step(s) with a non-finite loss before step %d (%d in this process's run)",
                skipped, self.step, self.skipped_total,
            )
        if self.cfg.train.nonfinite == "stop":
            # Dropped steps left the weights untouched, so this state is the last good one.
            self.save()
            raise NonFiniteLoss(
                f"non-finite loss before step {self.step} (train.nonfinite=stop); "
                f"{self.out_dir / checkpoint.LAST} holds the last good state"
            )


class Window:
    """Device-side sums between log lines; ``flush`` is the loop's one intended sync."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.reset()

    def reset(self) -> None:
        self.consistency = self.entropy = self.skipped = None
        self.steps = 0
        self.images = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, out: StepOutput, images: int) -> None:
        # A dropped step's loss is not finite: count it, keep it out of the averages.
        kept = out.skipped == 0
        consistency = torch.where(kept, out.consistency, 0.0)
        entropy = torch.where(kept, out.entropy, 0.0)
        if self.consistency is None:
            self.consistency, self.entropy, self.skipped = consistency, entropy, out.skipped
        else:
            self.consistency = self.consistency + consistency
            self.entropy = self.entropy + entropy
            self.skipped = self.skipped + out.skipped
        self.steps += 1
        self.images += images

    def flush(self) -> dict:
        trainer = self.trainer
        if self.steps == 0:
            return {}
        sums = torch.stack([self.consistency, self.entropy, self.skipped])
        distributed.all_reduce_sum(sums)
        # Intended host sync: one per log interval, to read the losses.
        consistency_sum, entropy_sum, skipped_sum = sums.tolist()
        world = trainer.env.world_size
        skipped = int(round(skipped_sum / world))  # the ranks agreed on every dropped step
        kept = (self.steps - skipped) * world
        consistency = consistency_sum / kept if kept else float("nan")
        entropy = entropy_sum / kept if kept else float("nan")
        elapsed = time.perf_counter() - self.start
        record = {
            "step": trainer.step,
            "epoch": trainer.step / trainer.steps_per_epoch,
            "loss": consistency + entropy,
            "consistency": consistency,
            "entropy": entropy,
            "lr": trainer.schedules.lr(trainer.step - 1),
            "weight_decay": trainer.schedules.weight_decay(trainer.step - 1),
            "teacher_momentum": trainer.schedules.teacher_momentum(trainer.step - 1),
            "images_per_s": self.images * world / max(elapsed, 1e-9),
            "data_time_s": self.data_time / self.steps,
            "step_time_s": elapsed / self.steps,
            "max_memory_mb": trainer.max_memory_mb(),
            "skipped_steps": skipped,
        }
        self.reset()
        return record


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise; rank 0 only."""

    def __init__(self, trainer: Trainer, stop: int):
        self.enabled = trainer.env.is_main
        self.trainer = trainer
        self.stop = stop
        mode = trainer.cfg.train.progress
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.bar = None
        self.start_time = time.perf_counter()
        self.start_step = trainer.step
        if self.enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=stop, initial=trainer.step, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if not self.enabled or not record:
            return
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}", refresh=False
            )
            self.bar.refresh()
            return
        done = record["step"] - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.stop - record["step"])
        print(
            f"step {record['step']:>6}/{self.stop} epoch {record['epoch']:.2f} "
            f"loss {record['loss']:.4f} (consistency {record['consistency']:.4f}, "
            f"entropy {record['entropy']:.4f}) lr {record['lr']:.4g} "
            f"{record['images_per_s']:.1f} img/s data {record['data_time_s'] * 1000:.0f} ms/step "
            f"eta {_format_seconds(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
