#!/usr/bin/env python
"""Convert an ImageFolder tree (ImageNet's train/ or val/ layout) into an FFCV .beton.

    python tools/convert_imagenet_ffcv.py SRC_DIR OUT.beton [--max-side 500] [--quality 90]
                                          [--raw-fraction 0.5] [--workers N] [--overwrite]

Labels are the class folders' indices in sorted order (torchvision's ImageFolder rule),
so a train and a val tree with the same classes get the same labels. Images are shrunk
so that their longer side is at most --max-side (0: kept as they are); a --raw-fraction
of them is stored as raw pixels (no decode cost when loading, more bytes), the rest as
JPEG at --quality. Which images are stored raw is a function of their index, so a
conversion is reproducible.

Two passes: every file is first checked (decoded at 1/8 scale, which reads all of its
compressed data), unreadable ones are reported by path and left out; then the readable
ones are written by --workers processes. The output is written to a hidden temporary
file beside OUT and renamed into place only when complete, so an interrupted or failed
conversion never leaves a file at OUT. An existing OUT is refused (before any work)
unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import queue
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool, Process, Queue, Value
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from carp_fast import ownership
from carp_fast.data.folder import DataPathError, list_image_folder

MISSING_FFCV = (
    "this tool needs FFCV: `pip install ffcv numba opencv-python-headless` after installing "
    "its system libraries (apt: pkg-config libopencv-dev libturbojpeg0-dev; "
    "`bash tools/install_system_deps.sh` does it)"
)
MIN_PAGE_SIZE = 8 << 20  # FFCV's default page: 8 MiB
HEADROOM = 1 << 16  # room for a sample's other fields beside its pixels


class ConversionError(RuntimeError):
    """A conversion that could not complete; nothing was left at the output path."""


@dataclass
class Summary:
    output: Path
    images: int
    classes: int
    skipped: list[tuple[str, str]]
    bytes: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (
            f"wrote {self.output}: {self.images} images, {self.classes} classes, "
            f"{self.bytes:,} bytes ({self.bytes / 2**30:.2f} GiB), "
            f"{self.images_per_second:.0f} images/s over {self.seconds:.1f} s; "
            f"{len(self.skipped)} unreadable file(s) skipped"
        )


def check_image(path: str) -> tuple[str, tuple[int, int] | None, str | None]:
    """``(path, (width, height), None)`` when the file decodes, else ``(path, None, reason)``.

    JPEGs are decoded at 1/8 scale: the whole compressed stream is still read, so a
    truncated or corrupt file fails here as it would at full size, at a fraction of the
    cost.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (1, 1))
            image.convert("RGB").load()
        return path, size, None
    except Exception as error:  # any failure to read makes the file unusable
        return path, None, f"{type(error).__name__}: {error}"


class FolderImages:
    """The readable samples as ``(RGB uint8 array, label)``, for FFCV's writer processes."""

    def __init__(self, samples: list[tuple[str, int]], max_side: int):
        self.samples = samples
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                if self.max_side and image.format == "JPEG":
                    # Decode at the smallest DCT scale that still covers max_side.
                    image.draft("RGB", (self.max_side, self.max_side))
                pixels = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise ConversionError(f"{path} became unreadable during the conversion: {error}") from error
        # RGBImageField picks raw or JPEG with NumPy's global generator: seeding it with
        # the index makes that choice, hence the output, the same on every run.
        np.random.seed(index % 2**32)
        return pixels, label


def _writer_class():
    import torch

    threads = torch.get_num_threads()
    try:
        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.writer import DatasetWriter
    except ImportError as error:
        raise ConversionError(MISSING_FFCV) from error
    finally:
        torch.set_num_threads(threads)  # importing FFCV sets torch to one thread

    class Writer(DatasetWriter):
        """FFCV's writer whose main loop notices dead workers and cleans up after itself.

        FFCV 1.0 waits forever for a worker that died, and leaves its workers and shared
        memory behind on Ctrl-C; this is its ``_write_common`` with both handled.
        """

        progress = True

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            allocations_queue: Queue = Queue()
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (
                workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                done_number, allocations_queue, *extra_worker_args,
            )
            processes = [
                Process(target=work_fn, args=worker_args, daemon=True) for _ in range(self.num_workers)
            ]
            progress = tqdm(
                total=num_samples, desc="writing", unit="img", disable=not self.progress,
                mininterval=0.5 if sys.stderr.isatty() else 30,
            )
            try:
                for process in processes:
                    process.start()
                allocations = []
                finished = 0
                while finished < len(processes):
                    progress.update(done_number.value - progress.n)
                    try:
                        allocations.extend(allocations_queue.get(timeout=0.2))
                        finished += 1
                        continue
                    except queue.Empty:
                        pass
                    for process in processes:
                        if process.exitcode not in (None, 0):
                            raise ConversionError(
                                f"a writer process exited with code {process.exitcode} "
                                "(its error is printed above); nothing was written"
                            )
                progress.update(done_number.value - progress.n)
                for process in processes:
                    process.join()
                self.finalize(allocations)
            finally:
                progress.close()
                for process in processes:
                    if process.is_alive():
                        process.terminate()
                        process.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return Writer


def _page_size(sizes: list[tuple[int, int]], max_side: int) -> int:
    """The smallest power-of-two FFCV page (at least 8 MiB) that holds the largest image raw."""
    largest = 0
    for width, height in sizes:
        scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
        largest = max(largest, int(width * scale + 1) * int(height * scale + 1) * 3)
    return max(MIN_PAGE_SIZE, 1 << math.ceil(math.log2(largest + HEADROOM)))


def convert(
    source: str | Path,
    output: str | Path,
    max_side: int = 500,
    quality: int = 90,
    raw_fraction: float = 0.5,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Write the ImageFolder tree at ``source`` to the .beton ``output``; see the module doc.

    Raises :class:`DataPathError` for a missing or empty source (naming it) and
    :class:`ConversionError` when the conversion cannot complete; in every failure,
    and on KeyboardInterrupt, nothing is left at ``output``. An existing ``output`` is
    replaced only with ``overwrite`` (else :class:`~carp_fast.ownership.OwnershipError`).
    """
    if max_side < 0:
        raise ValueError(f"--max-side must be 0 (keep) or positive, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in [1, 100], got {quality}")
    if not 0 <= raw_fraction <= 1:
        raise ValueError(f"--raw-fraction must be in [0, 1], got {raw_fraction}")
    workers = workers or os.cpu_count() or 1
    Writer = _writer_class()  # fails fast, before the long check, when FFCV is missing
    from ffcv.fields import IntField, RGBImageField

    source, output = Path(source), Path(output)
    samples, classes = list_image_folder(source)
    if output.is_dir():
        raise ConversionError(f"output {output} is a folder; give the path of the .beton file to write")
    ownership.check_overwrite(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    readable, sizes, skipped = [], [], []
    labels = dict(samples)
    with Pool(workers) as pool:
        checks = pool.imap(check_image, [path for path, _ in samples], chunksize=32)
        for path, size, reason in tqdm(
            checks, total=len(samples), desc="checking", unit="img", disable=not progress,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        ):
            if reason is None:
                readable.append((path, labels[path]))
                sizes.append(size)
            else:
                skipped.append((path, reason))
                tqdm.write(f"skipping unreadable image {path} ({reason})", file=sys.stderr)
    if not readable:
        raise DataPathError(f"no readable image under {source} ({len(samples)} files tried)")

    fields = {
        "image": RGBImageField(
            write_mode="proportion",
            max_resolution=max_side or None,
            jpeg_quality=quality,
            compress_probability=1 - raw_fraction,
        ),
        "label": IntField(),
    }
    # A name no other file has (mkstemp creates it exclusively), so the writer and the
    # clean-up below touch only this conversion's bytes.
    fd, partial_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(fd)
    partial = Path(partial_name)
    try:
        writer = Writer(
            str(partial), fields, page_size=_page_size(sizes, max_side), num_workers=workers
        )
        writer.progress = progress
        writer.from_indexed_dataset(FolderImages(readable, max_side), chunksize=64)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Summary(
        output, len(readable), len(classes), skipped, output.stat().st_size,
        time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert an ImageFolder tree (ImageNet train/ or val/) to an FFCV .beton file.",
    )
    parser.add_argument("source", help="root of the tree: SOURCE/<class>/<image>")
    parser.add_argument("output", help="the .beton file to write (must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--max-side", type=int, default=500,
                        help="shrink images so the longer side is at most this (0: keep size); default 500")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of compressed images; default 90")
    parser.add_argument("--raw-fraction", type=float, default=0.5,
                        help="share of images stored as raw pixels instead of JPEG; default 0.5")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes that read and encode images; default: all cores")
    args = parser.parse_args(argv)
    try:
        summary = convert(
            args.source, args.output, args.max_side, args.quality, args.raw_fraction, args.workers,
            overwrite=args.overwrite,
        )
    except (DataPathError, ValueError, ownership.OwnershipError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.output}", file=sys.stderr)
        return 130
    print(summary)
    for path, reason in summary.skipped:
        print(f"  skipped {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
