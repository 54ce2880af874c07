"""Encoded images as the GPU-decoding backends read them: bytes, a label, and a name.

Two sources (``data.path``): an ImageFolder tree, or a folder of webdataset ``.tar``
shards with DALI's ``.idx`` index files next to them (``tools/make_webdataset_shards.py``
makes both), read by offset from the index: a few large files instead of millions of
small ones. And the header checks that name a bad file before it reaches a GPU decoder's
opaque error: the size and kind of an image from its first bytes, and a truncation check.
The DALI and nvjpeg backends both read through this module.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from carp_fast.data.folder import IMAGE_EXTENSIONS, DataPathError, list_image_folder

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Image headers: the size (needed to draw the boxes) and a cheap validity check, from the
# bytes alone, so that a bad file is named before it reaches a GPU decoder's opaque error.


class UnreadableImage(ValueError):
    """Bytes that an image decoder would fail on, with the reason."""


# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image; :class:`UnreadableImage` if it is not one.

    JPEG and PNG are parsed here (microseconds), including a truncation check (the JPEG's
    end-of-image marker after its scan data, PNG's IEND chunk); BMP, TIFF, WebP and PNM
    headers are read with PIL.
    """
    if data[:2] == b"\xff\xd8":
        info = jpeg_info(data)
        return info.height, info.width
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise UnreadableImage("corrupt PNG header")
        if data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
            raise UnreadableImage("truncated PNG (no IEND chunk)")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if not (height and width):
            raise UnreadableImage("PNG of zero size")
        return height, width
    if (data[:2] == b"BM" or data[:4] in (b"II*\x00", b"MM\x00*")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or (data[:1] == b"P" and data[1:2] in b"123456" and len(data) > 2)):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as error:
            raise UnreadableImage(f"corrupt image header ({error})") from error
        return height, width
    raise UnreadableImage("not a JPEG, PNG, BMP, TIFF, WebP or PNM image")


class JpegInfo(NamedTuple):
    """What a JPEG's headers say: size, colour components (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK)
    and whether it is progressive (SOF2, SOF6, SOF10, SOF14)."""

    height: int
    width: int
    components: int
    progressive: bool


_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def jpeg_info(data: bytes) -> JpegInfo:
    """The :class:`JpegInfo` of a JPEG's bytes; :class:`UnreadableImage` if corrupt or truncated."""
    info = None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise UnreadableImage(f"corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise UnreadableImage(f"corrupt JPEG header (segment length {length} at byte {pos})")
        if marker in _JPEG_SOF:
            if pos + 10 > end:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            components = data[pos + 9]
            if not (height and width) or components not in (1, 3, 4):
                raise UnreadableImage(
                    f"corrupt JPEG frame header ({height}x{width}, {components} components)"
                )
            info = JpegInfo(height, width, components, marker in _JPEG_PROGRESSIVE_SOF)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows to the end
            if info is None:
                raise UnreadableImage("corrupt JPEG (scan before any frame header)")
            # Byte stuffing keeps FF D9 out of scan data: its absence after the first scan
            # means the file was cut short.
            if data.rfind(_JPEG_EOI, pos) < 0:
                raise UnreadableImage("truncated JPEG (no end-of-image marker)")
            return info
        pos += 2 + length
    raise UnreadableImage("truncated JPEG (ends before its scan data)")


def pil_decode_error(data: bytes) -> str | None:
    """Why PIL cannot decode ``data`` in full, or None when it can."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None



def read_readable(source, index: int, is_bad, mark_bad, check):
    """``(source index, bytes, label, check(bytes))`` of sample ``index`` or, if it is
    unreadable, of the next readable one.

    ``is_bad(j)`` says whether sample j is known to be unreadable; a read that fails or
    whose bytes ``check`` rejects (:class:`UnreadableImage`) is passed to
    ``mark_bad(j, reason)`` and skipped, as the torchvision backend skips what PIL cannot
    open.
    """
    n = len(source)
    for offset in range(n):
        j = (index + offset) % n
        if is_bad(j):
            continue
        try:
            data, label = source.read(j)
            checked = check(data)
        except (OSError, UnreadableImage) as error:
            mark_bad(j, str(error))
            continue
        return j, data, label, checked
    raise RuntimeError(f"no readable image in data.path ({n} tried)")


# ---------------------------------------------------------------------------------------
# Sources: encoded bytes and label of sample i, and a name for messages.


class FolderSource:
    """An ImageFolder tree (``root/<class>/<image>``); labels are the sorted class indices."""

    def __init__(self, root: Path):
        self.samples, self.classes = list_image_folder(root)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[bytes, int]:
        path, label = self.samples[index]
        with open(path, "rb") as handle:
            return handle.read(), label

    def describe(self, index: int) -> str:
        return self.samples[index][0]


_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_INDEX_VERSION = "v1.2"


class ShardSource:
    """Webdataset ``.tar`` shards with DALI index files (``NAME.tar`` + ``NAME.idx``).

    Each sample's image component (jpg, png, ...) is read by its offset in the index; the
    label is its ``cls`` component (an integer as text), or -1 without one. Shard files
    stay open per reader thread (a few at a time), so a random order costs one read per
    sample, not one open.
    """

    MAX_OPEN_PER_THREAD = 64

    def __init__(self, root: Path, tars: list[Path]):
        self.root = root
        self.tars = tars
        rows = []
        no_image = 0
        for shard, tar in enumerate(tars):
            index_path = tar.with_suffix(".idx")
            if not index_path.is_file():
                raise DataPathError(
                    f"shard {tar} has no DALI index file {index_path.name}; create the indexes "
                    f"with `python tools/make_webdataset_shards.py --index-only {root}` (or "
                    "DALI's wds2idx)"
                )
            tar_bytes = tar.stat().st_size
            for offset, size, cls_offset, cls_size in _read_index(index_path):
                if offset is None:
                    no_image += 1
                    continue
                cls_end = 0 if cls_offset is None else cls_offset + cls_size
                if max(offset + size, cls_end) > tar_bytes:
                    raise DataPathError(
                        f"index {index_path} points past the end of {tar.name}: the shard changed "
                        f"after indexing; rebuild it (`python tools/make_webdataset_shards.py "
                        f"--index-only {root}`)"
                    )
                if cls_offset is None:
                    cls_offset, cls_size = -1, 0
                rows.append((shard, offset, size, cls_offset, cls_size))
        if not rows:
            raise DataPathError(f"the shards under {root} hold no image samples")
        if no_image:
            log.warning("%d samples without an image component in the shards under %s are ignored",
                        no_image, root)
        self.rows = np.array(rows, dtype=np.int64)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.rows)

    def _file(self, shard: int):
        # Per thread, so that no thread closes a file another one is reading.
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        handle = files.pop(shard, None)
        if handle is None:
            if len(files) >= self.MAX_OPEN_PER_THREAD:
                files.pop(next(iter(files))).close()
            handle = open(self.tars[shard], "rb", buffering=0)
        files[shard] = handle  # most recently used last
        return handle

    def read(self, index: int) -> tuple[bytes, int]:
        shard, offset, size, cls_offset, cls_size = (int(x) for x in self.rows[index])
        fd = self._file(shard).fileno()
        if cls_offset < 0:
            return os.pread(fd, size, offset), -1
        # The components of a sample are neighbours in the tar: one read takes both.
        low, high = min(offset, cls_offset), max(offset + size, cls_offset + cls_size)
        if high - low <= size + cls_size + 4096:
            span = os.pread(fd, high - low, low)
            data = span[offset - low : offset - low + size]
            label_text = span[cls_offset - low : cls_offset - low + cls_size]
        else:
            data, label_text = os.pread(fd, size, offset), os.pread(fd, cls_size, cls_offset)
        try:
            label = int(label_text.strip() or b"-1")
        except ValueError:
            label = -1
        return data, label

    def describe(self, index: int) -> str:
        shard, offset = int(self.rows[index, 0]), int(self.rows[index, 1])
        tar = self.tars[shard]
        for line in tar.with_suffix(".idx").read_text().splitlines()[1:]:
            fields = line.split()
            for i in range(0, len(fields) - 3, 4):
                if int(fields[i + 1]) == offset:
                    return f"{tar}:{fields[i + 3]}"
        return f"{tar}@{offset}"


def _read_index(path: Path):
    """``(image offset, size, cls offset, cls size)`` per sample of a DALI v1.2 index.

    Each line after the header lists the sample's components as ``ext offset size name``;
    a sample without an image component yields ``(None, ...)``.
    """
    lines = path.read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != _INDEX_VERSION:
        raise DataPathError(
            f"{path} is not a DALI {_INDEX_VERSION} webdataset index (header {lines[:1]}); "
            f"rebuild it with `python tools/make_webdataset_shards.py --index-only {path.parent}`"
        )
    if int(header[1]) != len(lines) - 1:
        raise DataPathError(
            f"{path} announces {header[1]} samples but lists {len(lines) - 1}: it is incomplete; "
            f"rebuild it with `python tools/make_webdataset_shards.py --index-only {path.parent}`"
        )
    for line in lines[1:]:
        fields = line.split()
        image = cls = None
        for i in range(0, len(fields) - 3, 4):
            ext = fields[i].lower()
            if image is None and ext in _IMAGE_EXTS:
                image = (int(fields[i + 1]), int(fields[i + 2]))
            elif ext == "cls":
                cls = (int(fields[i + 1]), int(fields[i + 2]))
        yield (*(image or (None, None)), *(cls or (None, None)))


def open_source(path: str | Path, backend: str = "dali") -> FolderSource | ShardSource:
    """The source at ``data.path``: a folder of ``.tar`` shards, else an ImageFolder tree."""
    root = Path(path)
    if root.is_dir():
        tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
        if tars:
            return ShardSource(root, tars)
    elif root.is_file():
        raise DataPathError(
            f"data path {root} is a file; data.backend={backend} reads an ImageFolder tree or a folder "
            "of webdataset .tar shards with DALI .idx files (tools/make_webdataset_shards.py)"
        )
    return FolderSource(root)
