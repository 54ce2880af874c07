"""tools/run_demo.py (what `make demo` runs) on a tiny dataset: train, k-NN, summary."""

import json

import pytest

from conftest import load_tool, tiny_overrides


@pytest.mark.slow
def test_demo_trains_then_reports_trained_and_random_knn(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "demo"
    summary_copy = tmp_path / "bench" / "demo.json"
    overrides = tiny_overrides(tiny_dataset / "train", out, train__max_steps=3)
    assert load_tool("run_demo").main([*overrides, "--json", str(summary_copy)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(summary_copy.read_text()) == summary
    assert summary["steps"] == 3 and summary["arch"] == "resnet18"
    knn = summary["knn"]
    assert knn["num_val"] == 12 and knn["num_classes"] == 6  # 2 held-out images per class
    for accuracy in (knn["trained_top1"], knn["random_top1"]):
        assert 0.0 <= accuracy <= 100.0
    assert set(knn["trained"]) == set(knn["random_init"]) == {"10", "20"}
    printed = capsys.readouterr().out
    assert "+ " in printed and "carp_fast.train" in printed and "carp_fast.eval.knn" in printed
    assert f"trained {knn['trained_top1']:.1f} % vs random init {knn['random_top1']:.1f} %" in printed


def test_demo_refuses_a_wrong_key_before_training(tmp_path):
    with pytest.raises(Exception, match="trian"):
        load_tool("run_demo").main(["trian.epochs=1"])
