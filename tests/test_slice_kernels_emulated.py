"""The slice CUDA kernels (csrc/slice_kernels.cuh), run on the CPU through a small emulation
of CUDA's built-ins (tests/emulation/cuda_on_cpu.h), against the fused op's CPU kernel.

The GPU tests in test_fused_loss.py are the real check of these kernels; they need a GPU.
These run everywhere and check what does not depend on the hardware: every output written,
the indexing of the walk across rows, images and chunks, the per-image stash, the warp
reductions and the gradient, on shapes that take each branch (idle warps, one or an odd
number of teacher views, more rows and pairs than a warp has lanes, several chunks),
columns masked with -inf, all of one lane's among them, and rows whose every value is
negative.
The emulation uses libm's exp and exact division, so results agree to rounding only.
"""

from pathlib import Path

import pytest
import torch
from conftest import needs_extension
from torch.utils import cpp_extension

pytestmark = [
    pytest.mark.slow,
    needs_extension,
    # make test installs it (the test extra); a bare environment may lack it.
    pytest.mark.skipif(
        not cpp_extension.is_ninja_available(), reason="ninja not found: pip install ninja"
    ),
]

ROOT = Path(__file__).resolve().parents[1]

# Tolerances against the CPU kernel: fp32 outputs (agreements, stats, S_g) to fp32 rounding;
# the gradient, rounded to the logits' dtype, to one unit in the last place of that dtype.
FP32 = dict(rtol=1e-5, atol=1e-7)
GRAD = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernels as an extension module: forward(...) and backward(...)."""
    build = tmp_path_factory.mktemp("slice_emulated")
    return cpp_extension.load(
        name="carp_fast_slice_emulated",
        sources=[str(ROOT / "tests" / "emulation" / "slice_kernels_emulated.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "emulation")],
        extra_cflags=["-O2", "-std=c++20", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        build_directory=str(build),
    )


def _logits(views, batch, groups, partition_size, dtype, scale):
    return (torch.randn(views, batch, groups * partition_size) * scale).to(dtype)


# (Vs, Vt, B, G, P, dtype, CARP_FAST_CUDA_SLICE_IMAGES, logit scale)
SHAPES = [
    pytest.param(8, 2, 3, 2, 512, torch.bfloat16, None, 3.0, id="published-views-bf16-idle-warp"),
    pytest.param(8, 2, 11, 2, 512, torch.float16, "3", 3.0, id="published-views-fp16-images-in-turn"),
    pytest.param(3, 2, 5, 3, 128, torch.float32, None, 3.0, id="uneven-images-per-warp"),
    pytest.param(2, 3, 13, 1, 256, torch.float16, "3", 3.0, id="odd-teachers-two-chunks-fp16"),
    pytest.param(4, 1, 9, 2, 1024, torch.float32, "1", 3.0, id="one-teacher-one-image-per-warp"),
    pytest.param(5, 4, 7, 2, 128, torch.bfloat16, "2", 3.0, id="two-teacher-pairs"),
    pytest.param(30, 5, 2, 1, 128, torch.float32, None, 3.0, id="more-rows-and-pairs-than-lanes"),
    pytest.param(3, 2, 4, 2, 128, torch.float32, None, 40.0, id="peaked-agreements-clamped"),
]


@pytest.mark.parametrize("vs, vt, batch, groups, partition_size, dtype, images, scale", SHAPES)
def test_emulated_slice_kernels_match_the_cpu_kernel(
    emulated, monkeypatch, vs, vt, batch, groups, partition_size, dtype, images, scale
):
    if images is None:
        monkeypatch.delenv("CARP_FAST_CUDA_SLICE_IMAGES", raising=False)
    else:
        monkeypatch.setenv("CARP_FAST_CUDA_SLICE_IMAGES", images)
    student = _logits(vs, batch, groups, partition_size, dtype, scale)
    teacher = _logits(vt, batch, groups, partition_size, dtype, scale)
    _check_against_the_cpu_kernel(emulated, student, teacher, partition_size, clamped=scale > 10)


def test_emulated_slice_kernels_give_masked_columns_zero_probability(emulated, monkeypatch):
    # -inf in every column that lane 0 loads (its 16-byte pieces: columns c with
    # (c // piece) % 32 == 0), and in a few others: a lane whose values are all -inf must
    # contribute probability 0, as exp(-inf - m) = 0 does in the CPU kernel.
    monkeypatch.delenv("CARP_FAST_CUDA_SLICE_IMAGES", raising=False)
    dtype, partition_size, groups = torch.bfloat16, 512, 2
    piece = min(16 // torch.empty(0, dtype=dtype).element_size(), partition_size // 32)
    columns = torch.arange(groups * partition_size)
    masked = ((columns % partition_size) // piece) % 32 == 0
    masked |= columns % 37 == 5
    student = _logits(8, 3, groups, partition_size, dtype, 3.0)
    teacher = _logits(2, 3, groups, partition_size, dtype, 3.0)
    student[..., masked] = float("-inf")
    teacher[..., masked] = float("-inf")
    got = _check_against_the_cpu_kernel(emulated, student, teacher, partition_size, clamped=False)
    prob_sum = got[3].flatten()
    assert torch.equal(prob_sum[masked], torch.zeros_like(prob_sum[masked]))


def test_emulated_slice_kernels_take_rows_of_negative_logits(emulated, monkeypatch):
    # Every value of some rows negative (their max too), others straddling zero: a warp max
    # that orders floats by their bits must still find each row's max exactly.
    monkeypatch.delenv("CARP_FAST_CUDA_SLICE_IMAGES", raising=False)
    slice_index = torch.arange(4)[:, None] * 2 + torch.arange(2)  # [image, group]
    shift = torch.tensor([-60.0, -2.5, 0.0])[slice_index % 3].repeat_interleave(256, dim=-1)
    student = (_logits(5, 4, 2, 256, torch.float32, 3.0) + shift).contiguous()
    teacher = (_logits(2, 4, 2, 256, torch.float32, 3.0) + shift).contiguous()
    got = _check_against_the_cpu_kernel(emulated, student, teacher, 256, clamped=False)
    assert (got[1][..., 0] < 0).any() and (got[1][..., 0] > 0).any()


def _check_against_the_cpu_kernel(emulated, student, teacher, partition_size, clamped):
    """Every forward output and the gradient of the emulated kernels against the CPU
    kernel's; returns the emulated forward outputs."""
    dtype, groups = student.dtype, student.shape[-1] // partition_size
    got = emulated.forward(student, teacher, partition_size)
    _, *want = torch.ops.carp_fast.partition_softmax_forward(student, teacher, partition_size)
    for name, g, w in zip(("agreement", "student_stats", "teacher_stats", "prob_sum"), got, want):
        assert not g.isnan().any(), f"{name}: the emulated kernel left entries unwritten"
        torch.testing.assert_close(g, w, **FP32, msg=lambda m, name=name: f"{name}: {m}")
    # The row maxima are maxima of the same numbers: exact.
    assert torch.equal(got[1][..., 0], want[1][..., 0])
    assert torch.equal(got[2][..., 0], want[2][..., 0])
    if clamped:
        assert (want[0] < 1.2e-7).any(), "the shape meant to reach the clamp did not"

    agreement, student_stats, teacher_stats = want[0], want[1], want[2]
    grad_consistency = torch.tensor(0.7)
    grad_prob_sum = torch.randn(groups, partition_size)
    args = (
        grad_consistency,
        grad_prob_sum,
        student,
        teacher,
        agreement,
        student_stats,
        teacher_stats,
        partition_size,
    )
    grad = emulated.backward(*args)
    grad_want = torch.ops.carp_fast.partition_softmax_backward(*args)
    assert grad.dtype == dtype and not grad.isnan().any()
    tolerance = dict(GRAD[dtype])
    if clamped:
        # Agreements just above the clamp get weights of order 1 / eps, which amplify the
        # rounding differences between libm's exp and the CPU kernel's vectorised one: hold
        # the gradient to 1e-4 of its largest entry there.
        tolerance["atol"] = 1e-4 * grad_want.abs().max().item()
    torch.testing.assert_close(grad.float(), grad_want.float(), **tolerance)
    return got


def test_emulated_slice_kernels_refuse_a_bad_images_setting(emulated, monkeypatch):
    monkeypatch.setenv("CARP_FAST_CUDA_SLICE_IMAGES", "0")
    student = _logits(2, 2, 1, 128, torch.float32, 1.0)
    with pytest.raises(
        RuntimeError, match="CARP_FAST_CUDA_SLICE_IMAGES must be a positive integer"
    ):
        emulated.forward(student, student[:1].contiguous(), 128)
