"""dev/kernels/kernel_report.py: ptxas and SASS parsing, and a real compile where nvcc exists."""

import shutil

import pytest
from conftest import ROOT, load_tool

kernel_report = load_tool("kernel_report", ROOT / "dev" / "kernels")

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3twoPf' for 'sm_90'
ptxas info    : Function properties for _Z3twoPf
    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z3onePf' for 'sm_90'
ptxas info    : Function properties for _Z3onePf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 356 bytes cmem[0]
"""

SASS = """\
\tcode for sm_90
\t\tFunction : _Z3onePf
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000fe20000000800 */
        /*0010*/              @!P0 BRA 0x40 ;                              /* 0x0000000000008947 */
        /*0020*/                   FADD.FTZ R2, R2, R3 ;                   /* 0x0000000302027221 */
        /*0030*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0040*/                   SHFL.BFLY PT, R4, R2, 0x10, 0x1f ;      /* 0x0e001f0002047f89 */
        /*0050*/                   BRA 0x50;                               /* 0x0000000000007947 */
\t\t..........
\t\tFunction : _Z3twoPf
        /*0000*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def test_parse_ptxas_reads_each_kernels_registers_stack_and_spills():
    kernels = kernel_report.parse_ptxas(PTXAS)
    assert kernels["_Z3twoPf"] == {
        "arch": "sm_90",
        "stack_bytes": 8,
        "spill_store_bytes": 16,
        "spill_load_bytes": 12,
        "registers": 96,
    }
    assert kernels["_Z3onePf"]["registers"] == 12
    assert kernels["_Z3onePf"]["spill_store_bytes"] == 0


def test_parse_sass_counts_instructions_opcodes_and_the_path_before_the_last_exit():
    counts = kernel_report.parse_sass(SASS)
    one = counts["_Z3onePf"]
    assert one["instructions"] == 6
    assert one["before_last_exit"] == 4  # the shuffle's slow path after EXIT is left out
    assert one["opcodes"] == {"BRA": 2, "LDC": 1, "FADD": 1, "EXIT": 1, "SHFL": 1}
    assert counts["_Z3twoPf"] == {"instructions": 1, "before_last_exit": 1, "opcodes": {"EXIT": 1}}


STEPS = [
    "LDC R1, c[0x0][0x28]",
    "REDUX.MAX.S32 UR8, R61",
    "MOV R2, UR8",
    "@!P0 LDG.E.128 R28, desc[UR4][R60.64]",
    "REDUX.MAX.S32 UR8, R62",
    "FADD R2, R2, R3",
    "FADD R2, R2, R4",
    "@P1 REDUX.MAX.S32 UR8, R63",
    "EXIT",
]


def test_walk_steps_cuts_the_code_at_a_marker_opcode():
    steps = kernel_report.walk_steps(STEPS, "REDUX")
    assert [step["instructions"] for step in steps] == [3, 3]  # before the first, after the last: out
    assert steps[0]["opcodes"] == {"REDUX": 1, "MOV": 1, "LDG": 1}
    assert steps[1]["opcodes"] == {"FADD": 2, "REDUX": 1}
    # a prefix with modifiers, the predicate ignored; every second marker starts a step
    assert [s["instructions"] for s in kernel_report.walk_steps(STEPS, "REDUX.MAX", every=2)] == [6]
    assert kernel_report.walk_steps(STEPS, "LDG.E.128") == []  # one marker: no whole step
    assert kernel_report.walk_steps(STEPS, "RED.") == []  # a prefix of the full opcode, not a substring


def test_parse_sass_counts_steps_before_the_last_exit_only():
    counts = kernel_report.parse_sass(SASS, step_marker="BRA")
    # _Z3onePf: BRA at 1 and (after the last EXIT, so left out) at 5: no whole step before it
    assert counts["_Z3onePf"]["steps"] == []
    assert "steps" not in kernel_report.parse_sass(SASS)["_Z3onePf"]


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="no c++filt (binutils) on this machine")
def test_demangle_drops_namespaces_and_parameters():
    # void carp_fast::(anonymous namespace)::slice<16, c10::BFloat16>(float*)
    mangled = "_ZN9carp_fast12_GLOBAL__N_15sliceILi16EN3c108BFloat16EEEvPf"
    assert kernel_report.demangle(["_Z3onePf", mangled]) == {
        "_Z3onePf": "one",
        mangled: "slice<16, BFloat16>",
    }


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_report_compiles_a_kernel_and_reads_its_registers(tmp_path):
    source = tmp_path / "scale.cu"
    source.write_text(
        "__global__ void scale_kernel(float* x, float a, int n) {\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) x[i] *= a;\n"
        "}\n"
        "__global__ void other_kernel(float* x) { x[threadIdx.x] = 0.0f; }\n"
    )
    rows = kernel_report.report(source, "90", "nvcc", kernel_report.find_cuobjdump(None), "scale")
    assert list(rows) == ["scale_kernel"]
    assert rows["scale_kernel"]["registers"] > 0
    assert rows["scale_kernel"]["arch"] == "sm_90"
    assert rows["scale_kernel"]["spill_store_bytes"] == 0


def test_main_refuses_a_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kernel_report.main(["--source", str(tmp_path / "missing.cu")])
    assert "does not exist" in capsys.readouterr().err


def test_main_refuses_a_step_every_below_one(capsys):
    with pytest.raises(SystemExit):
        kernel_report.main(["--steps", "REDUX", "--step-every", "0"])
    assert "--step-every must be at least 1, got 0" in capsys.readouterr().err


def test_main_refuses_steps_without_cuobjdump(monkeypatch, capsys):
    monkeypatch.setattr(kernel_report, "find_cuobjdump", lambda given: None)
    monkeypatch.setattr(kernel_report.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(SystemExit):
        kernel_report.main(["--steps", "REDUX"])
    assert "--steps reads the SASS: it needs cuobjdump" in capsys.readouterr().err


def test_checkout_csrc_unpacks_a_commits_sources(tmp_path):
    if kernel_report._git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout")
    source, sha = kernel_report.checkout_csrc("HEAD", tmp_path)
    assert source == tmp_path / "csrc" / "partition_softmax_cuda.cu" and source.is_file()
    assert (tmp_path / "csrc" / "partition_softmax.h").is_file()
    assert len(sha) == 40


def test_main_refuses_an_unknown_revision(capsys):
    with pytest.raises(SystemExit, match="not a commit"):
        kernel_report.main(["--rev", "no-such-revision-anywhere"])
