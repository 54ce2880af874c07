// Fused CARP partition-softmax loss: declarations shared by the CPU and CUDA kernels.
//
// Inputs are grouped logits, student [Vs, B, G*P] and teacher [Vt, B, G*P], where group g
// is columns [g*P, (g+1)*P) of every row. Each (row, group) slice goes through a softmax
// over its P columns: p_{i,b,g} (student view i) and q_{j,b,g} (teacher view j).
//
// Forward outputs (all fp32):
//   consistency   []              mean over pairs i != j and over (b, g) of
//                                 -log clamp(a_{ijbg}, eps, 1 - eps), eps = FLT_EPSILON
//   agreement     [Vs, Vt, B, G]  a_{ijbg} = <p_{ibg}, q_{jbg}>, every pair (saved for backward)
//   student_stats [Vs, B, G, 2]   (m, r): row max and 1 / sum_c exp(x_c - m)
//   teacher_stats [Vt, B, G, 2]   same for the teacher
//   prob_sum      [G, P]          S_g = sum over b and every student and teacher view of p / q
//
// The entropy is left to Python (carp_fast.loss_terms.entropy_from_sum on the all-reduced S), so
// the DDP reduction exists once; its gradient dL/dS comes back into the backward.
//
// Backward takes dL/dconsistency (a 0-dim tensor, read on the device: no host sync) and
// dL/dS [G, P], and returns dL/dx for the student (its dtype and shape); the teacher gets
// no gradient. With N = (number of pairs i != j) * B * G and, for one student slice
// x = x_{ibg} with p = softmax(x):
//   w_ij    = -(dL/dconsistency / N) / a_ij   if i != j and eps <= a_ij <= 1 - eps, else 0
//             (torch's clamp passes the gradient on the closed interval, so do we)
//   dL/dp_c = dL/dS_{gc} + sum_j w_ij q_{jc}
//   dL/dx_c = p_c (dL/dp_c - <p, dL/dp>)
// p and q are recomputed from the logits and the saved (m, r) as exp(x - m) * r, the same
// arithmetic as the forward, so the backward sees the forward's probabilities bit for bit.
//
// The stats store (m, 1/sum) rather than (m, logsumexp) for that reason: exp(x - lse) would
// cost the forward a second exp per element to stay consistent with the backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <tuple>

namespace carp_fast {

struct LossShape {
  int64_t num_student;
  int64_t num_teacher;
  int64_t batch;
  int64_t num_groups;
  int64_t partition_size;
};

// Validates forward inputs (device, dtype, rank, shapes, contiguity, partition size) with
// messages that name the offending argument; returns the shape.
LossShape check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher,
                               int64_t partition_size);

// Validates backward inputs against the shape the forward saw.
LossShape check_backward_inputs(const at::Tensor& grad_consistency, const at::Tensor& grad_prob_sum,
                                const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& agreement, const at::Tensor& student_stats,
                                const at::Tensor& teacher_stats, int64_t partition_size);

// Pairs (i, j) with i != j, i over student views and j over teacher views: view k of the
// student and of the teacher are the same crop.
inline int64_t num_pairs(const LossShape& s) {
  return s.num_student * s.num_teacher - std::min(s.num_student, s.num_teacher);
}

// The clamp bounds of the agreements, float32 machine epsilon as in the reference.
constexpr float kAgreementMin = 1.1920928955078125e-07f;
constexpr float kAgreementMax = 1.0f - 1.1920928955078125e-07f;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult partition_softmax_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                            int64_t partition_size);

at::Tensor partition_softmax_backward_cpu(const at::Tensor& grad_consistency,
                                          const at::Tensor& grad_prob_sum,
                                          const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& agreement,
                                          const at::Tensor& student_stats,
                                          const at::Tensor& teacher_stats, int64_t partition_size);

}  // namespace carp_fast
