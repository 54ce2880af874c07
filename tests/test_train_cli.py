import subprocess
import sys

import yaml

from conftest import tiny_overrides


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "carp_fast.train", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_unknown_key_exits_2_naming_it():
    result = run_cli("--cfg", "demo_cpu.yaml", "train.epoch=3")
    assert result.returncode == 2
    assert "train.epoch" in result.stderr and "epochs" in result.stderr


def test_wrong_type_exits_2():
    result = run_cli("--cfg", "demo_cpu.yaml", "data.batch_size=big")
    assert result.returncode == 2
    assert "data.batch_size: expected an integer" in result.stderr


def test_missing_data_path_exits_2(tmp_path):
    result = run_cli("--cfg", "demo_cpu.yaml", f"data.path={tmp_path / 'nowhere'}",
                     "data.generate_demo=false", f"train.out_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "nowhere" in result.stderr


def test_recipe_by_name_and_print_config():
    result = run_cli("--cfg", "fast_400ep", "--print-config", "train.seed=3")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["seed"] == 3 and printed["train"]["epochs"] == 400


def test_cli_trains_and_leaves_a_run_directory(tiny_dataset, tmp_path):
    out = tmp_path / "cli_run"
    result = run_cli("--cfg", "demo_cpu.yaml",
                     *tiny_overrides(tiny_dataset / "train", out, **{"train.max_steps": 2}))
    assert result.returncode == 0, result.stderr
    assert "step      2/2" in result.stdout
    assert {"config.yaml", "metrics.jsonl", "last.pt"} <= {p.name for p in out.iterdir()}
