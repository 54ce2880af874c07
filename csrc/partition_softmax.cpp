// Operator schema, input checks and the CPU registration of the fused CARP loss.
// The maths lives in partition_softmax.h; the kernels in *_cpu.cpp and *_cuda.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "partition_softmax.h"

namespace carp_fast {
namespace {

bool is_supported_logit_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 3, "carp_fast fused loss: ", name,
              " logits must be [views, batch, G*P], got shape ", logits.sizes());
  TORCH_CHECK(is_supported_logit_dtype(logits.scalar_type()), "carp_fast fused loss: ", name,
              " logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), "carp_fast fused loss: ", name,
              " logits must be contiguous (call .contiguous() first)");
  TORCH_CHECK(logits.size(0) >= 1, "carp_fast fused loss: ", name, " needs at least one view");
}

void check_fp32_tensor(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                       const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "carp_fast fused loss: ", name, " is on ", t.device(),
              " but the student logits are on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "carp_fast fused loss: ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "carp_fast fused loss: ", name, " must have shape ", expected,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "carp_fast fused loss: ", name, " must be contiguous");
}

}  // namespace

LossShape check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher,
                               int64_t partition_size) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.device() == teacher.device(), "carp_fast fused loss: student logits are on ",
              student.device(), " but teacher logits are on ", teacher.device());
  TORCH_CHECK(student.size(1) == teacher.size(1) && student.size(2) == teacher.size(2),
              "carp_fast fused loss: student ", student.sizes(), " and teacher ", teacher.sizes(),
              " logits must agree in batch and prototype dimensions");
  const int64_t width = student.size(2);
  TORCH_CHECK(partition_size >= 1 && width % partition_size == 0, "carp_fast fused loss: partition size ",
              partition_size, " does not divide the ", width, " logit columns");
  TORCH_CHECK(student.size(1) >= 1 && width >= 1,
              "carp_fast fused loss: logits must have a non-empty batch and width, got ",
              student.sizes());
  return {student.size(0), teacher.size(0), student.size(1), width / partition_size, partition_size};
}

LossShape check_backward_inputs(const at::Tensor& grad_consistency, const at::Tensor& grad_prob_sum,
                                const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& agreement, const at::Tensor& student_stats,
                                const at::Tensor& teacher_stats, int64_t partition_size) {
  const LossShape s = check_forward_inputs(student, teacher, partition_size);
  check_fp32_tensor(grad_consistency, "grad_consistency", {}, student);
  check_fp32_tensor(grad_prob_sum, "grad_prob_sum", {s.num_groups, s.partition_size}, student);
  check_fp32_tensor(agreement, "agreement", {s.num_student, s.num_teacher, s.batch, s.num_groups},
                    student);
  check_fp32_tensor(student_stats, "student_stats", {s.num_student, s.batch, s.num_groups, 2},
                    student);
  check_fp32_tensor(teacher_stats, "teacher_stats", {s.num_teacher, s.batch, s.num_groups, 2},
                    student);
  return s;
}

}  // namespace carp_fast

TORCH_LIBRARY(carp_fast, m) {
  m.def(
      "partition_softmax_forward(Tensor student, Tensor teacher, int partition_size) -> (Tensor "
      "consistency, Tensor agreement, Tensor student_stats, Tensor teacher_stats, Tensor "
      "prob_sum)");
  m.def(
      "partition_softmax_backward(Tensor grad_consistency, Tensor grad_prob_sum, Tensor "
      "student, Tensor teacher, Tensor agreement, Tensor student_stats, Tensor teacher_stats, "
      "int partition_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(carp_fast, CPU, m) {
  m.impl("partition_softmax_forward", &carp_fast::partition_softmax_forward_cpu);
  m.impl("partition_softmax_backward", &carp_fast::partition_softmax_backward_cpu);
}

// Importing carp_fast._C runs the registrations above. The module itself only says whether
// the CUDA kernels were compiled in, so Python can tell a CPU-only build from a GPU one.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "Fused CARP loss operators, registered under torch.ops.carp_fast",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef CARP_FAST_WITH_CUDA
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", kWithCuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
