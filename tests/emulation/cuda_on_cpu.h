// Just enough of CUDA's built-ins for csrc/slice_kernels.cuh to compile and run on a CPU, so
// that the slice kernels' indexing, shared-memory use and warp reductions are tested on
// machines without a GPU (tests/test_slice_kernels_emulated.py). Include it before the
// kernels.
//
// Every CUDA thread of a block is a std::thread. Warp shuffles, the warp's integer max
// (__reduce_max_sync) and __syncwarp meet at a barrier of the warp's 32 threads,
// __syncthreads at one of the block's. Blocks run one after another. The threads really run
// concurrently, so shared memory that a kernel reads before the barrier that should order it
// can show up as a wrong value, though not reliably: this checks the arithmetic and the
// indexing, not the memory model. Dynamic shared memory starts as NaN, so a read of a place
// nobody wrote shows in the results. Maths functions are libm's, not the GPU's
// approximations, so results agree with the GPU's to rounding only.
#pragma once

#define CARP_FAST_EMULATE_CUDA 1

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }

// CUDA's min/max overloads for device code.
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

namespace cuda_emu {

constexpr int kWarpLanes = 32;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  std::barrier<> meet{kWarpLanes};
  float value[kWarpLanes];
  int integer[kWarpLanes];
};

struct Block {
  explicit Block(int threads, size_t shared_bytes)
      : meet(threads),
        warps(new Warp[threads / kWarpLanes]),
        shared((shared_bytes + sizeof(float4) - 1) / sizeof(float4), float4{kNaN, kNaN, kNaN, kNaN}) {}
  std::barrier<> meet;
  std::unique_ptr<Warp[]> warps;
  std::vector<float4> shared;
};

inline thread_local Dim3 thread_index;
inline thread_local Dim3 block_index;
inline thread_local Block* block = nullptr;
inline Dim3 block_dim;

// Every lane of the calling thread's warp puts its v in slots (one of the warp's arrays);
// once all have, each gets back read(slots), and nobody overwrites slots before every lane
// has read them.
template <typename T, typename Read>
T meet_in(T (Warp::*slots)[kWarpLanes], T v, Read read) {
  Warp& warp = block->warps[thread_index.x / kWarpLanes];
  (warp.*slots)[thread_index.x % kWarpLanes] = v;
  warp.meet.arrive_and_wait();
  const T got = read(warp.*slots);
  warp.meet.arrive_and_wait();
  return got;
}

// Each lane gets the v of lane `from`.
inline float exchange(float v, int from) {
  return meet_in(&Warp::value, v, [from](const float* all) { return all[from % kWarpLanes]; });
}

// Each lane gets the largest v of the warp.
inline int reduce_max(int v) {
  return meet_in(&Warp::integer, v,
                 [](const int* all) { return *std::max_element(all, all + kWarpLanes); });
}

// Runs kernel() as `blocks` blocks of `threads` threads (a multiple of 32), one block at a
// time; the same threads serve every block, and shared memory is NaN again for each.
template <typename Kernel>
void launch(unsigned blocks, unsigned threads, size_t shared_bytes, Kernel&& kernel) {
  block_dim = Dim3{threads, 1, 1};
  Block state(static_cast<int>(threads), shared_bytes);
  const std::vector<float4> fresh = state.shared;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_index = Dim3{t, 0, 0};
      block = &state;
      for (unsigned b = 0; b < blocks; ++b) {
        block_index = Dim3{b, 0, 0};
        kernel();
        state.meet.arrive_and_wait();  // the block is done
        if (t == 0) state.shared = fresh;
        state.meet.arrive_and_wait();  // the next block starts from fresh shared memory
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_index)
#define blockIdx (::cuda_emu::block_index)
#define blockDim (::cuda_emu::block_dim)
#define CARP_FAST_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::cuda_emu::block->shared.data())

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return cuda_emu::exchange(v, static_cast<int>(threadIdx.x % cuda_emu::kWarpLanes) ^ lane_mask);
}
inline float __shfl_sync(unsigned, float v, int from) { return cuda_emu::exchange(v, from); }
inline int __reduce_max_sync(unsigned, int v) { return cuda_emu::reduce_max(v); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  cuda_emu::block->warps[threadIdx.x / cuda_emu::kWarpLanes].meet.arrive_and_wait();
}
inline void __syncthreads() { cuda_emu::block->meet.arrive_and_wait(); }
