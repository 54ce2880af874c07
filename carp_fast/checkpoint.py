"""Atomic checkpoints: write, find, load, and keep-k rotation.

A checkpoint is a dict of plain tensors, numbers and strings (loadable with
``torch.load(weights_only=True)``): ``student`` and ``teacher`` state dicts with plain
module keys, ``optimizer``, ``scaler``, ``step``, ``epoch``, ``config`` (the resolved
config as a nested dict) and ``rng`` states.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
_NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or does not fit the run."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that ``path`` is always the old or the new file, whole.

    The bytes go to a temporary file in the same directory, are flushed and fsynced,
    then renamed over ``path`` (atomic on POSIX) and the directory entry is fsynced. A
    failure (disk full, permissions) removes the temporary file, leaves any previous
    ``path`` untouched and raises :class:`CheckpointError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(error, (OSError, RuntimeError)):
            raise CheckpointError(f"could not write checkpoint {path}: {error}") from error
        raise
    _fsync_dir(path.parent)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def numbered_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pt"


def prune_numbered(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoints; returns the removed."""
    directory = Path(directory)
    numbered = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _NUMBERED.match(p.name))
    )
    doomed = [p for _, p in numbered[: max(len(numbered) - keep_last, 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain module keys: drop DDP's ``module.`` and torch.compile's ``_orig_mod.``."""
    plain = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        plain[key] = value
    return plain


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    """Refuse a state dict whose keys or shapes differ from ``model``'s, saying which."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"the {what} weights do not fit this model:"]
        if mismatched:
            lines.append("  shape mismatch: " + "; ".join(mismatched[:5]))
        if missing:
            lines.append(f"  missing {len(missing)} keys, e.g. {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:5])}")
        raise CheckpointError("\n".join(lines))
