// CPU kernels of the fused CARP loss (maths in partition_softmax.h).
//
// Work is cut into items that own a slice of the output, so no two threads ever write the
// same float and every sum runs in an order fixed by the shapes alone: on a given machine
// the results are bitwise reproducible whatever the thread count.
//   forward:  item = (group g, chunk of images). It walks its images in order, keeps the
//             teacher probabilities of the current (b, g) in a scratch buffer of Vt*P
//             floats, and adds every probability into its own [P] partial sum.
//   backward: item = (image b, group g); the teacher probabilities are recomputed once per
//             item and shared by the Vs student views.
// Nothing the size of the logits is ever allocated besides the student gradient itself.
//
// The inner loops (partition_softmax_cpu_simd.h) are built twice: 4-lane vectors for any
// CPU (SSE2, NEON) and, on x86-64 with GCC or Clang, 8-lane AVX2+FMA ones, picked at run
// time from what the CPU supports.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "partition_softmax.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define CARP_HAVE_AVX2_KERNELS 1
#else
#define CARP_HAVE_AVX2_KERNELS 0
#endif

#define CARP_INLINE inline __attribute__((always_inline))

// The vector helpers are always inlined, so no vector value crosses a call boundary and
// GCC's note about the ABI of vector arguments without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace carp_fast {
namespace {

// Below this many items the forward splits the batch too, so that small G still spreads
// over the threads. A constant (not the thread count) keeps the summation order fixed.
constexpr int64_t kMinForwardItems = 64;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- Logits of any supported dtype, read as fp32 ---------------------------------------

struct Logits {
  const void* data;
  at::ScalarType dtype;
  int64_t views;
};

// The slice [offset, offset + n) as fp32: fp32 logits are read in place, half-precision
// ones are widened into `buffer` (P floats, so it stays in L1 for the passes that follow).
const float* slice_as_float(const Logits& logits, int64_t offset, int64_t n, float* buffer) {
  switch (logits.dtype) {
    case at::kFloat: return static_cast<const float*>(logits.data) + offset;
    case at::kBFloat16: {
      const auto* src = static_cast<const c10::BFloat16*>(logits.data) + offset;
      for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(src[c]);
      return buffer;
    }
    default: {
      const auto* src = static_cast<const c10::Half*>(logits.data) + offset;
      for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(src[c]);
      return buffer;
    }
  }
}

struct Scratch {
  explicit Scratch(const LossShape& s)
      : teacher_probs(static_cast<size_t>(s.num_teacher * s.partition_size)),
        probs(static_cast<size_t>(s.partition_size)),
        work(static_cast<size_t>(s.partition_size)),
        widened(static_cast<size_t>(s.partition_size)),
        teacher_weight(static_cast<size_t>(s.num_teacher)),
        teacher_term(static_cast<size_t>(s.num_teacher)) {}
  std::vector<float> teacher_probs;        // [Vt, P]: q_j of the current (b, g)
  std::vector<float> probs;                // [P]: exp(x - m) or p of a student slice
  std::vector<float> work;                 // [P]: dL/dp in the backward
  std::vector<float> widened;              // [P]: a half-precision slice widened to fp32
  std::vector<float> teacher_weight;       // [Vt]: w_ij of the current student slice
  std::vector<const float*> teacher_term;  // [Vt]: the q_j those weights multiply
};

// The teacher terms of dL/dp that are not zero: the diagonal pair and clamped agreements
// have zero weight and are skipped.
struct WeightedTeachers {
  int64_t count;
  const float* weight;
  const float* const* probs;
};

struct ForwardItem {
  Logits student, teacher;
  LossShape shape;
  int64_t batch_per_chunk;
  float* agreement;      // [Vs, Vt, B, G]
  float* student_stats;  // [Vs, B, G, 2]
  float* teacher_stats;  // [Vt, B, G, 2]
  float* prob_partial;   // [chunks, G, P]
};

// -log clamp(a, eps, 1 - eps), the consistency term of one agreement.
CARP_INLINE double pair_loss(float a) {
  return -std::log(static_cast<double>(std::min(std::max(a, kAgreementMin), kAgreementMax)));
}

// The slices of one item are runs of P elements (2 KiB at P = 512 in fp32) a whole logit
// row apart, too short for the hardware prefetcher to lock on; fetching the next image's
// slices while this one is computed hides most of the DRAM latency.
CARP_INLINE void prefetch_logits(const Logits& logits, const LossShape& s, int64_t b,
                                 int64_t group) {
  const int64_t element = static_cast<int64_t>(c10::elementSize(logits.dtype));
  const int64_t bytes = s.partition_size * element;
  const int64_t width = s.num_groups * s.partition_size;
  for (int64_t v = 0; v < logits.views; ++v) {
    const char* base = static_cast<const char*>(logits.data) +
                       ((v * s.batch + b) * width + group * s.partition_size) * element;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(base + o, 0, 2);
  }
}

struct BackwardItem {
  Logits student, teacher;
  LossShape shape;
  float grad_per_term;         // dL/dconsistency / N: each term's share of the mean
  const float* agreement;      // [Vs, Vt, B, G]
  const float* grad_prob_sum;  // [G, P]
  const float* student_stats;
  const float* teacher_stats;
  void* grad_student;  // [Vs, B, G*P], student dtype
};

// ---- The kernels, once per instruction set ------------------------------------------

namespace simd128 {
constexpr int64_t kLanes = 4;
#define CARP_SIMD_TARGET
#include "partition_softmax_cpu_simd.h"
#undef CARP_SIMD_TARGET
}  // namespace simd128

#if CARP_HAVE_AVX2_KERNELS
namespace avx2 {
constexpr int64_t kLanes = 8;
#define CARP_SIMD_TARGET __attribute__((target("avx2,fma")))
#include "partition_softmax_cpu_simd.h"
#undef CARP_SIMD_TARGET
}  // namespace avx2
#endif

struct Kernels {
  void (*forward_item)(const ForwardItem&, int64_t, int64_t, Scratch&, double*);
  void (*backward_item)(const BackwardItem&, int64_t, int64_t, Scratch&);
};

// The widest kernels this CPU runs. CARP_FAST_CPU_KERNELS=portable forces the 4-lane
// ones, so that one machine can test both builds; read per call (it is cheap) so that a
// test can set it in-process.
const Kernels& best_kernels() {
  static const Kernels portable{simd128::forward_item, simd128::backward_item};
#if CARP_HAVE_AVX2_KERNELS
  static const bool has_avx2 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  static const Kernels wide{avx2::forward_item, avx2::backward_item};
  const char* choice = std::getenv("CARP_FAST_CPU_KERNELS");
  const bool forced_portable = choice != nullptr && std::strcmp(choice, "portable") == 0;
  if (has_avx2 && !forced_portable) return wide;
#endif
  return portable;
}

// The gradient is the one tensor of the logits' size the loss creates, and on a fresh
// allocation its first touch costs a page fault per 4 KiB page, which measured on a VM at
// several times the kernel's own arithmetic. Asking for transparent huge pages (when the
// system leaves THP to madvise) makes that one fault per 2 MiB. Advice only: if the kernel
// declines, nothing changes.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < 4 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

Logits as_logits(const at::Tensor& t) { return {t.const_data_ptr(), t.scalar_type(), t.size(0)}; }

// Runs body(k, scratch) for every item k in [0, items) on torch's intra-op threads.
// Items are handed out dynamically rather than as one fixed range per thread: on a shared
// machine a thread that loses its core would otherwise hold the whole step up. Each item
// writes only its own outputs, so which thread runs it changes no result.
template <typename Body>
void for_each_item(int64_t items, const LossShape& shape, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  // Grab several items at a time when they are many and small (the backward's (b, g)).
  const int64_t grab = std::max<int64_t>(1, items / (threads * 32));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch(shape);
    for (int64_t begin = next.fetch_add(grab); begin < items; begin = next.fetch_add(grab)) {
      const int64_t end = std::min(items, begin + grab);
      for (int64_t k = begin; k < end; ++k) body(k, scratch);
    }
  });
}

}  // namespace

ForwardResult partition_softmax_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                            int64_t partition_size) {
  const LossShape s = check_forward_inputs(student, teacher, partition_size);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor consistency = at::empty({}, f32);
  at::Tensor agreement = at::empty({s.num_student, s.num_teacher, s.batch, s.num_groups}, f32);
  at::Tensor student_stats = at::empty({s.num_student, s.batch, s.num_groups, 2}, f32);
  at::Tensor teacher_stats = at::empty({s.num_teacher, s.batch, s.num_groups, 2}, f32);
  at::Tensor prob_sum = at::empty({s.num_groups, s.partition_size}, f32);

  const int64_t chunks = std::min(s.batch, (kMinForwardItems + s.num_groups - 1) / s.num_groups);
  const int64_t batch_per_chunk = (s.batch + chunks - 1) / chunks;
  const int64_t items = s.num_groups * chunks;
  // With one chunk the partial sums are the result; otherwise they are reduced below.
  at::Tensor partial =
      chunks == 1 ? prob_sum : at::empty({chunks, s.num_groups, s.partition_size}, f32);
  // Per-item sums of the consistency terms, added in item order below: fixed order, and
  // double so that 10^5+ terms of size ~log(P) lose nothing.
  std::vector<double> loss_partial(static_cast<size_t>(items));

  const ForwardItem item{as_logits(student),
                         as_logits(teacher),
                         s,
                         batch_per_chunk,
                         agreement.data_ptr<float>(),
                         student_stats.data_ptr<float>(),
                         teacher_stats.data_ptr<float>(),
                         partial.data_ptr<float>()};
  const Kernels& kernels = best_kernels();
  for_each_item(items, s, [&](int64_t k, Scratch& scratch) {
    kernels.forward_item(item, k / chunks, k % chunks, scratch, &loss_partial[k]);
  });

  double loss_sum = 0.0;
  for (const double v : loss_partial) loss_sum += v;
  consistency.fill_(loss_sum / static_cast<double>(num_pairs(s) * s.batch * s.num_groups));

  if (chunks > 1) {
    const float* src = partial.const_data_ptr<float>();
    float* dst = prob_sum.data_ptr<float>();
    const int64_t n = s.num_groups * s.partition_size;
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        float acc = src[e];
        for (int64_t k = 1; k < chunks; ++k) acc += src[k * n + e];
        dst[e] = acc;
      }
    });
  }
  return {consistency, agreement, student_stats, teacher_stats, prob_sum};
}

at::Tensor partition_softmax_backward_cpu(const at::Tensor& grad_consistency,
                                          const at::Tensor& grad_prob_sum,
                                          const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& agreement,
                                          const at::Tensor& student_stats,
                                          const at::Tensor& teacher_stats, int64_t partition_size) {
  const LossShape s = check_backward_inputs(grad_consistency, grad_prob_sum, student, teacher,
                                            agreement, student_stats, teacher_stats, partition_size);
  at::Tensor grad_student = at::empty_like(student);
  advise_huge_pages(grad_student.data_ptr(), grad_student.nbytes());
  const BackwardItem item{
      as_logits(student),
      as_logits(teacher),
      s,
      static_cast<float>(grad_consistency.item<double>() /
                         static_cast<double>(num_pairs(s) * s.batch * s.num_groups)),
      agreement.const_data_ptr<float>(),
      grad_prob_sum.const_data_ptr<float>(),
      student_stats.const_data_ptr<float>(),
      teacher_stats.const_data_ptr<float>(),
      grad_student.data_ptr()};
  const Kernels& kernels = best_kernels();
  for_each_item(s.batch * s.num_groups, s, [&](int64_t k, Scratch& scratch) {
    kernels.backward_item(item, k / s.num_groups, k % s.num_groups, scratch);
  });
  return grad_student;
}

}  // namespace carp_fast
