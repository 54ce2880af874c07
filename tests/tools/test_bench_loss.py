"""tools/bench_loss.py at a tiny shape: every implementation agrees, and the JSON holds the ratios."""

import json
import os

import pytest
import torch

from conftest import load_tool, needs_extension

bench_loss = load_tool("bench_loss")

TINY = ["--dtype", "fp32", "--views-student", "3", "--views-teacher", "2", "--batch", "3",
        "--prototypes", "384", "--group", "96", "--reps", "2", "--warmup", "1", "--threads", "1"]


@needs_extension
def test_every_implementation_gives_the_same_loss_and_the_json_holds_the_ratios(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "loss.json"
    impls = "published,reference,fused,fused_warp,fused_blocked"
    result = bench_loss.main(["--device", "cpu", *TINY, "--impls", impls, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["median_ms"]) == set(impls.split(","))
    # The same logits and partition order for all: published draws the partition itself,
    # so it agrees on the entropy only up to the permutation of groups (a sum over groups).
    reference = result["values"]["reference"]
    for impl in ("fused", "fused_warp", "fused_blocked"):
        got = result["values"][impl]
        assert got["consistency"] == pytest.approx(reference["consistency"], rel=1e-5)
        assert got["entropy"] == pytest.approx(reference["entropy"], rel=1e-5, abs=1e-7)
    for impl in ("published", "reference", "fused_warp", "fused_blocked"):
        ratio = result["ratios"][f"{impl}_time_over_fused"]
        assert ratio == pytest.approx(result["median_ms"][impl] / result["median_ms"]["fused"])
    assert result["roofline"] is None  # CPU: no kernels timed against a bandwidth


def test_fused_variants_pin_the_cuda_kernel_layout_only_while_they_run(monkeypatch):
    monkeypatch.delenv("CARP_FAST_CUDA_KERNELS", raising=False)
    for impl, layout in bench_loss.KERNEL_LAYOUTS.items():
        with bench_loss.kernel_choice(impl):
            assert os.environ["CARP_FAST_CUDA_KERNELS"] == layout
        assert "CARP_FAST_CUDA_KERNELS" not in os.environ
    with bench_loss.kernel_choice("fused"):
        assert "CARP_FAST_CUDA_KERNELS" not in os.environ


def test_the_timing_order_varies_from_rep_to_rep_and_repeats_across_runs():
    impls = ["published", "reference", "compiled", "fused", "fused_warp"]
    orders = [bench_loss.timing_order(impls, rep) for rep in range(20)]
    assert all(sorted(order) == sorted(impls) for order in orders)
    assert orders == [bench_loss.timing_order(impls, rep) for rep in range(20)]
    for impl in impls:
        places = [order.index(impl) for order in orders]
        before = {order[place - 1] for order, place in zip(orders, places) if place > 0}
        assert len(set(places)) >= 3, f"{impl} is nearly always timed at the same place"
        assert len(before) >= 3, f"{impl} is nearly always timed right after the same one"


def test_unknown_implementation_is_refused():
    with pytest.raises(SystemExit, match="unknown --impls"):
        bench_loss.main(["--device", "cpu", *TINY, "--impls", "fused,fastest"])
