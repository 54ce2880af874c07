"""One writer per run directory: an exclusive lock on ``train.out_dir/.carp_fast.lock``.

The trainer takes the lock before it reads or writes anything in its run directory
(rank 0 under torchrun; the other ranks wait for it and stop with it when it fails).
The lock is ``flock(LOCK_EX | LOCK_NB)`` on a file held open for the life of the
process: the kernel drops it when the process ends, however it ends (SIGKILL included;
processes forked from it, such as loader workers, close their copy of the descriptor at
once, so they never keep it alive), so a rerun after a crash or a kill takes the
directory over and resumes with no manual step. The file holds who has the lock (host,
pid, start time), for the second trainer's message; it is never deleted, so a stale
copy of it means nothing without the lock.

Filesystems without working locks (NFS mounted without lockd, some FUSE mounts) make
flock fail with ENOLCK or EOPNOTSUPP. Then the trainer refuses to start, saying so,
rather than run unguarded; ``train.run_dir_lock=off`` lets it train there without the
lock, and leaves it to the user that no second trainer writes the same directory.

Under the lock the directory is claimed as carp_fast's (see :mod:`carp_fast.ownership`):
it must be new, empty, already sealed as a run directory, or a run directory an older
carp_fast wrote (its last.pt a carp_fast checkpoint). A folder holding anything else is
refused and left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch

from carp_fast import checkpoint, distributed, ownership

log = logging.getLogger(__name__)

LOCK_NAME = ".carp_fast.lock"
LOCK_SIGNATURE = "carp_fast run directory lock"
# errno values that say "this filesystem cannot lock", not "someone holds the lock".
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

_held: dict[Path, int] = {}  # run directory -> descriptor holding its lock, for the process's life


def _close_in_child() -> None:
    """After fork (loader workers): close the inherited lock descriptors, without unlocking.

    A flock belongs to the open file, which a forked child shares; closing the child's
    copy (never LOCK_UN, which would unlock it for the parent too) leaves the parent the
    only holder, so the lock still ends the moment the trainer process ends.
    """
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLocked(RuntimeError):
    """The run directory is held by another trainer, or cannot be locked (exit status 2)."""


def lock_run_dir(out_dir: str | Path, env: distributed.DistEnv, device: torch.device,
                 mode: str = "flock") -> None:
    """Take ``out_dir`` for this run: rank 0 locks and claims it, every rank agrees.

    Raises :class:`RunDirLocked` (another trainer holds it, or no working locks) or
    :class:`~carp_fast.ownership.OwnershipError` (it holds files carp_fast did not write),
    on every rank.
    """
    out_dir = Path(out_dir)
    failure: Exception | None = None
    if env.is_main:
        try:
            _acquire(out_dir, mode)
        except (RunDirLocked, ownership.OwnershipError) as error:
            failure = error
    if not distributed.all_ok(failure is None, device):
        raise failure or RunDirLocked(f"rank 0 could not take the run directory {out_dir} (see its error)")


def holder_record() -> dict:
    return {
        "signature": LOCK_SIGNATURE,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }


def describe_holder(text: str) -> str:
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that left no readable record"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _is_lock_file(text: str) -> bool:
    if not text.strip():
        return True  # created by us (or a lock taken by a process killed before writing)
    try:
        return json.loads(text).get("signature") == LOCK_SIGNATURE
    except (ValueError, AttributeError):
        return False


def _acquire(out_dir: Path, mode: str) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ownership.OwnershipError(f"train.out_dir {out_dir} is a file, not a folder; nothing was changed")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = out_dir.resolve()
    if key in _held:
        return  # this process holds it already (one process, one writer: trainers in turn)
    path = out_dir / LOCK_NAME
    created = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        created = False
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # no O_TRUNC: checked before it is written

    def give_up(error: Exception) -> Exception:
        os.close(fd)
        if created:
            path.unlink(missing_ok=True)  # made just now by this process, holding nothing
        return error

    if mode == "flock":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read(fd))
            os.close(fd)
            raise RunDirLocked(
                f"run directory {out_dir} is in use by another trainer ({holder}); only one "
                "trainer may write a run directory: wait for it to end, stop it, or choose "
                "another train.out_dir"
            ) from None
        except OSError as error:
            if error.errno not in NO_LOCKS:
                raise
            raise give_up(RunDirLocked(
                f"the filesystem of run directory {out_dir} has no working file locks "
                f"({os.strerror(error.errno)}; NFS without lockd?), so carp_fast cannot make "
                "sure it is the only trainer writing there. Choose a train.out_dir on a "
                "filesystem with locks, or set train.run_dir_lock=off if you make sure that "
                "no other trainer uses this directory"
            )) from None
    if not _is_lock_file(_read(fd)):
        raise give_up(ownership.OwnershipError(
            f"{path} exists and is not carp_fast's lock file; it was left as it is: choose "
            "another train.out_dir"
        ))
    try:
        claim_run_dir(out_dir)
    except ownership.OwnershipError as error:
        raise give_up(error) from None
    if mode == "off":
        log.warning("train.run_dir_lock=off: %s is not locked; no other trainer may use it", out_dir)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
    os.fsync(fd)
    _held[key] = fd


def claim_run_dir(out_dir: Path) -> None:
    """Seal ``out_dir`` as a run directory, or refuse it when it holds foreign files.

    Numbered checkpoints are listed in its marker as they are written
    (:func:`carp_fast.checkpoint.save_numbered`) and only those are ever pruned; an
    older run's are not listed, so they stay.
    """
    ownership.claim_folder(out_dir, checkpoint.RUN_KIND, _written_by_older_carp_fast,
                           "Choose a new or empty train.out_dir.", ignore=(LOCK_NAME,))


def _written_by_older_carp_fast(out_dir: Path) -> bool:
    """Whether out_dir/last.pt is a carp_fast checkpoint (run directories before markers)."""
    last = out_dir / checkpoint.LAST
    if not last.is_file():
        return False
    try:  # mmap: the header is read, not the weights
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(state, dict) and str(state.get("format", "")).startswith("carp_fast/")
