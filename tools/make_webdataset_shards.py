"""Pack an ImageFolder tree into webdataset .tar shards with DALI index files.

    python tools/make_webdataset_shards.py IMAGEFOLDER OUT_DIR [--samples-per-shard 2000]
        [--verify] [--shuffle-seed N]
    python tools/make_webdataset_shards.py --index-only SHARD_DIR

For clusters where millions of small files are slow to open: a few hundred large files
instead, read by offset. OUT_DIR then serves as ``data.path`` with ``data.backend=dali``.

Each sample is two tar members, ``<class>/<stem>.<ext>`` (the image bytes, unchanged) and
``<class>/<stem>.cls`` (the class index as text, classes sorted by name as the ImageFolder
loaders number them); ``classes.txt`` lists the class names, one per line, in index order.
Next to every ``shard-NNNNNN.tar`` is ``shard-NNNNNN.idx``, DALI's webdataset index
(format v1.2, what DALI's ``wds2idx`` writes): a header ``v1.2 <samples>``, then one line
per sample listing each component as ``<ext> <data offset> <size> <member name>``.
``fn.readers.webdataset`` reads them as they are, and so does carp_fast's DALI loader.

Samples keep the folder's order (sample i of the shards is image i of the folder) unless
``--shuffle-seed`` mixes them; carp_fast reads the shards in a global per-epoch
permutation anyway. The shards are reproducible: same input, same bytes (no timestamps,
owners or permissions recorded). Each shard and index is written under a temporary name
and renamed into place, so an interrupted run leaves no half-written shard that looks
complete. ``--verify`` decodes every image with PIL first and leaves out (and lists) the
ones that fail; without it only files PIL cannot identify are left out.

OUT_DIR must be new, empty, or a shard folder this tool wrote (sealed by carp_fast's
marker, see carp_fast/ownership.py, and holding nothing else); the shards are written
into a temporary sibling folder that is sealed and renamed into place when complete, and
only the files the old marker lists are removed. Anything else at OUT_DIR is refused.

``--index-only`` writes the .idx file of every .tar in a folder, for shards made
elsewhere: members are grouped into samples by the name up to the first dot of the file
name, as DALI's reader groups them. An existing .idx is replaced only with
``--overwrite`` (or when this tool wrote it).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carp_fast import ownership  # noqa: E402
from carp_fast.data.folder import list_image_folder  # noqa: E402

INDEX_VERSION = "v1.2"
KIND = "webdataset shards"
WHAT_TO_DO = "Choose a new or empty OUT_DIR for the shards."


def split_name(name: str) -> tuple[str, str]:
    """``(sample key, extension)`` of a member name: split at the first dot of the file
    name, the rule of DALI's webdataset reader and wds2idx."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def write_index(tar_path: str | Path, index_path: str | Path | None = None) -> int:
    """Write DALI's index of the webdataset shard ``tar_path``; returns its sample count.

    Regular-file members are grouped into samples by consecutive equal keys; hidden files
    and names without an extension are left out, as DALI leaves them out.
    """
    tar_path = Path(tar_path)
    index_path = Path(index_path) if index_path is not None else tar_path.with_suffix(".idx")
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            if not key or key.endswith("/") or not ext:
                continue
            if any(c.isspace() for c in member.name):
                raise ValueError(
                    f"{tar_path}: member {member.name!r} has white space in its name, which "
                    "DALI's index format cannot hold"
                )
            component = (ext, member.offset_data, member.size, member.name)
            if key == last_key:
                samples[-1].append(component)
            else:
                samples.append([component])
                last_key = key
    if not samples:
        raise ValueError(f"{tar_path} holds no webdataset sample")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
    ownership.write_atomic(index_path, ("\n".join(lines) + "\n").encode())
    return len(samples)


def _sample_keys(samples: list[tuple[str, int]], classes: list[str]) -> list[str]:
    """``<class>/<stem>`` per image, made safe for the index format and unique.

    The index is split on white space and the key ends at the first dot of the file name,
    so both become underscores in the key (the bytes are unchanged).
    """
    keys, seen = [], set()
    for path, label in samples:
        folder = re.sub(r"\s", "_", classes[label])
        stem = re.sub(r"[\s.]", "_", Path(path).stem)
        key, n = f"{folder}/{stem}", 1
        while key in seen:
            n += 1
            key = f"{folder}/{stem}_{n}"
        seen.add(key)
        keys.append(key)
    return keys


def _unreadable(path: str, verify: bool) -> str | None:
    try:
        with Image.open(path) as image:
            if verify:
                image.convert("RGB")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shards(
    source: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 2000,
    verify: bool = False,
    shuffle_seed: int | None = None,
    prefix: str = "shard",
) -> tuple[list[Path], list[str]]:
    """Pack the ImageFolder ``source`` into shards under ``out_dir``.

    Returns the shard paths and the images left out as unreadable (``path: reason``).
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be positive")
    samples, classes = list_image_folder(source)
    out_dir = Path(out_dir)
    ownership.check_folder_is_free(out_dir, KIND, WHAT_TO_DO)  # refuse before any work
    skipped = []
    kept = []
    for path, label in samples:
        reason = _unreadable(path, verify)
        if reason is None:
            kept.append((path, label))
        else:
            skipped.append(f"{path}: {reason}")
    if not kept:
        raise ValueError(f"no readable image under {source}")
    keys = _sample_keys(kept, classes)
    order = np.arange(len(kept))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(kept))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing.", dir=out_dir.parent))
    names = []
    try:
        for shard, first in enumerate(range(0, len(kept), samples_per_shard)):
            tar_path = staging / f"{prefix}-{shard:06d}.tar"
            with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as archive:
                for i in order[first : first + samples_per_shard].tolist():
                    path, label = kept[i]
                    ext = Path(path).suffix.lower().lstrip(".")
                    archive.addfile(*_member(f"{keys[i]}.{ext}", Path(path).read_bytes()))
                    archive.addfile(*_member(f"{keys[i]}.cls", str(label).encode()))
            write_index(tar_path, tar_path.with_suffix(".idx"))
            names.append(tar_path.name)
        (staging / "classes.txt").write_bytes(("\n".join(classes) + "\n").encode())
        ownership.install_folder(staging, out_dir, KIND, "1", WHAT_TO_DO)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # mkdtemp made it: only this run's files
        raise
    shards = [out_dir / name for name in names]
    return shards, skipped


def write_indexes(folder: Path, overwrite: bool, parser: argparse.ArgumentParser) -> int:
    """``--index-only``: an .idx beside every .tar; existing ones only when ours or --overwrite."""
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        parser.error(f"no .tar file in {folder}")
    marker = ownership.read_marker(folder, KIND)
    ours = marker["files"] if marker else {}
    for tar in tars:
        index = tar.with_suffix(".idx")
        if index.exists() and not overwrite and ours.get(index.name) != index.stat().st_size:
            print(f"error: {index} exists and this tool did not write it; it was left as it is "
                  "(pass --overwrite to replace it)", file=sys.stderr)
            return 2
    for tar in tars:
        index = tar.with_suffix(".idx")
        print(f"{index}: {write_index(tar, index)} samples")
        if index.name in ours:
            ownership.record_file(folder, KIND, index.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="ImageFolder root (root/<class>/<image>), or with "
                        "--index-only a folder of .tar shards")
    parser.add_argument("out_dir", nargs="?", help="folder for the shards (created)")
    parser.add_argument("--samples-per-shard", type=int, default=2000,
                        help="images per shard (default 2000: ~220 MB of ImageNet JPEGs)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image with PIL and leave out the ones that fail")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="mix the samples across shards in this seed's order")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--index-only", action="store_true",
                        help="write the .idx file of every .tar under SOURCE")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --index-only: replace .idx files this tool did not write")
    args = parser.parse_args(argv)
    if args.index_only:
        return write_indexes(Path(args.source), args.overwrite, parser)
    if args.out_dir is None:
        parser.error("OUT_DIR is required (or --index-only)")
    try:
        shards, skipped = write_shards(args.source, args.out_dir, args.samples_per_shard,
                                       args.verify, args.shuffle_seed, args.prefix)
    except ownership.OwnershipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in skipped:
        print(f"left out {line}", file=sys.stderr)
    print(f"{len(shards)} shards with their .idx files in {args.out_dir}; "
          f"{len(skipped)} unreadable images left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
