"""tools/gpu_check_nvjpeg.py, the GPU stage of tools/gpu_check.sh, run here in CPU mode with tiny counts."""

import json

from conftest import load_tool


def test_the_stage_runs_every_step_and_writes_its_verdict(tmp_path):
    tool = load_tool("gpu_check_nvjpeg")
    out = tmp_path / "out" / "gpu_check_nvjpeg.json"
    status = tool.main([
        "--device", "cpu", "--tiny", "--images", "16", "--batch-size", "4", "--workers", "2",
        "--steps", "2", "--warmup", "1", "--loader-seconds", "0", "--data-dir", str(tmp_path / "photos"),
        "--json", str(out),
    ])
    report = json.loads(out.read_text())
    assert status == 0 and not report["errors"] and not report["skipped"]
    stages = report["stages"]
    assert stages["photos"]["images"] == 16
    assert stages["decode"]["nvjpeg"]["images_per_s"] > 0 and stages["decode"]["nvjpeg"]["undecodable"] == 0
    assert stages["decode"]["pil_all_cores"]["images_per_s"] > 0
    for name in ("producer", "loader"):
        assert all(stages[name][backend]["images_per_s"] > 0 for backend in ("nvjpeg", "torchvision")), name
    assert all(stages["trainer"][k]["images_per_s"] > 0 for k in ("synthetic", "nvjpeg", "torchvision"))
    verdict = report["verdict"]
    assert set(verdict["projected_imagenet_epoch_s_per_gpu"]) == {"synthetic", "nvjpeg", "torchvision"}
    expected = 1_281_167 / stages["trainer"]["nvjpeg"]["images_per_s"]
    assert abs(verdict["projected_imagenet_epoch_s_per_gpu"]["nvjpeg"] - expected) < 1e-6 * expected
    assert "producer_goal_met" in verdict and "end_to_end_goal_met" in verdict
    assert report["commit"] and report["machine"] and report["command"].startswith("python tools/gpu_check_nvjpeg.py")
    assert not (tmp_path / "photos" / "run" / "last.pt").exists()


def test_a_spent_budget_skips_the_remaining_stages(tmp_path):
    tool = load_tool("gpu_check_nvjpeg")
    out = tmp_path / "x.json"
    tool.main(["--device", "cpu", "--tiny", "--images", "8", "--batch-size", "4", "--workers", "1",
               "--budget", "0", "--data-dir", str(tmp_path / "photos"), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["skipped"] == ["photos", "decode", "producer", "loader", "trainer"]
    assert report["verdict"]["text"] == "no stage finished"
