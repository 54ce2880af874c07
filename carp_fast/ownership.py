"""What carp_fast may delete or overwrite: only what it can prove it wrote.

carp_fast never deletes, moves or overwrites a file it did not write. Every destructive
file operation in the package and its tools goes through this module and checks one of
three proofs (docs/data_safety.md lists each operation and the proof it checks):

- a folder carp_fast filled carries a *marker*, ``.carp_fast_owned.json``: the project's
  signature, the kind of folder, a version, and every file carp_fast wrote there with its
  size, sealed by a SHA-256 digest of the rest. A folder is carp_fast's to replace only
  when its marker is valid, names the expected kind, and nothing else is in the folder;
  only the listed files (at their listed sizes) are ever removed.
- a report (JSON) carp_fast wrote names its writer (``"written_by": "carp_fast"``), so a
  rerun may replace it; any other file at that path is refused.
- anything else is replaced only when the user says so (an explicit ``--overwrite``).

A foreign ``.complete`` or any other file left by a download script proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MARKER = ".carp_fast_owned.json"
SIGNATURE = "carp_fast owned folder"
WRITTEN_BY = "carp_fast"
# Reports written before they were signed record the command that wrote them: one that
# names a tool of this repository (tools/NAME.py) or the package is carp_fast's too.
_OUR_COMMAND = re.compile(r"(^|[\s/'\"])tools/\w+\.py\b|carp_fast\.")


class OwnershipError(FileExistsError):
    """A path holds something carp_fast did not write, so it is left alone and refused."""


# ---------------------------------------------------------------------------- markers
def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a uniquely named temporary file and a rename.

    The temporary name comes from ``mkstemp`` (created exclusively), so no file of anyone
    else's is opened; ``path`` is always the old or the new content, whole.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def list_files(folder: str | Path) -> dict[str, int]:
    """Every file under ``folder`` (relative POSIX path -> size), the marker aside."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            name = path.relative_to(folder).as_posix()
            if name != MARKER:
                files[name] = path.lstat().st_size
    return files


def write_marker(folder: str | Path, kind: str, version: str, files: dict[str, int],
                 **extra: Any) -> Path:
    """Seal ``folder`` as carp_fast's ``kind`` (at ``version``) holding exactly ``files``."""
    body = {"signature": SIGNATURE, "kind": kind, "version": version, "files": dict(files), **extra}
    record = {**body, "digest": _digest(body)}
    return write_atomic(Path(folder) / MARKER, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_marker(folder: str | Path, kind: str) -> dict[str, Any] | None:
    """The folder's marker when it is carp_fast's, sealed and of ``kind``; else None."""
    path = Path(folder) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("signature") != SIGNATURE:
        return None
    body = {k: v for k, v in record.items() if k != "digest"}
    if record.get("digest") != _digest(body) or record.get("kind") != kind:
        return None
    if not isinstance(record.get("files"), dict):
        return None
    return record


def record_file(folder: str | Path, kind: str, name: str, version: str = "1") -> None:
    """Add ``name`` (a file carp_fast just wrote in ``folder``) to the folder's marker."""
    folder = Path(folder)
    marker = read_marker(folder, kind)
    files = dict(marker["files"]) if marker else {}
    files[name] = (folder / name).stat().st_size
    extra = {k: v for k, v in (marker or {}).items()
             if k not in ("signature", "kind", "version", "files", "digest")}
    write_marker(folder, kind, marker["version"] if marker else version, files, **extra)


def forget_files(folder: str | Path, kind: str, names: Iterable[str]) -> None:
    """Drop ``names`` (already removed) from the folder's marker."""
    folder = Path(folder)
    marker = read_marker(folder, kind)
    if marker is None:
        return
    names = set(names)
    files = {k: v for k, v in marker["files"].items() if k not in names}
    extra = {k: v for k, v in marker.items()
             if k not in ("signature", "kind", "version", "files", "digest")}
    write_marker(folder, kind, marker["version"], files, **extra)


def foreign_entries(folder: str | Path, marker: dict[str, Any] | None) -> list[str]:
    """Files in ``folder`` that the marker does not list at the size it lists."""
    listed = marker["files"] if marker else {}
    return [name for name, size in list_files(folder).items() if listed.get(name) != size]


def remove_owned(folder: str | Path, marker: dict[str, Any]) -> None:
    """Delete the files ``marker`` lists (each only at its listed size), then the marker.

    Folders are removed only where they end up empty. The marker goes last, so an
    interrupted removal leaves a marker that still proves what remains is carp_fast's.
    """
    folder = Path(folder)
    for name, size in marker["files"].items():
        path = folder / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size == size:
            path.unlink()
    parents = sorted({p for name in marker["files"] for p in (folder / name).parents
                      if p != folder and folder in p.parents}, key=lambda p: -len(p.parts))
    (folder / MARKER).unlink(missing_ok=True)
    for parent in parents:
        try:
            parent.rmdir()  # only when empty: anything else in it stays
        except OSError:
            pass


def _refusal(folder: Path, kind: str, foreign: list[str], what_to_do: str) -> OwnershipError:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return OwnershipError(
        f"{folder} holds files carp_fast did not write as a {kind} ({shown}); nothing was "
        f"changed there. {what_to_do}"
    )


def install_folder(staging: str | Path, dest: str | Path, kind: str, version: str,
                   what_to_do: str, **extra: Any) -> Path:
    """Seal the finished ``staging`` folder and rename it to ``dest``.

    ``dest`` may be absent, an empty folder, or a folder carp_fast sealed as ``kind``
    with nothing else in it (its listed files are removed first); anything else raises
    :class:`OwnershipError` and leaves ``dest`` as it was. The marker is written last
    inside ``staging`` and the rename is atomic, so ``dest`` never looks complete early.
    """
    staging, dest = Path(staging), Path(dest)
    write_marker(staging, kind, version, list_files(staging), **extra)
    if dest.exists():
        marker = read_marker(dest, kind)
        foreign = foreign_entries(dest, marker)
        if foreign:
            raise _refusal(dest, kind, foreign, what_to_do)
        if marker is not None:
            remove_owned(dest, marker)
    os.replace(staging, dest)  # onto an empty folder or nothing: atomic on POSIX
    return dest


def generated_folder(dest: str | Path, kind: str, version: str, fill: Callable[[Path], None],
                     what_to_do: str, **extra: Any) -> Path:
    """``dest`` as a folder of generated files: reused when sealed as ``kind`` at ``version``.

    Otherwise ``dest`` must be absent, empty, or an older generation carp_fast sealed with
    nothing else in it (see :func:`install_folder`); ``fill`` writes the files into a
    temporary sibling folder that is sealed and renamed into place when complete, so an
    interrupted generation leaves nothing at ``dest`` that looks complete.
    """
    dest = Path(dest)

    def current() -> bool:
        marker = read_marker(dest, kind)
        return marker is not None and marker["version"] == version

    if current():
        return dest
    check_folder_is_free(dest, kind, what_to_do)  # refuse before any work
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.generating.", dir=dest.parent))
    try:
        fill(staging)
        install_folder(staging, dest, kind, version, what_to_do, **extra)
    except BaseException:
        # Only the staging folder goes: mkdtemp made it, so it holds this run's files alone.
        shutil.rmtree(staging, ignore_errors=True)
        if current():
            return dest  # another process finished the same folder first
        raise
    return dest


def check_folder_is_free(folder: str | Path, kind: str, what_to_do: str) -> dict[str, Any] | None:
    """Refuse ``folder`` unless it is absent, empty, or sealed as ``kind`` with only its files.

    Returns its marker (None when absent or empty).
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise OwnershipError(f"{folder} is a file, not a folder; nothing was changed. {what_to_do}")
    marker = read_marker(folder, kind)
    foreign = foreign_entries(folder, marker)
    if foreign:
        raise _refusal(folder, kind, foreign, what_to_do)
    return marker


def claim_folder(folder: str | Path, kind: str, written_before_markers: Callable[[Path], bool],
                 what_to_do: str, ignore: Iterable[str] = ()) -> None:
    """Make ``folder`` carp_fast's ``kind`` to write in, or refuse it.

    Accepted: a new or empty folder (created and sealed), one already sealed as ``kind``,
    or one that ``written_before_markers`` recognises as what an older carp_fast wrote
    there (sealed now). A folder holding anything else raises :class:`OwnershipError`;
    nothing in it is touched. Entries named in ``ignore`` (the caller's own, such as a
    lock file it just created) do not count.
    """
    folder = Path(folder)
    if read_marker(folder, kind) is not None:
        return
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{folder} is a file, not a folder; nothing was changed. {what_to_do}")
    ignore = {MARKER, *ignore}
    entries = sorted(p.name for p in folder.iterdir() if p.name not in ignore) if folder.exists() else []
    if entries and not written_before_markers(folder):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OwnershipError(
            f"{folder} holds files carp_fast did not write ({shown}); nothing there was "
            f"changed. {what_to_do}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind, "1", {})


# ------------------------------------------------------------------------ single files
def check_overwrite(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace an existing ``path`` unless the user passed ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise OwnershipError(f"{path} is a folder; give the path of the file to write")
    if path.exists() and not overwrite:
        raise OwnershipError(
            f"{path} already exists and was left as it is: pass {flag} to replace it, or "
            "choose another output path"
        )


def is_own_report(path: str | Path) -> bool:
    """Whether ``path`` is a JSON report carp_fast wrote (signed, or a legacy run record)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    if record.get("written_by") == WRITTEN_BY:
        return True
    command = record.get("command")
    command = " ".join(map(str, command)) if isinstance(command, list) else command
    return isinstance(command, str) and _OUR_COMMAND.search(command) is not None


def write_report(path: str | Path, record: dict[str, Any], indent: int = 2, **dumps: Any) -> Path:
    """Write the JSON ``record`` to ``path``, signing it (``record["written_by"] = "carp_fast"``).

    An existing file there is replaced only when it is a report carp_fast wrote; anything
    else is refused with :class:`OwnershipError`.
    """
    path = Path(path)
    if path.exists() and not is_own_report(path):
        raise OwnershipError(
            f"{path} exists and is not a report carp_fast wrote; it was left as it is: "
            "choose another path for the report, or move that file away"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    record["written_by"] = WRITTEN_BY  # in place: the caller's record is what the file holds
    return write_atomic(path, (json.dumps(record, indent=indent, **dumps) + "\n").encode())
