"""The fused CARP loss (csrc/ via carp_fast.fused_loss) against the reference implementation.

Tolerances: fp32 values and gradients to 1e-5 relative (gradients relative to their
largest entry, since single entries can be arbitrarily small); bf16/fp16 inputs: the fused
error against an fp32 reference on the full-precision logits may be at most twice the
reference's own error on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_extension
from spawn import run_ranks

from carp_fast import fused_loss
from carp_fast.loss import EPS, carp_loss


# (Vs, Vt, B, G, P): odd batch; partition sizes below, at and across the vector and unrolled
# block widths of both CPU kernel builds (7, 24, 100); G = 1 and G > 1; Vs > Vt, Vs = Vt and
# one student against two teachers; 2, 3 and 5 teacher views (5 takes the kernels' generic
# path, fewer the register-accumulator one).
SHAPES = [
    (3, 2, 3, 1, 7),
    (4, 2, 3, 5, 24),
    (2, 2, 3, 3, 24),
    (8, 2, 3, 2, 100),
    (1, 2, 3, 4, 7),
    (4, 3, 3, 2, 7),
    (6, 5, 2, 2, 24),
]


@pytest.fixture(params=["best", "portable"])
def cpu_kernels(request, monkeypatch):
    """Runs a test on the CPU's widest kernels and on the portable 4-lane ones."""
    if request.param == "portable":
        monkeypatch.setenv("CARP_FAST_CPU_KERNELS", "portable")
    return request.param


def _logits(vs, vt, b, g, p, device="cpu", scale=3.0):
    student = torch.randn(vs, b, g * p, device=device) * scale
    teacher = torch.randn(vt, b, g * p, device=device) * scale
    return student, teacher


def _loss_and_grad(impl, student, teacher, partition_size, weights=(0.7, 1.3)):
    """(consistency, entropy, d(w0*c + w1*h)/d student) for one implementation."""
    student = student.detach().clone().requires_grad_(True)
    consistency, entropy = carp_loss(student, teacher, partition_size, impl=impl)
    (weights[0] * consistency + weights[1] * entropy).backward()
    return consistency.detach(), entropy.detach(), student.grad


def _assert_grad_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def _assert_compiled_matches_eager(step, student, teacher):
    """torch.compile(step, fullgraph=True) gives eager's loss and student gradient (fp32, 1e-6)."""
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        s = student.clone().requires_grad_(True)
        loss = fn(s, teacher)
        loss.backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    _assert_grad_close(results[1][1], results[0][1], rel=1e-6)


@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weights", [(0.7, 1.3), (1.0, 0.0), (0.0, 1.0)], ids=["both", "c", "h"])
def test_matches_reference_fp32(shape, weights, cpu_kernels):
    student, teacher = _logits(*shape)
    c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, shape[-1], weights)
    c, h, g = _loss_and_grad("fused", student, teacher, shape[-1], weights)
    assert c.dtype == h.dtype == torch.float32 and c.dim() == h.dim() == 0
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_ref)


def _half_precision_errors(device, dtype, shape=(4, 2, 3, 3, 24)):
    """Errors of reference and fused on `dtype` logits, against fp32 on the exact logits."""
    student, teacher = _logits(*shape, device=device)
    p = shape[-1]
    truth = _loss_and_grad("reference", student, teacher, p)
    low_s, low_t = student.to(dtype), teacher.to(dtype)
    errors = {}
    for impl in ("reference", "fused"):
        c, h, g = _loss_and_grad(impl, low_s, low_t, p)
        assert g.dtype == dtype
        errors[impl] = (
            (c - truth[0]).abs().item(),
            (h - truth[1]).abs().item(),
            (g.float() - truth[2]).norm().item(),
        )
    return errors


def _assert_within_twice_reference(errors):
    for name, ref_err, fused_err in zip(
        ("consistency", "entropy", "grad"), *errors.values(), strict=True
    ):
        # A floor of fp32 rounding, for the case where the rounded inputs happen to land
        # the reference on the exact value.
        assert fused_err <= 2 * ref_err + 1e-6, (name, fused_err, ref_err)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_bounded_by_reference(dtype, cpu_kernels):
    _assert_within_twice_reference(_half_precision_errors("cpu", dtype))


@needs_extension
def test_mixed_dtypes_accepted():
    student, teacher = _logits(3, 2, 3, 2, 24)
    c_ref, h_ref, _ = _loss_and_grad("reference", student, teacher.bfloat16(), 24)
    c, h, g = _loss_and_grad("fused", student, teacher.bfloat16(), 24)
    assert g.dtype == torch.float32
    torch.testing.assert_close((c, h), (c_ref, h_ref), rtol=1e-5, atol=1e-7)


@needs_extension
def test_clamp_region_gives_zero_consistency_gradient(cpu_kernels):
    # Images 0-1: student and teacher peaked on different prototypes (agreement ~ 0,
    # clamped to eps); image 2: peaked on the same one (agreement ~ 1, clamped to 1 - eps);
    # image 3: ordinary logits. Only image 3 may get a consistency gradient.
    vs, vt, b, g, p = 3, 2, 4, 2, 7
    student, teacher = _logits(vs, vt, b, g, p, scale=1.0)
    for img, (s_col, t_col) in enumerate([(0, 3), (5, 1), (2, 2)]):
        student[:, img] = -60.0
        teacher[:, img] = -60.0
        student[:, img, s_col::p] = 60.0
        teacher[:, img, t_col::p] = 60.0

    agreement = torch.ops.carp_fast.partition_softmax_forward(student, teacher, p)[1]
    assert (agreement[:, :, :2] < EPS).all() and (agreement[:, :, 2] > 1 - EPS).all()

    for weights in [(1.0, 0.0), (0.7, 1.3)]:
        c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, p, weights)
        c, h, grad = _loss_and_grad("fused", student, teacher, p, weights)
        torch.testing.assert_close((c, h), (c_ref, h_ref), rtol=1e-5, atol=1e-7)
        _assert_grad_close(grad, g_ref)
        if weights[1] == 0.0:
            assert torch.count_nonzero(grad[:, :3]) == 0
            assert torch.count_nonzero(grad[:, 3]) > 0


@needs_extension
def test_teacher_gets_no_gradient():
    student, teacher = _logits(3, 2, 3, 2, 24)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    consistency, entropy = carp_loss(student, teacher, 24, impl="fused")
    (consistency + entropy).backward()
    assert teacher.grad is None and student.grad is not None


@needs_extension
@pytest.mark.parametrize("term", [0, 1], ids=["consistency_only", "entropy_only"])
def test_backward_through_one_term(term):
    # The other output gets no gradient at all (None, not zeros) in this graph.
    student, teacher = _logits(4, 2, 3, 2, 24)
    grads = []
    for impl in ("reference", "fused"):
        s = student.clone().requires_grad_(True)
        carp_loss(s, teacher, 24, impl=impl)[term].backward()
        grads.append(s.grad)
    _assert_grad_close(grads[1], grads[0])


@needs_extension
def test_nan_logit_gives_nan_loss():
    student, teacher = _logits(3, 2, 3, 2, 24)
    student[1, 2, 30] = float("nan")
    consistency, entropy = carp_loss(student, teacher, 24, impl="fused")
    assert torch.isnan(consistency) and torch.isnan(entropy)


@needs_extension
def test_deterministic_across_runs_and_thread_counts(cpu_kernels):
    student, teacher = _logits(8, 2, 5, 3, 100)
    first = _loss_and_grad("fused", student, teacher, 100)
    again = _loss_and_grad("fused", student, teacher, 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _loss_and_grad("fused", student, teacher, 100)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_extension
def test_opcheck_forward_and_backward():
    student, teacher = _logits(3, 2, 3, 2, 24)
    student.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.carp_fast.partition_softmax_forward.default, (student, teacher, 24)
    )

    _, agreement, s_stats, t_stats, prob_sum = torch.ops.carp_fast.partition_softmax_forward(
        student.detach(), teacher, 24
    )
    args = (
        torch.tensor(0.7),
        torch.randn_like(prob_sum),
        student.detach(),
        teacher,
        agreement,
        s_stats,
        t_stats,
        24,
    )
    torch.library.opcheck(torch.ops.carp_fast.partition_softmax_backward.default, args)


@needs_extension
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    student, teacher = _logits(4, 2, 3, 3, 24)

    def step(s, t):
        consistency, entropy = carp_loss(s, t, 24, impl="fused")
        return 0.7 * consistency + 1.3 * entropy

    _assert_compiled_matches_eager(step, student, teacher)


@needs_extension
def test_input_errors_are_clear():
    student, teacher = _logits(3, 2, 3, 2, 24)
    op = torch.ops.carp_fast.partition_softmax_forward
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16, got Double"):
        op(student.double(), teacher, 24)
    with pytest.raises(RuntimeError, match="teacher logits must be contiguous"):
        op(student, teacher.transpose(0, 1).contiguous().transpose(0, 1), 24)
    with pytest.raises(RuntimeError, match="partition size 5 does not divide the 48 logit columns"):
        op(student, teacher, 5)
    with pytest.raises(RuntimeError, match="must agree in batch and prototype dimensions"):
        op(student, teacher[:, :2].contiguous(), 24)
    with pytest.raises(RuntimeError, match=r"must be \[views, batch, G\*P\]"):
        op(student[0], teacher, 24)
    # Through the public entry point: the shared Python check speaks first.
    with pytest.raises(ValueError, match="does not divide"):
        carp_loss(student, teacher, 5, impl="fused")


@needs_extension
def test_non_contiguous_logits_through_public_entry_point():
    student, teacher = _logits(3, 2, 3, 2, 24)
    student_t = student.transpose(0, 1).contiguous().transpose(0, 1)
    c, h, g = _loss_and_grad("fused", student_t, teacher, 24)
    c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, 24)
    torch.testing.assert_close((c, h), (c_ref, h_ref), rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_ref)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(fused_loss, "_UNAVAILABLE_REASON", "carp_fast._C could not be imported")
    assert not fused_loss.is_available()
    assert "could not be imported" in fused_loss.unavailable_reason()
    student, teacher = _logits(3, 2, 3, 2, 24)
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        fused_loss.fused_carp_loss(student, teacher, 24)


@needs_extension
def test_device_without_kernels_is_refused_clearly():
    assert fused_loss.supports_device("cpu")
    student, teacher = _logits(3, 2, 3, 2, 24)
    with pytest.raises(RuntimeError, match="has no meta kernels in this build"):
        fused_loss.fused_carp_loss(student.to("meta"), teacher.to("meta"), 24)


# ---- Two CPU processes (gloo), each with half the batch -------------------------------

_DDP_SHAPE = (4, 2, 6, 3, 24)  # Vs, Vt, B (global), G, P


def _ddp_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    vs, vt, b, g, p = _DDP_SHAPE
    student, teacher = _logits(vs, vt, b, g, p)
    rows = slice(rank * b // world, (rank + 1) * b // world)
    local = student[:, rows].clone().requires_grad_(True)
    consistency, entropy = carp_loss(local, teacher[:, rows].contiguous(), p, impl="fused")
    (0.7 * consistency + 1.3 * entropy).backward()
    return {"consistency": consistency.detach(), "entropy": entropy.detach(), "grad": local.grad}


@needs_extension
def test_two_process_gloo_matches_single_process():
    world = 2
    ranks = run_ranks(_ddp_rank, world)

    torch.manual_seed(0)
    vs, vt, b, g, p = _DDP_SHAPE
    student, teacher = _logits(vs, vt, b, g, p)
    c_full, h_full, g_full = _loss_and_grad("reference", student, teacher, p)

    # Each rank's consistency is the mean over its images; equal shards average to the
    # global one. The entropy is global on every rank.
    torch.testing.assert_close(
        sum(r["consistency"] for r in ranks) / world, c_full, rtol=1e-5, atol=0
    )
    for r in ranks:
        torch.testing.assert_close(r["entropy"], h_full, rtol=1e-5, atol=1e-7)
    # DDP averages gradients over ranks, so rank r's logit gradient / world is the
    # single-process gradient of its rows.
    grad = torch.cat([r["grad"] for r in ranks], dim=1) / world
    _assert_grad_close(grad, g_full)


# ---- GPU ------------------------------------------------------------------------------

# Partition sizes 128-1024 take the slice kernels (a warp walks whole (image, group) slices) or,
# with CARP_FAST_CUDA_KERNELS=warp, the row-per-warp kernels; the others take the blocked
# ones. One choice serves a call's forward and backward (choose_layout in
# partition_softmax_cuda.cu). Some shapes cross the faster kernels' limits (P = 4096; 18 rows;
# Vt = 3 at P = 1024 overflows the slice kernels' shared memory), so they take a slower
# layout; batch 5 leaves some of the slice kernels' warps idle; 66 rows (64 students) is many
# views.
CUDA_SHAPES = SHAPES + [
    (3, 2, 3, 1, 128),
    (2, 2, 3, 3, 256),
    (1, 2, 3, 2, 128),
    (8, 2, 5, 4, 512),
    (3, 2, 3, 2, 1024),
    (4, 3, 2, 2, 1024),
    (6, 5, 2, 2, 256),
    (3, 2, 2, 2, 4096),
    (16, 2, 2, 1, 128),
    (64, 2, 2, 1, 128),
]


@pytest.fixture(params=["auto", "warp", "blocked"])
def cuda_kernels(request, monkeypatch):
    """Runs a test on each CUDA layout: auto (slice kernels where they apply), warp, blocked."""
    monkeypatch.setenv("CARP_FAST_CUDA_KERNELS", request.param)
    return request.param


@needs_extension
@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_reference_fp32(shape, cuda_kernels):
    student, teacher = _logits(*shape, device="cuda")
    c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, shape[-1])
    c, h, g = _loss_and_grad("fused", student, teacher, shape[-1])
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_ref)


@needs_extension
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("partition_size", [24, 128, 256])
@pytest.mark.parametrize("views", [(4, 2), (3, 3)], ids=["vt2", "vt3"])
def test_cuda_half_precision_error_bounded_by_reference(dtype, partition_size, views, cuda_kernels):
    # Two teacher views (the published recipe) and three: kernels may be compiled for the
    # first and read Vt at run time for the other.
    shape = (*views, 3, 3, partition_size)
    _assert_within_twice_reference(_half_precision_errors("cuda", dtype, shape))


@needs_extension
@pytest.mark.cuda
def test_cuda_deterministic_and_agrees_with_cpu(cuda_kernels):
    student, teacher = _logits(8, 2, 16, 8, 512, device="cuda")
    first = _loss_and_grad("fused", student, teacher, 512)
    again = _loss_and_grad("fused", student, teacher, 512)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    on_cpu = _loss_and_grad("fused", student.cpu(), teacher.cpu(), 512)
    torch.testing.assert_close(first[0].cpu(), on_cpu[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(first[1].cpu(), on_cpu[1], rtol=1e-5, atol=1e-7)
    _assert_grad_close(first[2].cpu(), on_cpu[2])


@needs_extension
@pytest.mark.cuda
@pytest.mark.parametrize("partition_size", [24, 128])
def test_cuda_clamp_region_and_opcheck(partition_size, cuda_kernels):
    p = partition_size
    student, teacher = _logits(3, 2, 3, 2, p, device="cuda")
    student[:, 0] = -60.0
    student[:, 0, 0::p] = 60.0
    teacher[:, 0] = -60.0
    teacher[:, 0, 5::p] = 60.0
    c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, p)
    c, h, g = _loss_and_grad("fused", student, teacher, p)
    torch.testing.assert_close((c, h), (c_ref, h_ref), rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_ref)
    torch.library.opcheck(
        torch.ops.carp_fast.partition_softmax_forward.default,
        (student.requires_grad_(True), teacher, p),
    )


@needs_extension
@pytest.mark.cuda
def test_cuda_bf16_kernels_agree_at_the_published_shape(monkeypatch):
    # The three CUDA layouts sum in different orders; at the published partition size and bf16
    # logits they must still agree to fp32 rounding, and write every gradient entry.
    student, teacher = _logits(8, 2, 64, 16, 512, device="cuda")
    student, teacher = student.bfloat16(), teacher.bfloat16()
    results = {}
    for kernels in ("slice", "warp", "blocked"):
        monkeypatch.setenv("CARP_FAST_CUDA_KERNELS", kernels)
        results[kernels] = _loss_and_grad("fused", student, teacher, 512)
    c_b, h_b, g_b = results["blocked"]
    for kernels in ("slice", "warp"):
        c, h, g = results[kernels]
        assert torch.isfinite(g.float()).all(), kernels
        torch.testing.assert_close(c, c_b, rtol=1e-5, atol=0)
        torch.testing.assert_close(h, h_b, rtol=1e-5, atol=1e-7)
        # bf16 gradients: one rounding of the same fp32 value, so at most one bf16 ulp apart.
        torch.testing.assert_close(
            g.float(), g_b.float(), rtol=2**-7, atol=1e-3 * g_b.float().abs().max().item()
        )


@needs_extension
@pytest.mark.cuda
@pytest.mark.parametrize("images_per_warp", ["1", "3", "64"])
def test_cuda_slice_kernels_any_images_per_warp(images_per_warp, monkeypatch):
    # The slice kernels' grid (images per warp, hence chunks of the batch and idle warps)
    # changes only the order of the fp32 sums.
    monkeypatch.setenv("CARP_FAST_CUDA_KERNELS", "slice")
    student, teacher = _logits(5, 2, 37, 3, 256, device="cuda")
    c_ref, h_ref, g_ref = _loss_and_grad("reference", student, teacher, 256)
    monkeypatch.setenv("CARP_FAST_CUDA_SLICE_IMAGES", images_per_warp)
    c, h, g = _loss_and_grad("fused", student, teacher, 256)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_ref)


@needs_extension
@pytest.mark.cuda
def test_cuda_misaligned_and_mixed_dtype_logits_take_other_kernels():
    # The slice kernels need 16-byte aligned rows of one dtype. Logits that start one element
    # into their storage go to another layout: the ops are called directly, since the loss
    # function's callers (and _loss_and_grad's clone) would hand over fresh, aligned memory.
    ops = torch.ops.carp_fast
    student, teacher = _logits(3, 2, 4, 2, 512, device="cuda")
    storage = torch.empty(student.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(student).copy_(student)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    aligned_out = ops.partition_softmax_forward(student, teacher, 512)
    shifted_out = ops.partition_softmax_forward(shifted, teacher, 512)
    for a, s in zip(aligned_out, shifted_out, strict=True):
        torch.testing.assert_close(s, a, rtol=1e-5, atol=1e-7)
    _, agreement, student_stats, teacher_stats, prob_sum = aligned_out
    grad_consistency, grad_prob_sum = torch.tensor(0.7, device="cuda"), prob_sum * 0.1 - 0.3
    grads = [
        ops.partition_softmax_backward(grad_consistency, grad_prob_sum, logits, teacher,
                                       agreement, student_stats, teacher_stats, 512)
        for logits in (student, shifted)
    ]
    _assert_grad_close(grads[1], grads[0])

    # A bf16 student with an fp32 teacher: against the reference on the same (exact) values.
    low = student.bfloat16()
    c, h, g = _loss_and_grad("fused", low, teacher, 512)
    c_ref, h_ref, g_ref = _loss_and_grad("reference", low.float(), teacher, 512)
    torch.testing.assert_close((c, h), (c_ref, h_ref), rtol=1e-5, atol=1e-7)
    assert g.dtype == torch.bfloat16
    # One bf16 rounding of the fp32 gradient.
    torch.testing.assert_close(
        g.float(), g_ref, rtol=2**-7, atol=1e-3 * g_ref.abs().max().item()
    )


@needs_extension
@pytest.mark.cuda
@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("CARP_FAST_CUDA_KERNELS", "fastest", "must be auto, slice, warp or blocked"),
        ("CARP_FAST_CUDA_SLICE_IMAGES", "0", "must be a positive integer"),
    ],
)
def test_cuda_kernel_settings_are_checked(variable, value, message, monkeypatch):
    monkeypatch.setenv(variable, value)
    student, teacher = _logits(2, 2, 3, 2, 256, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        carp_loss(student, teacher, 256, impl="fused")


@needs_extension
@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    student, teacher = _logits(8, 2, 4, 4, 512, device="cuda")

    def step(s, t):
        consistency, entropy = carp_loss(s, t, 512, impl="fused")
        return consistency + entropy

    _assert_compiled_matches_eager(step, student, teacher)
