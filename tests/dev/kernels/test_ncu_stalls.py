"""dev/kernels/ncu_stalls.py: Nsight Compute's source page summarised per kernel."""

import pytest
from conftest import ROOT, load_tool

ncu_stalls = load_tool("ncu_stalls", ROOT / "dev" / "kernels")

ALL = "Warp Stall Sampling (All Samples)"
NOT_ISSUED = "Warp Stall Sampling (Not-issued Samples)"
LONG = "smsp__pcsamp_warps_issue_stalled_long_scoreboard"
SHORT = "smsp__pcsamp_warps_issue_stalled_short_scoreboard"
LONG_NOT_ISSUED = "smsp__pcsamp_warps_issue_stalled_long_scoreboard_not_issued"

# Two kernels as the source page prints them: a row naming the kernel, a header, one row per
# SASS instruction; counts with thousands separators, a blank cell, and a predicated branch.
SOURCE_PAGE = f'''\
"forward_slice_kernel<16, BFloat16, 2>"
"Address","Source","{ALL}","{NOT_ISSUED}","{LONG}","{SHORT}","{LONG_NOT_ISSUED}","Instructions Executed"
"0x7f00","      LDG.E.128 R28, desc[UR4][R60.64] ;","5","4","0","0","4","120"
"0x7f10","      SHFL.BFLY PT, R64, R62, 0x10, 0x1f ;","1,200","1,000","0","1,100","0","300"
"0x7f20","      FADD.FTZ R65, R62, R64 ;","2,050","2,000","2,000","50","2,000","300"
"0x7f30","      @!P0 BRA 0x2c00 ;","","","","","","300"
"backward_slice_kernel<16, BFloat16>"
"Address","Source","{ALL}","{NOT_ISSUED}","{LONG}","{SHORT}","{LONG_NOT_ISSUED}","Instructions Executed"
"0x8000","      STG.E.128 desc[UR4][R2.64], R4 ;","7","7","7","0","7","64"
'''


def test_parse_source_page_reads_each_kernels_instructions_and_reasons():
    kernels = ncu_stalls.parse_source_page(SOURCE_PAGE)
    assert [k["kernel"] for k in kernels] == [
        "forward_slice_kernel<16, BFloat16, 2>",
        "backward_slice_kernel<16, BFloat16>",
    ]
    forward = kernels[0]["instructions"]
    assert [i["samples"] for i in forward] == [5, 1200, 2050, 0]
    assert forward[2]["source"] == "FADD.FTZ R65, R62, R64 ;"
    # the _not_issued variant is not a reason of its own; zero counts are dropped
    assert forward[2]["reasons"] == {"long_scoreboard": 2000, "short_scoreboard": 50}
    assert forward[3]["reasons"] == {}
    assert kernels[1]["instructions"][0]["reasons"] == {"long_scoreboard": 7}


def test_summarize_ranks_instructions_and_groups_by_opcode_and_reason():
    forward = ncu_stalls.parse_source_page(SOURCE_PAGE)[0]
    summary = ncu_stalls.summarize(forward, top=2)
    assert summary["samples"] == 5 + 1200 + 2050
    assert [i["address"] for i in summary["top"]] == ["0x7f20", "0x7f10"]
    assert summary["opcodes"] == {"FADD": 2050, "SHFL": 1200, "LDG": 5, "BRA": 0}
    assert summary["reasons"] == {"long_scoreboard": 2000, "short_scoreboard": 1150}
    text = ncu_stalls.render(summary)
    assert "3255 samples over 4 SASS instructions" in text
    assert "FADD 63.0 %" in text  # 2050 of 3255
    assert "long_scoreboard 2000, short_scoreboard 50" in text


def test_summarize_leaves_out_instructions_without_samples():
    forward = ncu_stalls.parse_source_page(SOURCE_PAGE)[0]
    assert len(ncu_stalls.summarize(forward, top=10)["top"]) == 3


def test_the_older_stall_column_names_are_read_too():
    page = (
        '"Address","Source","Warp Stall Sampling (All Samples)","stall_wait","stall_long_sb"\n'
        '"0x10","      MUFU.EX2 R1, R2 ;","9","6","3"\n'
    )
    (kernel,) = ncu_stalls.parse_source_page(page)
    assert kernel["kernel"] == "kernel 1"
    assert kernel["instructions"][0]["reasons"] == {"wait": 6, "long_sb": 3}


def test_a_page_without_the_sampling_columns_is_a_clear_error():
    with pytest.raises(SystemExit, match="SourceCounters"):
        ncu_stalls.parse_source_page(
            '"Address","Source","Instructions Executed"\n"0x10","EXIT ;","1"\n'
        )


def test_cli_prints_each_kernel_and_rejects_bad_arguments(tmp_path, capsys):
    page = tmp_path / "source.csv"
    page.write_text(SOURCE_PAGE)
    assert ncu_stalls.main([str(page), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward_slice_kernel<16, BFloat16, 2>: 3255 samples" in out
    assert "backward_slice_kernel<16, BFloat16>: 7 samples" in out
    with pytest.raises(SystemExit):
        ncu_stalls.main([str(tmp_path / "missing.csv")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncu_stalls.main([str(page), "--top", "0"])
    assert "--top must be at least 1" in capsys.readouterr().err
