"""One trainer per run directory: the lock, its holder record, and what a rerun does."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from carp_fast import checkpoint, ownership
from carp_fast.distributed import DistEnv
from carp_fast.ownership import OwnershipError
from carp_fast.run_lock import LOCK_NAME, RunDirLocked, lock_run_dir
from carp_fast.train import EXIT_USAGE
from conftest import tiny_overrides
from test_reliability import assert_same_weights, last_step, student_weights, wait_for

ONE_PROCESS = DistEnv(0, 1, 0)
CPU = torch.device("cpu")

_HOLDER = """
import os, sys, time, torch
from carp_fast import run_lock
from carp_fast.distributed import DistEnv
run_lock.lock_run_dir(sys.argv[1], DistEnv(0, 1, 0), torch.device("cpu"))
child = os.fork()  # as a loader worker is forked: it must not keep the lock alive
if child == 0:
    time.sleep(600)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(600)
"""


def hold_in_another_process(out_dir):
    """A process holding ``out_dir``'s lock, and the pid of a child it forked after locking."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out_dir)],
                            stdout=subprocess.PIPE, text=True)
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(child)


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_dies_with_it(tmp_path):
    out = tmp_path / "run"
    holder, child = hold_in_another_process(out)
    try:
        record = json.loads((out / LOCK_NAME).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        with pytest.raises(RunDirLocked) as error:
            lock_run_dir(out, ONE_PROCESS, CPU)
        message = str(error.value)
        assert str(out) in message and f"pid {holder.pid}" in message
        assert socket.gethostname() in message and record["started"] in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        # SIGKILL released it, though the forked child lives on: this process takes the
        # directory over, with no manual step.
        lock_run_dir(out, ONE_PROCESS, CPU)
    finally:
        os.kill(child, signal.SIGKILL)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock_run_dir(out, ONE_PROCESS, CPU)  # the holder itself may take it again


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_is_refused_unless_the_user_turns_the_lock_off(tmp_path, monkeypatch, code):
    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "nfs_run"
    with pytest.raises(RunDirLocked) as error:
        lock_run_dir(out, ONE_PROCESS, CPU)
    assert "no working file locks" in str(error.value) and str(out) in str(error.value)
    assert "train.run_dir_lock=off" in str(error.value)
    assert list(out.iterdir()) == []  # the lock file it had just made is gone again
    lock_run_dir(out, ONE_PROCESS, CPU, mode="off")
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert ownership.read_marker(out, checkpoint.RUN_KIND) is not None


@pytest.mark.parametrize("with_complete", [True, False])
def test_a_folder_of_someone_elses_is_refused_as_run_directory(tmp_path, with_complete):
    out = tmp_path / "mine"
    (out / "results").mkdir(parents=True)
    (out / "config.yaml").write_text("their config")
    (out / "results" / "table.csv").write_text("1,2,3")
    if with_complete:
        (out / ".complete").write_text("done\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OwnershipError, match="did not write"):
        lock_run_dir(out, ONE_PROCESS, CPU)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_run_directory_of_an_older_carp_fast_is_taken_over(tmp_path):
    out = tmp_path / "old_run"
    checkpoint.save_atomic({"format": "carp_fast/1", "step": 3}, out / checkpoint.LAST)
    (out / "metrics.jsonl").write_text("{}\n")
    lock_run_dir(out, ONE_PROCESS, CPU)
    assert ownership.read_marker(out, checkpoint.RUN_KIND) is not None
    assert checkpoint.load(out / checkpoint.LAST)["step"] == 3


def test_a_foreign_file_at_the_lock_path_is_left_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("someone's notes")
    with pytest.raises(OwnershipError, match="not carp_fast's lock file"):
        lock_run_dir(out, ONE_PROCESS, CPU)
    assert (out / LOCK_NAME).read_text() == "someone's notes"


# ------------------------------------------------------------------- whole trainers
LONG = {"train.epochs": 6, "train.ckpt_every": 1}  # 36 steps: long enough to overlap


def train_command(data, out):
    return [sys.executable, "-m", "carp_fast.train", "--cfg", "demo_cpu.yaml",
            *tiny_overrides(data, out, **LONG)]


@pytest.fixture(scope="module")
def alone(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("alone") / "run"
    subprocess.run(train_command(tiny_dataset / "train", out), check=True, capture_output=True, timeout=900)
    return out


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_the_first_runs_and_changes_nothing(tiny_dataset, tmp_path, alone):
    out = tmp_path / "run"
    cmd = train_command(tiny_dataset / "train", out)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: last_step(out) >= 1 or first.poll() is not None, timeout=300)
        started = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
        assert first.poll() is None, "the first trainer ended before the second was refused"
    finally:
        first_status = first.wait(timeout=900)
    assert second.returncode == EXIT_USAGE, second.stderr
    assert f"run directory {out} is in use by another trainer (pid {first.pid} on host " \
           f"{socket.gethostname()}, started " in second.stderr
    assert seconds < 60  # the time to start Python and torch, then the refusal
    assert first_status == 0
    assert_same_weights(student_weights(out), student_weights(alone))


@pytest.mark.slow
def test_after_sigkill_of_the_holder_a_rerun_takes_over_and_resumes(tiny_dataset, tmp_path, alone):
    out = tmp_path / "run"
    cmd = train_command(tiny_dataset / "train", out)
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: last_step(out) >= 3 or first.poll() is not None, timeout=300)
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = last_step(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {out / checkpoint.LAST} at step {killed_at}" in rerun.stderr
    assert json.loads((out / LOCK_NAME).read_text())["pid"] != first.pid
    assert last_step(out) == last_step(alone)
    assert_same_weights(student_weights(out), student_weights(alone))
