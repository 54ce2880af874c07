// The slice-per-warp CUDA kernels of the fused CARP loss (the fast path; maths in
// partition_softmax.h, the other layouts and the launchers in partition_softmax_cuda.cu),
// with the few device helpers every layout shares.
//
// This header stands alone so that tests can also compile it for the CPU against a small
// emulation of the CUDA built-ins (tests/emulation/cuda_on_cpu.h, CARP_FAST_EMULATE_CUDA):
// the kernels' indexing, shared-memory use and warp reductions then run, thread by thread,
// on a machine without a GPU. Only what this file uses needs emulating: __shfl_xor_sync,
// __shfl_sync, __reduce_max_sync, __syncwarp, __syncthreads, the thread/block indices, vector
// types, dynamic shared memory (CARP_FAST_DYNAMIC_SHARED) and a few float functions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "partition_softmax.h"

#ifndef CARP_FAST_DYNAMIC_SHARED
// A kernel's dynamic shared memory, as an array of `type` named `name`.
#define CARP_FAST_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace carp_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;

// exp(x - m) for a softmax, as exp2(x log2e - m log2e): one FFMA and one MUFU per element
// (m log2e is computed once per row where the caller inlines this in a loop over the row).
// The argument carries two roundings: m log2e's, at most |m| * 6e-8, which is the same for
// every element of the row and so cancels in p = e / sum e (forward and backward use this one
// function, so their p agree), and the FFMA's, about |x - m| * 6e-8 relative, far below the
// tolerances the tests hold the loss to.
__device__ __forceinline__ float exp_shifted(float x, float m) {
  return exp2f(fmaf(x, kLog2e, -m * kLog2e));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Max over the warp. From sm_80 on, through the warp's integer max (one REDUX instruction)
// instead of five dependent shuffle-and-max steps: the float's bits map to an int whose signed
// order is the floats' order (a negative float's magnitude bits flipped; the map is its own
// inverse), so the max of the ints is the int of the max. Unlike fmaxf it does not skip a NaN
// (it ranks one above +inf, or below -inf with the sign bit set); the callers' maxima come from
// fmaxf over a lane's values, which are NaN only where all of them are, and a row holding a NaN
// has a NaN sum either way.
__device__ __forceinline__ int flip_negative(int bits) {
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

__device__ __forceinline__ float warp_max_redux(float v) {
#if defined(CARP_FAST_EMULATE_CUDA) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  return __int_as_float(flip_negative(__reduce_max_sync(0xffffffffu, flip_negative(__float_as_int(v)))));
#else
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
#endif
}

// What a forward kernel writes; the consistency is then computed from the agreements alone
// (consistency_terms_kernel), the same way for every layout.
struct ForwardOut {
  float* __restrict__ agreement;      // [Vs, Vt, B, G]
  float* __restrict__ student_stats;  // [Vs, B, G, 2]
  float* __restrict__ teacher_stats;  // [Vt, B, G, 2]
  float* __restrict__ partial;        // [chunks, G, P]
};

struct BackwardIn {
  const float* __restrict__ grad_consistency;  // []
  float inv_terms;                             // 1 / N
  const float* __restrict__ agreement;         // [Vs, Vt, B, G]
  const float* __restrict__ grad_prob_sum;     // [G, P]
  const float* __restrict__ student_stats;
  const float* __restrict__ teacher_stats;
};

// The backward's inputs, from the tensors of partition_softmax_backward (checked already).
BackwardIn make_backward_in(const LossShape& s, const at::Tensor& grad_consistency,
                            const at::Tensor& grad_prob_sum, const at::Tensor& agreement,
                            const at::Tensor& student_stats, const at::Tensor& teacher_stats) {
  return {grad_consistency.const_data_ptr<float>(),
          static_cast<float>(1.0 / static_cast<double>(num_pairs(s) * s.batch * s.num_groups)),
          agreement.const_data_ptr<float>(),
          grad_prob_sum.const_data_ptr<float>(),
          student_stats.const_data_ptr<float>(),
          teacher_stats.const_data_ptr<float>()};
}

// The consistency weight of pair (i, j) in the backward, from its agreement a_ij:
//   w_ij = -(dL/dconsistency / N) / a_ij  if i != j and a_ij is inside the clamp, else 0
// torch's clamp passes the gradient on the closed interval [eps, 1 - eps], so do we.
__device__ __forceinline__ float pair_weight(float a, bool same_view, float grad_per_term) {
  const bool inside = a >= kAgreementMin && a <= kAgreementMax;
  return (!same_view && inside) ? -grad_per_term / a : 0.0f;
}

// Calls f(std::integral_constant<int, P / 32>{}) for the partition sizes the warp kernels are
// built for; false (and no call) for the others.
template <typename F>
bool with_warp_elems(int64_t partition_size, F&& f) {
  switch (partition_size) {
    case 128: f(std::integral_constant<int, 4>{}); return true;
    case 256: f(std::integral_constant<int, 8>{}); return true;
    case 512: f(std::integral_constant<int, 16>{}); return true;
    case 1024: f(std::integral_constant<int, 32>{}); return true;
    default: return false;
  }
}

// ---- Slice-per-warp kernels -------------------------------------------------------------

// A warp of these kernels owns whole (image, group) slices: it walks the Vt + Vs rows of one
// image's slice (teacher rows first), then the next image's, keeping the next rows' loads in
// flight while it computes on the current one. No warp waits for another until the very end
// (the forward's S_g, added in warp order), and each lane's loads are 16 bytes wide.
// Used when student and teacher share a dtype, P is 128, 256, 512 or 1024, and the pointers
// are 16-byte aligned; the warp and blocked kernels (partition_softmax_cuda.cu) take every
// other case.
constexpr int kSliceWarps = 4;  // warps per block; they share one group g
// 32-bit words per lane of rows in flight (a ring of 2 to 8 rows): 128 bytes per lane, 4 KiB
// per warp, so that the 16 or so warps an SM holds keep enough bytes in flight to cover the
// DRAM latency (bandwidth x latency is about 25 KiB per SM on an H100 or H200).
constexpr int kSliceRingWords = 32;
// Images a warp walks by default (CARP_FAST_CUDA_SLICE_IMAGES overrides, for tuning): fewer
// means more, shorter warps (a smaller tail at the end of the grid) but more [chunks, G, P]
// partial sums in the forward. 8 beat 4 by 1-2.5 % in every H200 run at the published shape
// (benchmarks/experiments/README.md).
constexpr int64_t kSliceImagesPerWarp = 8;

// One lane's kElems values of a row, as loaded: 32-bit words holding pieces of kPiece
// consecutive columns, piece t of lane l at columns (t * 32 + l) * kPiece ... + kPiece - 1,
// so that each load instruction of the warp reads 32 * kPiece consecutive elements.
template <int kElems, typename X>
struct LaneRow {
  static constexpr int kPiece = static_cast<int>(16 / sizeof(X)) < kElems
                                    ? static_cast<int>(16 / sizeof(X))
                                    : kElems;
  static constexpr int kPieceWords = kPiece * static_cast<int>(sizeof(X)) / 4;  // 2 or 4
  static constexpr int kWords = kElems * static_cast<int>(sizeof(X)) / 4;
  static_assert(kElems % kPiece == 0 && (kPieceWords == 2 || kPieceWords == 4), "piece layout");
  uint32_t word[kWords];

  __device__ __forceinline__ static int column(int lane, int k) {
    return ((k / kPiece) * kWarpSize + lane) * kPiece + k % kPiece;
  }

  // From the lane's first element (its first piece: `row + lane * kPiece`), so that the
  // caller folds the lane into a 32-bit index and every piece is an immediate offset.
  __device__ __forceinline__ void load(const X* __restrict__ lane_first) {
#pragma unroll
    for (int t = 0; t < kWords / kPieceWords; ++t) {
      const X* src = lane_first + t * kWarpSize * kPiece;
      if constexpr (kPieceWords == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(src);
        word[4 * t] = v.x, word[4 * t + 1] = v.y, word[4 * t + 2] = v.z, word[4 * t + 3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(src);
        word[2 * t] = v.x, word[2 * t + 1] = v.y;
      }
    }
  }

  __device__ __forceinline__ void store(X* __restrict__ lane_first) const {
#pragma unroll
    for (int t = 0; t < kWords / kPieceWords; ++t) {
      X* dst = lane_first + t * kWarpSize * kPiece;
      if constexpr (kPieceWords == 4) {
        *reinterpret_cast<uint4*>(dst) =
            make_uint4(word[4 * t], word[4 * t + 1], word[4 * t + 2], word[4 * t + 3]);
      } else {
        *reinterpret_cast<uint2*>(dst) = make_uint2(word[2 * t], word[2 * t + 1]);
      }
    }
  }

  // Element k as fp32, converted exactly as static_cast<float>(X) (little-endian halves; a
  // bf16 is the top half of its fp32, so one shift or mask converts it).
  __device__ __forceinline__ float get(int k) const {
    if constexpr (std::is_same_v<X, float>) {
      return __uint_as_float(word[k]);
    } else if constexpr (std::is_same_v<X, c10::BFloat16>) {
      return __uint_as_float(k % 2 ? word[k / 2] & 0xffff0000u : word[k / 2] << 16);
    } else {
      const uint16_t bits = static_cast<uint16_t>(k % 2 ? word[k / 2] >> 16 : word[k / 2]);
      return static_cast<float>(X(bits, X::from_bits()));
    }
  }

  // Elements k from fp32, rounded exactly as static_cast<X>(float).
  __device__ __forceinline__ void set_all(const float (&v)[kElems]) {
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      if constexpr (std::is_same_v<X, float>) {
        word[k] = __float_as_uint(v[k]);
      } else if (k % 2 == 1) {
        word[k / 2] = static_cast<uint32_t>(X(v[k - 1]).x) | (static_cast<uint32_t>(X(v[k]).x) << 16);
      }
    }
  }
};

template <int kElems, typename X>
constexpr int slice_ring_depth() {
  constexpr int depth = kSliceRingWords / LaneRow<kElems, X>::kWords;
  return depth < 2 ? 2 : (depth > 8 ? 8 : depth);
}

// A lane's kElems values reduced in a balanced tree: independent operations instead of a
// chain of kElems dependent ones.
template <int kElems, typename Op>
__device__ __forceinline__ float tree_reduce(const float (&v)[kElems], Op op) {
  float t[kElems / 2];
#pragma unroll
  for (int k = 0; k < kElems / 2; ++k) t[k] = op(v[2 * k], v[2 * k + 1]);
#pragma unroll
  for (int width = kElems / 4; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) t[k] = op(t[2 * k], t[2 * k + 1]);
  }
  return t[0];
}

// The larger of two packed pairs of 16-bit floats, pair by pair, in their own format (which
// orders them as their exact fp32 values do), a NaN losing to a number as in fmaxf: one
// instruction for two elements from sm_80 on. The emulation compares the halves as floats.
template <typename X>
__device__ __forceinline__ uint32_t max_pair(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t d;
  if constexpr (std::is_same_v<X, c10::BFloat16>) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
#else
  uint32_t d = 0;
  for (int half = 0; half < 2; ++half) {
    const uint16_t x = static_cast<uint16_t>(a >> (16 * half));
    const uint16_t y = static_cast<uint16_t>(b >> (16 * half));
    const float fx = static_cast<float>(X(x, X::from_bits()));
    const float fy = static_cast<float>(X(y, X::from_bits()));
    const uint16_t larger = (fx != fx || fy > fx) ? y : x;  // fmaxf's choice, as bits
    d |= static_cast<uint32_t>(larger) << (16 * half);
  }
  return d;
#endif
}

// The largest of a lane's values of a row (NaNs skipped, as by fmaxf). 16-bit logits are
// compared two at a time while still packed: kWords - 1 packed maxima and one fmaxf instead
// of kElems - 1 fmaxf (the conversions to fp32 that the exps need do not wait for it).
template <int kElems, typename X>
__device__ __forceinline__ float lane_max(const LaneRow<kElems, X>& row) {
  using Row = LaneRow<kElems, X>;
  if constexpr (std::is_same_v<X, float> || Row::kWords < 2) {
    float v[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) v[k] = row.get(k);
    return tree_reduce(v, [](float a, float b) { return fmaxf(a, b); });
  } else {
    uint32_t t[Row::kWords];
#pragma unroll
    for (int k = 0; k < Row::kWords; ++k) t[k] = row.word[k];
#pragma unroll
    for (int width = Row::kWords / 2; width > 0; width /= 2) {
#pragma unroll
      for (int k = 0; k < width; ++k) t[k] = max_pair<X>(t[2 * k], t[2 * k + 1]);
    }
    Row last;
    last.word[0] = t[0];
    return fmaxf(last.get(0), last.get(1));
  }
}

// Where a warp's walk is: an image, the index of the lane's first logit of its (image, group)
// slice within a view (image * G * P + g * P + lane * piece, kept up to date by additions
// rather than recomputed; 32 bits, as slice_kernels_apply holds a view below 2^31 logits),
// and a row of the slice (rows 0..Vt-1 teacher, then students).
struct RowPos {
  int image;
  uint32_t offset;
  int row;
};

// The rows one warp walks: images first, first + step, ... (count of them) of one group, and
// in each the Vt teacher rows, then the Vs student rows.
struct SliceWalk {
  int first, step, count, rows;
  uint32_t first_offset, step_offset;

  __device__ __forceinline__ SliceWalk(const LossShape& s, int64_t group, int64_t chunk,
                                       int64_t batch_per_chunk, int warp, int num_warps,
                                       int lane_column) {
    const int64_t begin = chunk * batch_per_chunk + warp;
    const int64_t end = min(s.batch, (chunk + 1) * batch_per_chunk);
    const int64_t width = s.num_groups * s.partition_size;
    first = static_cast<int>(begin);
    first_offset = static_cast<uint32_t>(begin * width + group * s.partition_size + lane_column);
    step = num_warps;
    step_offset = static_cast<uint32_t>(num_warps * width);
    count = begin < end ? static_cast<int>((end - begin + num_warps - 1) / num_warps) : 0;
    rows = static_cast<int>(s.num_teacher + s.num_student);
  }
  __device__ __forceinline__ RowPos start() const { return {first, first_offset, 0}; }
  __device__ __forceinline__ void advance(RowPos& pos) const {
    if (++pos.row == rows) {
      pos.row = 0;
      pos.image += step;
      pos.offset += step_offset;
    }
  }
};

// Calls use(pos, slot) for every row of the walk in order, where load(pos, slot) filled the
// slot: the loads of the next kDepth rows are in flight while use runs. The ring is unrolled
// so that every slot stays in registers. (A ring of kDepth + 1 slots, loading into the slot
// the previous row has left, saves the copy of the current slot but took 21 more registers
// in the forward.)
template <int kDepth, typename Slot, typename Load, typename Use>
__device__ __forceinline__ void for_each_prefetched(const SliceWalk& walk, Load&& load, Use&& use) {
  const int n = walk.count * walk.rows;
  Slot ring[kDepth];
  RowPos ahead = walk.start();  // the next row to load
#pragma unroll
  for (int k = 0; k < kDepth; ++k) {
    if (k < n) {
      load(ahead, ring[k]);
      walk.advance(ahead);
    }
  }
  RowPos at = walk.start();
  for (int base = 0; base < n; base += kDepth) {
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      if (base + k < n) {
        const Slot current = ring[k];
        if (base + k + kDepth < n) {
          load(ahead, ring[k]);
          walk.advance(ahead);
        }
        use(at, current);
        walk.advance(at);
      }
    }
  }
}

// Rows of kElems values per lane in shared memory, [rows, kElems / 4, 32] float4s, lane l's
// values of a row at the same places as in its registers: each lane reads and writes only its
// own entries (so no barrier orders them within a warp), 16 bytes at a time. Holds a warp's
// teacher probabilities q_j, and the backward's dL/dS_g row.
template <int kElems>
struct LaneRows {
  static_assert(kElems % 4 == 0, "rows are kept as float4s");
  float4* base;

  __device__ __forceinline__ float4& at(int row, int lane, int k) const {
    return base[(row * (kElems / 4) + k / 4) * kWarpSize + lane];
  }
  __device__ __forceinline__ void put(int row, int lane, const float (&v)[kElems], float scale) const {
#pragma unroll
    for (int k = 0; k < kElems; k += 4) {
      at(row, lane, k) = make_float4(v[k] * scale, v[k + 1] * scale, v[k + 2] * scale, v[k + 3] * scale);
    }
  }
};

// Rows (Vt + Vs) the slice kernels take at most: each row's view travels in the kernel's
// parameters (RowViews), so that a row's address is one constant-bank load and one
// multiply-add, not a choice between the two tensors and 64-bit index arithmetic (about 20
// instructions a row in the forward's SASS).
constexpr int kSliceMaxRows = 64;

// The first logit of each row's view: row r < Vt is teacher view r, row Vt + i student view i.
struct RowViews {
  const void* view[kSliceMaxRows];
};

template <typename X>
RowViews row_views(const X* student, const X* teacher, const LossShape& s) {
  RowViews rows{};
  const int64_t stride = s.batch * s.num_groups * s.partition_size;
  for (int64_t r = 0; r < s.num_teacher + s.num_student; ++r) {
    rows.view[r] = r < s.num_teacher ? teacher + r * stride : student + (r - s.num_teacher) * stride;
  }
  return rows;
}

// What a slice kernel's warp starts from: its lane and warp, its group and walk, the strides
// of the logits and stats, and its rows of teacher probabilities q_j in shared memory (the
// first [num_warps, Vt] rows of the kernel's LaneRows).
template <int kElems, typename X>
struct SliceWarp {
  int lane, warp, num_warps, num_teacher;
  int64_t group, num_groups, stride_view;
  int64_t slices;  // B * G: the stride of a view (or a pair) in the [V, B, G] outputs
  SliceWalk walk;
  LaneRows<kElems> q;  // [Vt] rows

  __device__ __forceinline__ SliceWarp(const LossShape& s, float4* smem4, int64_t chunks,
                                       int64_t batch_per_chunk)
      : lane(threadIdx.x % kWarpSize),
        warp(threadIdx.x / kWarpSize),
        num_warps(blockDim.x / kWarpSize),
        num_teacher(static_cast<int>(s.num_teacher)),
        group(blockIdx.x / chunks),
        num_groups(s.num_groups),
        stride_view(s.batch * s.num_groups * s.partition_size),
        slices(s.batch * s.num_groups),
        walk(s, group, blockIdx.x % chunks, batch_per_chunk, warp, num_warps,
             lane * LaneRow<kElems, X>::kPiece),
        q{smem4 + warp * num_teacher * (kElems * kWarpSize / 4)} {}

  // Shared memory after the warps' q rows.
  __device__ __forceinline__ float4* after_q(float4* smem4) const {
    return smem4 + num_warps * num_teacher * (kElems * kWarpSize / 4);
  }
  // Teacher view `row` for row < Vt, else student view row - Vt.
  __device__ __forceinline__ bool is_teacher(int row) const { return row < num_teacher; }
  __device__ __forceinline__ uint32_t view(int row) const {
    return is_teacher(row) ? row : row - num_teacher;
  }
  // The lane's first logit of the walk's row `at`.
  __device__ __forceinline__ const X* logits(const RowViews& rows, const RowPos& at) const {
    return static_cast<const X*>(rows.view[at.row]) + at.offset;
  }
  // The offset of entry `index`'s (image, group) slice in a [N, B, G] output: N = Vs * Vt for
  // the agreements (index i * Vt + j), [V, B, G, 2] for the stats (twice the offset).
  __device__ __forceinline__ int64_t slice_offset(int64_t index, int64_t image) const {
    return index * slices + image * num_groups + group;
  }
  __device__ __forceinline__ int64_t stats_offset(int64_t view, int64_t image) const {
    return 2 * slice_offset(view, image);
  }
};

// Per-image outputs of a slice forward warp, gathered in its shared memory while it walks the
// image's rows and written out together when the image is done: lane r writes row r's stats,
// lane e agreement e, so that no lane-0 store with its own 64-bit address arithmetic sits in
// the per-row path. [Vt + Vs] float2 (m, r), then [Vs, Vt] agreements.
struct ImageStash {
  float2* stats;
  float* agreement;

  // Floats one warp's stash takes, rounded up to whole float2s so that the next warp's stats
  // stay 8-byte aligned.
  __host__ __device__ static int64_t floats(int64_t rows, int64_t pairs) {
    return 2 * rows + (pairs + 1) / 2 * 2;
  }
};

// Sum over the warp of a (lanes 0-15 get it) and of b (lanes 16-31 get it) in five shuffles
// rather than ten: the first exchange swaps halves, so each half then reduces one value.
__device__ __forceinline__ float warp_sum_pair(float a, float b, int lane) {
  const bool upper = lane & 16;
  float v = (upper ? b : a) + __shfl_xor_sync(0xffffffffu, upper ? a : b, 16);
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Forward for one (group, chunk of images), each warp walking its images' slices (SliceWalk).
// Per row, with e_c = exp(x_c - m) kept unnormalised:
//   m = max_c x_c;  r = 1 / sum_c e_c;  (m, r) -> stash;  S_gc += e_c r
//   teacher row j: q_jc = e_c r -> this warp's shared memory
//   student row i: a_ij = r * sum_c e_c q_jc (warp sums, two teachers at a time) -> stash
// and after an image's last row the stash goes out to global memory (ImageStash).
// A NaN logit makes its row's sum, hence r, every p and every a_ij of the row NaN (the max
// skips NaNs here, unlike the other layouts, but the loss is NaN all the same).
// The warp's running S_g stays in registers for its whole walk: kept in shared memory it cost
// a read and a write of kElems floats per row, which made shared memory the busiest unit of
// the SM (v4 on the H200: L1/TEX 80 % busy, DRAM 33 %). At the end the warps' S_g are added
// in warp order.
// kTeachers is Vt where it is known when compiling (2, the published recipe's global crops:
// the student's dot products then need no loop), else 0 and Vt is read at run time.
template <int kElems, typename X, int kTeachers>
__global__ void __launch_bounds__(kSliceWarps* kWarpSize)
    forward_slice_kernel(const RowViews rows, LossShape s, int64_t chunks,
                         int64_t batch_per_chunk, ForwardOut out) {
  using Row = LaneRow<kElems, X>;
  CARP_FAST_DYNAMIC_SHARED(float4, smem4);
  constexpr int64_t P = kElems * kWarpSize;
  const SliceWarp<kElems, X> w(s, smem4, chunks, batch_per_chunk);
  const int lane = w.lane;
  const int num_teacher = kTeachers > 0 ? kTeachers : w.num_teacher;
  const int pairs = static_cast<int>(s.num_student) * num_teacher;
  float* total = reinterpret_cast<float*>(w.after_q(smem4));  // [P], the block's S_g
  float* stash_base = total + P + w.warp * ImageStash::floats(w.walk.rows, pairs);
  const ImageStash stash{reinterpret_cast<float2*>(stash_base), stash_base + 2 * w.walk.rows};
  float prob_sum[kElems];  // this warp's S_g, lane l's columns as in LaneRow
#pragma unroll
  for (int k = 0; k < kElems; ++k) prob_sum[k] = 0.0f;

  auto load = [&](const RowPos& at, Row& slot) { slot.load(w.logits(rows, at)); };
  auto use = [&](const RowPos& at, const Row& slot) {
    const float m = warp_max_redux(lane_max(slot));
    float e[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) e[k] = exp_shifted(slot.get(k), m);
    const float inv = 1.0f / warp_sum(tree_reduce(e, [](float a, float b) { return a + b; }));
#pragma unroll
    for (int k = 0; k < kElems; ++k) prob_sum[k] = fmaf(e[k], inv, prob_sum[k]);
    if (lane == 0) stash.stats[at.row] = make_float2(m, inv);

    if (at.row < num_teacher) {
      w.q.put(at.row, lane, e, inv);
    } else {
      // dot(e, q_j) in four partial sums, one per float4 component: four short chains, not
      // one long one.
      auto dot = [&](int j) {
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int k = 0; k < kElems; k += 4) {
          const float4 qv = w.q.at(j, lane, k);
          acc.x = fmaf(e[k], qv.x, acc.x);
          acc.y = fmaf(e[k + 1], qv.y, acc.y);
          acc.z = fmaf(e[k + 2], qv.z, acc.z);
          acc.w = fmaf(e[k + 3], qv.w, acc.w);
        }
        return (acc.x + acc.y) + (acc.z + acc.w);
      };
      float* a_row = stash.agreement + (at.row - num_teacher) * num_teacher;
      int j = 0;
#pragma unroll
      for (; j + 1 < num_teacher; j += 2) {
        const float a = warp_sum_pair(dot(j), dot(j + 1), lane) * inv;
        if (lane % 16 == 0) a_row[j + lane / 16] = a;
      }
      if (j < num_teacher) {
        const float a = warp_sum(dot(j)) * inv;
        if (lane == 0) a_row[j] = a;
      }
    }

    if (at.row == w.walk.rows - 1) {  // the image's last row: its stash goes out
      __syncwarp();  // every lane reads what lanes 0 and 16 put in the stash
      // Not unrolled: once per image, and unrolled copies would only hold more registers.
#pragma unroll 1
      for (int r = lane; r < w.walk.rows; r += kWarpSize) {
        float* stats = w.is_teacher(r) ? out.teacher_stats : out.student_stats;
        *reinterpret_cast<float2*>(stats + w.stats_offset(w.view(r), at.image)) = stash.stats[r];
      }
#pragma unroll 1
      for (int e = lane; e < pairs; e += kWarpSize) {
        out.agreement[w.slice_offset(e, at.image)] = stash.agreement[e];
      }
      __syncwarp();  // the next image's rows overwrite what other lanes have just read
    }
  };
  for_each_prefetched<slice_ring_depth<kElems, X>(), Row>(w.walk, load, use);

  // S_g of the chunk: the warps' sums added in warp order (warp 0 writes, the others add).
  for (int turn = 0; turn < w.num_warps; ++turn) {
    if (w.warp == turn) {
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        const int c = Row::column(lane, k);
        total[c] = turn == 0 ? prob_sum[k] : total[c] + prob_sum[k];
      }
    }
    __syncthreads();
  }
  float* partial = out.partial + ((blockIdx.x % chunks) * s.num_groups + w.group) * P;
  for (int64_t c = threadIdx.x; c < P; c += blockDim.x) partial[c] = total[c];
}

// A prefetched row of the backward: its logits, its saved (m, r) and, for a student row i,
// lane j's a_ij (j < Vt).
template <int kElems, typename X>
struct BackwardSlot {
  LaneRow<kElems, X> logits;
  float2 stats;
  float agreement;
};

// Backward for one (group, chunk of images), each warp walking its images' slices (SliceWalk)
// with p and q recomputed from the saved (m, r) as in every layout:
//   teacher rows: q_j = exp(t_j - m_j) r_j -> this warp's shared memory (own entries only)
//   student rows: w_ij    = -(dL/dconsistency / N) / a_ij  if i != j and a_ij is inside the
//                           clamp, else 0 (lane j computes it, shuffles hand it round)
//                 dL/dp_c = dL/dS_gc + sum_j w_ij q_jc   (dL/dS_g: the block's shared memory)
//                 s_i     = <p, dL/dp>                   (warp sum)
//                 dL/dx_c = p_c (dL/dp_c - s_i)          written once, 16 bytes per lane
template <int kElems, typename X>
__global__ void __launch_bounds__(kSliceWarps* kWarpSize)
    backward_slice_kernel(const RowViews rows, LossShape s, int64_t chunks,
                          int64_t batch_per_chunk, BackwardIn in, X* __restrict__ grad_student) {
  using Row = LaneRow<kElems, X>;
  using Slot = BackwardSlot<kElems, X>;
  CARP_FAST_DYNAMIC_SHARED(float4, smem4);
  constexpr int64_t P = kElems * kWarpSize;
  const SliceWarp<kElems, X> w(s, smem4, chunks, batch_per_chunk);
  const int lane = w.lane;
  // dL/dS_g, one row for the whole block (its warps share the group), in lane order.
  const LaneRows<kElems> grad_total{w.after_q(smem4)};

  for (int e = threadIdx.x; e < P / 4; e += blockDim.x) {
    const int l = e % kWarpSize, k = 4 * (e / kWarpSize);
    const float* g = in.grad_prob_sum + w.group * P;
    grad_total.at(0, l, k) = make_float4(g[Row::column(l, k)], g[Row::column(l, k + 1)],
                                         g[Row::column(l, k + 2)], g[Row::column(l, k + 3)]);
  }
  __syncthreads();
  const float grad_per_term = *in.grad_consistency * in.inv_terms;

  auto load = [&](const RowPos& at, Slot& slot) {
    slot.logits.load(w.logits(rows, at));
    if (w.is_teacher(at.row)) {
      slot.stats = *reinterpret_cast<const float2*>(in.teacher_stats + w.stats_offset(at.row, at.image));
      slot.agreement = 0.0f;
    } else {
      const int i = at.row - w.num_teacher;
      slot.stats = *reinterpret_cast<const float2*>(in.student_stats + w.stats_offset(i, at.image));
      slot.agreement = lane < w.num_teacher
                           ? in.agreement[w.slice_offset(i * w.num_teacher + lane, at.image)]
                           : 0.0f;
    }
  };
  auto use = [&](const RowPos& at, const Slot& slot) {
    float p[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) p[k] = exp_shifted(slot.logits.get(k), slot.stats.x) * slot.stats.y;
    if (w.is_teacher(at.row)) {
      w.q.put(at.row, lane, p, 1.0f);
      return;
    }
    const int i = at.row - w.num_teacher;
    const float lane_weight = pair_weight(slot.agreement, i == lane, grad_per_term);
    float d[kElems];
#pragma unroll
    for (int k = 0; k < kElems; k += 4) {
      const float4 g = grad_total.at(0, lane, k);
      d[k] = g.x, d[k + 1] = g.y, d[k + 2] = g.z, d[k + 3] = g.w;
    }
    for (int j = 0; j < w.num_teacher; ++j) {
      const float weight = __shfl_sync(0xffffffffu, lane_weight, j);
#pragma unroll
      for (int k = 0; k < kElems; k += 4) {
        const float4 qv = w.q.at(j, lane, k);
        d[k] += weight * qv.x;
        d[k + 1] += weight * qv.y;
        d[k + 2] += weight * qv.z;
        d[k + 3] += weight * qv.w;
      }
    }
    float pd[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) pd[k] = p[k] * d[k];
    const float dot = warp_sum(tree_reduce(pd, [](float a, float b) { return a + b; }));
#pragma unroll
    for (int k = 0; k < kElems; ++k) d[k] = p[k] * (d[k] - dot);
    Row grad;
    grad.set_all(d);
    grad.store(grad_student + static_cast<int64_t>(i) * w.stride_view + at.offset);
  };
  for_each_prefetched<slice_ring_depth<kElems, X>(), Slot>(w.walk, load, use);
}

// Images per warp of the slice kernels: kSliceImagesPerWarp, or CARP_FAST_CUDA_SLICE_IMAGES
// (for tuning), fewer where the grid would otherwise hold too few warps to fill a GPU.
// (The CPU emulation in tests/ lowers it, so that its small shapes also walk several images
// per warp.)
#ifndef CARP_FAST_TARGET_SLICE_WARPS
#define CARP_FAST_TARGET_SLICE_WARPS 4096
#endif
constexpr int64_t kTargetSliceWarps = CARP_FAST_TARGET_SLICE_WARPS;

struct SliceGrid {
  int64_t chunks, batch_per_chunk;
};

SliceGrid slice_grid(const LossShape& s) {
  int64_t per_warp = kSliceImagesPerWarp;
  if (const char* text = std::getenv("CARP_FAST_CUDA_SLICE_IMAGES"); text != nullptr && *text) {
    char* end = nullptr;
    per_warp = std::strtoll(text, &end, 10);
    TORCH_CHECK(*end == '\0' && per_warp >= 1,
                "CARP_FAST_CUDA_SLICE_IMAGES must be a positive integer, got '", text, "'");
  }
  per_warp = std::clamp<int64_t>(s.num_groups * s.batch / kTargetSliceWarps, 1, per_warp);
  const int64_t per_block = kSliceWarps * per_warp;
  const int64_t chunks = (s.batch + per_block - 1) / per_block;
  return {chunks, (s.batch + chunks - 1) / chunks};
}

// Whether the slice kernels' indexing holds for a shape: lane j for a_ij (Vt <= 32), every
// row's view in the parameters (RowViews), and a view's logits counted in 32 bits (RowPos).
bool slice_shape_fits(const LossShape& s) {
  return s.num_teacher <= kWarpSize && s.num_teacher + s.num_student <= kSliceMaxRows &&
         s.batch * s.num_groups * s.partition_size <= INT32_MAX;
}

// Calls f(std::integral_constant<int, Vt>{}) where the slice forward is compiled for the
// shape's Vt (2), else f(std::integral_constant<int, 0>{}): Vt read at run time.
template <typename F>
void with_slice_teachers(int64_t num_teacher, F&& f) {
  if (num_teacher == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

// Dynamic shared memory of the slice forward: per warp q [Vt, P] and its ImageStash; the
// block's S_g [P].
int64_t slice_forward_shared_bytes(const LossShape& s) {
  return static_cast<int64_t>(sizeof(float)) *
         ((kSliceWarps * s.num_teacher + 1) * s.partition_size +
          kSliceWarps * ImageStash::floats(s.num_student + s.num_teacher,
                                           s.num_student * s.num_teacher));
}

// Dynamic shared memory of the slice backward: per warp q [Vt, P]; the block's dL/dS_g [P].
int64_t slice_backward_shared_bytes(const LossShape& s) {
  return static_cast<int64_t>(sizeof(float)) * (kSliceWarps * s.num_teacher + 1) * s.partition_size;
}

}  // namespace
}  // namespace carp_fast
