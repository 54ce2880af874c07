"""dev/kernels/kernel_ab.py: preparing versions of csrc/, summarising rounds, and (slow) a real
build and timing of two versions on the CPU, one of which does not compile."""

import difflib
import json
import shutil
import subprocess

import pytest
from conftest import ROOT, load_tool

kernel_ab = load_tool("kernel_ab", ROOT / "dev" / "kernels")
ROOT = kernel_ab.ROOT
HEADER = "csrc/partition_softmax.h"


def csrc_patch(tmp_path, relative: str, edit) -> str:
    """A git-style diff of one csrc file, edited by `edit(text) -> text`, as a file path."""
    before = (ROOT / relative).read_text()
    after = edit(before)
    diff = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                f"a/{relative}", f"b/{relative}")
    path = tmp_path / "change.patch"
    path.write_text("".join(diff))
    return str(path)


def head_has(relative: str) -> bool:
    shown = subprocess.run(["git", "cat-file", "-e", f"HEAD:{relative}"], cwd=ROOT,
                           capture_output=True, check=False)
    return shown.returncode == 0


@pytest.mark.parametrize(
    "spec, message",
    [("v5", "expected NAME=COMMIT"), ("=HEAD", "expected NAME=COMMIT"),
     ("a b=HEAD", "letters, digits"), ("v6=HEAD+no/such.patch", "does not exist")],
)
def test_a_malformed_version_is_refused_with_the_reason(spec, message):
    with pytest.raises(SystemExit, match=message):
        kernel_ab.parse_version(spec)


@pytest.mark.skipif(shutil.which("git") is None or not head_has(HEADER), reason="needs git history")
def test_prepare_writes_each_versions_csrc_in_order_with_its_patch(tmp_path):
    patch = csrc_patch(tmp_path, HEADER, lambda text: text + "// kernel_ab test line\n")
    into = tmp_path / "ab"
    records = kernel_ab.prepare(["base=HEAD", f"mine=worktree+{patch}"], into)

    assert [r["name"] for r in records] == ["base", "mine"]
    committed = subprocess.run(["git", "show", f"HEAD:{HEADER}"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert (into / "base" / HEADER).read_text() == committed
    mine = (into / "mine" / HEADER).read_text()
    assert mine == (ROOT / HEADER).read_text() + "// kernel_ab test line\n"
    assert json.loads((into / "mine" / "version.json").read_text())["commit"].endswith(
        "+worktree+" + patch.replace("\\", "/"))
    loaded = kernel_ab.load_versions(into)
    assert [v["name"] for v in loaded] == ["base", "mine"]
    assert loaded[0]["index"] == 0


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_bad_version_leaves_the_prepared_set_as_it_was(tmp_path):
    into = tmp_path / "ab"
    kernel_ab.prepare(["base=worktree"], into)
    before = sorted(p.relative_to(into) for p in into.rglob("*"))
    with pytest.raises(SystemExit, match="not a commit"):
        kernel_ab.prepare(["ok=worktree", "bad=no-such-revision-xyz"], into)
    stale = tmp_path / "stale.patch"  # its context is not in the file
    stale.write_text("".join(difflib.unified_diff(
        ["a line that is not there\n"], ["its replacement\n"], f"a/{HEADER}", f"b/{HEADER}")))
    with pytest.raises(SystemExit, match="does not apply"):
        kernel_ab.prepare([f"bad=worktree+{stale}"], into)
    assert sorted(p.relative_to(into) for p in into.rglob("*")) == before
    assert [v["name"] for v in kernel_ab.load_versions(into)] == ["base"]


def test_run_without_prepared_versions_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="prepare"):
        kernel_ab.load_versions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no prepared version"):
        kernel_ab.load_versions(tmp_path / "empty")
    (tmp_path / "odd" / "junk").mkdir(parents=True)
    with pytest.raises(SystemExit, match="not a prepared version"):
        kernel_ab.load_versions(tmp_path / "odd")


def test_figures_keep_the_kernel_times_and_the_whole_step():
    bench = {
        "median_ms": {"fused": 1.7, "reference": 6.4},
        "roofline": {"kernels": {
            "fused": {"forward": {"median_ms": 0.2}, "backward": {"median_ms": 0.19},
                      "forward_backward": {"median_ms": 0.39}},
            "fused_slice_images_8": {"forward": {"median_ms": 0.18}}}},
    }
    assert kernel_ab.figures(bench) == {
        "fused.forward_ms": 0.2, "fused.backward_ms": 0.19, "fused.forward_backward_ms": 0.39,
        "fused_slice_images_8.forward_ms": 0.18, "fused.step_ms": 1.7}
    assert kernel_ab.figures({"median_ms": {"fused": 2.0}}) == {"fused.step_ms": 2.0}


def test_summary_takes_medians_over_rounds_and_ratios_to_the_first_version_that_ran():
    versions = [
        {"name": "broken", "error": "build failed"},
        {"name": "base", "rounds": [{"t": 1.0}, {"t": 3.0}, {"t": 2.0}]},
        {"name": "new", "rounds": [{"t": 1.5}, {"t": 1.4}, {"t": 9.0}, {"t": 1.6}]},
    ]
    medians, baseline, ratios = kernel_ab.summarise(versions)
    assert medians == {"broken": {}, "base": {"t": 2.0}, "new": {"t": 1.55}}
    assert baseline == "base"
    assert ratios == {"new": {"t": pytest.approx(0.775)}}


def _adopt_setup(tmp_path, medians, baseline="base"):
    """A tree's csrc/, two prepared versions and a run's summary with these medians."""
    into = tmp_path / "csrc"
    into.mkdir()
    (into / "kernel.cuh").write_text("tree\n")
    prepared = tmp_path / "ab"
    for name in ("base", "new"):
        (prepared / name / "csrc").mkdir(parents=True)
        (prepared / name / "csrc" / "kernel.cuh").write_text(f"{name}\n")
        (prepared / name / "version.json").write_text(json.dumps({"commit": f"abc+{name}.patch"}))
    result = tmp_path / "kernel_ab.json"
    result.write_text(json.dumps({"baseline": baseline, "medians": medians}))
    return result, prepared, into


def test_adopt_puts_the_fastest_versions_csrc_in_place_where_it_beats_the_margin(tmp_path):
    result, prepared, into = _adopt_setup(tmp_path, {
        "base": {"fused.forward_backward_ms": 0.40}, "new": {"fused.forward_backward_ms": 0.36}})
    lines = kernel_ab.adopt(result, prepared, into, margin=0.02)
    assert lines[-1] == "adopted new (0.900 of base's time): abc+new.patch"
    assert (into / "kernel.cuh").read_text() == "new\n"
    assert not (tmp_path / "csrc.adopting").exists()


@pytest.mark.parametrize("medians, baseline, reason", [
    ({"base": {"fused.forward_backward_ms": 0.40}, "new": {"fused.forward_backward_ms": 0.395}},
     "base", "no version beats base by more than 2%"),
    ({"base": {"fused.forward_backward_ms": 0.40}, "new": {"fused.forward_backward_ms": 0.45}},
     "base", "no version beats base"),
    ({"base": {}, "new": {"fused.forward_backward_ms": 0.30}}, "base", "baseline was not timed"),
])
def test_adopt_keeps_the_trees_csrc_otherwise(tmp_path, medians, baseline, reason):
    result, prepared, into = _adopt_setup(tmp_path, medians, baseline)
    lines = kernel_ab.adopt(result, prepared, into, margin=0.02)
    assert reason in lines[-1] and not lines[-1].startswith("adopted")
    assert (into / "kernel.cuh").read_text() == "tree\n"


def test_adopt_without_a_result_or_with_a_broken_version_leaves_csrc_as_it_was(tmp_path):
    result, prepared, into = _adopt_setup(tmp_path, {
        "base": {"fused.forward_backward_ms": 0.40}, "new": {"fused.forward_backward_ms": 0.30}})
    missing = kernel_ab.adopt(tmp_path / "none.json", prepared, into, margin=0.02)
    assert missing[-1].startswith("no none.json")
    shutil.rmtree(prepared / "new" / "csrc")  # the copy fails half way: nothing is lost
    with pytest.raises(OSError):
        kernel_ab.adopt(result, prepared, into, margin=0.02)
    assert (into / "kernel.cuh").read_text() == "tree\n"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_run_builds_each_version_apart_and_times_those_that_build(tmp_path, monkeypatch):
    # CPU kernels only: the CUDA build would take minutes here and cannot run.
    monkeypatch.setenv("CARP_FAST_NO_CUDA", "1")
    cpu_source = "csrc/partition_softmax_cpu.cpp"
    broken = csrc_patch(tmp_path, cpu_source,
                        lambda text: text + "\nthis is not C++ kernel_ab_marker;\n")
    prepared, work, out = tmp_path / "ab", tmp_path / "work", tmp_path / "out"
    kernel_ab.prepare(["base=worktree", f"broken=worktree+{broken}"], prepared)

    status = kernel_ab.run(prepared, work, out, rounds=2, bench_args=[
        "--device", "cpu", "--dtype", "fp32", "--views-student", "3", "--views-teacher", "2",
        "--batch", "3", "--prototypes", "48", "--group", "12", "--reps", "2", "--warmup", "1",
        "--threads", "1", "--impls", "fused"])

    assert status == 1  # one version failed
    summary = json.loads((out / "kernel_ab.json").read_text())
    base, failed = summary["versions"]
    assert failed["name"] == "broken" and failed["error"] == "build failed"
    assert "kernel_ab_marker" in failed["build"]["tail"]
    assert base["build"]["ok"] and "error" not in base
    assert base["extension"].startswith(str(work / "base"))
    assert len(base["rounds"]) == 2 and all(r["fused.step_ms"] > 0 for r in base["rounds"])
    assert summary["baseline"] == "base" and summary["ratios_to_baseline"] == {}
    assert summary["medians"]["base"]["fused.step_ms"] > 0
    log = (out / "kernel_ab.log").read_text()
    assert "build broken: FAILED" in log and "kernel_ab_marker" in log
    assert "round 0 broken" not in log  # never timed
    assert "round 1 base" in log
