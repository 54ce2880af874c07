"""Process-group setup for torchrun and SLURM, and the few collectives the loss needs.

One process per device. torchrun exports RANK / WORLD_SIZE / LOCAL_RANK (and
MASTER_ADDR / MASTER_PORT); under ``srun`` without torchrun we read SLURM's variables
and expect MASTER_ADDR / MASTER_PORT from the job script. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """Rank layout from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(
            int(os.environ["SLURM_PROCID"]),
            int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
        )
    return DistEnv(0, 1, 0)


def init(device_type: str, timeout_minutes: int = 30) -> DistEnv:
    """Join the process group when launched with several processes; returns the layout."""
    env = read_env()
    if env.world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                "distributed launch without MASTER_ADDR/MASTER_PORT: start with torchrun, "
                "or export both in the SLURM job script"
            )
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
            kwargs["device_id"] = torch.device("cuda", env.local_rank)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _restart_scoped_agent_store(env, timeout)
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
    return env


def _restart_scoped_agent_store(env: DistEnv, timeout: datetime.timedelta):
    """torchrun's shared store, with keys scoped to this restart; None to use env:// as is.

    With the c10d rendezvous torchrun hands its workers one TCPStore for the whole job
    and never clears it. After ``--max-restarts`` brings a group back, the new workers
    can read the dead workers' gloo/NCCL addresses from the previous attempt and fail
    with "connection refused" or hang (pytorch/pytorch#135712). Prefixing the keys with
    the restart count keeps attempts apart. The count is only consistent when one agent
    runs every rank (a single node); across nodes each agent counts its own restarts,
    so there we keep torchrun's behaviour and the README says to export
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for elastic multi-node jobs.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"carp_fast/restart_{attempt}", client)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op in a single process)."""
    all_reduce_sum(tensor)
    tensor /= world_size()
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ok(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (one tiny all-reduce; used at start-up only).

    Lets the ranks that wait on rank 0's work (locking the run directory, generating
    data) stop with it when it fails, rather than hang in a barrier it never reaches.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0  # intended sync: once, before training starts
