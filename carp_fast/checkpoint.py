"""Atomic checkpoints: write, find, load, and keep-k rotation.

A checkpoint is a dict of plain tensors, numbers and strings (loadable with
``torch.load(weights_only=True)``): ``student`` and ``teacher`` state dicts with plain
module keys, ``optimizer``, ``scaler``, ``step``, ``epoch``, ``config`` (the resolved
config as a nested dict) and ``rng`` states.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
_NUMBERED = re.compile(r"^ckpt_(\d{8})\.pt$")
# What save_atomic's mkstemp names look like for the files a run directory holds.
_TEMPORARY = re.compile(r"^\.(last|ckpt_\d{8})\.pt\.[A-Za-z0-9_]{8}\.tmp$")
RUN_KIND = "run directory"  # the ownership marker's kind for a run directory


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or does not fit the run."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions); the previous file is intact."""


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
            raise CheckpointWriteError(
                f"could not write checkpoint {path}: {error}; the previous {path.name} is intact"
            ) from error
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left behind (they never look complete).

    Only in a run directory carp_fast sealed (:mod:`carp_fast.ownership`), whose lock the
    caller holds (so no writer is alive), and only names that :func:`save_atomic`'s
    temporaries of last.pt and numbered checkpoints have.
    """
    from carp_fast import ownership

    directory = Path(directory)
    if not directory.is_dir() or ownership.read_marker(directory, RUN_KIND) is None:
        return []
    stale = [p for p in directory.iterdir()
             if _TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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


def save_numbered(state: dict[str, Any], directory: str | Path, step: int, keep_last: int) -> Path:
    """Write the numbered checkpoint of ``step``, list it in the run directory's marker,
    then prune to the newest ``keep_last``."""
    from carp_fast import ownership

    path = save_atomic(state, numbered_path(directory, step))
    ownership.record_file(directory, RUN_KIND, path.name)
    prune_numbered(directory, keep_last)
    return path


def prune_numbered(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoints; returns the removed.

    Only the ones the run directory's marker lists (carp_fast wrote them there, see
    :func:`save_numbered`) at the size it lists are counted and removed; any other file,
    numbered like them or not, stays.
    """
    from carp_fast import ownership

    directory = Path(directory)
    marker = ownership.read_marker(directory, RUN_KIND)
    if marker is None:
        return []
    numbered = sorted(
        (int(m.group(1)), directory / name)
        for name, size in marker["files"].items()
        if (m := _NUMBERED.match(name)) and (directory / name).is_file()
        and (directory / name).stat().st_size == size
    )
    doomed = [p for _, p in numbered[: max(len(numbered) - keep_last, 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    ownership.forget_files(directory, RUN_KIND, [p.name for p in doomed])
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


# ------------------------------------------------------------------------------------
# Reading weights for evaluation, export and warm start
#
# Three kinds of file hold encoder weights: a carp_fast checkpoint (or a run directory,
# whose last.pt is read), a published CARP checkpoint (``student``/``teacher`` dicts whose
# keys carry DDP's ``module.`` prefix, plus an ``args`` argparse.Namespace), and a plain
# backbone state dict (what ``python -m carp_fast.export`` writes, .pth or .safetensors).
# All of them come back in CarpModel's key layout (``backbone.*``, ``head.*``).

PUBLISHED = "published"
CARP_FAST = "carp_fast"
BACKBONE_ONLY = "backbone"


def _load_published(path: Path, map_location) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` that also accepts the published ``args``.

    The published training script pickles its argparse.Namespace next to the weights.
    A Namespace holds only plain values, so allowing that one class keeps the guarantee
    that no pickled code runs.
    """
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        text = str(error)
        if "Unsupported global" in text or "Weights only load failed" in text:
            culprit = next(
                (line.strip() for line in text.splitlines() if "Unsupported global" in line), ""
            )
            raise CheckpointError(
                f"cannot read {path} with weights_only=True: it pickles Python objects other "
                f"than tensors and plain values{' (' + culprit + ')' if culprit else ''}. "
                "Re-save it from a trusted environment as a dict of state dicts, e.g. "
                "torch.save({'student': ckpt['student'], 'teacher': ckpt['teacher']}, out)"
            ) from error
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _model_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain keys; a bare backbone (torchvision keys) goes under ``backbone.``."""
    plain = strip_prefixes(state_dict)
    if any(k.startswith(("backbone.", "head.")) for k in plain):
        return plain
    return {f"backbone.{k}": v for k, v in plain.items()}


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Student and teacher weights of a run directory, checkpoint or exported backbone.

    Returns ``{"student": sd | None, "teacher": sd | None, "config": dict | None,
    "args": dict | None, "arch": str | None, "format": str, "source": str}``: state dicts
    in CarpModel's layout (``backbone.*``, ``head.*``; no ``module.`` prefix), the
    carp_fast config when the file has one, the published run's arguments when it has
    them, and the architecture the file names, if any. A bare backbone file gives the
    same dict as student and teacher. Every read uses ``weights_only=True``.
    """
    path = Path(path)
    if path.is_dir():
        last = path / LAST
        if not last.is_file():
            raise CheckpointError(f"{path} is a directory without {LAST}: not a carp_fast run")
        path = last
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    source = str(path)

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, safe_open

        try:
            tensors = load_file(str(path), device=str(map_location))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # SafetensorError (not exported by every version), OSError
            raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error
        weights = _model_layout(tensors)
        return {
            "student": weights, "teacher": weights, "config": None, "args": None,
            "arch": metadata.get("arch"), "format": BACKBONE_ONLY, "source": source,
        }

    state = _load_published(path, map_location)
    if str(state.get("format", "")).startswith("carp_fast/") or (
        isinstance(state.get("config"), dict) and "model" in state["config"]
    ):
        config = state.get("config")
        return {
            "student": _model_layout(state["student"]) if _is_state_dict(state.get("student")) else None,
            "teacher": _model_layout(state["teacher"]) if _is_state_dict(state.get("teacher")) else None,
            "config": config,
            "args": None,
            "arch": (config or {}).get("model", {}).get("arch"),
            "format": CARP_FAST,
            "source": source,
        }
    if _is_state_dict(state.get("student")) or _is_state_dict(state.get("teacher")):
        args = state.get("args")
        args = vars(args) if hasattr(args, "__dict__") else (args if isinstance(args, dict) else None)
        arch = args.get("arch") if args else None
        return {
            "student": _model_layout(state["student"]) if _is_state_dict(state.get("student")) else None,
            "teacher": _model_layout(state["teacher"]) if _is_state_dict(state.get("teacher")) else None,
            "config": None,
            "args": args,
            "arch": arch if isinstance(arch, str) else None,
            "format": PUBLISHED,
            "source": source,
        }
    for key in ("state_dict", "model"):  # common wrappers around a single state dict
        if _is_state_dict(state.get(key)):
            state = state[key]
            break
    if _is_state_dict(state):
        weights = _model_layout(state)
        return {
            "student": weights, "teacher": weights, "config": None, "args": None,
            "arch": None, "format": BACKBONE_ONLY, "source": source,
        }
    raise CheckpointError(
        f"{path} is neither a carp_fast checkpoint, a published CARP checkpoint (student/"
        f"teacher state dicts) nor a state dict; its top-level keys are "
        f"{', '.join(sorted(map(str, state))[:10]) or 'none'}"
    )


def backbone_state_dict(weights: dict[str, Any], which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``which`` network's backbone with torchvision keys: no ``backbone.``, no ``fc.``."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state_dict = weights.get(which)
    if state_dict is None:
        raise CheckpointError(f"{weights.get('source', 'the checkpoint')} holds no {which} weights")
    backbone = {
        k[len("backbone."):]: v
        for k, v in state_dict.items()
        if k.startswith("backbone.") and not k.startswith("backbone.fc.")
    }
    if not backbone:
        raise CheckpointError(
            f"the {which} of {weights.get('source', 'the checkpoint')} has no backbone.* keys "
            f"(it has e.g. {', '.join(sorted(state_dict)[:5])})"
        )
    return backbone


def _resnet_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(
        name
        for name, fn in vars(tvm.resnet).items()
        if callable(fn) and name.islower() and not name.startswith("_")
        and name != "resnet" and "resne" in name
    )


@functools.lru_cache(maxsize=None)
def _arch_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torchvision.models as tvm

    # Meta tensors: shapes without allocating or initialising a single weight.
    with torch.device("meta"):
        model = getattr(tvm, name)(weights=None)
    return tuple(
        (k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith("fc.")
    )


def infer_arch(backbone: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet whose keys and shapes (fc aside) match ``backbone``, if any."""
    shapes = {k: tuple(v.shape) for k, v in backbone.items() if not k.startswith("fc.")}
    for name in _resnet_names():
        if dict(_arch_shapes(name)) == shapes:
            return name
    return None


def _arch_hint(backbone: dict[str, torch.Tensor], expected: str | None, cli: bool = False) -> str:
    found = infer_arch(backbone)
    if found is None:
        return "\n  these weights match no torchvision ResNet (fc aside)"
    if found == expected:
        return ""
    target = f", the model is a {expected}" if expected else ""
    advice = f" (pass --arch {found} to use them as one)" if cli else ""
    return f"\n  these weights are a {found} backbone{target}{advice}"


def check_backbone(
    backbone: dict[str, torch.Tensor], model: torch.nn.Module, arch: str, what: str, source: str = ""
) -> None:
    """:func:`check_compatible` for a backbone, naming the architecture the weights are."""
    try:
        check_compatible(backbone, model, what)
    except CheckpointError as error:
        message = str(error).replace("this model", f"a {arch}", 1)
        prefix = f"{source}: " if source else ""
        raise CheckpointError(f"{prefix}{message}{_arch_hint(backbone, arch, cli=True)}") from None


def init_from_weights(
    path: str | Path, student: torch.nn.Module, teacher: torch.nn.Module
) -> dict[str, Any]:
    """Warm start: copy a checkpoint's student and teacher weights into fresh models.

    Accepts whatever :func:`read_weights` does. The backbone must fit exactly; the head
    is loaded when the file has one (it must then fit too) and left at its random
    initialisation when the file is a bare backbone. A file with only one of student and
    teacher initialises both from it. Returns the :func:`read_weights` dict.
    """
    weights = read_weights(path)
    fallback = weights["student"] if weights["student"] is not None else weights["teacher"]
    for name, model in (("student", student), ("teacher", teacher)):
        state = dict(weights[name] if weights[name] is not None else fallback)
        if not any(k.startswith("head.") for k in state):
            state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        try:
            check_compatible(state, model, f"{name} of {weights['source']}")
        except CheckpointError as error:
            own = {
                k[len("backbone."):]: v
                for k, v in model.state_dict().items()
                if k.startswith("backbone.")
            }
            theirs = backbone_state_dict({name: state, "source": weights["source"]}, name)
            raise CheckpointError(f"{error}{_arch_hint(theirs, infer_arch(own))}") from None
        model.load_state_dict(state)
    return weights


def weights_arch(weights: dict[str, Any], which: str = "teacher", requested: str | None = None) -> str:
    """The architecture to build for ``weights``: ``requested`` when given, else the one
    the file names (carp_fast config, published ``args.arch``), else the one its shapes
    match, else resnet50 (the published models)."""
    if requested:
        return requested
    if weights.get("arch"):
        return weights["arch"]
    try:
        return infer_arch(backbone_state_dict(weights, which)) or "resnet50"
    except CheckpointError:
        return "resnet50"
