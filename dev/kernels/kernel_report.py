"""Registers, spills and SASS instruction counts of the fused loss's CUDA kernels, from a
compile on this machine: no GPU needed.

    python dev/kernels/kernel_report.py --json benchmarks/kernels_sm90.json
    python dev/kernels/kernel_report.py --rev 114e1cc --kernels slice    # csrc/ as of another commit

Compiles csrc/partition_softmax_cuda.cu (of the working tree, or of --rev) for one
architecture with the flags setup.py builds with (-O3 --use_fast_math, torch's nvcc defines),
reads ptxas's report (registers, stack, spills per kernel) and, where cuobjdump is found
(--cuobjdump, PATH, or the PyPI wheel nvidia-cuda-cuobjdump unpacked anywhere), counts each
kernel's SASS instructions: all of them, those before its last EXIT (the rest are the
slow paths of divergent shuffles, rarely run) and per opcode.

Static counts are not the instructions a row executes (loops, branches), but they move with
them: the kernel notes (docs/kernel_history.md names the commit) follow one row's path through the SASS by hand.
--steps cuts each kernel's code before its last EXIT into the unrolled steps of a loop, at an
instruction that a step issues once (REDUX for a slice forward's row max; STG.E.128 with
--step-every 2 for a slice backward's two gradient stores at P = 512 in bf16), and counts
each step's instructions and opcodes:

    python dev/kernels/kernel_report.py --kernels 'forward_slice_kernel<16, BFloat16, 2>' --steps REDUX
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from carp_fast import ownership
from carp_fast.profiling import git_commit

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = ROOT / "csrc" / "partition_softmax_cuda.cu"

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_REGISTERS = re.compile(r"Used (?P<registers>\d+) registers")
_FUNCTION = re.compile(r"^\s*Function : (?P<name>\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?P<text>[^;]*);")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled kernel names to readable ones (c++filt where present), namespaces dropped."""
    readable = list(names)
    if names and shutil.which("c++filt"):
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            readable = out.stdout.splitlines()
    short = []
    for name in readable:
        name = re.sub(r"^void ", "", name)
        name = name.replace("carp_fast::(anonymous namespace)::", "").replace("c10::", "")
        name = re.sub(r"\(.*$", "", name)  # the parameter list
        short.append(name)
    return dict(zip(names, short))


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output to {mangled kernel: {arch, registers, stack_bytes, spill_store_bytes,
    spill_load_bytes}}."""
    kernels: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if entry := _ENTRY.search(line):
            current = kernels.setdefault(entry["name"], {"arch": entry["arch"]})
        elif current is not None and (frame := _FRAME.search(line)):
            current.update(
                stack_bytes=int(frame["stack"]),
                spill_store_bytes=int(frame["stores"]),
                spill_load_bytes=int(frame["loads"]),
            )
        elif current is not None and (used := _REGISTERS.search(line)):
            current["registers"] = int(used["registers"])
            current = None
    return kernels


def full_opcode(instruction: str) -> str:
    """The opcode with its modifiers ("REDUX.MAX.S32"), the predicate dropped."""
    words = [w for w in instruction.split() if not w.startswith("@")]
    return words[0] if words else "?"


def opcode(instruction: str) -> str:
    """The opcode without its modifiers ("REDUX")."""
    return full_opcode(instruction).split(".")[0]


def opcode_counts(instructions: list[str]) -> dict[str, int]:
    """Instructions per opcode without modifiers, most frequent first."""
    return dict(collections.Counter(map(opcode, instructions)).most_common())


def walk_steps(instructions: list[str], marker: str, every: int = 1) -> list[dict]:
    """The stretches of code from one step marker to the next: every `every`-th instruction
    whose opcode (with modifiers) starts with `marker` starts a step; the code before the first
    and from the last on is left out. Each step: {instructions, opcodes}."""
    starts = [i for i, text in enumerate(instructions) if full_opcode(text).startswith(marker)]
    starts = starts[::every]
    return [
        {"instructions": end - begin, "opcodes": opcode_counts(instructions[begin:end])}
        for begin, end in itertools.pairwise(starts)
    ]


def parse_sass(text: str, step_marker: str | None = None, step_every: int = 1) -> dict[str, dict]:
    """cuobjdump -sass output to {mangled kernel: {instructions, before_last_exit, opcodes}},
    and `steps` (walk_steps over the code before the last EXIT) where step_marker is given."""
    bodies: dict[str, list[str]] = {}
    body = None
    for line in text.splitlines():
        if function := _FUNCTION.match(line):
            body = bodies.setdefault(function["name"], [])
        elif body is not None and (instruction := _INSTRUCTION.match(line)):
            body.append(instruction["text"].strip())
    counts = {}
    for name, instructions in bodies.items():
        last_exit = 0
        for index, instruction in enumerate(instructions):
            if opcode(instruction) == "EXIT":
                last_exit = index + 1
        counts[name] = {
            "instructions": len(instructions),
            "before_last_exit": last_exit,
            "opcodes": opcode_counts(instructions),
        }
        if step_marker:
            counts[name]["steps"] = walk_steps(instructions[:last_exit], step_marker, step_every)
    return counts


def find_cuobjdump(given: str | None) -> str | None:
    if given:
        return given
    if found := shutil.which("cuobjdump"):
        return found
    try:  # the nvidia-cuda-cuobjdump wheel, if installed into this environment
        import nvidia  # type: ignore[import-not-found]

        for base in getattr(nvidia, "__path__", []):
            for candidate in Path(base).glob("*/bin/cuobjdump"):
                return str(candidate)
    except ImportError:
        pass
    return None


def compile_object(source: Path, arch: str, nvcc: str, out_dir: Path) -> tuple[Path, str]:
    """nvcc -c with setup.py's flags and ptxas -v, the source's folder on the include path;
    returns the object and ptxas's report."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{source.resolve().parent}"]
    obj = out_dir / (source.stem + ".o")
    command = [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(obj),
        *includes,
        "-std=c++20",
        "-O3",
        "--use_fast_math",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-DTORCH_EXTENSION_NAME=_C",
        "-DCARP_FAST_WITH_CUDA=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return obj, done.stderr


def report(
    source: Path,
    arch: str,
    nvcc: str,
    cuobjdump: str | None,
    kernels: str | None,
    step_marker: str | None = None,
    step_every: int = 1,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        obj, ptxas = compile_object(source, arch, nvcc, Path(tmp))
        resources = parse_ptxas(ptxas)
        sass = {}
        if cuobjdump:
            dump = subprocess.run(
                [cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=False
            )
            if dump.returncode != 0:
                raise SystemExit(f"cuobjdump failed ({dump.returncode}): {dump.stderr[-2000:]}")
            sass = parse_sass(dump.stdout, step_marker, step_every)
    names = demangle(sorted(set(resources) | set(sass)))
    rows = {}
    for mangled, name in sorted(names.items(), key=lambda item: item[1]):
        if kernels and not re.search(kernels, name):
            continue
        rows[name] = {**resources.get(mangled, {}), **sass.get(mangled, {})}
    return rows


def _git(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False, **kwargs)


def checkout_csrc(rev: str, into: Path) -> tuple[Path, str]:
    """csrc/ as of commit `rev`, unpacked under `into`; returns its CUDA source and the sha."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}", text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--rev {rev}: not a commit of this repository")
    archive = _git("archive", sha.stdout.strip(), "csrc")
    if archive.returncode != 0:
        raise SystemExit(f"--rev {rev}: git archive failed: {archive.stderr.decode()[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "csrc" / DEFAULT_SOURCE.name, sha.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="the .cu file to compile"
    )
    parser.add_argument("--rev", help="compile csrc/ as of this commit instead of the working tree")
    parser.add_argument(
        "--arch", default="90", help="compute capability without the dot (default 90)"
    )
    parser.add_argument(
        "--nvcc", default=os.environ.get("NVCC", "nvcc"), help="nvcc to use (default: PATH)"
    )
    parser.add_argument(
        "--cuobjdump", help="cuobjdump to count SASS with (default: PATH or the nvidia wheel)"
    )
    parser.add_argument("--kernels", help="regular expression on the readable kernel names to keep")
    parser.add_argument(
        "--steps",
        metavar="OPCODE",
        help="cut each kernel into loop steps at this opcode (with modifiers, a prefix) and count them",
    )
    parser.add_argument(
        "--step-every",
        type=int,
        default=1,
        help="a step starts at every n-th --steps instruction (default 1)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    if not args.source.is_file():
        parser.error(f"--source {args.source} does not exist")
    if args.step_every < 1:
        parser.error(f"--step-every must be at least 1, got {args.step_every}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.rev:
            source, commit = checkout_csrc(args.rev, Path(tmp))
        else:
            source, commit = args.source, git_commit()  # HEAD, +dirty if the tree has changes
        if shutil.which(args.nvcc) is None:
            parser.error(f"nvcc not found ({args.nvcc}); install the CUDA toolkit or pass --nvcc")
        cuobjdump = find_cuobjdump(args.cuobjdump)
        if args.steps and not cuobjdump:
            parser.error("--steps reads the SASS: it needs cuobjdump (--cuobjdump)")
        rows = report(
            source, args.arch, args.nvcc, cuobjdump, args.kernels, args.steps, args.step_every
        )
    if not rows:
        raise SystemExit(f"no kernel of {args.source} matched --kernels {args.kernels!r}")
    for name, row in rows.items():
        spills = row.get("spill_store_bytes", 0) + row.get("spill_load_bytes", 0)
        print(
            f"{name:60s} regs {row.get('registers', '?'):>3}  spills {spills:>3} B  "
            f"sass {row.get('before_last_exit', '-')}/{row.get('instructions', '-')}"
        )
        if args.steps:
            sizes = [str(step["instructions"]) for step in row.get("steps", [])]
            print(f"    steps at {args.steps}: {' '.join(sizes) or 'none found'}")
    if not cuobjdump:
        print(
            "no cuobjdump: registers and spills only (pip download nvidia-cuda-cuobjdump, unpack, --cuobjdump)"
        )
    if args.json:
        nvcc_version = subprocess.run(
            [args.nvcc, "--version"], capture_output=True, text=True, check=False
        ).stdout
        record = {
            "tool": "dev/kernels/kernel_report.py",
            "command": "python dev/kernels/kernel_report.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            # timezone.utc, not datetime.UTC: the package supports Python 3.10.
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
            "commit": commit,
            "source": (
                f"{DEFAULT_SOURCE.relative_to(ROOT)} at {commit}"
                if args.rev
                else str(args.source.resolve().relative_to(ROOT))
                if args.source.resolve().is_relative_to(ROOT)
                else str(args.source)
            ),
            "arch": f"sm_{args.arch}",
            "nvcc": nvcc_version.strip().splitlines()[-1] if nvcc_version else None,
            "cuobjdump": cuobjdump,
            "kernels": rows,
        }
        ownership.write_report(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
