"""The CARP loss on the fused csrc/ kernels (``carp_fast._C``), same values as the reference.

The extension registers two operators under ``torch.ops.carp_fast`` (maths in
csrc/partition_softmax.h):

* ``partition_softmax_forward(student, teacher, partition_size)`` returns the consistency
  term, the agreements ``<p_i, q_j>`` ``[Vs, Vt, B, G]`` and per-slice softmax stats (both
  kept for the backward), and the per-group probability sum ``[G, P]``. No tensor of the
  logits' size is ever built.
* ``partition_softmax_backward(...)`` turns the gradients of the consistency and of the
  probability sum into the student-logit gradient, recomputing the softmax from the stats.

The entropy is computed here from the probability sum by the very same
``global_probability_sum`` / ``entropy_from_sum`` as the reference, so the cross-rank
all-reduce of the ``[G, P]`` sum exists once and autograd carries its gradient back in.
"""

from __future__ import annotations

import torch

from carp_fast import distributed
from carp_fast.loss_terms import check_logits, entropy_from_sum, global_probability_sum

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler; the CUDA kernel also needs nvcc and a CUDA build of torch)"
)


def _load_extension() -> tuple[str, bool]:
    """Imports the extension (registering its operators): (why not or '', has CUDA kernels)."""
    try:
        from carp_fast import _C
    except ImportError as error:
        return f"carp_fast._C could not be imported ({error})", False
    if not hasattr(torch.ops.carp_fast, "partition_softmax_forward"):
        return (
            "carp_fast._C is imported but did not register carp_fast::partition_softmax_forward",
            False,
        )
    return "", bool(getattr(_C, "with_cuda", 0))


_UNAVAILABLE_REASON, _WITH_CUDA = _load_extension()


def is_available() -> bool:
    """Whether the fused kernels are built and registered."""
    return not _UNAVAILABLE_REASON


def unavailable_reason() -> str:
    """Why the fused kernels cannot be used ('' when they can)."""
    return _UNAVAILABLE_REASON


def supports_device(device: torch.device | str) -> bool:
    """Whether the build has kernels for this device type (CPU always; CUDA if compiled in)."""
    device_type = torch.device(device).type
    return is_available() and (device_type == "cpu" or (device_type == "cuda" and _WITH_CUDA))


if is_available():

    @torch.library.register_fake("carp_fast::partition_softmax_forward")
    def _forward_fake(student: torch.Tensor, teacher: torch.Tensor, partition_size: int):
        num_student, batch, width = student.shape
        num_teacher = teacher.shape[0]
        num_groups = width // partition_size
        f32 = {"dtype": torch.float32, "device": student.device}
        return (
            student.new_empty((), **f32),
            student.new_empty((num_student, num_teacher, batch, num_groups), **f32),
            student.new_empty((num_student, batch, num_groups, 2), **f32),
            student.new_empty((num_teacher, batch, num_groups, 2), **f32),
            student.new_empty((num_groups, partition_size), **f32),
        )

    @torch.library.register_fake("carp_fast::partition_softmax_backward")
    def _backward_fake(
        grad_consistency: torch.Tensor,
        grad_prob_sum: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        agreement: torch.Tensor,
        student_stats: torch.Tensor,
        teacher_stats: torch.Tensor,
        partition_size: int,
    ) -> torch.Tensor:
        return torch.empty_like(student)

    def _setup_context(ctx, inputs, output) -> None:
        student, teacher, partition_size = inputs
        _, agreement, student_stats, teacher_stats, _ = output
        ctx.save_for_backward(student, teacher, agreement, student_stats, teacher_stats)
        ctx.partition_size = partition_size
        ctx.mark_non_differentiable(agreement, student_stats, teacher_stats)

    def _backward(ctx, grad_consistency, _agreement, _s_stats, _t_stats, grad_prob_sum):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        student, teacher, agreement, student_stats, teacher_stats = ctx.saved_tensors
        if grad_consistency is None:
            grad_consistency = agreement.new_zeros(())
        if grad_prob_sum is None:
            grad_prob_sum = agreement.new_zeros((agreement.shape[-1], ctx.partition_size))
        # Upstream gradients may arrive expanded (stride 0) or in another dtype; the
        # kernels take dense fp32 (no copy when they already are).
        grad_student = torch.ops.carp_fast.partition_softmax_backward(
            grad_consistency.float().contiguous(),
            grad_prob_sum.float().contiguous(),
            student,
            teacher,
            agreement,
            student_stats,
            teacher_stats,
            ctx.partition_size,
        )
        # The teacher is a target: no gradient, as in the reference (detached there).
        return grad_student, None, None

    torch.library.register_autograd(
        "carp_fast::partition_softmax_forward", _backward, setup_context=_setup_context
    )


def fused_carp_loss(
    student: torch.Tensor, teacher: torch.Tensor, partition_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(consistency, entropy)`` as fp32 scalars, the same function as ``reference_carp_loss``.

    ``student`` ``[Vs, B, G*P]`` and ``teacher`` ``[Vt, B, G*P]`` in fp32, bf16 or fp16
    (accumulation is fp32 throughout). Under ``torch.distributed`` the entropy uses the
    global batch: the ``[G, P]`` probability sum is all-reduced, not the probabilities.
    """
    if not is_available():
        raise RuntimeError(f"the fused CARP loss is not built: {_UNAVAILABLE_REASON}; {BUILD_HINT}")
    if not supports_device(student.device):
        raise RuntimeError(
            f"the fused CARP loss has no {student.device.type} kernels in this build (CPU always; "
            "CUDA when built with nvcc and a CUDA build of torch: "
            "`pip install --no-build-isolation -e .`)"
        )
    check_logits(student, teacher, partition_size)
    num_student, batch, _ = student.shape
    num_teacher = teacher.shape[0]

    consistency, _, _, _, local_sum = torch.ops.carp_fast.partition_softmax_forward(
        student.contiguous(), teacher.detach().contiguous(), partition_size
    )
    rows = (num_student + num_teacher) * batch * distributed.world_size()
    entropy = entropy_from_sum(global_probability_sum(local_sum), rows, partition_size)
    return consistency, entropy
