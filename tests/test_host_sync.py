"""No host sync in the hot loop (CUDA only; collected and skipped without a GPU).

Under ``torch.cuda.set_sync_debug_mode("error")`` every operation that makes the host
wait for the GPU (a blocking copy, ``.item()``, a tensor built from a Python list on the
device, a boolean-mask index) raises. What runs under it here: optimiser steps of the real
trainer with the fused loss and bf16 (forward, loss, backward, LARS, EMA, the agreement on
non-finite steps, the log window's device sums), the shared device augmentation, and the
batches of the two-stage loaders installed on the machine. What runs outside it is what
the README documents as the loop's syncs: the log-interval flush and the agreed stop.
"""

import contextlib
import math

import pytest
import torch

from carp_fast import fused_loss
from carp_fast.config import load_config
from carp_fast.data import build_loader
from carp_fast.data.augment import MultiCropAugment
from carp_fast.data.batch import MultiCropBatch
from carp_fast.trainer import Trainer, Window
from conftest import load_converter, tiny_overrides

pytestmark = pytest.mark.cuda


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()  # the warm-up's work is done before the check starts
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def cuda_config(data, out, **extra):
    values = {"train.device": "cuda", "train.amp": "bf16", "train.loss_impl": "fused",
              "data.pin_memory": True, **extra}
    return load_config("demo_cpu.yaml", tiny_overrides(data, out, **values))


def needs_fused_cuda():
    if not fused_loss.supports_device("cuda"):
        pytest.skip(f"the fused loss has no CUDA kernels in this build ({fused_loss.unavailable_reason()})")


def test_training_steps_make_no_host_sync_between_log_intervals(tiny_dataset, tmp_path):
    needs_fused_cuda()
    cfg = cuda_config(tiny_dataset / "train", tmp_path / "run", **{"data.backend": "synthetic"})
    trainer = Trainer(cfg)
    iterator = iter(trainer.loader)
    for _ in range(2):  # warm-up: cudnn.benchmark's search, lazy initialisation, allocator growth
        trainer.train_step([next(iterator)])
    window = Window(trainer)
    with syncs_are_errors():
        for _ in range(5):
            window.add(trainer.train_step([next(iterator)]), cfg.data.batch_size)
    record = window.flush()  # documented sync: once per log interval
    assert record["step"] == 7 and math.isfinite(record["loss"]) and record["skipped_steps"] == 0
    assert trainer._stop_agreed() is False  # documented sync: at the same points


def test_fp16_grad_scaler_syncs_every_step_as_documented(tiny_dataset, tmp_path):
    needs_fused_cuda()
    cfg = cuda_config(tiny_dataset / "train", tmp_path / "run", **{"data.backend": "synthetic",
                                                                   "train.amp": "fp16"})
    trainer = Trainer(cfg)
    iterator = iter(trainer.loader)
    trainer.train_step([next(iterator)])
    with syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
        trainer.train_step([next(iterator)])  # GradScaler reads its found-inf flag


def test_device_augmentation_makes_no_host_sync():
    cfg = load_config("demo_cpu.yaml", [])
    crops, b = cfg.crops, 16
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)

    def views(number, size):
        return torch.randint(0, 256, (number * b, 3, size, size), dtype=torch.uint8,
                             device=device, generator=generator)

    batch = MultiCropBatch(views(crops.global_number, crops.global_size),
                           views(crops.local_number, crops.local_size),
                           torch.zeros(b, dtype=torch.long, device=device))
    augment = MultiCropAugment.from_config(cfg)
    augment(batch, 0, 0, torch.bfloat16)  # warm-up: the per-device constants are built
    with syncs_are_errors():
        # 96 rows a step at p = 0.8 of jitter: every slot sees hue rows, every step blurs.
        out = [augment(batch, 0, step, torch.bfloat16) for step in range(1, 4)]
    assert out[-1].global_views.dtype == torch.bfloat16
    assert torch.isfinite(out[-1].global_views.float()).all()


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_two_stage_loader_batches_make_no_host_sync(backend, tiny_dataset, tmp_path):
    pytest.importorskip({"ffcv": "ffcv", "dali": "nvidia.dali"}[backend])
    path = tiny_dataset / "train"
    if backend == "ffcv":
        path = tmp_path / "train.beton"
        load_converter().convert(tiny_dataset / "train", path, workers=2, progress=False)
    cfg = cuda_config(path, tmp_path / "run", **{"data.backend": backend, "data.num_workers": 2})
    loader = build_loader(cfg, torch.device("cuda"), dtype=torch.bfloat16)
    loader.set_epoch(0)
    iterator = iter(loader)
    next(iterator)  # warm-up: the pipeline starts and allocates its buffers
    with syncs_are_errors():
        batches = [next(iterator) for _ in range(3)]
    assert all(b.global_views.device.type == "cuda" for b in batches)
    assert batches[-1].global_views.dtype == torch.bfloat16
