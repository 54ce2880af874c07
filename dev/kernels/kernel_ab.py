"""Time versions of the fused loss's kernels (csrc/) against each other, on one machine, in
one call: what a GPU session needs to compare candidate kernels without a rebuild per call.

Here, where git and the history are, name the versions; each becomes a copy of csrc/ under
.ab/ (ignored by git, so the device call must carry it):

    python dev/kernels/kernel_ab.py prepare v5=HEAD v6=HEAD+my_change.patch
    python dev/kernels/kernel_ab.py prepare base=1bf98de mine=worktree

A version is a commit (anything `git rev-parse` takes) or `worktree` (csrc/ as it is on
disk), either followed by `+PATCH` (a `git diff`, of which the csrc/ part is applied on top).
The first is the baseline.

On the machine that times them:

    python dev/kernels/kernel_ab.py run --out $OUT                  # CUDA, the published shape
    python dev/kernels/kernel_ab.py run --rounds 3 -- --device cpu --dtype fp32 --batch 4 ...

`run` copies this repository's Python side once per version with that version's csrc/
(under --work), builds every copy's extension at the same time (`setup.py build_ext
--inplace`, the cores shared out), checks that each copy imports its own build, then times
the fused loss with tools/bench_loss.py (the arguments after `--`; by default the CUDA
kernels alone at B = 256, bf16, against the copy bandwidth), version after version, round
after round, so that drift of the machine falls on every version alike. It writes one JSON
(kernel_ab.json: each version's source, commit, build time and per-round figures, medians
over rounds, ratios to the baseline) and one log (kernel_ab.log, with the end of any failed
build), so that at most two files come back. A version that fails to build or to run is
reported with the end of its log; the others are still timed, and the exit status is 1.

    python dev/kernels/kernel_ab.py adopt --margin 0.02    # after run, on the same machine

`adopt` reads run's kernel_ab.json and, where the fastest version's forward + backward beats
the baseline's by more than --margin (a fraction of the baseline's time), puts that version's
csrc/ in place of this tree's (KERNEL_STAGES=1 AB=1 AB_ADOPT=1 bash tools/gpu_check.sh then builds, tests and
benchmarks it). Its last line says what it did: `adopted NAME (...): COMMIT`, or why not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernel_report import ROOT, checkout_csrc

from carp_fast import ownership
from carp_fast.profiling import git_commit

DEFAULT_PREPARED = ROOT / ".ab"
PREPARED_KIND = "kernel_ab prepared versions"
PREPARED_HINT = "Choose a new or empty --into folder."
WORK_KIND = "kernel_ab work"
LOG_HEADER = "# kernel_ab.py log"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "kernel_ab"
# Where run writes kernel_ab.json and adopt reads it ($OUT on the device machine).
DEFAULT_OUT = Path(os.environ.get("OUT", "kernel_ab_out"))
# What a version's copy needs besides csrc/: setup.py builds carp_fast._C, bench_loss runs it.
COPIED = ("setup.py", "README.md", "carp_fast", "tools")
DEFAULT_BENCH = ["--device", "cuda", "--dtype", "bf16", "--batch", "256", "--reps", "20",
                 "--impls", "fused"]
# Figures kept per round: bench_loss's roofline entries (CUDA) or its whole-step median.
KERNEL_PARTS = ("forward", "backward", "forward_backward")


# ---- prepare ----------------------------------------------------------------------------


def parse_version(spec: str) -> tuple[str, str, Path | None]:
    """'NAME=SOURCE[+PATCH]' -> (name, source, patch)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"version {spec!r}: expected NAME=COMMIT or NAME=worktree, "
                         "optionally +PATCH")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SystemExit(f"version name {name!r}: letters, digits, '-', '_' and '.' only")
    source, plus, patch = rest.partition("+")
    patch_path = None
    if plus:
        patch_path = Path(patch)
        if not patch_path.is_file():
            raise SystemExit(f"version {name}: patch {patch} does not exist")
    return name, source, patch_path


def prepare(specs: list[str], into: Path) -> list[dict]:
    """Writes each version's csrc/ and version.json under `into`, replacing what was there."""
    versions = [parse_version(spec) for spec in specs]
    names = [name for name, _, _ in versions]
    if len(set(names)) != len(names):
        raise SystemExit(f"version names must differ: {names}")
    if not versions:
        raise SystemExit("name at least one version")
    into.parent.mkdir(parents=True, exist_ok=True)
    ownership.check_folder_is_free(into, PREPARED_KIND, PREPARED_HINT)  # refuse before any work
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.preparing.", dir=into.parent))
    try:
        records = []
        for index, (name, source, patch) in enumerate(versions):
            folder = staging / name
            folder.mkdir()
            if source == "worktree":
                shutil.copytree(ROOT / "csrc", folder / "csrc")
                commit = (git_commit() or "unknown") + "+worktree"
            else:
                _, commit = checkout_csrc(source, folder)
            if patch is not None:
                # Only the patch's csrc/ part: a candidate's diff may touch tests too.
                applied = subprocess.run(
                    ["git", "apply", "--include=csrc/*", str(patch.resolve())], cwd=folder,
                    capture_output=True, text=True, check=False)
                if applied.returncode != 0:
                    raise SystemExit(f"version {name}: {patch} does not apply to {source}'s "
                                     f"csrc/: {applied.stderr.strip()[-500:]}")
                commit += f"+{patch.as_posix()}"
            record = {"name": name, "index": index, "source": source,
                      "patch": patch.as_posix() if patch else None, "commit": commit}
            (folder / "version.json").write_text(json.dumps(record, indent=2) + "\n")
            records.append(record)
        # Only now, with every version in hand, does the old set go (only its listed files).
        ownership.install_folder(staging, into, PREPARED_KIND, "1", PREPARED_HINT)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # mkdtemp made it (gone once installed)
    return records


# ---- run --------------------------------------------------------------------------------


def load_versions(prepared: Path) -> list[dict]:
    if not prepared.is_dir():
        raise SystemExit(f"{prepared} does not exist: run `python dev/kernels/kernel_ab.py prepare ...` "
                         "first (and carry it to the machine that times the versions)")
    versions = []
    for folder in sorted(prepared.iterdir()):
        meta = folder / "version.json"
        if not folder.is_dir():
            continue
        if not meta.is_file() or not (folder / "csrc").is_dir():
            raise SystemExit(f"{folder} is not a prepared version (no version.json or csrc/)")
        versions.append({**json.loads(meta.read_text()), "prepared": folder})
    if not versions:
        raise SystemExit(f"{prepared} holds no prepared version")
    return sorted(versions, key=lambda v: v["index"])


def make_copy(version: dict, work: Path) -> Path:
    """This repository's Python side with the version's csrc/, at work/<name>."""
    # `work` is kernel_ab's scratch folder (sealed when first used; a folder holding anything
    # else is refused), so the copies in it, build outputs included, are its own to replace.
    ownership.claim_folder(work, WORK_KIND, lambda folder: False,
                           "Choose a new or empty --work folder.")
    copy = work / version["name"]
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for item in COPIED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, copy / item, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, copy / item)
    shutil.copytree(version["prepared"] / "csrc", copy / "csrc")
    return copy


def build_env(copy: Path, jobs: int) -> dict:
    env = dict(os.environ, MAX_JOBS=str(jobs), PYTHONPATH=str(copy))
    if "CARP_FAST_CUDA_ARCH" not in env and "TORCH_CUDA_ARCH_LIST" not in env:
        arch = _device_arch()
        if arch:  # only the GPU in hand: one architecture builds several times faster
            env["CARP_FAST_CUDA_ARCH"] = arch
    return env


def _device_arch() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return "%d.%d" % torch.cuda.get_device_capability()


def build_all(versions: list[dict], copies: dict[str, Path], log) -> dict[str, dict]:
    """Builds every copy's extension at once; name -> {seconds, ok, tail}."""
    jobs = max(1, (os.cpu_count() or 1) // len(versions))
    running = {}
    for version in versions:
        copy = copies[version["name"]]
        out = open(copy / "build.log", "w")  # closed below, once the build ends
        process = subprocess.Popen(
            [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
            env=build_env(copy, jobs), stdout=out, stderr=subprocess.STDOUT)
        running[version["name"]] = (process, out, time.monotonic())
    results = {}
    for name, (process, out, start) in running.items():
        status = process.wait()
        out.close()
        seconds = time.monotonic() - start
        text = (copies[name] / "build.log").read_text(errors="replace")
        results[name] = {"seconds": round(seconds, 1), "ok": status == 0,
                         "tail": "" if status == 0 else failure_excerpt(text)}
        log(f"build {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} "
            f"in {seconds:.0f} s")
        if status != 0:
            log(results[name]["tail"])
    return results


def failure_excerpt(text: str, errors: int = 20, tail: int = 15) -> str:
    """The compiler's error lines (with the line after each, where it echoes the source)
    and the log's last lines: a build log ends in setuptools' traceback, not the error."""
    lines = text.splitlines()
    picked = []
    for index, line in enumerate(lines):
        if re.search(r"\berror\b", line, re.IGNORECASE) and len(picked) < 2 * errors:
            picked.extend(lines[index:index + 2])
    return "\n".join([*picked, "...", *lines[-tail:]])


def imported_extension(copy: Path) -> str:
    """Where carp_fast._C comes from when the copy's environment imports it."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch, carp_fast._C as c; print(c.__file__)"], cwd=copy,
        env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"import failed: {done.stderr.strip()[-1000:]}")
    return done.stdout.strip().splitlines()[-1]


def figures(bench: dict) -> dict[str, float]:
    """The times (ms) a round keeps from one bench_loss JSON."""
    kept = {}
    kernels = (bench.get("roofline") or {}).get("kernels") or {}
    for variant, parts in kernels.items():
        for part in KERNEL_PARTS:
            if part in parts:
                kept[f"{variant}.{part}_ms"] = parts[part]["median_ms"]
    if "fused" in bench.get("median_ms", {}):
        kept["fused.step_ms"] = bench["median_ms"]["fused"]
    return kept


def summarise(versions: list[dict]) -> tuple[dict, str | None, dict]:
    """Medians over rounds per version, the baseline (the first version that ran, if any)
    and each other version's ratios to it: time over the baseline's, so below 1 is faster."""
    medians = {}
    for version in versions:
        rounds = version.get("rounds") or []
        keys = sorted({key for r in rounds for key in r})
        medians[version["name"]] = {
            key: statistics.median(r[key] for r in rounds if key in r) for key in keys}
    ran = [v["name"] for v in versions if medians[v["name"]]]
    ratios = {}
    if ran:
        base = medians[ran[0]]
        for name in ran[1:]:
            ratios[name] = {key: value / base[key] for key, value in medians[name].items()
                            if base.get(key)}
    return medians, (ran[0] if ran else None), ratios


def run(prepared: Path, work: Path, out: Path, rounds: int, bench_args: list[str]) -> int:
    versions = load_versions(prepared)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "kernel_ab.log"
    if log_path.exists() and not log_path.read_text(errors="replace").startswith(LOG_HEADER):
        raise SystemExit(f"{log_path} exists and kernel_ab did not write it; it was left as it "
                         "is: choose another --out")
    log_file = log_path.open("w")
    log_file.write(LOG_HEADER + "\n")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    started = time.monotonic()
    log(f"{len(versions)} versions: " + ", ".join(f"{v['name']} ({v['commit']})" for v in versions))
    copies = {v["name"]: make_copy(v, work) for v in versions}
    builds = build_all(versions, copies, log)
    for version in versions:
        name = version["name"]
        version["build"] = builds[name]
        version.pop("prepared")
        if not builds[name]["ok"]:
            version["error"] = "build failed"
            continue
        try:
            where = imported_extension(copies[name])
        except RuntimeError as error:
            version["error"] = str(error)
            log(f"{name}: {error}")
            continue
        if not Path(where).resolve().is_relative_to(copies[name].resolve()):
            version["error"] = f"imported another build of carp_fast._C: {where}"
            log(f"{name}: {version['error']}")
        version["extension"] = where

    bench_args = bench_args or DEFAULT_BENCH
    for round_index in range(rounds):
        for version in versions:
            if "error" in version:
                continue
            name = version["name"]
            result = copies[name] / f"bench_{round_index}.json"
            command = [sys.executable, "tools/bench_loss.py", *bench_args, "--json", str(result)]
            env = dict(os.environ, PYTHONPATH=str(copies[name]), CARP_FAST_COMMIT=version["commit"])
            done = subprocess.run(command, cwd=copies[name], env=env, capture_output=True,
                                  text=True, check=False)
            if done.returncode != 0:
                version["error"] = f"bench_loss exit {done.returncode}"
                log(f"round {round_index} {name}: FAILED\n{(done.stdout + done.stderr)[-3000:]}")
                continue
            bench = json.loads(result.read_text())
            kept = figures(bench)
            version.setdefault("rounds", []).append(kept)
            version.setdefault("bench", bench)  # the first round's whole record, for provenance
            log(f"round {round_index} {name}: " + ", ".join(
                f"{key} {value:.4g}" for key, value in kept.items()))

    medians, baseline, ratios = summarise(versions)
    first = next((v["bench"] for v in versions if "bench" in v), {})
    summary = {
        "what": "the fused CARP loss timed with each version of csrc/ (dev/kernels/kernel_ab.py)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": first.get("device_name"),
        "torch": first.get("torch"),
        "command": ["dev/kernels/kernel_ab.py", "run", "--rounds", str(rounds), "--", *bench_args],
        "baseline": baseline,
        "medians": medians,
        "ratios_to_baseline": ratios,
        "versions": versions,
        "seconds": round(time.monotonic() - started, 1),
    }
    ownership.write_report(out / "kernel_ab.json", summary)
    for name, values in medians.items():
        shown = ", ".join(f"{key} {value:.4g}" for key, value in values.items()
                          if key.endswith("forward_backward_ms") or key == "fused.step_ms")
        ratio = ratios.get(name, {})
        shown += "".join(f"; {key} x{value:.3f}" for key, value in ratio.items()
                         if key.endswith("forward_backward_ms") or key == "fused.step_ms")
        log(f"{name}: {shown or 'no result'}")
    log_file.close()
    return 1 if any("error" in v for v in versions) else 0


# ---- adopt ------------------------------------------------------------------------------

ADOPT_FIGURE = "fused.forward_backward_ms"


def adopt(result: Path, prepared: Path, into: Path, margin: float) -> list[str]:
    """Replaces `into` by the csrc/ of the version that run timed fastest, where it beats the
    baseline by more than `margin` (a fraction of the baseline's time). Returns the lines for
    the log; the last is `adopted NAME (...): COMMIT` if it did."""
    try:
        summary = json.loads(result.read_text())
    except (OSError, ValueError) as error:
        return [f"no {result.name} ({error}): the tree's csrc/ stays"]
    times = {name: values[ADOPT_FIGURE] for name, values in summary["medians"].items()
             if ADOPT_FIGURE in values}
    base = summary["baseline"]
    if base not in times:
        return ["the baseline was not timed: the tree's csrc/ stays"]
    lines = ["forward + backward ms: " + str({name: round(t, 4) for name, t in times.items()})]
    best = min(times, key=times.get)
    if best == base or times[best] > (1 - margin) * times[base]:
        return lines + [f"no version beats {base} by more than {margin:.0%}: the tree's csrc/ stays"]
    commit = json.loads((prepared / best / "version.json").read_text())["commit"]
    # `adopt` is the explicit request to replace `into` (the tree's csrc/, which git holds).
    # Copied next to it first (a fresh folder), so a failed copy leaves `into` as it was.
    staged = Path(tempfile.mkdtemp(prefix=f".{into.name}.adopting.", dir=into.parent)) / into.name
    shutil.copytree(prepared / best / "csrc", staged)
    shutil.rmtree(into)
    staged.rename(into)
    staged.parent.rmdir()
    return lines + [f"adopted {best} ({times[best] / times[base]:.3f} of {base}'s time): {commit}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the named versions' csrc/ under --into")
    prep.add_argument("versions", nargs="+", help="NAME=COMMIT|worktree[+PATCH], baseline first")
    prep.add_argument("--into", type=Path, default=DEFAULT_PREPARED)
    timing = commands.add_parser("run", help="build and time the prepared versions")
    timing.add_argument("--prepared", type=Path, default=DEFAULT_PREPARED)
    timing.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the copies build")
    timing.add_argument("--out", type=Path, default=DEFAULT_OUT)
    timing.add_argument("--rounds", type=int, default=2)
    timing.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="-- then tools/bench_loss.py's arguments (default: "
                        + " ".join(DEFAULT_BENCH) + ")")
    choose = commands.add_parser("adopt", help="put the fastest version's csrc/ in place of --into")
    choose.add_argument("--result", type=Path, default=DEFAULT_OUT / "kernel_ab.json")
    choose.add_argument("--prepared", type=Path, default=DEFAULT_PREPARED)
    choose.add_argument("--into", type=Path, default=ROOT / "csrc")
    choose.add_argument("--margin", type=float, default=0.02)
    args = parser.parse_args(argv)
    if args.command == "adopt":
        print("\n".join(adopt(args.result, args.prepared, args.into, args.margin)))
        return 0
    if args.command == "prepare":
        for record in prepare(args.versions, args.into):
            print(f"{record['name']}: {record['commit']} -> {args.into / record['name']}")
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if "--json" in bench_args:
        parser.error("--json is kernel_ab's to set (one per version and round)")
    return run(args.prepared, args.work, args.out, args.rounds, bench_args)


if __name__ == "__main__":
    sys.exit(main())
