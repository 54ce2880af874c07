#!/usr/bin/env python
"""Experiment (did not win; kept in git history only): other layouts for resize_crop's passes.

Variants, all bitwise equal to resize_crop (checked below), timed interleaved on the
benchmark photographs with the recipe's boxes, one thread:

* strips: the vertical pass writes 8 output rows at a time pixel-major (x, row, rgb), so
  the horizontal kernel reads 3 full 8-lane vectors per tap instead of 8 4-lane loads.
* strips_f / rows_f: the same and the current layout with the photograph converted to
  float32 once (no uint8 -> float per tap).
* fused: the current kernels on an 8-row intermediate (cache-resident) instead of the
  whole box's.

    python dev/producer/resample_layouts.py
"""
import glob, math, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from carp_fast.data import ffcv_loader as F
import numba
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic
from llvmlite import ir
from carp_fast.data.ffcv_loader import _splat, _accumulate, max_taps, bicubic_taps

STRIP = 8
CHUNK = 16
PIXEL = STRIP * 12  # bytes of one strip pixel: 8 rows x RGB float32

@intrinsic
def _vertical_chunk(typingctx, source, source_stride, weights, count, out):
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    def codegen(context, builder, signature, args):
        source, stride, weights, count, out = args
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        lanes = ir.VectorType(f32, 16)
        bytes16 = ir.VectorType(ir.IntType(8), 16)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * 16)) for _ in range(3)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            row = builder.add(source, builder.mul(loop.index, stride))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 16)
            for k, slot in enumerate(slots):
                address = builder.inttoptr(builder.add(row, ir.Constant(i64, 16 * k)), bytes16.as_pointer())
                _accumulate(builder, slot, builder.uitofp(builder.load(address, align=1), lanes), weight)
        values = [builder.load(slot) for slot in slots]
        three = ir.VectorType(f32, 3)
        for p in range(CHUNK):
            lane = 3 * p
            s = lane // 16
            if lane % 16 <= 13:
                pixel = builder.shuffle_vector(values[s], values[s], ir.Constant(ir.VectorType(i32, 3), [lane % 16 + c for c in range(3)]))
            else:
                pixel = builder.shuffle_vector(values[s], values[s + 1], ir.Constant(ir.VectorType(i32, 3), [lane % 16 + c for c in range(3)]))
            address = builder.inttoptr(builder.add(out, ir.Constant(i64, PIXEL * p)), three.as_pointer())
            builder.store(pixel, address, align=4)
        return context.get_dummy_value()
    return sig, codegen

@intrinsic
def _horizontal_strip(typingctx, strip, weights, count, out, out_stride):
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    def codegen(context, builder, signature, args):
        strip, weights, count, out, out_stride = args
        f32, i32, i64, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
        eight = ir.VectorType(f32, 8)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(eight, [0.0] * 8)) for _ in range(3)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            pixel = builder.add(strip, builder.mul(loop.index, ir.Constant(i64, PIXEL)))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 8)
            for k, slot in enumerate(slots):
                values = builder.load(builder.inttoptr(builder.add(pixel, ir.Constant(i64, 32 * k)), eight.as_pointer()), align=4)
                _accumulate(builder, slot, values, weight)
        low, high = ir.Constant(eight, [0.0] * 8), ir.Constant(eight, [255.0] * 8)
        parts = []
        for slot in slots:
            value = builder.fadd(builder.load(slot), ir.Constant(eight, [0.5] * 8))
            value = builder.select(builder.fcmp_ordered("<", value, low), low, value)
            value = builder.select(builder.fcmp_ordered(">", value, high), high, value)
            parts.append(builder.trunc(builder.fptosi(value, ir.VectorType(i32, 8)), ir.VectorType(i8, 8)))
        first = builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(i32, 16), list(range(16))))
        second = builder.shuffle_vector(parts[2], parts[2], ir.Constant(ir.VectorType(i32, 16), list(range(16))))
        pixels = builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(i32, 24), list(range(24))))
        for j in range(STRIP):
            address = builder.inttoptr(builder.add(out, builder.mul(out_stride, ir.Constant(i64, j))), i8.as_pointer())
            red_green = builder.shuffle_vector(pixels, pixels, ir.Constant(ir.VectorType(i32, 2), [3 * j, 3 * j + 1]))
            builder.store(builder.bitcast(red_green, ir.IntType(16)), builder.bitcast(address, ir.IntType(16).as_pointer()), align=1)
            builder.store(builder.extract_element(pixels, ir.Constant(i32, 3 * j + 2)), builder.gep(address, [ir.Constant(i64, 2)]))
        return context.get_dummy_value()
    return sig, codegen

@njit(nogil=True, fastmath=True)
def _strips(image, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, strip, out, mode=3):
    stride = image.shape[1] * 3
    source = image.ctypes.data + top * stride + left * 3
    out_h, out_w = out.shape[0], out.shape[1]
    out_stride = out_w * 3
    base = strip.ctypes.data
    for r in range(0, out_h, STRIP):
        r = min(r, out_h - STRIP)
        for j in range(STRIP if mode & 1 else 0):
            o = r + j
            start = source + first_y[o] * stride
            taps = weights_y.ctypes.data + o * weights_y.shape[1] * 4
            for x in range(0, crop_w, CHUNK):
                x = min(x, crop_w - CHUNK)
                _vertical_chunk(start + 3 * x, stride, taps, count_y[o], base + x * PIXEL + j * 12)
        target = out.ctypes.data + r * out_stride
        for o in range(out_w if mode & 2 else 0):
            _horizontal_strip(base + first_x[o] * PIXEL, weights_x.ctypes.data + o * weights_x.shape[1] * 4,
                              count_x[o], target + o * 3, out_stride)

@njit(nogil=True)
def resize_crop2(image, top, left, crop_h, crop_w, out, flip, mode=3):
    size = out.shape[0]
    first_y, count_y = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_y = np.empty((size, max_taps(crop_h, size)), np.float32)
    first_x, count_x = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_x = np.empty((size, max_taps(crop_w, size)), np.float32)
    bicubic_taps(crop_h, size, False, first_y, count_y, weights_y)
    bicubic_taps(crop_w, size, flip, first_x, count_x, weights_x)
    strip = np.empty((crop_w, STRIP, 3), np.float32)
    _strips(image, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, strip, out, mode)

from carp_fast.data.ffcv_loader import _vertical_block, _horizontal_pixel

@njit(nogil=True, fastmath=True)
def _fused(image, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, rows, out):
    stride = image.shape[1] * 3
    line = crop_w * 3
    source = image.ctypes.data + top * stride + left * 3
    out_h, out_w = out.shape[0], out.shape[1]
    out_stride = out_w * 3
    row_stride = rows.shape[1] * 4
    for r in range(0, out_h, STRIP):
        r = min(r, out_h - STRIP)
        for j in range(STRIP):
            o = r + j
            start = source + first_y[o] * stride
            target_row = rows.ctypes.data + j * row_stride
            taps = weights_y.ctypes.data + o * weights_y.shape[1] * 4
            for k in range(0, line, 64):
                k = min(k, line - 64)
                _vertical_block(start + k, stride, taps, count_y[o], target_row + 4 * k)
        target = out.ctypes.data + r * out_stride
        for o in range(out_w):
            _horizontal_pixel(rows.ctypes.data + first_x[o] * 12, row_stride, weights_x.ctypes.data + o * weights_x.shape[1] * 4,
                              count_x[o], target + o * 3, out_stride)

@njit(nogil=True)
def resize_crop3(image, top, left, crop_h, crop_w, out, flip):
    size = out.shape[0]
    first_y, count_y = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_y = np.empty((size, max_taps(crop_h, size)), np.float32)
    first_x, count_x = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_x = np.empty((size, max_taps(crop_w, size)), np.float32)
    bicubic_taps(crop_h, size, False, first_y, count_y, weights_y)
    bicubic_taps(crop_w, size, flip, first_x, count_x, weights_x)
    rows = np.empty((STRIP, crop_w * 3 + 1), np.float32)
    rows[:, crop_w * 3] = 0.0
    _fused(image, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, rows, out)

@intrinsic
def _vertical_chunk_f(typingctx, source, source_stride, weights, count, out):
    """Like _vertical_chunk, float32 source."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    def codegen(context, builder, signature, args):
        source, stride, weights, count, out = args
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        lanes = ir.VectorType(f32, 16)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * 16)) for _ in range(3)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            row = builder.add(source, builder.mul(loop.index, stride))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 16)
            for k, slot in enumerate(slots):
                address = builder.inttoptr(builder.add(row, ir.Constant(i64, 64 * k)), lanes.as_pointer())
                _accumulate(builder, slot, builder.load(address, align=4), weight)
        values = [builder.load(slot) for slot in slots]
        three = ir.VectorType(f32, 3)
        for p in range(CHUNK):
            lane = 3 * p
            s = lane // 16
            other = values[s] if lane % 16 <= 13 else values[s + 1]
            pixel = builder.shuffle_vector(values[s], other, ir.Constant(ir.VectorType(i32, 3), [lane % 16 + c for c in range(3)]))
            address = builder.inttoptr(builder.add(out, ir.Constant(i64, PIXEL * p)), three.as_pointer())
            builder.store(pixel, address, align=4)
        return context.get_dummy_value()
    return sig, codegen

@intrinsic
def _vertical_block_f(typingctx, source, source_stride, weights, count, out):
    """64 floats, float32 source, row-major out."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)
    def codegen(context, builder, signature, args):
        source, stride, weights, count, out = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        lanes = ir.VectorType(f32, 16)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * 16)) for _ in range(4)]
        weight_ptr = builder.inttoptr(weights, f32.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            row = builder.add(source, builder.mul(loop.index, stride))
            weight = _splat(builder, builder.load(builder.gep(weight_ptr, [loop.index])), 16)
            for k, slot in enumerate(slots):
                address = builder.inttoptr(builder.add(row, ir.Constant(i64, 64 * k)), lanes.as_pointer())
                _accumulate(builder, slot, builder.load(address, align=4), weight)
        for k, slot in enumerate(slots):
            address = builder.inttoptr(builder.add(out, ir.Constant(i64, 64 * k)), lanes.as_pointer())
            builder.store(builder.load(slot), address, align=4)
        return context.get_dummy_value()
    return sig, codegen

@njit(nogil=True, fastmath=True)
def _strips_f(image, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, strip, out):
    stride = image.shape[1] * 12
    source = image.ctypes.data + top * stride + left * 12
    out_h, out_w = out.shape[0], out.shape[1]
    out_stride = out_w * 3
    base = strip.ctypes.data
    for r in range(0, out_h, STRIP):
        r = min(r, out_h - STRIP)
        for j in range(STRIP):
            o = r + j
            start = source + first_y[o] * stride
            taps = weights_y.ctypes.data + o * weights_y.shape[1] * 4
            for x in range(0, crop_w, CHUNK):
                x = min(x, crop_w - CHUNK)
                _vertical_chunk_f(start + 12 * x, stride, taps, count_y[o], base + x * PIXEL + j * 12)
        target = out.ctypes.data + r * out_stride
        for o in range(out_w):
            _horizontal_strip(base + first_x[o] * PIXEL, weights_x.ctypes.data + o * weights_x.shape[1] * 4,
                              count_x[o], target + o * 3, out_stride)

@njit(nogil=True, fastmath=True)
def _rows_f(image, top, left, crop_w, first, count, weights, rows):
    stride = image.shape[1] * 12
    line = crop_w * 3
    source = image.ctypes.data + top * stride + left * 12
    for o in range(rows.shape[0]):
        start = source + first[o] * stride
        out = rows.ctypes.data + o * rows.shape[1] * 4
        taps = weights.ctypes.data + o * weights.shape[1] * 4
        for k in range(0, line, 64):
            k = min(k, line - 64)
            _vertical_block_f(start + 4 * k, stride, taps, count[o], out + 4 * k)

@njit(nogil=True)
def _taps(crop_h, crop_w, size, flip):
    first_y, count_y = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_y = np.empty((size, max_taps(crop_h, size)), np.float32)
    first_x, count_x = np.empty(size, np.int64), np.empty(size, np.int64)
    weights_x = np.empty((size, max_taps(crop_w, size)), np.float32)
    bicubic_taps(crop_h, size, False, first_y, count_y, weights_y)
    bicubic_taps(crop_w, size, flip, first_x, count_x, weights_x)
    return first_y, count_y, weights_y, first_x, count_x, weights_x

@njit(nogil=True)
def resize_strips_f(fimage, top, left, crop_h, crop_w, out, flip):
    size = out.shape[0]
    first_y, count_y, weights_y, first_x, count_x, weights_x = _taps(crop_h, crop_w, size, flip)
    strip = np.empty((crop_w, STRIP, 3), np.float32)
    _strips_f(fimage, top, left, crop_w, first_y, count_y, weights_y, first_x, count_x, weights_x, strip, out)

@njit(nogil=True)
def resize_rows_f(fimage, top, left, crop_h, crop_w, out, flip):
    size = out.shape[0]
    first_y, count_y, weights_y, first_x, count_x, weights_x = _taps(crop_h, crop_w, size, flip)
    rows = np.empty((size, crop_w * 3 + 1), np.float32)
    rows[:, crop_w * 3] = 0.0
    _rows_f(fimage, top, left, crop_w, first_y, count_y, weights_y, rows)
    F._horizontal_pass(rows, first_x, count_x, weights_x, out)

@njit(nogil=True, fastmath=True)
def to_float(image):
    h, w = image.shape[0], image.shape[1]
    out = np.empty((h, w, 3), np.float32)
    src = image.reshape(-1); dst = out.reshape(-1)
    for i in range(src.shape[0]):
        dst[i] = np.float32(src[i])
    return out


def main():
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "data" / "bench_photos" / "train").rglob("*.jpg"))[:32]
    if not files:
        raise SystemExit("run tools/bench_loaders.py first (it writes data/bench_photos)")
    imgs = [np.ascontiguousarray(np.asarray(Image.open(f).convert("RGB"))) for f in files]
    views = [(224, (0.2, 1.0))] * 2 + [(96, (0.05, 0.2))] * 6
    per = []
    for i in range(64):
        im = imgs[i % len(imgs)]
        st = np.uint64(F.sample_stream(np.uint64(1), np.uint64(0), np.uint64(i)))
        cs = []
        for size, (lo, hi) in views:
            top, left, h, w, st = F.sample_crop_box(im.shape[0], im.shape[1], lo, hi, math.log(3 / 4),
                                                    math.log(4 / 3), st)
            u, st = F._uniform(np.uint64(st))
            st = np.uint64(st)
            cs.append((top, left, h, w, np.zeros((size, size, 3), np.uint8), u < 0.5))
        per.append((im, cs))

    def over(fn, convert=False):
        def run():
            for im, cs in per:
                source = to_float(im) if convert else im
                for c in cs:
                    fn(source, *c)
        return run

    fns = dict(current=over(F.resize_crop), strips=over(resize_crop2), fused=over(resize_crop3),
               strips_f=over(resize_strips_f, True), rows_f=over(resize_rows_f, True))
    outs = {}
    for n, fn in fns.items():
        fn()
        outs[n] = [c[4].copy() for _, cs in per for c in cs]
    for n in fns:
        print(n, "max abs difference to resize_crop",
              max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(outs["current"], outs[n])))
    res = {n: [] for n in fns}
    for _ in range(15):
        for n, fn in fns.items():
            t = time.thread_time()
            fn()
            res[n].append((time.thread_time() - t) / len(per) * 1e6)
    med = {n: float(np.median(v)) for n, v in res.items()}
    for n in fns:
        print(f"{n:10s} {med[n]:7.0f} µs per photograph, {med['current'] / med[n]:.3f}x resize_crop's speed")


if __name__ == "__main__":
    main()
