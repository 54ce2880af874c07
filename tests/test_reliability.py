"""Fault injection: kills, preemption, failed writes, non-finite losses lose nothing."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carp_fast import checkpoint, ownership
from carp_fast.config import load_config
from carp_fast.train import EXIT_PREEMPTED, EXIT_WRITE_FAILED
from carp_fast.trainer import NonFiniteLoss, Trainer
from conftest import tiny_overrides
from spawn import run_ranks

ROOT = Path(__file__).resolve().parent.parent


def train_command(data, out, **extra):
    return [sys.executable, "-m", "carp_fast.train", "--cfg", "demo_cpu.yaml",
            *tiny_overrides(data, out, **extra)]


def last_step(out: Path) -> int:
    try:
        return checkpoint.load(out / checkpoint.LAST)["step"]
    except checkpoint.CheckpointError:
        return -1


def wait_for(predicate, timeout=120.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def student_weights(out: Path):
    return checkpoint.load(out / checkpoint.LAST)["student"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """An uninterrupted 8-step run to compare interrupted ones against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(train_command(tiny_dataset / "train", out, **{"train.max_steps": 8,
                   "train.ckpt_every": 1}), check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_matches_uninterrupted(tiny_dataset, tmp_path, reference_run):
    out = tmp_path / "killed"
    cmd = train_command(tiny_dataset / "train", out, **{"train.max_steps": 8, "train.ckpt_every": 1})
    rng = random.Random(0)
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = last_step(out)
        # Let it get going (past its own first checkpoint write), then kill at a random moment.
        wait_for(lambda: last_step(out) > start or proc.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Whatever the moment, last.pt is a whole checkpoint (old or new).
        assert last_step(out) >= 1
    assert kills >= 1
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert last_step(out) == 8
    assert not list(out.glob(".*.tmp"))
    assert_same_weights(student_weights(out), student_weights(reference_run))


_WRITER = """
import sys, torch
from carp_fast import checkpoint
path = sys.argv[1]
big = torch.arange(30_000_000, dtype=torch.float32)
step = 0
while True:
    step += 1
    checkpoint.save_atomic({"step": step, "payload": big + step}, path)
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_write_leaves_old_or_new_file(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"
    # Each write of 120 MB takes a while; kill at random points inside the next ones.
    time.sleep(random.Random(1).uniform(0.05, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = checkpoint.load(path)
    assert state["step"] >= 1
    assert torch.equal(state["payload"][:3], torch.arange(3, dtype=torch.float32) + state["step"])
    # Temporaries are removed only in a run directory carp_fast sealed.
    assert checkpoint.remove_stale_temporaries(tmp_path) == []
    ownership.write_marker(tmp_path, checkpoint.RUN_KIND, "1", {})
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert all(p.name.endswith(".tmp") for p in removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.MARKER, "last.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_resumes_at_the_same_step(signum, tiny_dataset, tmp_path, reference_run):
    out = tmp_path / "preempted"
    cmd = train_command(tiny_dataset / "train", out, **{"train.max_steps": 8, "train.ckpt_every": 100})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "rerun the same command to resume" in stderr
    stopped_at = last_step(out)
    assert 2 <= stopped_at < 8
    # Mid-epoch (4 batches per epoch): resume must restore the data position too.
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last.pt'} at step {stopped_at}" in resumed.stderr
    assert_same_weights(student_weights(out), student_weights(reference_run))


def test_failed_write_keeps_previous_checkpoint_and_stops_clearly(tiny_config, monkeypatch):
    cfg = tiny_config(train__max_steps=4, train__ckpt_every=2)
    trainer = Trainer(cfg)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device.*intact"):
        trainer.fit()
    monkeypatch.undo()
    state = checkpoint.load(trainer.out_dir / checkpoint.LAST)
    assert state["step"] == 2
    assert not list(trainer.out_dir.glob(".*.tmp"))


def test_failed_write_exit_status(tiny_dataset, tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    ownership.write_marker(out, checkpoint.RUN_KIND, "1", {})  # a run directory of carp_fast's
    (out / "last.pt").mkdir()  # renaming a file over a directory fails like a bad disk would
    result = subprocess.run(train_command(tiny_dataset / "train", out, **{"train.max_steps": 1}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_WRITE_FAILED, result.stderr
    assert "could not write checkpoint" in result.stderr and "last.pt" in result.stderr


def poison_loss_at(call_numbers):
    """A carp_loss that returns NaN on the given (1-based) calls."""
    from carp_fast import loss as loss_module

    state = {"calls": 0}

    def poisoned(*args, **kwargs):
        state["calls"] += 1
        consistency, entropy = loss_module.carp_loss(*args, **kwargs)
        if state["calls"] in call_numbers:
            return consistency * float("nan"), entropy
        return consistency, entropy

    return poisoned


def test_nonfinite_skip_drops_the_step_and_goes_on(tiny_config, monkeypatch):
    import carp_fast.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "carp_loss", poison_loss_at({2}))
    trainer = Trainer(tiny_config(train__max_steps=3, train__nonfinite="skip"))
    snapshots = []
    real_step = trainer.train_step

    def recording_step(batches):
        out = real_step(batches)
        snapshots.append([p.detach().clone() for p in trainer.student.parameters()])
        return out

    trainer.train_step = recording_step
    trainer.fit()
    assert trainer.step == 3 and trainer.skipped_total == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 dropped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    lines = (trainer.out_dir / "metrics.jsonl").read_text().splitlines()
    assert '"skipped_steps": 1' in lines[1]


def test_nonfinite_stop_saves_last_good_state(tiny_config, monkeypatch):
    import carp_fast.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "carp_loss", poison_loss_at({3}))
    trainer = Trainer(tiny_config(train__max_steps=6, train__nonfinite="stop"))
    with pytest.raises(NonFiniteLoss, match="last good state"):
        trainer.fit()
    state = checkpoint.load(trainer.out_dir / checkpoint.LAST)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def nonfinite_rank(rank, world, overrides):
    import carp_fast.trainer as trainer_module
    from carp_fast import distributed

    # Only rank 1 sees a non-finite loss, on its second step.
    if rank == 1:
        trainer_module.carp_loss = poison_loss_at({2})
    cfg = load_config("demo_cpu.yaml", overrides)
    trainer = Trainer(cfg, distributed.read_env())
    trainer.fit()
    return trainer.skipped_total, {k: v.clone() for k, v in trainer.student.state_dict().items()}


@pytest.mark.slow
def test_ranks_agree_to_drop_a_nonfinite_step(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset / "train", tmp_path / "ddp_nan",
                               **{"train.max_steps": 3, "train.nonfinite": "skip"})
    (skipped0, weights0), (skipped1, weights1) = run_ranks(nonfinite_rank, 2, overrides)
    assert skipped0 == skipped1 == 1
    for key in weights0:
        if "running" in key or "num_batches" in key:
            continue
        assert torch.equal(weights0[key], weights1[key]), key


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           "-m", "carp_fast.train", "--cfg", "demo_cpu.yaml",
           *tiny_overrides(tiny_dataset / "train", out, **{"train.max_steps": 10,
                                                          "train.ckpt_every": 1,
                                                          "data.batch_size": 2})]
    env = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="INFO")  # torchrun logs its restarts
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            assert wait_for(lambda: last_step(out) >= 2, timeout=300), log_path.read_text()[-4000:]
            # torchrun's own children are the two workers.
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            pids = [int(p) for p in workers.stdout.split()]
            assert len(pids) == 2, (pids, log_path.read_text()[-4000:])
            os.kill(pids[-1], signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # a hang must fail the test, not CI's clock
                proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-6000:]
    assert "Worker group FAILED" in output  # the kill really cost the group one attempt
    assert last_step(out) == 10
    assert "resumed from" in output
