"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's source page.

    ncu --section SourceCounters ... --export rep python tools/bench_loss.py ...
    ncu --import rep.ncu-rep --page source --csv --print-source sass > source.csv
    python dev/kernels/ncu_stalls.py source.csv [--top 40]

The source page holds one row per SASS instruction of each profiled kernel, with the warp
stall samples taken at it (PC sampling: which instruction a warp was at, and why it could not
issue, every few thousand cycles). For each kernel this prints the samples by stall reason,
by opcode, and the instructions that drew the most, each with its own leading reasons.
tools/gpu_check.sh (KERNEL_STAGES=1 NCU=1) runs it on the fused loss's forward and backward kernels, so that a
GPU session says which instructions of the slice kernels the time goes to, not only how busy
each unit was.

Only the columns that Nsight Compute's versions share are read: "Address", "Source", the
total "Warp Stall Sampling (All Samples)", and one column per stall reason (named
"stall_<reason>" in some versions, "smsp__pcsamp_warps_issue_stalled_<reason>" in others; the
"_not_issued" variants are left out). A header row starts each kernel's table; the row
before it, where it is not an instruction, names the kernel.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import sys
from pathlib import Path

from kernel_report import opcode

ALL_SAMPLES = "Warp Stall Sampling (All Samples)"
_REASON_PREFIXES = ("smsp__pcsamp_warps_issue_stalled_", "stall_")


def reason_name(column: str) -> str | None:
    """The stall reason a column counts ("long_scoreboard"), or None for other columns."""
    for prefix in _REASON_PREFIXES:
        if column.startswith(prefix) and not column.endswith("_not_issued"):
            return column[len(prefix) :]
    return None


def count(cell: str) -> int:
    """A cell's sample count: thousands separators dropped, blank as 0."""
    text = cell.replace(",", "").strip()
    if not text:
        return 0
    return int(float(text))


def parse_source_page(text: str) -> list[dict]:
    """The kernels of a source-page CSV: [{kernel, instructions: [{address, source, samples,
    reasons: {reason: samples}}]}], in the file's order."""
    rows = list(csv.reader(io.StringIO(text)))
    kernels: list[dict] = []
    header: list[str] | None = None
    reason_columns: dict[str, str] = {}  # header column -> the stall reason it counts
    for index, row in enumerate(rows):
        if "Source" in row and ALL_SAMPLES in row:
            header = row
            reason_columns = {
                column: reason
                for column in header
                if (reason := reason_name(column)) is not None
            }
            before = rows[index - 1] if index > 0 else []
            named = [cell.strip() for cell in before if cell.strip()]
            is_instruction = bool(named) and named[0].startswith("0x")
            kernels.append(
                {
                    "kernel": " ".join(named)
                    if named and not is_instruction
                    else f"kernel {len(kernels) + 1}",
                    "instructions": [],
                }
            )
            continue
        if header is None or len(row) != len(header):
            continue
        cells = dict(zip(header, row))
        kernels[-1]["instructions"].append(
            {
                "address": cells.get("Address", "").strip(),
                "source": cells["Source"].strip(),
                "samples": count(cells[ALL_SAMPLES]),
                "reasons": {
                    reason: samples
                    for column, reason in reason_columns.items()
                    if (samples := count(cells[column])) > 0
                },
            }
        )
    if not kernels:
        raise SystemExit(
            f"no source-page table found: expected a header row with 'Source' and '{ALL_SAMPLES}' "
            "(was the SourceCounters section collected, and the page printed with --page source --csv?)"
        )
    return kernels


def summarize(kernel: dict, top: int) -> dict:
    """A kernel's samples in all, by reason, by opcode, and its `top` instructions."""
    instructions = kernel["instructions"]
    total = sum(i["samples"] for i in instructions)
    reasons: collections.Counter = collections.Counter()
    opcodes: collections.Counter = collections.Counter()
    for instruction in instructions:
        reasons.update(instruction["reasons"])
        opcodes[opcode(instruction["source"])] += instruction["samples"]
    ranked = sorted(instructions, key=lambda i: i["samples"], reverse=True)[:top]
    return {
        "kernel": kernel["kernel"],
        "instructions": len(instructions),
        "samples": total,
        "reasons": dict(reasons.most_common()),
        "opcodes": dict(opcodes.most_common()),
        "top": [i for i in ranked if i["samples"] > 0],
    }


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f} %" if whole else "    - "


def render(summary: dict, reasons_shown: int = 8, opcodes_shown: int = 12) -> str:
    total = summary["samples"]
    lines = [
        f"{summary['kernel']}: {total} samples over {summary['instructions']} SASS instructions"
    ]
    reason_total = sum(summary["reasons"].values())
    lines.append(
        "  by reason:  "
        + ", ".join(
            f"{r} {share(n, reason_total).strip()}"
            for r, n in list(summary["reasons"].items())[:reasons_shown]
        )
    )
    lines.append(
        "  by opcode:  "
        + ", ".join(
            f"{o} {share(n, total).strip()}"
            for o, n in list(summary["opcodes"].items())[:opcodes_shown]
        )
    )
    lines.append("  instructions with the most samples:")
    for instruction in summary["top"]:
        leading = sorted(
            instruction["reasons"].items(), key=lambda item: item[1], reverse=True
        )[:3]
        why = ", ".join(f"{r} {n}" for r, n in leading)
        lines.append(
            f"    {instruction['address']:>8} {share(instruction['samples'], total)}  "
            f"{instruction['source'][:60]:<60}  {why}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "csv",
        type=Path,
        help="ncu --page source --csv --print-source sass output ('-': stdin)",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=40,
        help="instructions listed per kernel (default 40)",
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    if str(args.csv) == "-":
        text = sys.stdin.read()
    elif not args.csv.is_file():
        parser.error(f"{args.csv}: no such file")
    else:
        text = args.csv.read_text(errors="replace")
    for kernel in parse_source_page(text):
        print(render(summarize(kernel, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
