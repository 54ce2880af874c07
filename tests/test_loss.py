"""The reference objective against a direct, loop-by-loop transcription of the maths."""

import math

import pytest
import torch

from carp_fast.loss import EPS, carp_loss, draw_partition


def direct_formula(student, teacher, partition_size):
    """DESIGN.md's definitions, one pair and one group at a time, in float64."""
    vs, batch, width = student.shape
    vt = teacher.shape[0]
    groups = width // partition_size
    s = student.double().view(vs, batch, groups, partition_size).softmax(-1)
    t = teacher.double().view(vt, batch, groups, partition_size).softmax(-1)
    pair_terms = []
    for i in range(vs):
        for j in range(vt):
            if i == j:
                continue
            total = 0.0
            for b in range(batch):
                for g in range(groups):
                    inner = float((s[i, b, g] * t[j, b, g]).sum())
                    total += -math.log(min(max(inner, EPS), 1 - EPS))
            pair_terms.append(total / (batch * groups))
    consistency = sum(pair_terms) / len(pair_terms)
    rows = torch.cat([s.reshape(-1, groups, partition_size), t.reshape(-1, groups, partition_size)])
    mean = rows.mean(0)
    entropy = 0.0
    for g in range(groups):
        entropy += math.log(partition_size) + float((mean[g] * mean[g].clamp(EPS, 1 - EPS).log()).sum())
    return consistency, entropy / groups


@pytest.mark.parametrize(
    "vs,vt,batch,groups,partition_size",
    [(2, 2, 3, 1, 7), (5, 2, 3, 3, 24), (3, 1, 2, 4, 5), (8, 2, 4, 2, 16)],
)
def test_reference_matches_direct_formula(vs, vt, batch, groups, partition_size):
    student = torch.randn(vs, batch, groups * partition_size) * 3
    teacher = student[:vt].detach() + 0.5 * torch.randn(vt, batch, groups * partition_size)
    consistency, entropy = carp_loss(student, teacher, partition_size, impl="reference")
    want_c, want_h = direct_formula(student, teacher, partition_size)
    assert consistency.dtype == entropy.dtype == torch.float32
    assert consistency.item() == pytest.approx(want_c, rel=1e-5)
    assert entropy.item() == pytest.approx(want_h, rel=1e-4, abs=1e-6)


def test_reference_gradient_matches_float64_autograd():
    torch.manual_seed(3)
    student = (torch.randn(4, 3, 2 * 9) * 2).requires_grad_()
    teacher = torch.randn(2, 3, 2 * 9)
    c, h = carp_loss(student, teacher, 9, impl="reference")
    (0.7 * c + 1.3 * h).backward()

    s64 = student.detach().double().requires_grad_()
    vs, batch, width = s64.shape
    p = s64.view(vs, batch, 2, 9).softmax(-1)
    q = teacher.double().view(2, batch, 2, 9).softmax(-1)
    pairs = [
        -torch.log(torch.einsum("bgc,bgc->bg", p[i], q[j]).clamp(EPS, 1 - EPS)).mean()
        for i in range(vs) for j in range(2) if i != j
    ]
    c64 = torch.stack(pairs).mean()
    mean = torch.cat([p.reshape(-1, 2, 9), q.reshape(-1, 2, 9)]).mean(0)
    h64 = (math.log(9) + (mean * mean.clamp(EPS, 1 - EPS).log()).sum(-1)).mean()
    (0.7 * c64 + 1.3 * h64).backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_gradient():
    student = torch.randn(3, 2, 8, requires_grad=True)
    teacher = torch.randn(2, 2, 8, requires_grad=True)
    c, h = carp_loss(student, teacher, 4, impl="reference")
    (c + h).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_clamped_agreement_gives_finite_loss_and_zero_consistency_gradient():
    # Opposite one-hot-like groups: <p, q> underflows below eps, so the clamp is active.
    student = torch.zeros(2, 1, 4)
    student[..., 0] = 200.0
    teacher = torch.zeros(2, 1, 4)
    teacher[..., 3] = 200.0
    student.requires_grad_()
    c, _ = carp_loss(student, teacher, 4, impl="reference")
    assert c.item() == pytest.approx(-math.log(EPS), rel=1e-6)
    c.backward()
    assert torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize(
    "student_shape,teacher_shape,group,message",
    [
        ((2, 3, 10), (2, 3, 10), 4, "does not divide"),
        ((2, 3, 8), (2, 4, 8), 4, "must agree"),
        ((2, 8), (2, 3, 8), 4, "must be"),
        ((1, 3, 8), (1, 3, 8), 4, "no pair"),
    ],
)
def test_impossible_shapes_are_named(student_shape, teacher_shape, group, message):
    with pytest.raises(ValueError, match=message):
        carp_loss(torch.randn(student_shape), torch.randn(teacher_shape), group, impl="reference")


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown loss impl"):
        carp_loss(torch.randn(2, 1, 4), torch.randn(2, 1, 4), 4, impl="fast")


def test_partition_is_a_pure_function_of_its_arguments():
    a = draw_partition(1000, 100, seed=7, step=3)
    b = draw_partition(1000, 100, seed=7, step=3)
    assert a.dtype == torch.int64 and a.shape == (10, 100)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_partition(1000, 100, seed=7, step=4))
    assert not torch.equal(a, draw_partition(1000, 100, seed=8, step=3))


def test_partition_covers_every_prototype_exactly_once():
    part = draw_partition(4096, 512, seed=0, step=11)
    assert torch.equal(part.flatten().sort().values, torch.arange(4096))


def test_partition_with_remainder_drops_the_tail_without_repeats():
    part = draw_partition(1000, 300, seed=1, step=0)
    assert part.shape == (3, 300)
    assert part.unique().numel() == 900
    # Over many steps every prototype gets its turn.
    seen = torch.cat([draw_partition(1000, 300, 1, s).flatten() for s in range(20)])
    assert seen.unique().numel() == 1000


def test_partition_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot cut"):
        draw_partition(100, 200, 0, 0)
