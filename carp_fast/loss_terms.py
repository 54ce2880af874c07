"""The parts of the CARP loss that the reference and the fused implementation share.

Both :func:`carp_fast.loss.reference_carp_loss` and :mod:`carp_fast.fused_loss` check their
logits here and compute the entropy term here, from the ``[G, P]`` probability sum, so the
cross-rank all-reduce of that sum exists once and autograd carries its gradient back into
either implementation.
"""

from __future__ import annotations

import torch

from carp_fast import distributed

# The clamp bound of both terms (float32's machine epsilon), as in the published loss.
EPS = torch.finfo(torch.float32).eps


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward hands each rank ``world_size`` times its gradient.

    Every rank computes the same entropy from the same reduced sum, so the upstream
    gradient is identical on all ranks and the true gradient of the sum (an all-reduce of
    the upstream gradients) is ``world_size * grad``: no second collective is needed. DDP
    then divides by ``world_size``, which leaves exactly the single-process gradient of
    the global-batch entropy.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.world_size = distributed.world_size()
        reduced = tensor.clone()
        distributed.all_reduce_sum(reduced)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * ctx.world_size


def global_probability_sum(local_sum: torch.Tensor) -> torch.Tensor:
    """All-reduce a ``[G, P]`` probability sum over ranks, differentiably (identity alone)."""
    if distributed.world_size() == 1:
        return local_sum
    return _AllReduceSum.apply(local_sum)


def check_logits(student: torch.Tensor, teacher: torch.Tensor, partition_size: int) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(
            f"logits must be [views, batch, G*P]; got student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[1:] != teacher.shape[1:]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits must "
            "agree in batch and prototype dimensions"
        )
    if partition_size < 1 or student.shape[-1] % partition_size != 0:
        raise ValueError(
            f"partition size {partition_size} does not divide the {student.shape[-1]} logit columns"
        )
    if student.shape[0] < 1 or teacher.shape[0] < 1:
        raise ValueError("need at least one student and one teacher view")
    if student.shape[0] == 1 and teacher.shape[0] == 1:
        raise ValueError("one student and one teacher view leave no pair i != j")


def entropy_from_sum(prob_sum: torch.Tensor, num_rows: int, partition_size: int) -> torch.Tensor:
    """Entropy term from the global ``[G, P]`` probability sum over ``num_rows`` rows."""
    mean_probs = prob_sum / num_rows
    neg_entropy = (mean_probs * torch.log(mean_probs.clamp(EPS, 1.0 - EPS))).sum(-1)
    return (neg_entropy + torch.log(torch.tensor(float(partition_size)))).mean()
