import json

import pytest
import torch
import yaml

from carp_fast import checkpoint
from carp_fast.trainer import Trainer


def test_short_run_writes_logs_config_and_checkpoint(tiny_config):
    cfg = tiny_config(train__max_steps=3)
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    teacher_before = [p.detach().clone() for p in trainer.teacher.parameters()]
    record = trainer.fit()
    out = trainer.out_dir
    assert record["step"] == 3
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    for key in ("epoch", "loss", "consistency", "entropy", "lr", "teacher_momentum",
                "images_per_s", "data_time_s", "max_memory_mb"):
        assert key in lines[-1]
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.to_dict()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["config"] == cfg.to_dict()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["student"])
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters())]
    assert sum(changed) > len(changed) // 2
    # The teacher moved towards the student, and got no gradient of its own.
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.parameters()))
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_max_steps_keeps_the_schedule(tiny_config):
    capped = Trainer(tiny_config(train__max_steps=2))
    full = Trainer(tiny_config())
    assert capped.total_steps == full.total_steps
    assert capped.schedules.lr(1) == full.schedules.lr(1)


def test_resume_is_exact(tiny_config, tmp_path):
    # 2N steps in one go vs N steps, then a fresh process-like trainer resuming to 2N.
    # N = 3 is mid-epoch (4 batches per epoch here), so the data position must resume too.
    straight = Trainer(tiny_config(train__out_dir=str(tmp_path / "a"), train__max_steps=6))
    straight.fit()
    first = Trainer(tiny_config(train__out_dir=str(tmp_path / "b"), train__max_steps=3))
    first.fit()
    second = Trainer(tiny_config(train__out_dir=str(tmp_path / "b"), train__max_steps=6))
    second.fit()
    assert second.step == 6
    for (name, a), b in zip(straight.student.state_dict().items(), second.student.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.teacher.state_dict().values(), second.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_accumulation_counts_in_the_global_batch(tiny_config):
    trainer = Trainer(tiny_config(train__accumulation_steps=2, train__max_steps=1))
    assert trainer.global_batch == 8
    assert trainer.steps_per_epoch == len(trainer.loader) // 2
    trainer.fit()
    assert trainer.step == 1


def test_resume_refuses_another_model(tiny_config, tmp_path):
    Trainer(tiny_config(train__out_dir=str(tmp_path / "r"), train__max_steps=1)).fit()
    other = Trainer(tiny_config(train__out_dir=str(tmp_path / "r"), model__num_prototypes=128))
    with pytest.raises(checkpoint.CheckpointError, match="num_prototypes"):
        other.fit()


def test_numbered_copies_are_kept_and_pruned(tiny_config, tmp_path):
    cfg = tiny_config(train__out_dir=str(tmp_path / "k"), train__keep_every=1, train__keep_last=2,
                      train__max_steps=4)
    Trainer(cfg).fit()
    names = sorted(p.name for p in (tmp_path / "k").glob("ckpt_*.pt"))
    assert names == ["ckpt_00000003.pt", "ckpt_00000004.pt"]


def test_warm_start_from_a_published_format_checkpoint(tiny_config, tmp_path):
    donor = Trainer(tiny_config(train__out_dir=str(tmp_path / "donor"), train__max_steps=1))
    donor.fit()
    # The published format: DDP-prefixed state dicts, no carp_fast config.
    published = {
        "student": {f"module.{k}": v for k, v in donor.student.state_dict().items()},
        "teacher": {f"module.{k}": v for k, v in donor.teacher.state_dict().items()},
        "epoch": 100,
    }
    path = tmp_path / "carp_published.pth"
    torch.save(published, path)
    warm = Trainer(tiny_config(train__out_dir=str(tmp_path / "warm"), model__init_weights=str(path)))
    for a, b in zip(warm.teacher.state_dict().values(), donor.teacher.state_dict().values()):
        assert torch.equal(a, b)
    assert warm.step == 0


def test_warm_start_refuses_another_architecture(tiny_config, tmp_path):
    donor = Trainer(tiny_config(train__out_dir=str(tmp_path / "donor"), train__max_steps=1))
    donor.fit()
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        Trainer(tiny_config(train__out_dir=str(tmp_path / "warm34"), model__arch="resnet34",
                            model__init_weights=str(tmp_path / "donor")))


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_fast_path_matches_the_plain_fp32_step(tiny_config, tmp_path, amp):
    # The production path (mixed precision, fused loss on the warp kernels
    # since P = 128, multi-tensor LARS and EMA on the GPU) against plain fp32 with the
    # reference loss: the same first-step loss within mixed-precision rounding, and a few
    # more steps that stay finite and move both networks.
    shared = dict(train__device="cuda", model__num_prototypes=256, model__partition_size=128)
    plain = Trainer(tiny_config(train__out_dir=str(tmp_path / "plain"), train__amp="off",
                                train__loss_impl="reference",
                                train__max_steps=1, **shared))
    plain.fit()
    fast = Trainer(tiny_config(train__out_dir=str(tmp_path / "fast"), train__amp=amp,
                               train__loss_impl="fused",
                               train__max_steps=4, **shared))
    student_before = [p.detach().clone() for p in fast.student.parameters()]
    teacher_before = [p.detach().clone() for p in fast.teacher.parameters()]
    fast.fit()

    def metrics(trainer):
        return [json.loads(l) for l in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]

    first_plain, fast_lines = metrics(plain)[0], metrics(fast)
    assert len(fast_lines) == 4 and all(torch.isfinite(torch.tensor(l["loss"])) for l in fast_lines)
    assert fast_lines[0]["loss"] == pytest.approx(first_plain["loss"], rel=2e-2)
    assert all(p.is_cuda for p in fast.student.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(student_before, fast.student.parameters())]
    assert sum(moved) > len(moved) // 2
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, fast.teacher.parameters()))
