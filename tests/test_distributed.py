"""Two gloo processes on CPU against one process holding the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from carp_fast import distributed
from carp_fast.loss import carp_loss
from spawn import free_port, run_ranks

VS, VT, BATCH, GROUPS, GROUP = 4, 2, 6, 3, 10


def make_logits():
    generator = torch.Generator().manual_seed(1234)
    student = torch.randn(VS, BATCH, GROUPS * GROUP, generator=generator) * 2
    teacher = torch.randn(VT, BATCH, GROUPS * GROUP, generator=generator) * 2
    return student, teacher


def rank_loss_and_grad(rank, world, impl):
    student, teacher = make_logits()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    local = student[:, rows].clone().requires_grad_()
    consistency, entropy = carp_loss(local, teacher[:, rows], GROUP, impl=impl)
    (0.7 * consistency + 1.3 * entropy).backward()
    return consistency.item(), entropy.item(), local.grad


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_ddp_loss_and_gradients_equal_single_process(impl):
    world = 2
    results = run_ranks(rank_loss_and_grad, world, impl)

    student, teacher = make_logits()
    student.requires_grad_()
    consistency, entropy = carp_loss(student, teacher, GROUP, impl="reference")
    (0.7 * consistency + 1.3 * entropy).backward()

    # DDP averages gradients over ranks: rank r's share is its local gradient / world.
    ddp_grad = torch.cat([grad for _, _, grad in results], dim=1) / world
    torch.testing.assert_close(ddp_grad, student.grad, rtol=1e-5, atol=1e-8)
    mean_consistency = sum(c for c, _, _ in results) / world
    assert mean_consistency == pytest.approx(consistency.item(), rel=1e-6)
    for _, h, _ in results:
        assert h == pytest.approx(entropy.item(), rel=1e-6, abs=1e-7)


def train_rank(rank, world, overrides):
    from carp_fast import distributed
    from carp_fast.config import load_config
    from carp_fast.trainer import Trainer

    cfg = load_config("demo_cpu.yaml", overrides)
    trainer = Trainer(cfg, distributed.read_env())
    record = trainer.fit()
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}, record


@pytest.mark.slow
def test_two_process_training_keeps_ranks_in_step(tiny_dataset, tmp_path):
    from conftest import tiny_overrides

    overrides = tiny_overrides(tiny_dataset / "train", tmp_path / "ddp", **{"train.max_steps": 2})
    results = run_ranks(train_rank, 2, overrides)
    (weights0, record0), (weights1, record1) = results
    for key in weights0:
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics are per rank without SyncBN (CPU)
        torch.testing.assert_close(weights0[key], weights1[key], rtol=0, atol=0, msg=key)
    assert record0["step"] == record1["step"] == 2
    # Only rank 0 writes the run directory.
    assert (tmp_path / "ddp" / "last.pt").exists()
    assert record0["loss"] == pytest.approx(record1["loss"])


def join_as_torchrun_worker(rank, world, port, attempt, group_world_size, results):
    # What torchrun (c10d rendezvous, shared store) exports to its workers.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT=str(attempt), GROUP_WORLD_SIZE=str(group_world_size),
    )
    torch.set_num_threads(1)
    distributed.init("cpu", timeout_minutes=1)
    total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
    results[rank] = total.item()
    distributed.shutdown()


def test_restarted_workers_do_not_read_the_previous_attempts_addresses():
    port = free_port()
    # Plays torchrun's agent: one store for every attempt, never cleared.
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    for attempt in range(3):
        results = mp.Manager().dict()
        mp.spawn(join_as_torchrun_worker, args=(2, port, attempt, 1, results), nprocs=2, join=True)
        assert dict(results) == {0: 3.0, 1: 3.0}, attempt
