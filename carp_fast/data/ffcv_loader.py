"""The FFCV backend's producer: decode each image once, cut every crop from it.

FFCV's own decoders decode and crop in one step, so one pipeline per view would decode
every image Vg + Vl times. :class:`MultiCropDecoder` is a single FFCV decoder operation
that decodes an image once (libjpeg-turbo through FFCV, or a memcpy-free view of a raw
sample) and cuts all random-resized crops, with flips, from it in numba-compiled code on
FFCV's worker threads. The crops are written view-major into the batch buffer, so the
batch becomes ``[V*B, 3, H, W]`` channels-last tensors without a copy.

Randomness is a pure function of (seed, epoch, sample index), drawn with a counter-based
generator inside the compiled code: crops do not depend on thread count or scheduling,
and a resumed run sees the crops it would have seen. The sample order uses the
torchvision backend's sharding rule (:class:`EpochShardSampler`), so both backends give
every rank the same images in the same order for the same seed and epoch.

A pitfall shapes the compiled code: each FFCV ``Loader`` marks numba's shared type
objects for 1-D/2-D uint8 and 1-D uint64/uint32 contiguous arrays read-only in place
(``OSCacheManager.state_type`` and ``ProcessCacheManager.state_type``), which changes
their hash and corrupts the overload table of any long-lived compiled function that was
called with such arrays. The module-level kernels here, compiled once per process, are
therefore only ever called with scalars, addresses, int64/float arrays and 3-D uint8
arrays; the small per-loader function FFCV compiles gathers the addresses.
"""

from __future__ import annotations

import logging
import math
import queue
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from carp_fast.config import Config
from carp_fast.data.batch import MultiCropBatch
from carp_fast.data.crops import centre_crop
from carp_fast.data.folder import DataPathError
from carp_fast.data.recipe import FLIP_P, view_specs
from carp_fast.data.sampling import EpochShardSampler

MISSING_FFCV = (
    "data.backend=ffcv needs FFCV: `pip install ffcv numba opencv-python-headless` after "
    "installing its system libraries (apt: pkg-config libopencv-dev libturbojpeg0-dev; "
    "`bash tools/install_system_deps.sh` does it)"
)

try:
    import numba
    from numba import njit
    from numba.core import cgutils, types
    from numba.extending import intrinsic
    from llvmlite import ir
except ImportError as error:  # pragma: no cover - exercised only without numba
    raise ImportError(MISSING_FFCV) from error

# Importing FFCV sets torch to one thread (ffcv.pipeline.compiler does at import); the
# training process keeps its own setting.
_torch_threads = torch.get_num_threads()
try:
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import ctypes_imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.state import State
except ImportError as error:  # pragma: no cover - exercised only without ffcv
    raise ImportError(MISSING_FFCV) from error
finally:
    torch.set_num_threads(_torch_threads)

log = logging.getLogger(__name__)

_centre_crop = njit(nogil=True, cache=True)(centre_crop)

_JPEG_MODE = IMAGE_MODES["jpg"]


@intrinsic
def _address_as_pointer(typingctx, address):
    """An integer address as a void pointer, to view memory owned elsewhere."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


# ---------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64): a stream per (seed, epoch, sample), so draws
# inside parallel loops are reproducible whatever thread runs which sample.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0


@njit(nogil=True, cache=True)
def _mix(z):
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@njit(nogil=True, cache=True)
def sample_stream(seed, epoch, index):
    """The initial state of the random stream of one sample in one epoch."""
    state = _mix(np.uint64(seed) + _GOLDEN)
    state = _mix(state ^ (np.uint64(epoch) + _GOLDEN))
    return _mix(state ^ (np.uint64(index) + _GOLDEN))


@njit(nogil=True, cache=True)
def _uniform(state):
    """``(u, next_state)`` with u uniform in [0, 1)."""
    state = state + _GOLDEN
    return float(_mix(state) >> _S11) * _INV_2_53, state


@njit(nogil=True, cache=True)
def sample_crop_box(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, state):
    """``(top, left, crop_h, crop_w, state)`` drawn as torchvision's RandomResizedCrop does.

    Same algorithm as :func:`carp_fast.data.crops.sample_crop` (ten tries of area fraction
    uniform in scale and log aspect uniform in log ratio, then a centre crop at the
    nearest admissible ratio), with the counter-based stream instead of NumPy's.
    """
    area = height * width
    for _ in range(10):
        u, state = _uniform(state)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u)
        u, state = _uniform(state)
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u)
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            u, state = _uniform(state)
            top = int(u * (height - crop_h + 1))
            u, state = _uniform(state)
            left = int(u * (width - crop_w + 1))
            return top, left, crop_h, crop_w, state
    top, left, crop_h, crop_w = _centre_crop(height, width, math.exp(log_ratio_lo), math.exp(log_ratio_hi))
    return top, left, crop_h, crop_w, state


# ---------------------------------------------------------------------------------------
# Resampling: PIL's antialiased BICUBIC (a = -0.5, support 2 scaled by the downscale
# factor), as torchvision's RandomResizedCrop applies it to a PIL image: the box is cut
# first, so taps never reach outside it. Two passes in float32: a vertical pass that
# combines whole source rows, then a horizontal pass that filters within rows of the
# intermediate. Both inner loops are LLVM vector code written below (numba does not
# vectorise either: the first re-reads its accumulator row per tap, the second is a
# short reduction over interleaved RGB), called once per 64 intermediate values or per
# output pixel of eight rows; plain loops serve boxes and outputs too small for them.

_BICUBIC_A = -0.5
_VERTICAL_BLOCK = 64  # intermediate floats per vertical-kernel call (4 x 16 lanes)
_HORIZONTAL_ROWS = 8  # output rows per horizontal-kernel call (4 x 2 pixels of 4 lanes)


@njit(nogil=True, cache=True)
def _bicubic(x):
    x = abs(x)
    if x < 1.0:
        return ((_BICUBIC_A + 2.0) * x - (_BICUBIC_A + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * _BICUBIC_A
    return 0.0


@njit(nogil=True, cache=True)
def max_taps(length, out_size):
    """PIL's kernel size for resampling ``length`` pixels to ``out_size``."""
    return int(math.ceil(2.0 * max(length / out_size, 1.0))) * 2 + 1


@njit(nogil=True, cache=True)
def bicubic_taps(length, out_size, flip, first, count, weights):
    """PIL's bicubic taps (``precompute_coeffs``) of a box ``length`` pixels long.

    Output pixel o reads box pixels ``first[o] + t`` for ``t < count[o]`` with weights
    ``weights[o, t]`` (normalised to sum 1; rows beyond ``count`` are zero). With
    ``flip`` the outputs are stored in reverse order, which mirrors the view for free.
    """
    scale = length / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    inverse = 1.0 / filter_scale
    kmax = weights.shape[1]
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), length)
        n = min(hi - lo, kmax)
        dest = out_size - 1 - o if flip else o
        total = 0.0
        for t in range(n):
            weight = _bicubic((t + lo - center + 0.5) * inverse)
            weights[dest, t] = weight
            total += weight
        for t in range(kmax):
            weights[dest, t] = weights[dest, t] / total if t < n else 0.0
        first[dest] = lo
        count[dest] = n


def _splat(builder, value, lanes):
    vector = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _accumulate(builder, slot, values, weight):
    product = builder.fmul(values, weight, flags=("fast",))
    builder.store(builder.fadd(builder.load(slot), product, flags=("fast",)), slot)


@intrinsic
def _vertical_block(typingctx, source, source_stride, weights, count, out):
    """64 floats ``out[k] = sum_t weights[t] * source[t * source_stride + k]`` (uint8 source).

    Four 16-lane accumulators stay in registers over all taps; each tap loads 64 source
    bytes once (the numba loop re-read and re-wrote its float row per tap).
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        source, stride, weights, count, out = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        lanes = ir.VectorType(f32, 16)
        bytes16 = ir.VectorType(ir.IntType(8), 16)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * 16)) for _ in range(4)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            row = builder.add(source, builder.mul(loop.index, stride))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 16)
            for k, slot in enumerate(slots):
                address = builder.inttoptr(builder.add(row, ir.Constant(i64, 16 * k)), bytes16.as_pointer())
                _accumulate(builder, slot, builder.uitofp(builder.load(address, align=1), lanes), weight)
        for k, slot in enumerate(slots):
            address = builder.inttoptr(builder.add(out, ir.Constant(i64, 64 * k)), lanes.as_pointer())
            builder.store(builder.load(slot), address, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _horizontal_pixel(typingctx, row, row_stride, weights, count, out, out_stride):
    """One output pixel in eight consecutive rows, rounded and clamped to uint8.

    Row j's pixel is ``sum_t weights[t] * row_j[3t : 3t + 3]`` (float rows, RGB
    interleaved), computed 4 lanes wide (the 4th lane reads the next pixel's red and is
    dropped), two rows per 8-lane accumulator; the 3 bytes go to ``out + j * out_stride``.
    """
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row, stride, weights, count, out, out_stride = args
        f32, i32, i64, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
        four, eight = ir.VectorType(f32, 4), ir.VectorType(f32, 8)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(eight, [0.0] * 8))
                 for _ in range(_HORIZONTAL_ROWS // 2)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        concat = ir.Constant(ir.VectorType(i32, 8), list(range(8)))
        with cgutils.for_range(builder, count) as loop:
            pixel = builder.add(row, builder.mul(loop.index, ir.Constant(i64, 12)))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 8)
            for k, slot in enumerate(slots):
                pair = [builder.load(builder.inttoptr(builder.add(pixel, builder.mul(stride, ir.Constant(i64, 2 * k + j))),
                                                      four.as_pointer()), align=4) for j in (0, 1)]
                _accumulate(builder, slot, builder.shuffle_vector(pair[0], pair[1], concat), weight)
        low, high = ir.Constant(eight, [0.0] * 8), ir.Constant(eight, [255.0] * 8)
        for k, slot in enumerate(slots):
            value = builder.fadd(builder.load(slot), ir.Constant(eight, [0.5] * 8))  # round half up, as PIL
            value = builder.select(builder.fcmp_ordered("<", value, low), low, value)
            value = builder.select(builder.fcmp_ordered(">", value, high), high, value)
            pixels = builder.trunc(builder.fptosi(value, ir.VectorType(i32, 8)), ir.VectorType(i8, 8))
            for j in (0, 1):
                address = builder.inttoptr(builder.add(out, builder.mul(out_stride, ir.Constant(i64, 2 * k + j))),
                                           i8.as_pointer())
                red_green = builder.shuffle_vector(pixels, pixels, ir.Constant(ir.VectorType(i32, 2), [4 * j, 4 * j + 1]))
                builder.store(builder.bitcast(red_green, ir.IntType(16)),
                              builder.bitcast(address, ir.IntType(16).as_pointer()), align=1)
                builder.store(builder.extract_element(pixels, ir.Constant(i32, 4 * j + 2)),
                              builder.gep(address, [ir.Constant(i64, 2)]))
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, fastmath=True)
def _vertical_pass(image, top, left, crop_w, first, count, weights, rows):
    """``rows[o, :3 crop_w]`` = the box's source rows combined with output row o's taps."""
    stride = image.shape[1] * 3
    line = crop_w * 3
    source = image.ctypes.data + top * stride + left * 3
    if line >= _VERTICAL_BLOCK:
        for o in range(rows.shape[0]):
            start = source + first[o] * stride
            out = rows.ctypes.data + o * rows.shape[1] * 4
            taps = weights.ctypes.data + o * weights.shape[1] * 4
            for k in range(0, line, _VERTICAL_BLOCK):
                k = min(k, line - _VERTICAL_BLOCK)  # the last block overlaps the one before
                _vertical_block(start + k, stride, taps, count[o], out + 4 * k)
        return
    pixels = image.reshape(-1)
    for o in range(rows.shape[0]):
        base = (top + first[o]) * stride + left * 3
        for k in range(line):
            total = np.float32(0.0)
            for t in range(count[o]):
                total += weights[o, t] * np.float32(pixels[base + t * stride + k])
            rows[o, k] = total


@njit(nogil=True, cache=True, fastmath=True)
def _horizontal_pass(rows, first, count, weights, out):
    """``out[r, o]`` = row r of the intermediate filtered with output column o's taps."""
    out_h, out_w = out.shape[0], out.shape[1]
    out_stride = out_w * 3
    if out_h >= _HORIZONTAL_ROWS:
        row_stride = rows.shape[1] * 4
        for r in range(0, out_h, _HORIZONTAL_ROWS):
            r = min(r, out_h - _HORIZONTAL_ROWS)  # the last rows overlap: same values twice
            row = rows.ctypes.data + r * row_stride
            target = out.ctypes.data + r * out_stride
            for o in range(out_w):
                _horizontal_pixel(row + first[o] * 12, row_stride, weights.ctypes.data + o * weights.shape[1] * 4,
                                  count[o], target + o * 3, out_stride)
        return
    for r in range(out_h):
        for o in range(out_w):
            for ch in range(3):
                total = np.float32(0.5)
                for t in range(count[o]):
                    total += weights[o, t] * rows[r, (first[o] + t) * 3 + ch]
                out[r, o, ch] = 0 if total < 0 else (255 if total >= 255 else np.uint8(total))


@njit(nogil=True, cache=True)
def resize_crop(image, top, left, crop_h, crop_w, out, flip):
    """Resample the box of the C-contiguous HWC uint8 ``image`` into the square HWC ``out``.

    PIL's BICUBIC of the cut-out box (torchvision's ``resized_crop`` on a PIL image),
    mirrored when ``flip``. The intermediate keeps float32 (PIL rounds it to uint8).
    """
    size = out.shape[0]
    first_y, count_y = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_y = np.empty((size, max_taps(crop_h, size)), np.float32)
    first_x, count_x = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_x = np.empty((size, max_taps(crop_w, size)), np.float32)
    bicubic_taps(crop_h, size, False, first_y, count_y, weights_y)
    bicubic_taps(crop_w, size, flip, first_x, count_x, weights_x)
    # One float of slack per row: the horizontal kernel's 4th lane reads past the last pixel.
    rows = np.empty((size, crop_w * 3 + 1), np.float32)
    rows[:, crop_w * 3] = 0.0
    _vertical_pass(image, top, left, crop_w, first_y, count_y, weights_y, rows)
    _horizontal_pass(rows, first_x, count_x, weights_x, out)


@njit(nogil=True, cache=True)
def cut_views(image, state, sizes, scales, log_ratio, flip_p, destination, offsets):
    """All crops of one decoded HWC image; view v goes to ``destination + offsets[v]``.

    Every view draws its box, then its flip, from the sample's stream in view order.
    """
    height, width = image.shape[0], image.shape[1]
    for v in range(sizes.shape[0]):
        top, left, crop_h, crop_w, state = sample_crop_box(
            height, width, scales[v, 0], scales[v, 1], log_ratio[0], log_ratio[1], state
        )
        u, state = _uniform(state)
        size = sizes[v]
        view = numba.carray(_address_as_pointer(destination + offsets[v]), (size, size, 3), np.uint8)
        resize_crop(image, top, left, crop_h, crop_w, view, u < flip_p)


@njit(nogil=True, parallel=True)
def cut_batch(addresses, nbytes, modes, heights, widths, indices, destination, seed, epoch,
              sizes, scales, log_ratio, flip_p):
    """Decode each sample once and cut its views, in parallel over the batch.

    Sample i's encoded bytes are at ``addresses[i]``; the batch buffer at ``destination``
    receives the views view-major: view v of sample i starts at
    (bytes of views before v) · count + i · bytes(v).
    """
    count = addresses.shape[0]
    view_bytes = sizes * sizes * 3
    starts = np.zeros(sizes.shape[0], np.int64)
    for v in range(1, sizes.shape[0]):
        starts[v] = starts[v - 1] + view_bytes[v - 1] * count
    for i in numba.prange(count):
        height, width = heights[i], widths[i]
        state = sample_stream(seed, epoch, np.uint64(indices[i]))
        offsets = starts + i * view_bytes
        if modes[i] == _JPEG_MODE:
            image = np.empty((height, width, 3), np.uint8)
            ctypes_imdecode(
                _address_as_pointer(addresses[i]), nbytes[i], height, width,
                _address_as_pointer(image.ctypes.data), height, width, 0, 0, 1, 1, False, False,
            )
            cut_views(image, state, sizes, scales, log_ratio, flip_p, destination, offsets)
        else:
            raw = numba.carray(_address_as_pointer(addresses[i]), (height, width, 3), np.uint8)
            cut_views(raw, state, sizes, scales, log_ratio, flip_p, destination, offsets)


class MultiCropDecoder(SimpleRGBImageDecoder):
    """FFCV decoder of an ``RGBImageField``: one decode, Vg + Vl crops with flips.

    (A subclass of FFCV's image decoder, which is how FFCV recognises the first operation
    of a pipeline as the field's decoder.)

    Output per sample: ``sum(size² · 3)`` bytes, but written view-major across the batch
    buffer, so the batch's bytes read as global views ``[Vg·B, H, W, 3]`` followed by local
    views ``[Vl·B, h, w, 3]`` (see :func:`split_views`). The epoch enters the random
    streams through :attr:`epoch_cell`, which the loader sets before each epoch; the
    compiled code reads it at every batch, so nothing is recompiled between epochs.
    """

    def __init__(self, views: list[tuple[int, tuple[float, float]]], ratio, seed: int,
                 flip_p: float = FLIP_P):
        super().__init__()
        self.sizes = np.array([size for size, _ in views], dtype=np.int64)
        self.scales = np.array([scale for _, scale in views], dtype=np.float64).reshape(-1, 2)
        self.log_ratio = np.log(np.array(ratio, dtype=np.float64))
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.epoch_cell = np.zeros(1, dtype=np.int64)
        self.view_bytes = self.sizes * self.sizes * 3

    def set_epoch(self, epoch: int) -> None:
        self.epoch_cell[0] = epoch

    def declare_state_and_memory(self, previous_state: State):
        shape = (int(self.view_bytes.sum()),)
        dtype = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self):
        # FFCV compiles this per loader; it only gathers where each sample's bytes are
        # (the memory manager decides) and hands over to the process-wide cut_batch.
        mem_read = self.memory_read
        sizes, scales, log_ratio = self.sizes, self.scales, self.log_ratio
        seed, flip_p = np.uint64(self.seed), self.flip_p
        epoch_address = self.epoch_cell.ctypes.data

        def decode(batch_indices, destination, metadata, storage_state):
            count = len(batch_indices)
            addresses = np.empty(count, np.int64)
            nbytes = np.empty(count, np.int64)
            modes = np.empty(count, np.int64)
            heights = np.empty(count, np.int64)
            widths = np.empty(count, np.int64)
            indices = np.empty(count, np.int64)
            for i in range(count):
                index = batch_indices[i]
                field = metadata[index]
                data = mem_read(field["data_ptr"], storage_state)
                addresses[i] = data.ctypes.data
                nbytes[i] = data.size
                modes[i] = field["mode"]
                heights[i] = field["height"]
                widths[i] = field["width"]
                indices[i] = index
            epoch = numba.carray(_address_as_pointer(epoch_address), (1,), np.int64)[0]
            cut_batch(addresses, nbytes, modes, heights, widths, indices, destination.ctypes.data,
                      seed, np.uint64(epoch), sizes, scales, log_ratio, flip_p)
            return destination[:count]

        return decode


def split_views(flat: torch.Tensor, batch_size: int, global_number: int, global_size: int,
                local_number: int, local_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder's view-major bytes as ``[Vg·B, 3, H, W]`` (and local) channels-last views."""
    flat = flat.reshape(-1)
    n_global = global_number * batch_size * global_size * global_size * 3
    global_views = flat[:n_global].view(global_number * batch_size, global_size, global_size, 3)
    local_views = None
    if local_number:
        local_views = flat[n_global:].view(local_number * batch_size, local_size, local_size, 3)
        local_views = local_views.permute(0, 3, 1, 2)
    return global_views.permute(0, 3, 1, 2), local_views


class _ShardOrder:
    """Per-epoch sample order of this rank, in the shape FFCV's loader asks for.

    ``random``: the torchvision backend's rule (a permutation from (seed, epoch), rank r
    takes positions r, r + world, ...). ``quasi_random``: FFCV's page-aware order, drawn
    identically on every rank from (seed, epoch), and rank r takes the r-th contiguous
    block of it: a block touches mostly its own pages, so ranks on one node do not each
    read the whole dataset. Either way every rank gets the same number of whole batches.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int,
                 quasi_random=None):
        self.sampler = EpochShardSampler(num_samples, batch_size, rank, world, seed)
        self.quasi_random = quasi_random
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int, start_batch: int) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def sample_order(self, _ffcv_epoch: int) -> np.ndarray:
        sampler = self.sampler
        if self.quasi_random is None:
            return np.fromiter((index for index, _ in sampler), dtype=np.int64)
        order = self._quasi_random_order(sampler.epoch)
        start = self.rank * (self.num_samples // self.world)
        block = order[start : start + sampler.batches_per_epoch * self.batch_size]
        return np.ascontiguousarray(block[sampler.start_batch * self.batch_size :], dtype=np.int64)

    def _quasi_random_order(self, epoch: int) -> np.ndarray:
        """FFCV's QuasiRandom order of the whole dataset for (seed, epoch).

        FFCV's own ``sample_order`` shuffles its page table in place, so its result
        depends on how many epochs the process drew before; a resumed rank would then
        disagree with the others. Drawing from a copy makes it a function of the epoch.
        """
        from ffcv.traversal_order.quasi_random import generate_order_inner

        quasi = self.quasi_random
        order = np.zeros(len(quasi.indices), dtype=np.int64)
        generate_order_inner(
            self.sampler.seed * 912300 + epoch, quasi.page_to_samples_array.copy(),
            quasi.page_sizes, order, 2 * self.batch_size,
        )
        return order


class FFCVLoader:
    """The producer stage over a .beton file: uint8 multi-crop batches on ``device``.

    Yields :class:`MultiCropBatch` of uint8 ``[V·B, 3, H, W]`` channels-last views (not
    colour-augmented, not normalised) and int64 labels. ``data.num_workers`` is the number
    of FFCV worker threads (0 counts as 1).

    The views live in FFCV's batch buffers, which it reuses a few batches later: with
    ``copy=False`` a batch is valid until the next one is requested (enough for an
    augmentation stage that reads it at once); ``copy=True`` hands out owned tensors.
    """

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, copy: bool = True):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import ToDevice, ToTensor
        from ffcv.traversal_order import QuasiRandom

        path = Path(cfg.data.path)
        if not path.exists():
            raise DataPathError(
                f"data path {path} does not exist (data.backend=ffcv reads a .beton file; "
                "make one with tools/convert_imagenet_ffcv.py)"
            )
        if not path.is_file():
            raise DataPathError(
                f"data path {path} is not a file: data.backend=ffcv reads a .beton file; convert "
                f"the image folder with `python tools/convert_imagenet_ffcv.py {path} OUT.beton`"
            )
        crops = cfg.crops
        self.crops = crops
        self.batch_size = cfg.data.batch_size
        self.device = device
        self.copy = copy
        views = view_specs(crops)
        self.decoder = MultiCropDecoder(views, crops.ratio, cfg.train.seed)
        image_pipeline = [self.decoder, ToTensor()]
        label_pipeline = [IntDecoder(), ToTensor()]
        if device.type == "cuda":
            image_pipeline.append(ToDevice(device, non_blocking=True))
            label_pipeline.append(ToDevice(device, non_blocking=True))
        # Worker threads are numba's, which cannot exceed its pool (the core count).
        workers = max(1, cfg.data.num_workers)
        if workers > numba.config.NUMBA_NUM_THREADS:
            log.warning(
                "data.num_workers=%d exceeds the %d threads numba can run here; using %d",
                workers, numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS,
            )
            workers = numba.config.NUMBA_NUM_THREADS
        # FFCV sets torch's thread count to its worker count on the way; the training
        # process keeps its own.
        torch_threads = torch.get_num_threads()
        try:
            self.loader = _loader_class()(
                str(path),
                batch_size=self.batch_size,
                num_workers=workers,
                os_cache=cfg.data.ffcv.os_cache,
                order=OrderOption.SEQUENTIAL,
                seed=cfg.train.seed,
                pipelines={"image": image_pipeline, "label": label_pipeline},
                drop_last=True,
                batches_ahead=max(1, cfg.data.prefetch_factor),
            )
        except (AssertionError, ValueError, OSError) as error:
            raise DataPathError(f"data path {path} is not a readable FFCV .beton file ({error})") from error
        finally:
            torch.set_num_threads(torch_threads)
        fields = set(self.loader.reader.handlers)
        if not {"image", "label"} <= fields:
            raise DataPathError(
                f"{path} has fields {sorted(fields)}; carp_fast needs 'image' (RGBImageField) and "
                "'label' (IntField), as tools/convert_imagenet_ffcv.py writes"
            )
        self.num_samples = int(self.loader.reader.num_samples)
        quasi = QuasiRandom(self.loader) if cfg.data.ffcv.order == "quasi_random" else None
        self.order = _ShardOrder(
            self.num_samples, self.batch_size, rank, world, cfg.train.seed, quasi
        )
        # FFCV asks its traversal order for each epoch's indices; ours shards by rank and
        # follows set_epoch rather than FFCV's own epoch counter.
        self.loader.traversal_order = self.order
        self.epoch = 0

    @property
    def num_images(self) -> int:
        return self.num_samples

    def __len__(self) -> int:
        return self.order.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch, start_batch)

    def __iter__(self):
        crops = self.crops
        self.decoder.set_epoch(self.epoch)
        epoch_iterator = iter(self.loader)
        try:
            for images, labels in epoch_iterator:
                global_views, local_views = split_views(
                    images, labels.shape[0], crops.global_number, crops.global_size,
                    crops.local_number, crops.local_size,
                )
                if self.copy:
                    global_views = global_views.clone()
                    local_views = None if local_views is None else local_views.clone()
                yield MultiCropBatch(global_views, local_views, labels.reshape(-1).to(torch.int64, copy=True))
        finally:
            _stop(epoch_iterator)
        if epoch_iterator.error is not None:
            raise RuntimeError(
                f"the FFCV producer failed while reading {self.loader.fname}: {epoch_iterator.error!r}"
            ) from epoch_iterator.error


def _stop(epoch_iterator) -> None:
    """Stop FFCV's producer thread of an abandoned epoch before another one starts.

    FFCV's thread only notices the stop request when its queue is full; wait for it, so
    two producers never run compiled parallel code at once.
    """
    epoch_iterator.close()
    if epoch_iterator.is_alive():
        epoch_iterator.join(timeout=60)
        if epoch_iterator.is_alive():
            log.warning("FFCV producer thread did not stop within 60 s")


def _loader_class():
    """FFCV's Loader whose producer thread reports a failure instead of hanging.

    FFCV's thread dies silently on an exception (a compile error, a bad sample) and the
    consumer then waits forever on its queue; ours ends the epoch and keeps the error.
    """
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class ReportingEpochIterator(EpochIterator):
        error = None

        def run(self):
            try:
                super().run()
            except BaseException as error:
                self.error = error
                while not self.terminate_event.is_set():
                    try:
                        self.output_queue.put(None, timeout=0.5)
                        return
                    except queue.Full:
                        pass

    class ReportingLoader(Loader):
        def __iter__(self):
            # Loader.__iter__ of FFCV 1.0, with the iterator above, and without setting
            # the thread counts of this (the training) thread: the producer thread sets
            # its own.
            order = self.next_traversal_order()
            selected_order = order[: len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return ReportingEpochIterator(self, selected_order)

    return ReportingLoader
