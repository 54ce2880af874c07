"""tools/profile_throughput.py at a tiny shape on CPU, and the README report built from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tool, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profile(tiny_dataset, tmp_path_factory):
    """One profiler run over every stage, with one backend that cannot be built here."""
    tmp = tmp_path_factory.mktemp("profile")
    out = tmp / "profile.json"
    profiler = load_tool("profile_throughput")
    overrides = tiny_overrides(tiny_dataset / "train", tmp / "run", data__batch_size=4)
    status = profiler.main(["--cfg", "demo_cpu.yaml", *overrides, "--device", "cpu",
                            "--backends", "torchvision,ffcv", "--data-path", f"ffcv={tmp / 'absent.beton'}",
                            "--steps", "2", "--warmup", "1", "--loader-seconds", "0", "--loss-reps", "1",
                            "--baseline",
                            "--json", str(out)])
    assert status == 0
    return json.loads(out.read_text())


def test_profile_holds_every_stage_with_its_provenance(profile):
    loader = profile["loaders"]["torchvision"]
    assert loader["images_per_s"] > 0 and loader["batch_size"] == 4 and loader["batches"] == 2
    assert profile["compute"]["images_per_s"] > 0
    assert set(profile["full_step"]["phase_share"]) == {"data", "forward", "loss", "backward", "optimizer"}
    assert sum(profile["full_step"]["phase_share"].values()) == pytest.approx(1.0)
    for impl in ("reference", "fused"):
        assert profile["loss"][impl]["median_s"] > 0
    assert "compiled" in profile["loss"]  # timed, or its failure named
    assert profile["baseline"]["images_per_s"] > 0
    assert profile["speedup_over_baseline"] == pytest.approx(
        profile["compute"]["images_per_s"] / profile["baseline"]["images_per_s"])
    assert profile["verdict"].startswith(("data-bound", "compute-bound"))
    assert profile["machine"]["cores"] >= 1 and profile["versions"]["torch"]
    assert "profile_throughput" in profile["command"]


def test_a_backend_that_cannot_load_is_reported_by_name(profile):
    # --data-path sent the ffcv backend to a file that does not exist.
    assert "absent.beton" in profile["loaders"]["ffcv"]["error"]
    assert "ffcv" not in profile["loaders_flat"]


def test_bad_data_path_argument_is_refused():
    done = subprocess.run([sys.executable, "tools/profile_throughput.py", "--cfg", "demo_cpu.yaml",
                           "--data-path", "ffcv"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "BACKEND=PATH" in done.stderr


def test_report_renders_a_profile_with_its_machine_and_command(profile):
    report = load_tool("performance_report")
    text = report.table([("profile_cpu.json", profile)])
    row = text.splitlines()[2]
    assert "torchvision loader" in row and "published recipe" in row and profile["verdict"] in row
    assert "profile_throughput.py" in row and "[profile_cpu.json](benchmarks/profile_cpu.json)" in row
    short = report.table([("profile_cpu.json", profile)], full=False).splitlines()[2]
    assert "published recipe" in short and "profile_throughput.py" not in short


def test_report_lists_a_json_it_cannot_render():
    report = load_tool("performance_report")
    assert "`mystery.json`" in report.table([("mystery.json", {"anything": 1})])


def test_loss_row_shows_only_the_formulations_a_record_timed():
    report = load_tool("performance_report")
    record = {"shape": {"views_student": 8, "views_teacher": 2, "batch": 256, "prototypes": 65536,
                        "partition_size": 512},
              "dtype": "bf16", "device": "cuda", "torch_threads": 16,
              "median_ms": {"published": 40.0, "compiled": 4.0, "fused": 2.0},
              "peak_extra_memory_mib": {"published": 2000.0, "compiled": 1800.0, "fused": 250.0},
              "student_grad_mib": 256.0,
              "ratios": {"published_time_over_fused": 20.0, "compiled_time_over_fused": 2.0}}
    _, result, detail = report.loss_row("loss.json", record)
    assert "reference" not in result + detail
    assert "compiled 4.0 ms (2.0×), published 40.0 ms (20.0×)" in result
    assert "250.0 vs 2,000.0 MiB for the published (0.125;" in detail


def test_readme_results_and_chart_are_current():
    done = subprocess.run([sys.executable, "tools/performance_report.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_recording_versions_leaves_torch_threads_alone():
    import torch

    from carp_fast import profiling

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        found = profiling.versions()
        assert torch.get_num_threads() == 2  # importing FFCV would have set it to 1
    finally:
        torch.set_num_threads(before)
    assert found["torch"] == torch.__version__


def test_report_commands_read_the_same_from_any_checkout():
    report = load_tool("performance_report")
    recorded = {"command": "/opt/py/bin/python3.12 /home/someone/carp_fast/tools/bench_loss.py "
                           "--json /home/someone/carp_fast/benchmarks/loss.json --lr 0.5"}
    assert report._command(recorded) == "`python tools/bench_loss.py --json benchmarks/loss.json --lr 0.5`"


def test_fit_batch_takes_the_largest_that_fits_and_only_forgives_out_of_memory(monkeypatch):
    import torch

    profiler = load_tool("profile_throughput")
    seen = []

    def fake_steps(cfg, device, steps, warmup, loader=None, timed_phases=True):
        seen.append(("carp_fast", cfg.data.batch_size))
        if cfg.data.batch_size > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fake_baseline(cfg, device, steps, warmup):
        seen.append(("baseline", cfg.data.batch_size))
        if cfg.data.batch_size > 16:
            raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(profiler, "carp_fast_steps", fake_steps)
    monkeypatch.setattr(profiler, "baseline_steps", fake_baseline)
    cfg = profiler.load_config("demo_cpu.yaml", [])
    fit = profiler.largest_fitting_batch(cfg, torch.device("cpu"), [16, 32, 24, 8], baseline=True)
    assert fit == {"chosen": 16, "tried": {32: "out of memory", 24: "out of memory", 16: "fits"}}
    assert cfg.data.batch_size != 32  # the caller's config is not touched
    assert profiler.largest_fitting_batch(cfg, torch.device("cpu"), [32, 24], baseline=False)["chosen"] == 24
    with pytest.raises(RuntimeError, match=r"no batch size in \[64, 32\] fits"):
        profiler.largest_fitting_batch(cfg, torch.device("cpu"), [32, 64], baseline=False)

    def broken(*args, **kwargs):
        raise ValueError("a shape error, not memory")

    monkeypatch.setattr(profiler, "carp_fast_steps", broken)
    with pytest.raises(ValueError, match="shape error"):
        profiler.largest_fitting_batch(cfg, torch.device("cpu"), [8], baseline=False)


def test_loss_timing_covers_exactly_the_implementations_asked_for(tiny_config):
    profiler = load_tool("profile_throughput")
    timed = profiler.time_losses(tiny_config(), profiler.torch.device("cpu"), 1, 3, 2, impls=("reference",))
    assert set(timed) == {"reference", "shape"} and timed["reference"]["median_s"] > 0


def test_suite_row_puts_each_protocols_headline_of_every_network_side_by_side():
    report = load_tool("performance_report")

    def results(knn, nmi, copies):
        return {"d": {"knn": {"results": {"20": {"top1": knn + 1}, "10": {"top1": knn}}},
                      "kmeans": {"nmi": nmi}},
                "c": {"copydetection": {"map": copies}}}

    record = {"tool": "carp_fast.eval.suite", "spec": "docs/spec.yaml", "arch": "resnet18",
              "which": "teacher", "datasets": {"d": {}, "c": {}}, "feature_seconds": {"d": 3.0, "c": 1.5},
              "results": {"CARP teacher": results(50.0, 18.0, 20.0), "random init": results(40.0, 2.5, 6.0)}}
    what, result, detail = report.suite_row("suite.json", record)
    assert "CARP teacher vs random init" in what and "spec.yaml" in what
    assert result == "10-NN top-1 50.0 vs 40.0; k-means NMI 18.0 vs 2.5; copy detection mAP 20.0 vs 6.0"
    assert detail == "features extracted in 4 s"


def test_producer_cores_per_gpu_is_one_computation_for_bench_and_profiler(tmp_path):
    """Cores round up; the GPU step is read from a profile record (compiled first); the
    profiler's verdict divides its fastest producer by the worker threads."""
    from types import SimpleNamespace

    import torch

    from carp_fast import profiling

    assert profiling.producer_cores_per_gpu(500.0, 1850.0) == 4
    assert profiling.producer_cores_per_gpu(925.0, 1850.0) == 2
    with pytest.raises(ValueError, match="positive"):
        profiling.producer_cores_per_gpu(0.0, 1850.0)
    record = tmp_path / "profile.json"
    record.write_text(json.dumps({"machine": {"gpu": "GPU X"},
                                  "compute": {"images_per_s": 1000.0, "batch_size": 8},
                                  "compute_compiled": {"images_per_s": 1500.0, "batch_size": 8}}))
    step = profiling.recorded_gpu_step(record)
    assert step["images_per_s"] == 1500.0 and "compute_compiled" in step["source"] and "GPU X" in step["source"]
    assert profiling.recorded_gpu_step(tmp_path / "absent.json") is None
    assert profiling.cores_per_gpu_verdict(500.0, 1500.0, "here").startswith("this recipe needs 3 producer cores per GPU")

    profiler = load_tool("profile_throughput")
    report = {"loaders": {"torchvision": {"images_per_s": 5.0},
                          "ffcv": {"images_per_s": 10.0, "producer_images_per_s": 1000.0},
                          "dali": {"images_per_s": 9.0, "producer_images_per_s": 800.0}},
              "compute": {"images_per_s": 30.0}, "compute_compiled": {"images_per_s": 2100.0}}
    cfg = SimpleNamespace(data=SimpleNamespace(num_workers=2))
    on_gpu = profiler.producer_cores(report, cfg, torch.device("cuda"))
    assert on_gpu["backend"] == "ffcv" and on_gpu["producer_images_per_s_per_core"] == 500.0
    assert on_gpu["cores"] == 5 and on_gpu["gpu_step_images_per_s"] == 2100.0
    on_cpu = profiler.producer_cores(report, cfg, torch.device("cpu"))
    recorded = profiling.recorded_gpu_step()
    assert on_cpu["cores"] == profiling.producer_cores_per_gpu(500.0, recorded["images_per_s"])
    assert profiler.producer_cores({"loaders": {"torchvision": {"images_per_s": 5.0}}}, cfg,
                                   torch.device("cpu")) is None
