// The slice CUDA kernels (csrc/slice_kernels.cuh) built for the CPU against cuda_on_cpu.h,
// launched the way partition_softmax_cuda.cu launches them: same grid, same shared memory,
// and the partial S_g summed over chunks in chunk order as sum_chunks_kernel does. The
// consistency (a small kernel over the agreements, common to every layout) is left out: the
// tests compare the agreements themselves.
#include <torch/extension.h>

#include "cuda_on_cpu.h"
// Production aims at 4096 warps and so gives a warp several images only at large batches;
// aiming at one makes the tests' small shapes walk several images per warp as well.
#define CARP_FAST_TARGET_SLICE_WARPS 1
#include "slice_kernels.cuh"

namespace carp_fast {
namespace {

LossShape slice_shape(const at::Tensor& student, const at::Tensor& teacher, int64_t partition_size) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "logits must be [V, B, G*P]");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "logits must be contiguous");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "the slice kernels take student and teacher of one dtype");
  TORCH_CHECK(student.size(1) == teacher.size(1) && student.size(2) == teacher.size(2),
              "student and teacher differ in batch or width");
  TORCH_CHECK(student.size(2) % partition_size == 0, "partition size must divide the width");
  LossShape s{student.size(0), teacher.size(0), student.size(1), student.size(2) / partition_size,
              partition_size};
  TORCH_CHECK(with_warp_elems(partition_size, [](auto) {}), "the slice kernels take P = 128 ... 1024");
  TORCH_CHECK(slice_shape_fits(s),
              "the slice kernels take at most 32 teacher views, 64 views in all and 2^31 logits "
              "a view");
  return s;
}

// Runs kernel(X{}, std::integral_constant<int, P / 32>{}, grid) on the slice kernels' grid,
// for the logits' dtype X and partition size P, as the launchers in partition_softmax_cuda.cu do.
template <typename Kernel>
void launch_slice(const LossShape& s, at::ScalarType dtype, int64_t shared_bytes, Kernel&& kernel) {
  const SliceGrid grid = slice_grid(s);
  auto run = [&](auto tag) {
    with_warp_elems(s.partition_size, [&](auto elems) {
      cuda_emu::launch(static_cast<unsigned>(s.num_groups * grid.chunks), kSliceWarps * kWarpSize,
                       static_cast<size_t>(shared_bytes), [&] { kernel(tag, elems, grid); });
    });
  };
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16");
  }
}

std::vector<at::Tensor> forward(const at::Tensor& student, const at::Tensor& teacher,
                                int64_t partition_size) {
  const LossShape s = slice_shape(student, teacher, partition_size);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor agreement = at::empty({s.num_student, s.num_teacher, s.batch, s.num_groups}, f32);
  at::Tensor student_stats = at::empty({s.num_student, s.batch, s.num_groups, 2}, f32);
  at::Tensor teacher_stats = at::empty({s.num_teacher, s.batch, s.num_groups, 2}, f32);
  // NaN where nothing is written: an output the kernel misses shows.
  for (at::Tensor* t : {&agreement, &student_stats, &teacher_stats}) t->fill_(NAN);
  const int64_t chunks = slice_grid(s).chunks;
  at::Tensor partial = at::full({chunks, s.num_groups, s.partition_size}, NAN, f32);
  const ForwardOut out{agreement.data_ptr<float>(), student_stats.data_ptr<float>(),
                       teacher_stats.data_ptr<float>(), partial.data_ptr<float>()};
  launch_slice(s, student.scalar_type(), slice_forward_shared_bytes(s),
               [&](auto tag, auto elems, const SliceGrid& grid) {
                 using X = decltype(tag);
                 const RowViews rows =
                     row_views(student.const_data_ptr<X>(), teacher.const_data_ptr<X>(), s);
                 with_slice_teachers(s.num_teacher, [&](auto teachers) {
                   forward_slice_kernel<decltype(elems)::value, X, decltype(teachers)::value>(
                       rows, s, grid.chunks, grid.batch_per_chunk, out);
                 });
               });
  at::Tensor prob_sum = partial[0].clone();
  for (int64_t k = 1; k < chunks; ++k) prob_sum += partial[k];
  return {agreement, student_stats, teacher_stats, prob_sum};
}

at::Tensor backward(const at::Tensor& grad_consistency, const at::Tensor& grad_prob_sum,
                    const at::Tensor& student, const at::Tensor& teacher,
                    const at::Tensor& agreement, const at::Tensor& student_stats,
                    const at::Tensor& teacher_stats, int64_t partition_size) {
  const LossShape s = slice_shape(student, teacher, partition_size);
  at::Tensor grad_student = at::full_like(student, NAN);
  const BackwardIn in =
      make_backward_in(s, grad_consistency, grad_prob_sum, agreement, student_stats, teacher_stats);
  launch_slice(s, student.scalar_type(), slice_backward_shared_bytes(s),
               [&](auto tag, auto elems, const SliceGrid& grid) {
                 using X = decltype(tag);
                 backward_slice_kernel<decltype(elems)::value, X>(
                     row_views(student.const_data_ptr<X>(), teacher.const_data_ptr<X>(), s), s,
                     grid.chunks, grid.batch_per_chunk, in, grad_student.data_ptr<X>());
               });
  return grad_student;
}

}  // namespace
}  // namespace carp_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &carp_fast::forward,
        "slice forward kernel, emulated: (agreement, student_stats, teacher_stats, prob_sum)");
  m.def("backward", &carp_fast::backward, "slice backward kernel, emulated: student gradient");
}
