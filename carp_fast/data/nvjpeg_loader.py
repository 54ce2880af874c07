"""The nvjpeg backend's producer: JPEGs decoded on the training GPU, every crop cut there.

Needs nothing beyond torch and torchvision (TorchCodec is used where installed). The work
splits in three:

* CPU workers (``data.num_workers`` DataLoader processes) read the encoded bytes of this
  rank's samples in the epoch's order (:class:`EpochShardSampler`, the rule of every
  backend) from an ImageFolder tree or webdataset shards (:mod:`carp_fast.data.sources`),
  check each header (an unreadable file is reported by path and replaced by the next
  readable sample, as the other backends do) and hand over one flat byte tensor per batch.
  No worker touches a pixel.
* The main process decodes each batch on the device with one function,
  :func:`decode_images` (nvJPEG's batched decoder through torchvision or TorchCodec; on a
  CPU device the same calls run libjpeg-turbo), draws every sample's boxes and flips from
  the FFCV backend's counter-based streams (:func:`draw_views`: the same boxes for the
  same seed, epoch and sample index), packs the decoded images into one atlas and cuts all
  crops of one output size with one ``roi_align`` call (:func:`cut_crops`), flips, and
  hands uint8 channels-last views to the shared augmentation (:mod:`carp_fast.data.augment`).
* That runs in a producer thread on a side CUDA stream, ``data.nvjpeg.ahead`` batches
  ahead: batch n+1 is decoded while the training stream runs step n. The training stream
  waits for a batch's own event (device-side, no host sync), and every tensor handed over
  is ``record_stream``-ed on it, so the caching allocator cannot give its memory back to
  the side stream while training still reads it.

Resampling: ``roi_align(aligned=True, sampling_ratio=0)`` averages ceil(box/size)²
bilinear samples per output pixel, a box filter as wide as the output pixel: a 400 px box
shrunk to 96 px averages 5×5 samples per pixel where point sampling (``grid_sample``)
would alias. The published recipe resizes with PIL's antialiased BICUBIC, which is a little
sharper; on generated photographs the crops are 35.5 dB PSNR from it at worst (median
40.7 dB over 96 crops at 224 and 96 px, tests/data/test_nvjpeg_loader.py; the bound is 32 dB).
A grating above the output's Nyquist frequency comes out at about 1/5 of the contrast
that point sampling leaves (PIL's wider bicubic support removes nearly all of it).

Known pitfalls of GPU decoding, and what this module does about each:

* torchvision's batched CUDA decode allocates its outputs on the caller's current stream
  but writes them from a private stream that does not wait for the caller's queued work,
  so it can overwrite memory that queued kernels still read (pytorch/vision#9606); and
  nvJPEG's hardware engine (A100/H100) writes before work queued on its own stream has
  run, so a device-side wait does not protect it either (pytorch/torchcodec#1634). The
  decode therefore runs with the side stream current and only after a host wait for that
  stream: every block the allocator can hand the decoder is then idle (blocks used by the
  training stream are held back by their recorded events, which the allocator checks on
  the host).
* CMYK (and YCCK) JPEGs are not supported by nvJPEG's GPU path: they are decoded on the
  CPU and copied over. Progressive JPEGs cannot go through the batched hardware decoder
  (torchvision decodes them one by one inside the call, decode_jpegs_cuda.cpp): they get
  a call each, so that a failure stays with its image.
* One bad file fails the whole batched call (torchvision "does not return partial
  results"): the batch then falls back to one call per image, and what nvJPEG refuses is
  decoded on the CPU; a file no decoder reads is reported by path and replaced.
* Grayscale images come out as RGB (decoded with mode RGB, and expanded if a decoder
  still returns one channel); a PNG (or other format) named ``.jpg`` is recognised by its
  bytes and decoded by the CPU's general decoder.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch
from carp_fast.data.crops import centre_crop
from carp_fast.data.recipe import FLIP_P
from carp_fast.data.sources import image_size, jpeg_info, open_source, read_readable
from carp_fast.data.sampling import EpochShardSampler, ShardedLoader

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Counter-based draws: the FFCV backend's streams (carp_fast.data.ffcv_loader:
# sample_stream, sample_crop_box and the flip after each box), vectorised over a batch in
# NumPy because that module needs numba and FFCV, which this backend must not. The tests
# hold both to the same boxes for the same (seed, epoch, index).

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))
_INV_2_53 = 1.0 / 9007199254740992.0
_U64 = 2**64


def _mix(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, as the compiled code's does.
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


def sample_streams(seed: int, epoch: int, indices) -> np.ndarray:
    """The initial states (uint64) of the random streams of ``indices`` in ``epoch``."""
    indices = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    n = indices.shape[0]
    state = _mix(np.full(n, seed % _U64, np.uint64) + _GOLDEN)
    state = _mix(state ^ (np.full(n, epoch % _U64, np.uint64) + _GOLDEN))
    return _mix(state ^ (indices + _GOLDEN))


def _uniform(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(u, next_state)`` with u uniform in [0, 1), per stream."""
    state = state + _GOLDEN
    return (_mix(state) >> _S11).astype(np.float64) * _INV_2_53, state


def _exp(values: np.ndarray) -> np.ndarray:
    # The C library's exp, as numba's math.exp calls it (NumPy's own may differ in the
    # last bit, which could move a rounded box side).
    return np.array([math.exp(v) for v in values.tolist()], dtype=np.float64)


def draw_boxes(heights: np.ndarray, widths: np.ndarray, scale, log_ratio, state: np.ndarray):
    """``(top, left, crop_h, crop_w, state)`` per stream: ffcv_loader.sample_crop_box.

    Torchvision's RandomResizedCrop algorithm: ten tries of an area fraction uniform in
    ``scale`` and a log aspect uniform in ``log_ratio``, then a centre crop at the nearest
    admissible ratio.
    """
    n = state.shape[0]
    state = state.copy()
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    crop_h, crop_w = np.zeros(n, np.int64), np.zeros(n, np.int64)
    area = heights * widths
    pending = np.arange(n)
    for _ in range(10):
        if pending.size == 0:
            break
        u, s = _uniform(state[pending])
        target = area[pending] * (scale[0] + (scale[1] - scale[0]) * u)
        u, s = _uniform(s)
        aspect = _exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u)
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= widths[pending]) & (h > 0) & (h <= heights[pending])
        hit = pending[fits]
        u, s_hit = _uniform(s[fits])
        top[hit] = (u * (heights[hit] - h[fits] + 1)).astype(np.int64)
        u, s_hit = _uniform(s_hit)
        left[hit] = (u * (widths[hit] - w[fits] + 1)).astype(np.int64)
        crop_h[hit], crop_w[hit] = h[fits], w[fits]
        state[hit] = s_hit
        state[pending[~fits]] = s[~fits]
        pending = pending[~fits]
    ratio_lo, ratio_hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
    for i in pending.tolist():  # rare: ten misses
        top[i], left[i], crop_h[i], crop_w[i] = centre_crop(int(heights[i]), int(widths[i]), ratio_lo, ratio_hi)
    return top, left, crop_h, crop_w, state


def draw_views(seed: int, epoch: int, indices, heights, widths, scales, ratio,
               flip_p: float = FLIP_P) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[V, B, 4]`` (top, left, height, width) and flips ``[V, B]`` of a batch.

    Per sample, view after view: a box, then a flip with p ``flip_p``, from the sample's
    stream (the FFCV backend's cut_views). ``scales`` has one ``(low, high)`` per view.
    """
    heights = np.asarray(heights, np.int64)
    widths = np.asarray(widths, np.int64)
    # np.log of a float64 array, as the FFCV decoder computes its log ratio.
    log_ratio = np.log(np.array(ratio, dtype=np.float64))
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    state = sample_streams(seed, epoch, indices)
    boxes = np.empty((len(scales), state.shape[0], 4), np.int64)
    flips = np.empty((len(scales), state.shape[0]), bool)
    for v, scale in enumerate(scales):
        *box, state = draw_boxes(heights, widths, scale, log_ratio, state)
        boxes[v] = np.stack(box, 1)
        u, state = _uniform(state)
        flips[v] = u < flip_p
    return boxes, flips


# ---------------------------------------------------------------------------------------
# Decoding: one function, whichever library is installed.

BASELINE, PROGRESSIVE, CMYK, OTHER = range(4)  # how an encoded sample is decoded


def sample_kind(data: bytes) -> int:
    """How to decode ``data``; raises :class:`~carp_fast.data.sources.UnreadableImage`
    (the reason) when its headers say it cannot be decoded at all."""
    if data[:2] == b"\xff\xd8":
        info = jpeg_info(data)
        if info.components == 4:
            return CMYK
        return PROGRESSIVE if info.progressive else BASELINE
    image_size(data)  # PNG and the rest, whatever the file is called
    return OTHER


class _TorchvisionCodec:
    """torchvision.io's decoders (deprecated since torchvision 0.29 in favour of
    TorchCodec's, but shipped with every torchvision that has nvJPEG)."""

    name = "torchvision"

    def __init__(self):
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        # Every call warns of the deprecation; this backend chose the decoder knowingly.
        warnings.filterwarnings(
            "ignore", message="The image decoding and encoding capabilities of TorchVision",
            category=DeprecationWarning,
        )
        self._jpeg, self._image, self._rgb = decode_jpeg, decode_image, ImageReadMode.RGB

    def jpegs(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return self._jpeg(datas, mode=self._rgb, device=device)

    def jpeg(self, data: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self._jpeg(data, mode=self._rgb, device=device)

    def any_format(self, data: torch.Tensor) -> torch.Tensor:
        return self._image(data, mode=self._rgb)


class _TorchcodecCodec:
    """TorchCodec's decoders (torchcodec.decoders). They apply a JPEG's EXIF orientation
    (torchvision's and PIL's ``convert`` do not), so a rotated photo comes out upright."""

    name = "torchcodec"

    def __init__(self):
        from torchcodec.decoders import decode_image, decode_jpeg

        self._jpeg, self._image = decode_jpeg, decode_image

    def jpegs(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return self._jpeg(datas, mode="RGB", device=device)

    def jpeg(self, data: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self._jpeg(data, mode="RGB", device=device)

    def any_format(self, data: torch.Tensor) -> torch.Tensor:
        return self._image(data, mode="RGB")


MISSING_TORCHCODEC = (
    "data.nvjpeg.decoder=torchcodec needs TorchCodec (`pip install torchcodec` matching your "
    "torch); data.nvjpeg.decoder=auto or torchvision decodes with torchvision alone"
)


def select_codec(name: str = "auto"):
    """The decoders ``data.nvjpeg.decoder`` names: ``auto`` takes TorchCodec's where it
    imports, else torchvision's."""
    if name in ("auto", "torchcodec"):
        try:
            return _TorchcodecCodec()
        except (ImportError, OSError, RuntimeError) as error:  # absent, or its libraries are
            if name == "torchcodec":
                raise ImportError(f"{MISSING_TORCHCODEC} ({error})") from error
    if name not in ("auto", "torchvision"):
        raise ValueError(f"unknown decoder {name!r}: auto, torchvision or torchcodec")
    return _TorchvisionCodec()


def _rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def decode_images(datas: list[torch.Tensor], kinds: list[int], device: torch.device,
                  codec) -> list[torch.Tensor | str]:
    """Each encoded image as ``[3, H, W]`` uint8 on ``device``, or why no decoder reads it.

    Baseline JPEGs go to the device in one batched call; progressive ones one call each;
    CMYK and non-JPEG bytes to the CPU's decoder. A failed call falls back to one call per
    image, and an image the device's decoder refuses to the CPU's (see the module notes).
    """
    out: list[torch.Tensor | str | None] = [None] * len(datas)
    batched = [i for i, kind in enumerate(kinds) if kind == BASELINE]
    if batched:
        try:
            for i, image in zip(batched, codec.jpegs([datas[i] for i in batched], device)):
                out[i] = image
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # one bad file fails the whole call
            log.debug("batched JPEG decode failed (%s); decoding one image at a time", error)
    for i, kind in enumerate(kinds):
        if out[i] is None and kind in (BASELINE, PROGRESSIVE):
            try:
                out[i] = codec.jpeg(datas[i], device)
            except torch.OutOfMemoryError:
                raise
            except Exception:
                pass  # the CPU's decoder below
    for i in range(len(datas)):
        if out[i] is not None:
            continue
        try:
            image = codec.any_format(datas[i])
        except Exception as error:  # the decoders raise RuntimeError or ValueError
            out[i] = f"{type(error).__name__}: {error}"
            continue
        if device.type == "cuda":
            image = image.pin_memory()  # a truly asynchronous copy
        out[i] = image.to(device, non_blocking=True)
    return [_rgb(image) if isinstance(image, torch.Tensor) else image for image in out]


# ---------------------------------------------------------------------------------------
# Crops: all images of a batch in one atlas, all crops of one size in one roi_align call.


def pack_atlas(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Top-left corners ``(ys, xs)`` and size ``(height, width)`` of an atlas holding every
    image with a one-pixel frame, packed in shelves (tallest first).

    One atlas rather than a ``[B, 3, Hmax, Wmax]`` stack: a single 3000 px photo would
    make the stack hold 256 images of that size.
    """
    slot_h, slot_w = np.asarray(heights) + 2, np.asarray(widths) + 2
    width = max(int(slot_w.max()), int(math.ceil(math.sqrt(float((slot_h * slot_w).sum()) * 1.1))))
    ys, xs = np.zeros(len(slot_h), np.int64), np.zeros(len(slot_h), np.int64)
    x = y = shelf = 0
    for i in np.argsort(-slot_h, kind="stable").tolist():
        if x + slot_w[i] > width:
            y, x, shelf = y + shelf, 0, 0
        ys[i], xs[i] = y, x
        x += int(slot_w[i])
        shelf = max(shelf, int(slot_h[i]))
    return ys, xs, y + shelf, width


def _concat_ranges(lengths: np.ndarray) -> np.ndarray:
    """``[0..l0), [0..l1), ...`` concatenated."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def frame_indices(ys, xs, heights, widths, atlas_width: int) -> tuple[np.ndarray, ...]:
    """Flat atlas positions ``(rows_to, rows_from, cols_to, cols_from)`` that copy each
    image's edge pixels into its frame: rows first, then columns (which takes the corners).

    roi_align's bilinear samples reach half a pixel past a box; at an image's edge that
    half pixel must read the edge again (as roi_align does at the border of its input),
    not the neighbouring image.
    """
    n = np.arange(len(ys))
    img = np.repeat(n, widths)
    cols = xs[img] + 1 + _concat_ranges(np.asarray(widths))
    top = ys[img] * atlas_width + cols
    bottom = (ys[img] + heights[img] + 1) * atlas_width + cols
    rows_to = np.concatenate([top, bottom])
    rows_from = np.concatenate([top + atlas_width, bottom - atlas_width])
    img = np.repeat(n, np.asarray(heights) + 2)
    rows = ys[img] + _concat_ranges(np.asarray(heights) + 2)
    left = rows * atlas_width + xs[img]
    right = left + widths[img] + 1
    return rows_to, rows_from, np.concatenate([left, right]), np.concatenate([left + 1, right - 1])


def _on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()  # only a copy from pinned memory is truly asynchronous
    return tensor.to(device, non_blocking=True)


def cut_crops(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray,
              groups: list[tuple[int, int, int]]) -> list[torch.Tensor | None]:
    """The crops of every view group ``(first view, views, size)``: uint8 ``[views·B, 3,
    size, size]`` channels-last, view-major, flipped where ``flips`` says.

    ``images`` are ``[3, H, W]`` uint8 on one device; ``boxes`` ``[V, B, 4]`` (top, left,
    height, width) in their pixels. One ``roi_align`` call per group with
    ``aligned=True`` (a box of pixel edges maps to pixel centres as in PIL's resize) and
    ``sampling_ratio=0`` (ceil(box side / size) samples per output pixel and axis).
    """
    from torchvision.ops import roi_align

    device = images[0].device
    heights = np.array([image.shape[1] for image in images], np.int64)
    widths = np.array([image.shape[2] for image in images], np.int64)
    ys, xs, atlas_h, atlas_w = pack_atlas(heights, widths)
    # float32: roi_align takes its box coordinates in the input's dtype, and half precision
    # cannot address an atlas row past 2048.
    atlas = torch.zeros((3, atlas_h, atlas_w), dtype=torch.float32, device=device)
    for image, y, x in zip(images, ys.tolist(), xs.tolist()):
        atlas[:, y + 1 : y + 1 + image.shape[1], x + 1 : x + 1 + image.shape[2]].copy_(image)
    rows_to, rows_from, cols_to, cols_from = frame_indices(ys, xs, heights, widths, atlas_w)
    split = np.cumsum([len(rows_to), len(rows_from), len(cols_to)])
    frame = _on_device(np.concatenate([rows_to, rows_from, cols_to, cols_from]), device)
    rows_to, rows_from, cols_to, cols_from = torch.tensor_split(frame, split.tolist())
    flat = atlas.view(3, -1)
    flat[:, rows_to] = flat[:, rows_from]
    flat[:, cols_to] = flat[:, cols_from]
    out: list[torch.Tensor | None] = []
    for first, number, size in groups:
        if number == 0:
            out.append(None)
            continue
        box = boxes[first : first + number].reshape(-1, 4).astype(np.float64)  # view-major
        origin_y, origin_x = np.tile(ys + 1, number), np.tile(xs + 1, number)
        rois = np.stack([
            np.zeros(len(box)), origin_x + box[:, 1], origin_y + box[:, 0],
            origin_x + box[:, 1] + box[:, 3], origin_y + box[:, 0] + box[:, 2],
        ], 1).astype(np.float32)
        crops = roi_align(atlas[None], _on_device(rois, device), (size, size), spatial_scale=1.0,
                          sampling_ratio=0, aligned=True)
        views = torch.empty((len(box), size, size, 3), dtype=torch.uint8, device=device)
        views = views.permute(0, 3, 1, 2).copy_(crops.round_().clamp_(0, 255))  # channels-last
        # The flipped rows, known on the host (no device-to-host read), mirrored in uint8.
        flipped = np.flatnonzero(flips[first : first + number].reshape(-1))
        if flipped.size:
            rows = _on_device(flipped, device)
            views[rows] = views[rows].flip(-1)
        out.append(views)
    return out


# ---------------------------------------------------------------------------------------
# Workers: encoded bytes of a batch, checked, in one flat tensor.


class EncodedBatch(NamedTuple):
    """One batch's encoded images as read by a worker."""

    data: torch.Tensor  # uint8 [total bytes]: the files one after another
    offsets: torch.Tensor  # int64 [B + 1]: sample i is data[offsets[i]:offsets[i + 1]]
    kinds: torch.Tensor  # int64 [B]: BASELINE, PROGRESSIVE, CMYK or OTHER
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B]: the sampler's index, whose stream draws the boxes
    sources: torch.Tensor  # int64 [B]: the sample read (the next readable one if not)
    epoch: int
    skipped: list  # (source index, reason) of samples found unreadable on the way


class _EncodedReader(Dataset):
    """Items are batches: ``reader[[(index, epoch), ...]]`` is an :class:`EncodedBatch`."""

    def __init__(self, source):
        self.source = source
        self.bad: set[int] = set()  # this worker's; the main process keeps the record

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, keys) -> EncodedBatch:
        chunks, kinds, labels, sources, skipped = [], [], [], [], []

        def mark_bad(j: int, reason: str) -> None:
            self.bad.add(j)
            skipped.append((j, reason))

        for index, _ in keys:
            j, data, label, kind = read_readable(self.source, index, self.bad.__contains__,
                                                 mark_bad, sample_kind)
            chunks.append(data)
            kinds.append(kind)
            labels.append(label)
            sources.append(j)
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
        return EncodedBatch(
            torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8),
            torch.from_numpy(offsets.astype(np.int64)), torch.tensor(kinds), torch.tensor(labels),
            torch.tensor([index for index, _ in keys]), torch.tensor(sources), keys[0][1], skipped,
        )


# ---------------------------------------------------------------------------------------


class _End:
    """Marks the end of an epoch in the producer's queue."""


class NvjpegLoader(ShardedLoader):
    """The producer stage decoding on ``device``: uint8 multi-crop batches there.

    Yields :class:`MultiCropBatch` of uint8 ``[V·B, 3, H, W]`` channels-last views (not
    colour-augmented, not normalised), view-major, on ``device``, and int64 labels on the
    host. Every batch is a fresh tensor the caller may keep.
    """

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"data.backend=nvjpeg runs on CPU or CUDA devices, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.codec = select_codec(cfg.data.nvjpeg.decoder)
        self.source = open_source(cfg.data.path, backend="nvjpeg")
        crops = cfg.crops
        self.scales = [crops.global_scale] * crops.global_number + [crops.local_scale] * crops.local_number
        self.groups = [(0, crops.global_number, crops.global_size),
                       (crops.global_number, crops.local_number, crops.local_size)]
        self.ratio = crops.ratio
        self.batch_size = cfg.data.batch_size
        self.seed = cfg.train.seed
        self.ahead = cfg.data.nvjpeg.ahead
        self.sampler = EpochShardSampler(len(self.source), self.batch_size, rank, world, self.seed)
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            _EncodedReader(self.source), batch_size=None,
            sampler=BatchSampler(self.sampler, self.batch_size, drop_last=True),
            num_workers=workers, persistent_workers=cfg.data.persistent_workers and workers > 0,
            prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        )
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._bad: dict[int, str] = {}
        self._running: tuple[threading.Event, threading.Thread] | None = None  # the open pass

    # -- the loader contract ------------------------------------------------------------
    @property
    def bad_paths(self) -> set[str]:
        """Samples found unreadable so far (paths, or ``shard.tar:member``), skipped."""
        return set(self._bad.values())

    # -- the producer (its own thread, on the side stream) -------------------------------
    def _mark_bad(self, index: int, reason: str) -> None:
        if index in self._bad:
            return
        self._bad[index] = self.source.describe(index)
        log.warning("skipping unreadable image %s (%s); %d skipped so far",
                    self._bad[index], reason, len(self._bad))

    def _replacement(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(image, label, source index)`` of the first sample after ``index`` that reads
        and decodes (on the CPU: the path of last resort)."""
        while True:
            index, data, label, _ = read_readable(self.source, index + 1, self._bad.__contains__,
                                                  self._mark_bad, sample_kind)
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = decode_images([tensor], [OTHER], self.device, self.codec)[0]
            if isinstance(image, torch.Tensor):
                return image, label, index
            self._mark_bad(index, f"no decoder reads it: {image}")

    def produce(self, encoded: EncodedBatch) -> MultiCropBatch:
        """Decode and crop one batch on the current stream (the side stream on a GPU)."""
        for j, reason in encoded.skipped:
            self._mark_bad(j, reason)
        offsets = encoded.offsets.tolist()
        datas = [encoded.data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        kinds, labels = encoded.kinds.tolist(), encoded.labels.tolist()
        sources = encoded.sources.tolist()
        # A sample this process found unreadable earlier (its header passed, its pixels did
        # not) is not decoded again: the workers do not know of it.
        known_bad = [j in self._bad for j in sources]
        wanted = [i for i, bad in enumerate(known_bad) if not bad]
        if self.side_stream is not None:
            # Intended host wait, on the side stream only (pytorch/vision#9606 and
            # pytorch/torchcodec#1634, module notes): nothing may still be queued there when
            # nvJPEG gets its output memory.
            self.side_stream.synchronize()
        decoded = decode_images([datas[i] for i in wanted], [kinds[i] for i in wanted],
                                self.device, self.codec)
        images: list = [None] * len(datas)
        for i, image in zip(wanted, decoded):
            if isinstance(image, str):
                self._mark_bad(sources[i], f"no decoder reads it: {image}")
            else:
                images[i] = image
        for i, image in enumerate(images):
            if image is None:
                images[i], labels[i], sources[i] = self._replacement(sources[i])
        heights = [image.shape[1] for image in images]
        widths = [image.shape[2] for image in images]
        boxes, flips = draw_views(self.seed, encoded.epoch, encoded.indices.numpy(), heights,
                                  widths, self.scales, self.ratio)
        global_views, local_views = cut_crops(images, boxes, flips, self.groups)
        labels = torch.tensor(labels, dtype=torch.int64)
        if self.side_stream is not None:
            labels = labels.pin_memory()  # so that their copy to the device never waits
        return MultiCropBatch(global_views, local_views, labels)

    def _run_producer(self, encoded_batches, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            torch.set_grad_enabled(False)  # this thread's; nothing here is differentiated
            if self.side_stream is None:
                for encoded in encoded_batches:
                    if not put((self.produce(encoded), None)):
                        return
            else:
                with torch.cuda.device(self.device), torch.cuda.stream(self.side_stream):
                    for encoded in encoded_batches:
                        batch = self.produce(encoded)
                        done = torch.cuda.Event()
                        done.record(self.side_stream)
                        if not put((batch, done)):
                            return
            put(_End)
        except BaseException as error:  # raised in the consumer, with its traceback
            put(error)

    def __iter__(self):
        # One epoch at a time: the workers' iterator is shared, so a new pass stops the
        # producer of one still open (whose consumer then gets an error, not a hang).
        if self._running is not None:
            self._running[0].set()
            self._running[1].join()
        out: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        # The workers start (fork) here, in the caller's thread: forking from a thread other
        # than the main one copies locks other threads may hold.
        encoded_batches = iter(self.loader)
        producer = threading.Thread(target=self._run_producer, args=(encoded_batches, out, stop),
                                    name="carp-nvjpeg-producer", daemon=True)
        producer.start()
        self._running = (stop, producer)
        try:
            while True:
                try:
                    item = out.get(timeout=0.5)
                except queue.Empty:
                    if stop.is_set() and not producer.is_alive():
                        raise RuntimeError("this epoch's iterator was abandoned: a newer pass over "
                                           "the nvjpeg loader started") from None
                    continue
                if item is _End:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, done = item
                if done is not None:
                    # The training stream waits for this batch's kernels (device-side; a
                    # wait_stream on the side stream would also wait for the next batch's),
                    # and the allocator keeps its memory until the training stream is done.
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(done)
                    for views in (batch.global_views, batch.local_views):
                        if views is not None:
                            views.record_stream(stream)
                yield batch
        finally:
            stop.set()
            producer.join()
            if self._running is not None and self._running[1] is producer:
                self._running = None
