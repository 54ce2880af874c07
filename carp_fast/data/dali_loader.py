"""The DALI backend's producer: each image decoded once, all crops cut from it by DALI.

On a GPU node the JPEGs are decoded by nvJPEG (``device="mixed"``, with a share of them on
the hardware decoder of A100/H100) and every random-resized crop, with its flip, is cut
from the decoded image on the GPU; the uint8 crops go from DALI's output buffers into
CUDA tensors with the PyTorch plugin's ``feed_ndarray``, never through host memory.
Without a GPU (``device="cpu"``) the same pipeline runs on CPU threads: decode with
libjpeg-turbo and crop there. Either way the shared device-side stage
(:mod:`carp_fast.data.augment`) then finishes the batch.

Host and pipeline split the work like this:

* A small host stage (Python, a few reader threads, some batches ahead) reads the
  encoded bytes of this rank's samples in the epoch's order, reads each image's size from
  its header, and draws its crop boxes and flips. That is a few kilobytes of arithmetic
  per image; no host thread touches a pixel.
* The DALI pipeline receives the bytes and boxes through ``fn.external_source``, decodes
  each image once (``fn.decoders.image``) and runs one ``fn.resize`` per view with the
  box as its region of interest: the ROI crops, a reversed ROI flips, and the resampling
  is antialiased bicubic (the recipe's PIL ``BICUBIC``).

Why not DALI's readers and ``fn.random_resized_crop``? Their order and their random
streams follow DALI's iteration count and batch slots, not the sample: an epoch's order
cannot be a function of (seed, epoch) under our sharding rule, and a run resumed mid-epoch
would see other crops than the run it continues. Here the order is the torchvision
backend's :class:`EpochShardSampler` (same images per rank, per epoch, per seed, as the
other backends) and every box is drawn exactly as the torchvision backend draws it
(:func:`carp_fast.data.crops.sample_crop` from ``sample_rng(seed, epoch, index)``:
torchvision's RandomResizedCrop algorithm, then a flip with p 0.5), so the crops are a
pure function of (seed, epoch, sample index): identical across thread counts, loader
instances and resumes, and the same boxes the torchvision producer cuts. (DALI's own
generator also differs from torchvision's in its fallback: a random, not centred, crop.)

Epoch and sharding: the permutation of (seed, epoch) is dealt round-robin to the ranks,
and the tail that does not fill a batch on every rank is dropped this epoch (it comes
back with the next shuffle), so every rank runs the same whole number of batches,
``len(loader)``. ``set_epoch(epoch, start_batch)`` resumes mid-epoch. Each pass over an
epoch builds a fresh pipeline, so an epoch abandoned half-way leaves nothing behind.

Sources (``data.path``): an ImageFolder tree, or a folder of webdataset ``.tar`` shards
with DALI's ``.idx`` index files next to them (``tools/make_webdataset_shards.py`` makes
both from an ImageFolder tree), read by offset from the index: a few large files instead
of millions of small ones. A folder holding ``.tar`` files is read as shards.

Unreadable samples (not an image, truncated, a corrupt header, a format DALI cannot
decode) are caught on the host from their bytes, reported once by path with the reason,
and replaced by the next readable sample, as the torchvision backend does;
:attr:`DALILoader.bad_paths` lists them. A file that passes those checks but still makes
DALI's decoder fail (say, a corrupt Huffman table) is found by decoding the failed
batch's files with PIL, reported and skipped the same way, and the epoch goes on from
that batch with a fresh pipeline.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch
from carp_fast.data.crops import sample_crop
from carp_fast.data.folder import IMAGE_EXTENSIONS, DataPathError, list_image_folder
from carp_fast.data.recipe import FLIP_P, view_specs
from carp_fast.data.sampling import EpochShardSampler, sample_rng

MISSING_DALI = (
    "data.backend=dali needs NVIDIA DALI: `pip install nvidia-dali-cuda120` (or the "
    "nvidia-dali-cuda* wheel matching your CUDA; it also runs CPU-only pipelines), "
    "or choose data.backend=torchvision or ffcv"
)

try:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as error:  # pragma: no cover - exercised by a test with DALI hidden
    raise ImportError(MISSING_DALI) from error

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Image headers: the size (needed to draw the boxes) and a cheap validity check, from the
# bytes alone, so that a bad file is named before it reaches DALI's opaque decoder error.


class UnreadableImage(ValueError):
    """Bytes that DALI's decoder would fail on, with the reason."""


# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of an encoded image DALI can decode; :class:`UnreadableImage` if not.

    JPEG and PNG are parsed here (microseconds), including a truncation check (the JPEG's
    end-of-image marker after its scan data, PNG's IEND chunk); BMP, TIFF, WebP and PNM
    headers are read with PIL.
    """
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
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
    raise UnreadableImage("not a JPEG, PNG, BMP, TIFF, WebP or PNM image (what DALI decodes)")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    size = None
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
            size = (height, width)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows to the end
            if size is None:
                raise UnreadableImage("corrupt JPEG (scan before any frame header)")
            # Byte stuffing keeps FF D9 out of scan data: its absence after the first scan
            # means the file was cut short.
            if data.rfind(_JPEG_EOI, pos) < 0:
                raise UnreadableImage("truncated JPEG (no end-of-image marker)")
            return size
        pos += 2 + length
    raise UnreadableImage("truncated JPEG (ends before its scan data)")


def _pil_decode_error(data: bytes) -> str | None:
    """Why PIL cannot decode ``data`` in full, or None when it can."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------------------
# Crop boxes


def draw_rois(height: int, width: int, views: list[tuple[int, tuple[float, float]]],
              ratio: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Regions of interest of all views of one image: ``(start, end)``, each ``[V, 2]`` (y, x).

    Per view, in view order: a box drawn as torchvision's RandomResizedCrop draws it, then
    a flip with p 0.5 (the torchvision producer's draws, from the same stream). A flipped
    view has its x start and end swapped, which is how DALI's resize mirrors a region.
    """
    start = np.empty((len(views), 2), np.float32)
    end = np.empty((len(views), 2), np.float32)
    for v, (_, scale) in enumerate(views):
        top, left, h, w = sample_crop(height, width, scale, ratio, rng)
        flip = rng.random() < FLIP_P
        start[v] = (top, left + w if flip else left)
        end[v] = (top + h, left if flip else left + w)
    return start, end


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


def open_source(path: str | Path) -> FolderSource | ShardSource:
    """The source at ``data.path``: a folder of ``.tar`` shards, else an ImageFolder tree."""
    root = Path(path)
    if root.is_dir():
        tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
        if tars:
            return ShardSource(root, tars)
    elif root.is_file():
        raise DataPathError(
            f"data path {root} is a file; data.backend=dali reads an ImageFolder tree or a folder "
            "of webdataset .tar shards with DALI .idx files (tools/make_webdataset_shards.py)"
        )
    return FolderSource(root)


# ---------------------------------------------------------------------------------------
# The host stage: bytes and boxes of every sample of a batch, a few batches ahead.


class _HostStage:
    """Prepares the external-source inputs of batch k = 0, 1, ... of ``order``."""

    def __init__(self, loader: DALILoader, order: np.ndarray, epoch: int, ahead: int):
        self.loader = loader
        self.order = order
        self.epoch = epoch
        self.ahead = ahead
        self.num_batches = len(order) // loader.batch_size
        self.pool = ThreadPoolExecutor(max_workers=loader.reader_threads,
                                       thread_name_prefix="carp-dali-read")
        self.pending: deque = deque()
        self.submitted = 0
        self.fed = 0
        self.done: dict[int, tuple[list[int], list[int]]] = {}  # k -> (labels, source indices)
        self.error: BaseException | None = None  # raised here, not by DALI's decoder

    def _submit_until(self, k: int) -> None:
        b = self.loader.batch_size
        while self.submitted < min(k, self.num_batches):
            indices = self.order[self.submitted * b : (self.submitted + 1) * b].tolist()
            prepare = self.loader.prepare_sample
            self.pending.append([self.pool.submit(prepare, i, self.epoch) for i in indices])
            self.submitted += 1

    def __call__(self):
        """The next batch's inputs (DALI's external-source callback)."""
        k = self.fed
        if k >= self.num_batches:
            raise StopIteration
        self._submit_until(k + 1 + self.ahead)
        try:
            samples = [future.result() for future in self.pending.popleft()]
        except BaseException as error:
            self.error = error
            raise
        self.fed += 1
        encoded, labels, fed, starts, ends = zip(*samples)
        self.done[k] = (list(labels), list(fed))
        starts, ends = np.stack(starts), np.stack(ends)  # [B, V, 2]
        rois = []
        for v in range(starts.shape[1]):
            rois += [np.ascontiguousarray(starts[:, v]), np.ascontiguousarray(ends[:, v])]
        return [list(encoded), *rois]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DALILoader:
    """The producer stage with DALI: uint8 multi-crop batches on ``device``.

    Yields :class:`MultiCropBatch` of uint8 ``[V·B, 3, H, W]`` channels-last views (not
    colour-augmented, not normalised), view-major, on ``device`` (decoded and cropped on
    that GPU, or on CPU threads for a CPU device), and int64 labels on the host.
    ``data.num_workers`` is the number of DALI threads (0 counts as 1). Every batch is a
    fresh tensor the caller may keep.
    """

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"data.backend=dali runs on CPU or CUDA devices, not {device}")
        self.device = device
        self.source = open_source(cfg.data.path)
        crops = cfg.crops
        self.crops = crops
        self.views = view_specs(crops)
        self.ratio = crops.ratio
        self.batch_size = cfg.data.batch_size
        self.seed = cfg.train.seed
        self.num_threads = max(1, cfg.data.num_workers)
        # Reading is I/O (a network file system wants several reads in flight); the rest,
        # header and boxes, is ~0.2 ms of Python per image.
        self.reader_threads = min(8, max(2, self.num_threads))
        self.prefetch = max(1, cfg.data.prefetch_factor)
        self.hw_decoder_load = cfg.data.dali.hw_decoder_load
        self.device_memory_padding = cfg.data.dali.device_memory_padding
        self.host_memory_padding = cfg.data.dali.host_memory_padding
        self.sampler = EpochShardSampler(len(self.source), self.batch_size, rank, world, self.seed)
        self._bad: dict[int, str] = {}
        self._bad_lock = threading.Lock()

    # -- the loader contract ------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.source)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def epoch_order(self) -> np.ndarray:
        """This rank's sample indices for the rest of the current epoch, in order."""
        return np.fromiter((index for index, _ in self.sampler), dtype=np.int64)

    @property
    def bad_paths(self) -> set[str]:
        """Samples found unreadable so far (paths, or ``shard.tar:member``), skipped."""
        return set(self._bad.values())

    # -- host side ----------------------------------------------------------------------
    def _mark_bad(self, index: int, reason: str) -> None:
        with self._bad_lock:
            if index in self._bad:
                return
            self._bad[index] = self.source.describe(index)
        log.warning("skipping unreadable image %s (%s); %d skipped so far",
                    self._bad[index], reason, len(self._bad))

    def _read_readable(self, index: int) -> tuple[int, bytes, int, int, int]:
        """``(source index, bytes, label, height, width)`` of sample ``index`` or, if it is
        unreadable, of the next readable one."""
        n = len(self.source)
        for offset in range(n):
            j = (index + offset) % n
            if j in self._bad:
                continue
            try:
                data, label = self.source.read(j)
                height, width = image_size(data)
            except (OSError, UnreadableImage) as error:
                self._mark_bad(j, str(error))
                continue
            return j, data, label, height, width
        raise RuntimeError(f"no readable image in data.path ({n} tried)")

    def prepare_sample(self, index: int, epoch: int):
        """Encoded bytes, label, source index and ROIs of one sample (reader threads)."""
        j, data, label, height, width = self._read_readable(index)
        rng = sample_rng(self.seed, epoch, index)
        start, end = draw_rois(height, width, self.views, self.ratio, rng)
        return np.frombuffer(data, dtype=np.uint8), label, j, start, end

    # -- the pipeline -------------------------------------------------------------------
    def _define_pipeline(self, host, device_id: int | None) -> tuple[Pipeline, list]:
        """The pipeline's graph (not built) and its view outputs; on the GPU ``device_id``
        decode and crops run there, with None on CPU threads."""
        pipe = Pipeline(
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
            seed=self.seed, prefetch_queue_depth=self.prefetch,
        )
        with pipe:
            encoded, *rois = fn.external_source(
                source=host, num_outputs=1 + 2 * len(self.views), batch=True,
                dtype=[types.UINT8] + [types.FLOAT] * (2 * len(self.views)),
            )
            if device_id is not None:
                images = fn.decoders.image(
                    encoded, device="mixed", output_type=types.RGB,
                    hw_decoder_load=self.hw_decoder_load,
                    device_memory_padding=self.device_memory_padding,
                    host_memory_padding=self.host_memory_padding,
                )
            else:
                images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            views = [
                fn.resize(images, size=[size, size], roi_start=rois[2 * v], roi_end=rois[2 * v + 1],
                          interp_type=types.INTERP_CUBIC, antialias=True)
                for v, (size, _) in enumerate(self.views)
            ]
            pipe.set_outputs(*views)
        return pipe, views

    def _pipeline(self, host: _HostStage) -> Pipeline:
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index
            if device_id is None:
                device_id = torch.cuda.current_device()
        pipe, _ = self._define_pipeline(host, device_id)
        pipe.build()
        return pipe

    def _to_batch(self, outputs, labels: list[int]) -> MultiCropBatch:
        b = self.batch_size
        crops = self.crops
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        groups = []
        for first, number, size in ((0, crops.global_number, crops.global_size),
                                    (crops.global_number, crops.local_number, crops.local_size)):
            if number == 0:
                groups.append(None)
                continue
            # View-major NHWC memory; the NCHW view of it is channels-last for free.
            nhwc = torch.empty((number * b, size, size, 3), dtype=torch.uint8, device=self.device)
            for v in range(number):
                rows = nhwc[v * b : (v + 1) * b]
                feed_ndarray(outputs[first + v].as_tensor(), rows, cuda_stream=stream)
            groups.append(nhwc.permute(0, 3, 1, 2))
        return MultiCropBatch(groups[0], groups[1], torch.tensor(labels, dtype=torch.int64))

    def __iter__(self):
        order = self.epoch_order()
        epoch = self.sampler.epoch
        b = self.batch_size
        position = 0  # batch of `order` to produce next
        while position < len(order) // b:
            host = _HostStage(self, order[position * b :], epoch, self.prefetch)
            pipe = None
            try:
                pipe = self._pipeline(host)
                for k in range(host.num_batches):
                    try:
                        outputs = pipe.run()
                    except StopIteration:  # pragma: no cover - the host stage ran dry early
                        raise RuntimeError("the DALI pipeline ended before the epoch did") from None
                    except RuntimeError as error:
                        if host.error is not None:
                            raise host.error from error
                        self._recover(host, k, error)
                        break  # rebuild the pipeline and go on from this batch
                    labels, _ = host.done.pop(k)
                    batch = self._to_batch(outputs, labels)
                    position += 1
                    yield batch
            finally:
                del pipe
                host.close()

    def _recover(self, host: _HostStage, k: int, error: RuntimeError) -> None:
        """After DALI failed on batch ``k``: skip its undecodable files, or explain."""
        suspects = sorted({j for batch in range(k, host.fed) for j in host.done.get(batch, ([], []))[1]})
        found = 0
        for j in suspects:
            try:
                data, _ = self.source.read(j)
            except OSError as read_error:
                reason = str(read_error)
            else:
                reason = _pil_decode_error(data)
            if reason is not None:
                self._mark_bad(j, f"DALI and PIL cannot decode it: {reason}")
                found += 1
        if not found:
            names = ", ".join(self.source.describe(j) for j in suspects)
            raise RuntimeError(
                f"DALI failed on a batch whose files all pass PIL's decoder ({names}); "
                f"DALI's message: {error}"
            ) from error
