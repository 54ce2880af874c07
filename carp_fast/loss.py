"""The CARP objective: random partition draw and the partitioned softmax loss.

Notation (DESIGN.md): ``Vs`` student views, ``Vt`` teacher views, ``B`` images per
process, ``G`` groups of ``P`` prototypes each, ``K' = G * P``. Logits arrive already in
partition order: group ``g`` is columns ``[g*P, (g+1)*P)``, because the model applies the
partition permutation to its prototype rows (no logits gather anywhere).

For each group the logits go through a softmax over its ``P`` columns:
student probabilities ``p_i`` (view ``i``) and teacher probabilities ``q_j`` (view ``j``,
no gradient). Then

    consistency = mean_{i in S, j in T, i != j} mean_{b, g} -log clamp(<p_i, q_j>, eps, 1 - eps)
    entropy     = mean_g [ log P + sum_c pbar_gc * log clamp(pbar_gc, eps, 1 - eps) ]

where ``pbar_g`` averages the group's probabilities over every student and teacher row of
the *global* batch and ``eps`` is float32's machine epsilon. This is the published
objective value for value; every fast path is tested against :func:`reference_carp_loss`.
"""

from __future__ import annotations

import hashlib
import warnings

import torch

from carp_fast import distributed, fused_loss
from carp_fast.loss_terms import EPS, check_logits, entropy_from_sum, global_probability_sum

IMPLEMENTATIONS = ("auto", "reference", "fused")


def draw_partition(num_prototypes: int, partition_size: int, seed: int, step: int) -> torch.Tensor:
    """Random partition of the prototypes for one step, as a LongTensor ``[G, P]`` on CPU.

    ``G = num_prototypes // partition_size``; when ``partition_size`` does not divide
    ``num_prototypes`` the left-over prototypes sit out this step (as in the published
    draw of ``G * P`` indices without replacement). The draw is a pure function of its
    arguments, so every rank derives the same partition without a broadcast.
    """
    if partition_size < 1 or num_prototypes < partition_size:
        raise ValueError(
            f"cannot cut {num_prototypes} prototypes into groups of {partition_size}: "
            "need 1 <= partition_size <= num_prototypes"
        )
    # Hash (seed, step) so that neighbouring steps and seeds get unrelated streams.
    digest = hashlib.blake2b(f"carp-partition:{seed}:{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    num_groups = num_prototypes // partition_size
    order = torch.randperm(num_prototypes, generator=generator)
    return order[: num_groups * partition_size].view(num_groups, partition_size)


def reference_carp_loss(
    student: torch.Tensor, teacher: torch.Tensor, partition_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch CARP loss: the ground truth every other implementation is held to."""
    check_logits(student, teacher, partition_size)
    num_student, batch, width = student.shape
    num_teacher = teacher.shape[0]
    num_groups = width // partition_size
    p = torch.softmax(student.float().view(num_student, batch, num_groups, partition_size), -1)
    q = torch.softmax(
        teacher.detach().float().view(num_teacher, batch, num_groups, partition_size), -1
    )

    # <p_i, q_j> for every pair at once: [Vs, Vt, B, G].
    agreement = torch.einsum("ibgc,jbgc->ijbg", p, q)
    pair_loss = -torch.log(agreement.clamp(EPS, 1.0 - EPS)).mean(dim=(2, 3))
    off_diagonal = ~torch.eye(num_student, num_teacher, dtype=torch.bool, device=p.device)
    consistency = pair_loss[off_diagonal].mean()

    local_sum = p.sum(dim=(0, 1)) + q.sum(dim=(0, 1))
    rows = (num_student + num_teacher) * batch * distributed.world_size()
    entropy = entropy_from_sum(global_probability_sum(local_sum), rows, partition_size)
    return consistency, entropy


_warned_fallback = False


def carp_loss(
    student: torch.Tensor, teacher: torch.Tensor, partition_size: int, impl: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CARP loss on grouped logits; returns ``(consistency, entropy)`` as fp32 scalars.

    ``student`` is ``[Vs, B, G*P]``, ``teacher`` ``[Vt, B, G*P]`` (no gradient reaches
    it); views ``0..Vt-1`` of the student are the same crops as the teacher's, so pairs
    with ``i == j`` are skipped. ``impl`` is ``reference`` (plain PyTorch), ``fused``
    (the csrc/ extension) or ``auto`` (fused where built, else reference with a warning).
    Under ``torch.distributed`` the entropy uses the batch of all ranks.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "reference":
        return reference_carp_loss(student, teacher, partition_size)
    if impl == "fused":
        return fused_loss.fused_carp_loss(student, teacher, partition_size)
    if fused_loss.supports_device(student.device):
        return fused_loss.fused_carp_loss(student, teacher, partition_size)
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "loss_impl=auto: the fused CARP loss extension is not built "
            f"({fused_loss.unavailable_reason()}); using the reference implementation",
            stacklevel=2,
        )
    return reference_carp_loss(student, teacher, partition_size)
