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
of millions of small ones. A folder holding ``.tar`` files is read as shards
(:mod:`carp_fast.data.sources`, shared with the nvjpeg backend).

Unreadable samples (not an image, truncated, a corrupt header, a format DALI cannot
decode) are caught on the host from their bytes, reported once by path with the reason,
and replaced by the next readable sample, as the torchvision backend does;
:attr:`DALILoader.bad_paths` lists them. A file that passes those checks but still makes
DALI's decoder fail (say, a corrupt Huffman table) is found by decoding the failed
batch's files with PIL, reported and skipped the same way, and the epoch goes on from
that batch with a fresh pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch
from carp_fast.data.crops import sample_crop
from carp_fast.data.recipe import FLIP_P, view_specs
from carp_fast.data.sampling import EpochShardSampler, ShardedLoader, sample_rng
from carp_fast.data.sources import image_size, open_source, read_readable
from carp_fast.data.sources import pil_decode_error as _pil_decode_error

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


class DALILoader(ShardedLoader):
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
        j, data, label, (height, width) = read_readable(
            self.source, index, self._bad.__contains__, self._mark_bad, image_size)
        return j, data, label, height, width

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
