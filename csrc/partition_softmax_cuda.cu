// CUDA kernels of the fused CARP loss (maths in partition_softmax.h).
//
// Three layouts of the same maths, one chosen per call for its forward and backward alike by
// choose_layout, tried in this order (CARP_FAST_CUDA_KERNELS=warp or
// =blocked starts further down, to compare them):
//
// Slice-per-warp ("slice" kernels in slice_kernels.cuh, the fast path: P = 128, 256, 512 or
// 1024, student and teacher of one dtype, 16-byte aligned): one warp walks whole (image,
// group) slices, row after row (teacher rows first), lane l holding its columns of the row in
// registers. The next rows' 16-byte loads are issued before the current row is used, so every
// warp keeps memory busy while it computes, and no warp ever waits for another inside the
// loop. Each logit is read from DRAM once and goes through one exp.
//
// Row-per-warp ("warp" kernels, P = 128 ... 1024 and at most 16 views): one warp owns one
// view's row of a (image, group) slice, lane l holding columns l, l + 32, ... in registers;
// the teacher probabilities q_j pass through shared memory, with one block barrier per image.
//
// Column-per-thread ("blocked" kernels, any P): a thread block owns one group g and a chunk
// of images; thread t owns the columns c = t, t + blockDim, ... of that group in every row it
// touches, so every per-column quantity (q_j[c], the probability sum S_g[c]) is read and
// written by one thread only, and per-row scalars go through block reductions. Rows are
// re-read for each pass (max, sum, probabilities); the repeats mostly hit L1/L2.
//
// Every layout writes the same forward outputs; the consistency is then computed from the
// agreements by two small kernels common to all (its logs in double precision, once per
// pair, outside the loops that stream the logits).
//
// Determinism: every reduction has a fixed shape (warp butterfly, then warps or rows added
// in a fixed order by one thread), and S_g is accumulated per chunk of images then summed
// over chunks in chunk order by a second small kernel. No atomics anywhere, and the
// chunking depends on the shapes and CARP_FAST_CUDA_SLICE_IMAGES only, so two runs on the
// same GPU agree bit for bit.
//
// Traffic: the forward reads each logit once from DRAM, the backward reads the logits once
// and writes the student gradient once. Nothing of the logits' size is allocated besides
// that gradient.
//
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in the cuSPARSE/cuBLAS headers,
// which a minimal toolkit (nvcc + cudart) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "partition_softmax.h"
#include "slice_kernels.cuh"

namespace carp_fast {
namespace {

constexpr int kMaxThreads = 256;
// Columns per thread aimed at before growing the block: enough independent loads in
// flight per thread without idling most of a block on small groups.
constexpr int64_t kColumnsPerThread = 4;
// Teacher views whose agreements one pass over a student row accumulates in registers;
// more teacher views take more passes (recomputing p), never more registers.
constexpr int kTeacherChunk = 4;
// Forward blocks aimed at: an H100 holds about 132 SMs x 8-16 of these small blocks at once.
// With few groups the batch is cut into chunks to get there (at the price of a [chunks, G, P]
// partial sum). A constant, so the summation order depends on the shapes only.
constexpr int64_t kTargetForwardBlocks = 2048;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

// A NaN in a row must make that row's max NaN (as in torch.softmax), so that the loss is
// NaN rather than silently ignoring the entry: fmaxf would drop it.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// clamp(a, eps, 1 - eps) that lets a NaN through, as torch.clamp does (fmaxf would not).
__device__ __forceinline__ float clamp_agreement(float a) {
  return a < kAgreementMin ? kAgreementMin : (a > kAgreementMax ? kAgreementMax : a);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// red holds one value per (slot, warp); combines the warps' values of `slot` in warp order.
__device__ __forceinline__ float combine_warps_sum(const float* red, int slot, int num_warps) {
  float v = red[slot * num_warps];
  for (int w = 1; w < num_warps; ++w) v += red[slot * num_warps + w];
  return v;
}

__device__ __forceinline__ float combine_warps_max(const float* red, int slot, int num_warps) {
  float v = red[slot * num_warps];
  for (int w = 1; w < num_warps; ++w) v = nan_max(v, red[slot * num_warps + w]);
  return v;
}

// Row r of the (b, g) slice stack: rows 0..Vt-1 are the teacher views, then the students.
template <typename S, typename T>
struct SliceRows {
  const S* __restrict__ student;
  const T* __restrict__ teacher;
  int64_t num_teacher, stride_view, offset;  // offset = b * width + g * P

  __device__ __forceinline__ float at(int r, int64_t c) const {
    return r < num_teacher
               ? static_cast<float>(teacher[r * stride_view + offset + c])
               : static_cast<float>(student[(r - num_teacher) * stride_view + offset + c]);
  }
};

// Forward for one (group, chunk of images). Per image b, over its R = Vt + Vs rows:
//   m_r = max_c x_rc;  r_r = 1 / sum_c exp(x_rc - m_r)            (two block reductions)
//   q_jc = exp(t_jc - m_j) r_j      kept in shared memory, own columns only
//   p_ic = exp(x_ic - m_i) r_i;  a_ij = sum_c p_ic q_jc             (one block reduction)
//   S_gc += sum_j q_jc + sum_i p_ic                                  (own columns)
template <typename S, typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const S* __restrict__ student, const T* __restrict__ teacher, LossShape s,
                   int64_t chunks, int64_t batch_per_chunk, ForwardOut out) {
  extern __shared__ float smem[];
  const int64_t P = s.partition_size;
  const int num_teacher = static_cast<int>(s.num_teacher);
  const int num_student = static_cast<int>(s.num_student);
  const int rows = num_teacher + num_student;
  const int num_warps = blockDim.x / kWarpSize;
  const int red_slots = max(rows, num_student * num_teacher);
  float* q = smem;                               // [Vt, P]
  float* total = q + num_teacher * P;            // [P]
  float* red = total + P;                        // [red_slots, num_warps]
  float* row_max = red + red_slots * num_warps;  // [R]
  float* row_inv = row_max + rows;               // [R]

  const int64_t group = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t width = s.num_groups * P;

  for (int64_t c = tid; c < P; c += blockDim.x) total[c] = 0.0f;

  const int64_t b_end = min(s.batch, (chunk + 1) * batch_per_chunk);
  for (int64_t b = chunk * batch_per_chunk; b < b_end; ++b) {
    const SliceRows<S, T> x{student, teacher, s.num_teacher, s.batch * width,
                            b * width + group * P};
    const int64_t slice = b * s.num_groups + group;

    for (int r = 0; r < rows; ++r) {
      float m = -INFINITY;
      for (int64_t c = tid; c < P; c += blockDim.x) m = nan_max(m, x.at(r, c));
      m = warp_max(m);
      if (lane == 0) red[r * num_warps + warp] = m;
    }
    __syncthreads();
    for (int r = tid; r < rows; r += blockDim.x) row_max[r] = combine_warps_max(red, r, num_warps);
    __syncthreads();

    for (int r = 0; r < rows; ++r) {
      const float m = row_max[r];
      float sum = 0.0f;
      for (int64_t c = tid; c < P; c += blockDim.x) sum += exp_shifted(x.at(r, c), m);
      sum = warp_sum(sum);
      if (lane == 0) red[r * num_warps + warp] = sum;
    }
    __syncthreads();
    for (int r = tid; r < rows; r += blockDim.x) {
      const float inv = 1.0f / combine_warps_sum(red, r, num_warps);
      row_inv[r] = inv;
      float* stats = r < num_teacher ? out.teacher_stats + (r * s.batch * s.num_groups + slice) * 2
                                     : out.student_stats +
                                           ((r - num_teacher) * s.batch * s.num_groups + slice) * 2;
      stats[0] = row_max[r];
      stats[1] = inv;
    }
    __syncthreads();

    for (int j = 0; j < num_teacher; ++j) {
      const float m = row_max[j], inv = row_inv[j];
      for (int64_t c = tid; c < P; c += blockDim.x) {
        const float qv = exp_shifted(x.at(j, c), m) * inv;
        q[j * P + c] = qv;
        total[c] += qv;
      }
    }
    for (int i = 0; i < num_student; ++i) {
      const int r = num_teacher + i;
      const float m = row_max[r], inv = row_inv[r];
      for (int j0 = 0; j0 < num_teacher; j0 += kTeacherChunk) {
        float acc[kTeacherChunk] = {};
        for (int64_t c = tid; c < P; c += blockDim.x) {
          const float p = exp_shifted(x.at(r, c), m) * inv;
          if (j0 == 0) total[c] += p;
#pragma unroll
          for (int k = 0; k < kTeacherChunk; ++k) {
            if (j0 + k < num_teacher) acc[k] += p * q[(j0 + k) * P + c];
          }
        }
#pragma unroll
        for (int k = 0; k < kTeacherChunk; ++k) {
          if (j0 + k < num_teacher) {
            const float v = warp_sum(acc[k]);
            if (lane == 0) red[(i * num_teacher + j0 + k) * num_warps + warp] = v;
          }
        }
      }
    }
    __syncthreads();
    for (int k = tid; k < num_student * num_teacher; k += blockDim.x) {
      out.agreement[(k * s.batch) * s.num_groups + slice] = combine_warps_sum(red, k, num_warps);
    }
    __syncthreads();  // red and the stats are rewritten for the next image
  }

  float* partial = out.partial + (chunk * s.num_groups + group) * P;
  for (int64_t c = tid; c < P; c += blockDim.x) partial[c] = total[c];
}

// consistency = (sum over pairs i != j and slices (b, g) of -log clamp(a_ijbg, eps, 1 - eps))
// / N, from the agreements every forward layout writes, in double. Two passes of fixed
// launch shapes, so that the order of the sums depends on the shapes only: each of
// kConsistencyBlocks blocks adds a strided share of the agreements (thread by thread, then a
// fixed tree), then one block adds the blocks' sums in a fixed tree.
constexpr int kConsistencyBlocks = kMaxThreads;

// The sum of every thread's v over a block of kMaxThreads threads, in a fixed tree.
__device__ __forceinline__ double block_sum(double v, double* partial) {
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int width = kMaxThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  return partial[0];
}

__global__ void __launch_bounds__(kMaxThreads)
    consistency_terms_kernel(const float* __restrict__ agreement, LossShape s,
                             double* __restrict__ block_terms) {
  __shared__ double partial[kMaxThreads];
  const int64_t slices = s.batch * s.num_groups;
  const int64_t n = s.num_student * s.num_teacher * slices;
  double sum = 0.0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kMaxThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(kConsistencyBlocks) * kMaxThreads) {
    const int64_t pair = e / slices;  // i * Vt + j
    if (pair / s.num_teacher != pair % s.num_teacher) {
      sum -= log(static_cast<double>(clamp_agreement(agreement[e])));
    }
  }
  const double block_total = block_sum(sum, partial);
  if (threadIdx.x == 0) block_terms[blockIdx.x] = block_total;
}

__global__ void __launch_bounds__(kMaxThreads)
    finish_consistency_kernel(const double* __restrict__ block_terms, double inv_terms,
                              float* __restrict__ consistency) {
  __shared__ double partial[kMaxThreads];
  const double total = block_sum(block_terms[threadIdx.x], partial);
  if (threadIdx.x == 0) *consistency = static_cast<float>(total * inv_terms);
}

// S = sum over chunks of the partial sums, in chunk order.
__global__ void sum_chunks_kernel(const float* __restrict__ partial, int64_t chunks, int64_t n,
                                  float* __restrict__ prob_sum) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = partial[e];
    for (int64_t k = 1; k < chunks; ++k) acc += partial[k * n + e];
    prob_sum[e] = acc;
  }
}

// q_j = exp(t_j - m_j) r_j of one (b, g) slice into shared memory q [Vt, P], from the saved
// teacher stats; every thread of the block takes columns t, t + blockDim, ...
template <typename T>
__device__ __forceinline__ void fill_teacher_probabilities(float* q, const T* __restrict__ teacher,
                                                           const LossShape& s, const BackwardIn& in,
                                                           int64_t slice, int64_t offset) {
  const int64_t P = s.partition_size;
  const int64_t stride_view = s.batch * s.num_groups * P;
  for (int j = 0; j < static_cast<int>(s.num_teacher); ++j) {
    const float* stats = in.teacher_stats + (j * s.batch * s.num_groups + slice) * 2;
    const float m = stats[0], inv = stats[1];
    for (int64_t c = threadIdx.x; c < P; c += blockDim.x) {
      q[j * P + c] =
          exp_shifted(static_cast<float>(teacher[j * stride_view + offset + c]), m) * inv;
    }
  }
}

// Backward for one (image b, group g). With p, q recomputed from the saved (m, r):
//   w_ij = -(dL/dconsistency / N) / a_ij  if i != j and a_ij is inside the clamp, else 0
//   dL/dp_ic = dL/dS_gc + sum_j w_ij q_jc
//   s_i = <p_i, dL/dp_i>                                            (one block reduction)
//   dL/dx_ic = p_ic (dL/dp_ic - s_i)
// The second pass recomputes p and dL/dp rather than keeping Vs * P floats per block.
template <typename S, typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const S* __restrict__ student, const T* __restrict__ teacher, LossShape s,
                    BackwardIn in, S* __restrict__ grad_student) {
  extern __shared__ float smem[];
  const int64_t P = s.partition_size;
  const int num_teacher = static_cast<int>(s.num_teacher);
  const int num_student = static_cast<int>(s.num_student);
  const int num_warps = blockDim.x / kWarpSize;
  float* q = smem;                                  // [Vt, P]
  float* weight = q + num_teacher * P;              // [Vs, Vt]: w of this (b, g)
  float* red = weight + num_student * num_teacher;  // [Vs, num_warps]
  float* row_dot = red + num_student * num_warps;   // [Vs]

  const int64_t b = blockIdx.x / s.num_groups;
  const int64_t group = blockIdx.x % s.num_groups;
  const int64_t slice = b * s.num_groups + group;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t width = s.num_groups * P;
  const int64_t stride_view = s.batch * width;
  const int64_t offset = b * width + group * P;
  const float* grad_total = in.grad_prob_sum + group * P;

  const float grad_per_term = *in.grad_consistency * in.inv_terms;
  for (int k = tid; k < num_student * num_teacher; k += blockDim.x) {
    const float a = in.agreement[(k * s.batch) * s.num_groups + slice];
    weight[k] = pair_weight(a, k / num_teacher == k % num_teacher, grad_per_term);
  }
  fill_teacher_probabilities(q, teacher, s, in, slice, offset);
  __syncthreads();

  auto grad_wrt_prob = [&](int i, int64_t c) {
    float d = grad_total[c];
    for (int j = 0; j < num_teacher; ++j) d += weight[i * num_teacher + j] * q[j * P + c];
    return d;
  };

  for (int i = 0; i < num_student; ++i) {
    const float* stats = in.student_stats + (i * s.batch * s.num_groups + slice) * 2;
    const float m = stats[0], inv = stats[1];
    float acc = 0.0f;
    for (int64_t c = tid; c < P; c += blockDim.x) {
      const float p =
          exp_shifted(static_cast<float>(student[i * stride_view + offset + c]), m) * inv;
      acc += p * grad_wrt_prob(i, c);
    }
    acc = warp_sum(acc);
    if (lane == 0) red[i * num_warps + warp] = acc;
  }
  __syncthreads();
  for (int i = tid; i < num_student; i += blockDim.x)
    row_dot[i] = combine_warps_sum(red, i, num_warps);
  __syncthreads();

  for (int i = 0; i < num_student; ++i) {
    const float* stats = in.student_stats + (i * s.batch * s.num_groups + slice) * 2;
    const float m = stats[0], inv = stats[1], dot = row_dot[i];
    for (int64_t c = tid; c < P; c += blockDim.x) {
      const int64_t e = i * stride_view + offset + c;
      const float p = exp_shifted(static_cast<float>(student[e]), m) * inv;
      grad_student[e] = static_cast<S>(p * (grad_wrt_prob(i, c) - dot));
    }
  }
}

// ---- Row-per-warp kernels ---------------------------------------------------------------

// Views (rows) a warp kernel's block may hold: one warp each, and a bound on the block that
// leaves each thread up to 128 registers for P = 1024 (32 values per row in registers).
constexpr int kWarpKernelMaxRows = 16;

// Lane `lane`'s kElems values of one row: columns lane, lane + 32, ... so that each load
// instruction of the warp reads 32 consecutive elements (coalesced, any alignment).
template <int kElems, typename X>
__device__ __forceinline__ void load_row(const X* __restrict__ row, int lane, float (&v)[kElems]) {
#pragma unroll
  for (int k = 0; k < kElems; ++k) v[k] = static_cast<float>(row[k * kWarpSize + lane]);
}

// Turns a row held in registers into its softmax, in place; returns (max, 1 / sum) of
// exp(x - max), the stats the backward recomputes p from. Per lane:
//   m = max over the warp of x_c;  e_c = exp(x_c - m);  r = 1 / (warp sum of e_c);  p_c = e_c r
template <int kElems>
__device__ __forceinline__ float2 softmax_in_registers(float (&v)[kElems]) {
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < kElems; ++k) m = nan_max(m, v[k]);
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    v[k] = exp_shifted(v[k], m);
    sum += v[k];
  }
  const float inv = 1.0f / warp_sum(sum);
#pragma unroll
  for (int k = 0; k < kElems; ++k) v[k] *= inv;
  return make_float2(m, inv);
}

// Forward for one (group, chunk of images), warp w holding row w of each image (teacher
// views first, then the students). Per image b:
//   every warp:    p (or q) = softmax of its row in registers, stats (m, r) written by lane 0,
//                  S_gc += its probabilities (registers, summed over the chunk's images)
//   teacher warps: q_j -> shared memory (double-buffered by image parity, so one barrier
//                  per image orders the writes of image b after the reads of image b - 2)
//   student warps: a_ij = warp sum of p_ic q_jc, written by lane 0
// At the end the rows' S_g are added in row order through shared memory, so the result is
// fixed by the shapes.
template <int kElems, typename S, typename T>
__global__ void __launch_bounds__(kWarpKernelMaxRows* kWarpSize)
    forward_warp_kernel(const S* __restrict__ student, const T* __restrict__ teacher, LossShape s,
                        int64_t chunks, int64_t batch_per_chunk, ForwardOut out) {
  extern __shared__ float smem[];
  constexpr int64_t P = kElems * kWarpSize;
  const int num_teacher = static_cast<int>(s.num_teacher);
  const int rows = num_teacher + static_cast<int>(s.num_student);
  float* q = smem;                         // [2, Vt, P]
  float* total = q + 2 * num_teacher * P;  // [P]

  const int64_t group = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int lane = threadIdx.x % kWarpSize;
  const int row = threadIdx.x / kWarpSize;
  const bool is_teacher = row < num_teacher;
  const int64_t view = is_teacher ? row : row - num_teacher;
  const int64_t width = s.num_groups * P;
  const int64_t stride_view = s.batch * width;
  float* stats_base = is_teacher ? out.teacher_stats : out.student_stats;

  float row_total[kElems];
#pragma unroll
  for (int k = 0; k < kElems; ++k) row_total[k] = 0.0f;

  const int64_t b_end = min(s.batch, (chunk + 1) * batch_per_chunk);
  for (int64_t b = chunk * batch_per_chunk; b < b_end; ++b) {
    const int64_t offset = view * stride_view + b * width + group * P;
    float v[kElems];
    if (is_teacher) {
      load_row<kElems>(teacher + offset, lane, v);
    } else {
      load_row<kElems>(student + offset, lane, v);
    }
    const float2 stats = softmax_in_registers<kElems>(v);
    const int64_t slice = b * s.num_groups + group;
    if (lane == 0) {
      float* dst = stats_base + (view * s.batch * s.num_groups + slice) * 2;
      dst[0] = stats.x;
      dst[1] = stats.y;
    }
#pragma unroll
    for (int k = 0; k < kElems; ++k) row_total[k] += v[k];

    float* q_image = q + (b & 1) * num_teacher * P;
    if (is_teacher) {
#pragma unroll
      for (int k = 0; k < kElems; ++k) q_image[view * P + k * kWarpSize + lane] = v[k];
    }
    __syncthreads();
    if (!is_teacher) {
      for (int j = 0; j < num_teacher; ++j) {
        float a = 0.0f;
#pragma unroll
        for (int k = 0; k < kElems; ++k) a += v[k] * q_image[j * P + k * kWarpSize + lane];
        a = warp_sum(a);
        if (lane == 0) {
          out.agreement[((view * num_teacher + j) * s.batch + b) * s.num_groups + group] = a;
        }
      }
    }
  }

  // S_g of the chunk: the rows' sums added in row order (row 0 writes, the others add).
  for (int r = 0; r < rows; ++r) {
    if (row == r) {
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        const int64_t c = k * kWarpSize + lane;
        total[c] = r == 0 ? row_total[k] : total[c] + row_total[k];
      }
    }
    __syncthreads();
  }
  float* partial = out.partial + (chunk * s.num_groups + group) * P;
  for (int64_t c = threadIdx.x; c < P; c += blockDim.x) partial[c] = total[c];
}

// Backward for one (image b, group g), warp i holding student row i. The block first
// recomputes the teacher probabilities q_j = exp(t_j - m_j) r_j into shared memory (all
// threads, any columns), then each warp, with p recomputed in registers from its saved
// (m, r):
//   w_ij    = -(dL/dconsistency / N) / a_ij  if i != j and a_ij is inside the clamp, else 0
//   dL/dp_c = dL/dS_gc + sum_j w_ij q_jc       (registers)
//   s_i     = <p, dL/dp>                       (warp sum)
//   dL/dx_c = p_c (dL/dp_c - s_i)              written once
template <int kElems, typename S, typename T>
__global__ void __launch_bounds__(kWarpKernelMaxRows* kWarpSize)
    backward_warp_kernel(const S* __restrict__ student, const T* __restrict__ teacher,
                         LossShape s, BackwardIn in, S* __restrict__ grad_student) {
  extern __shared__ float smem[];
  constexpr int64_t P = kElems * kWarpSize;
  const int num_teacher = static_cast<int>(s.num_teacher);
  float* q = smem;  // [Vt, P]

  const int64_t b = blockIdx.x / s.num_groups;
  const int64_t group = blockIdx.x % s.num_groups;
  const int64_t slice = b * s.num_groups + group;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = threadIdx.x / kWarpSize;
  const int64_t width = s.num_groups * P;
  const int64_t stride_view = s.batch * width;
  const int64_t offset = b * width + group * P;

  fill_teacher_probabilities(q, teacher, s, in, slice, offset);

  // Everything of this warp's row that does not need q, while the block fills it.
  const float* stats = in.student_stats + (i * s.batch * s.num_groups + slice) * 2;
  const float m = stats[0], inv = stats[1];
  float p[kElems];
  load_row<kElems>(student + i * stride_view + offset, lane, p);
#pragma unroll
  for (int k = 0; k < kElems; ++k) p[k] = exp_shifted(p[k], m) * inv;
  float d[kElems];
  const float* grad_total = in.grad_prob_sum + group * P;
#pragma unroll
  for (int k = 0; k < kElems; ++k) d[k] = grad_total[k * kWarpSize + lane];
  const float grad_per_term = *in.grad_consistency * in.inv_terms;
  __syncthreads();

  for (int j = 0; j < num_teacher; ++j) {
    const float a = in.agreement[((i * num_teacher + j) * s.batch + b) * s.num_groups + group];
    const float w = pair_weight(a, i == j, grad_per_term);
#pragma unroll
    for (int k = 0; k < kElems; ++k) d[k] += w * q[j * P + k * kWarpSize + lane];
  }
  float dot = 0.0f;
#pragma unroll
  for (int k = 0; k < kElems; ++k) dot += p[k] * d[k];
  dot = warp_sum(dot);
  S* grad_row = grad_student + i * stride_view + offset;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    grad_row[k * kWarpSize + lane] = static_cast<S>(p[k] * (d[k] - dot));
  }
}

// Which kernels a call may use, from CARP_FAST_CUDA_KERNELS (read per call, so that a
// benchmark or a test can compare them in one process): "auto" (or unset, or "slice") tries
// the slice kernels, then the warp kernels, then the blocked ones; "warp" starts at the warp
// kernels; "blocked" uses the blocked kernels everywhere.
enum class KernelChoice { kAuto, kWarp, kBlocked };

KernelChoice kernel_choice() {
  const char* choice = std::getenv("CARP_FAST_CUDA_KERNELS");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "auto") == 0 ||
      std::strcmp(choice, "slice") == 0) {
    return KernelChoice::kAuto;
  }
  if (std::strcmp(choice, "warp") == 0) return KernelChoice::kWarp;
  TORCH_CHECK(std::strcmp(choice, "blocked") == 0,
              "CARP_FAST_CUDA_KERNELS must be auto, slice, warp or blocked, got '", choice, "'");
  return KernelChoice::kBlocked;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The slice kernels need one dtype for both logits (a lane's pieces line up with the
// teacher's), 16-byte aligned rows, a shape their indexing holds (slice_shape_fits) and their
// shared memory (q, S_g and a stash per warp, a row of the block) within the default 48 KiB.
bool slice_kernels_apply(const at::Tensor& student, const at::Tensor& teacher, const LossShape& s,
                         int64_t shared_bytes) {
  return student.scalar_type() == teacher.scalar_type() && aligned16(student) &&
         aligned16(teacher) && slice_shape_fits(s) && shared_bytes <= kDefaultSharedBytes &&
         with_warp_elems(s.partition_size, [](auto) {});
}

// The warp kernels' shared memory: the forward double-buffers q and holds S_g of the block,
// the backward holds q.
int64_t warp_forward_shared_bytes(const LossShape& s) {
  return static_cast<int64_t>(sizeof(float)) * (2 * s.num_teacher + 1) * s.partition_size;
}
int64_t warp_backward_shared_bytes(const LossShape& s) {
  return static_cast<int64_t>(sizeof(float)) * s.num_teacher * s.partition_size;
}

// The layout of a loss call, chosen once from the logits for the forward and its backward
// alike, so that one call never mixes layouts: the fastest whose limits hold in both
// directions. Slice wins at every shape it takes (docs/kernel_history.md). The warp kernels
// stay for the shapes slice refuses but they take (student and teacher of different dtypes,
// rows not 16-byte aligned, slice's shared memory over 48 KiB): there they beat the blocked
// kernels about 3x. Blocked takes any P. The backward's gradient is a fresh allocation,
// aligned like every caching-allocator block, so it adds no condition.
enum class Layout { kSlice, kWarp, kBlocked };

Layout choose_layout(const at::Tensor& student, const at::Tensor& teacher, const LossShape& s) {
  const KernelChoice choice = kernel_choice();
  const int64_t slice_shared_bytes =
      std::max(slice_forward_shared_bytes(s), slice_backward_shared_bytes(s));
  if (choice == KernelChoice::kAuto &&
      slice_kernels_apply(student, teacher, s, slice_shared_bytes)) {
    return Layout::kSlice;
  }
  const bool warp_fits = s.num_student + s.num_teacher <= kWarpKernelMaxRows &&
                         warp_forward_shared_bytes(s) <= kDefaultSharedBytes &&
                         warp_backward_shared_bytes(s) <= kDefaultSharedBytes &&
                         with_warp_elems(s.partition_size, [](auto) {});
  if (choice != KernelChoice::kBlocked && warp_fits) return Layout::kWarp;
  return Layout::kBlocked;
}

int threads_for(int64_t partition_size) {
  const int64_t want = (partition_size + kColumnsPerThread - 1) / kColumnsPerThread;
  const int64_t rounded = (want + kWarpSize - 1) / kWarpSize * kWarpSize;
  return static_cast<int>(std::clamp<int64_t>(rounded, kWarpSize, kMaxThreads));
}

// Calls f(S{}, T{}) with the C++ types of the student and teacher logits.
template <typename F>
void with_logit_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

template <typename F>
void with_logit_types(const at::Tensor& student, const at::Tensor& teacher, F&& f) {
  with_logit_type(student.scalar_type(), [&](auto s_tag) {
    with_logit_type(teacher.scalar_type(), [&](auto t_tag) { f(s_tag, t_tag); });
  });
}

// Dynamic shared memory above 48 KiB must be opted into per kernel; beyond the device's
// opt-in limit the group is too large for this kernel and we say so.
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, int64_t bytes, const LossShape& s) {
  if (bytes <= kDefaultSharedBytes) return;
  int device = 0;
  int limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= limit, "carp_fast fused loss: partition size ",
              s.partition_size, " with ", s.num_teacher, " teacher views needs ", bytes,
              " bytes of shared memory per block, more than this GPU's ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

ForwardResult partition_softmax_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                             int64_t partition_size) {
  const LossShape s = check_forward_inputs(student, teacher, partition_size);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor consistency = at::empty({}, f32);
  at::Tensor agreement = at::empty({s.num_student, s.num_teacher, s.batch, s.num_groups}, f32);
  at::Tensor student_stats = at::empty({s.num_student, s.batch, s.num_groups, 2}, f32);
  at::Tensor teacher_stats = at::empty({s.num_teacher, s.batch, s.num_groups, 2}, f32);
  at::Tensor prob_sum = at::empty({s.num_groups, s.partition_size}, f32);

  const Layout layout = choose_layout(student, teacher, s);
  const int64_t rows = s.num_student + s.num_teacher;
  const int64_t slice_shared_bytes = slice_forward_shared_bytes(s);
  const int64_t warp_shared_bytes = warp_forward_shared_bytes(s);
  const bool slice_path = layout == Layout::kSlice;
  const bool warp_path = layout == Layout::kWarp;

  int64_t chunks = 0, batch_per_chunk = 0;
  if (slice_path) {
    const SliceGrid grid = slice_grid(s);
    chunks = grid.chunks;
    batch_per_chunk = grid.batch_per_chunk;
  } else {
    chunks = std::min(s.batch, (kTargetForwardBlocks + s.num_groups - 1) / s.num_groups);
    batch_per_chunk = (s.batch + chunks - 1) / chunks;
  }
  const int64_t blocks = s.num_groups * chunks;
  at::Tensor partial =
      chunks == 1 ? prob_sum : at::empty({chunks, s.num_groups, s.partition_size}, f32);

  const ForwardOut out{agreement.data_ptr<float>(),
                       student_stats.data_ptr<float>(), teacher_stats.data_ptr<float>(),
                       partial.data_ptr<float>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  with_logit_types(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    if (slice_path) {
      if constexpr (std::is_same_v<S, T>) {
        const RowViews rows =
            row_views(student.const_data_ptr<S>(), teacher.const_data_ptr<S>(), s);
        with_warp_elems(s.partition_size, [&](auto elems) {
          with_slice_teachers(s.num_teacher, [&](auto teachers) {
            forward_slice_kernel<decltype(elems)::value, S, decltype(teachers)::value>
                <<<static_cast<unsigned>(blocks), kSliceWarps * kWarpSize, slice_shared_bytes,
                   stream>>>(rows, s, chunks, batch_per_chunk, out);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      }
      return;
    }
    const bool launched = warp_path && with_warp_elems(s.partition_size, [&](auto elems) {
      forward_warp_kernel<decltype(elems)::value, S, T>
          <<<static_cast<unsigned>(blocks), static_cast<unsigned>(rows * kWarpSize),
             warp_shared_bytes, stream>>>(student.const_data_ptr<S>(),
                                          teacher.const_data_ptr<T>(), s, chunks,
                                          batch_per_chunk, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (launched) return;
    const int threads = threads_for(s.partition_size);
    const int num_warps = threads / kWarpSize;
    const int64_t red_slots = std::max(rows, s.num_student * s.num_teacher);
    const int64_t shared_bytes =
        static_cast<int64_t>(sizeof(float)) *
        ((s.num_teacher + 1) * s.partition_size + red_slots * num_warps + 2 * rows);
    auto kernel = forward_kernel<S, T>;
    reserve_shared_memory(kernel, shared_bytes, s);
    kernel<<<static_cast<unsigned>(blocks), threads, shared_bytes, stream>>>(
        student.const_data_ptr<S>(), teacher.const_data_ptr<T>(), s, chunks, batch_per_chunk, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  at::Tensor block_terms = at::empty({kConsistencyBlocks}, student.options().dtype(at::kDouble));
  consistency_terms_kernel<<<kConsistencyBlocks, kMaxThreads, 0, stream>>>(
      agreement.const_data_ptr<float>(), s, block_terms.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double inv_terms = 1.0 / static_cast<double>(num_pairs(s) * s.batch * s.num_groups);
  finish_consistency_kernel<<<1, kMaxThreads, 0, stream>>>(
      block_terms.const_data_ptr<double>(), inv_terms, consistency.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (chunks > 1) {
    const int64_t n = s.num_groups * s.partition_size;
    const int64_t sum_blocks = std::min<int64_t>((n + kMaxThreads - 1) / kMaxThreads, 4096);
    sum_chunks_kernel<<<static_cast<unsigned>(sum_blocks), kMaxThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), chunks, n, prob_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {consistency, agreement, student_stats, teacher_stats, prob_sum};
}

at::Tensor partition_softmax_backward_cuda(const at::Tensor& grad_consistency,
                                           const at::Tensor& grad_prob_sum,
                                           const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& agreement,
                                           const at::Tensor& student_stats,
                                           const at::Tensor& teacher_stats, int64_t partition_size) {
  const LossShape s = check_backward_inputs(grad_consistency, grad_prob_sum, student, teacher,
                                            agreement, student_stats, teacher_stats, partition_size);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty_like(student);

  const BackwardIn in =
      make_backward_in(s, grad_consistency, grad_prob_sum, agreement, student_stats, teacher_stats);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const Layout layout = choose_layout(student, teacher, s);
  const int64_t slice_shared_bytes = slice_backward_shared_bytes(s);
  const int64_t warp_shared_bytes = warp_backward_shared_bytes(s);
  const bool slice_path = layout == Layout::kSlice;
  const bool warp_path = layout == Layout::kWarp;

  with_logit_types(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    if (slice_path) {
      if constexpr (std::is_same_v<S, T>) {
        const SliceGrid grid = slice_grid(s);
        with_warp_elems(s.partition_size, [&](auto elems) {
          backward_slice_kernel<decltype(elems)::value, S>
              <<<static_cast<unsigned>(s.num_groups * grid.chunks), kSliceWarps * kWarpSize,
                 slice_shared_bytes, stream>>>(
                  row_views(student.const_data_ptr<S>(), teacher.const_data_ptr<S>(), s), s,
                  grid.chunks, grid.batch_per_chunk, in, grad_student.data_ptr<S>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      return;
    }
    const bool launched = warp_path && with_warp_elems(s.partition_size, [&](auto elems) {
      backward_warp_kernel<decltype(elems)::value, S, T>
          <<<static_cast<unsigned>(s.batch * s.num_groups),
             static_cast<unsigned>(s.num_student * kWarpSize), warp_shared_bytes, stream>>>(
              student.const_data_ptr<S>(), teacher.const_data_ptr<T>(), s, in,
              grad_student.data_ptr<S>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (launched) return;
    const int threads = threads_for(s.partition_size);
    const int num_warps = threads / kWarpSize;
    const int64_t shared_bytes = static_cast<int64_t>(sizeof(float)) *
                                 (s.num_teacher * s.partition_size + s.num_student * s.num_teacher +
                                  s.num_student * num_warps + s.num_student);
    auto kernel = backward_kernel<S, T>;
    reserve_shared_memory(kernel, shared_bytes, s);
    kernel<<<static_cast<unsigned>(s.batch * s.num_groups), threads, shared_bytes, stream>>>(
        student.const_data_ptr<S>(), teacher.const_data_ptr<T>(), s, in,
        grad_student.data_ptr<S>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_student;
}

}  // namespace
}  // namespace carp_fast

TORCH_LIBRARY_IMPL(carp_fast, CUDA, m) {
  m.impl("partition_softmax_forward", &carp_fast::partition_softmax_forward_cuda);
  m.impl("partition_softmax_backward", &carp_fast::partition_softmax_backward_cuda);
}
