import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from carp_fast.eval import fewshot  # noqa: E402


def test_average_precision_by_hand():
    # Ranked: hit, miss, hit, miss. Precision 1, 1/2, 2/3, 1/2; the envelope at the hits is
    # 1 and 2/3, so AP = (1 + 2/3) / 2.
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert fewshot.average_precision(scores, np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6)
    # Envelope matters: miss, hit, hit -> precisions 0, 1/2, 2/3; envelope at hits 2/3, 2/3.
    assert fewshot.average_precision(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1], bool)) == pytest.approx(2 / 3)
    assert fewshot.average_precision(scores, np.zeros(4, bool)) == 0.0


def test_interval_by_hand():
    out = fewshot.interval95([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == pytest.approx(1.0)
    assert out["ci95"] == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2 dof)
    assert fewshot.interval95([5.0])["ci95"] is None


def blobs(num_classes, per_class, dim, generator, noise):
    centres = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(labels.numel(), dim, generator=generator), labels


def test_separable_classes_score_100_at_every_shot():
    generator = torch.Generator().manual_seed(0)
    features, labels = blobs(5, 30, 12, generator, noise=0.05)
    train, test = torch.arange(150) % 3 != 0, torch.arange(150) % 3 == 0
    result = fewshot.fewshot_evaluate(
        features[train], labels[train], features[test], labels[test], 5,
        fewshot.FewShotSettings(shots=(1, 4), runs=3),
    )
    for shots in ("1", "4"):
        entry = result["shots"][shots]["costs"]["0.5"]
        assert entry["map"]["mean"] == pytest.approx(100.0)
        assert entry["top1"]["mean"] == pytest.approx(100.0)
        assert entry["map"]["ci95"] == pytest.approx(0.0)
        assert len(entry["runs"]) == 3


def test_random_features_score_near_chance():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(900, 16, generator=generator)
    labels = torch.randint(0, 5, (900,), generator=generator)
    result = fewshot.fewshot_evaluate(
        features[:400], labels[:400], features[400:], labels[400:], 5,
        fewshot.FewShotSettings(shots=(8,), runs=5),
    )
    entry = result["shots"]["8"]["costs"]["0.5"]
    assert abs(entry["top1"]["mean"] - 20.0) < 6.0  # chance: 1 in 5
    # A class's AP with random scores is about its share of the test set (~20 %).
    assert abs(entry["map"]["mean"] - 20.0) < 6.0


def test_draws_are_seeded_and_do_not_depend_on_other_shot_counts():
    generator = torch.Generator().manual_seed(2)
    features, labels = blobs(4, 20, 8, generator, noise=2.0)
    args = (features[::2], labels[::2], features[1::2], labels[1::2], 4)  # every class in both halves
    alone = fewshot.fewshot_evaluate(*args, fewshot.FewShotSettings(shots=(2,), runs=2))
    together = fewshot.fewshot_evaluate(*args, fewshot.FewShotSettings(shots=(1, 2), runs=2))
    assert alone["shots"]["2"] == together["shots"]["2"]
    other_seed = fewshot.fewshot_evaluate(*args, fewshot.FewShotSettings(shots=(2,), runs=2, seed=1))
    assert other_seed["shots"]["2"]["costs"]["0.5"]["runs"] != alone["shots"]["2"]["costs"]["0.5"]["runs"]


def test_sample_shots_takes_k_of_each_class_or_names_the_short_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    picked = fewshot.sample_shots(labels, 3, 1, torch.Generator().manual_seed(0))
    assert sorted(labels[picked].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="class 2, it has 1"):
        fewshot.sample_shots(labels, 3, 2, torch.Generator().manual_seed(0))


def test_several_costs_are_all_reported():
    generator = torch.Generator().manual_seed(3)
    features, labels = blobs(3, 20, 8, generator, noise=3.0)
    result = fewshot.fewshot_evaluate(
        features[::2], labels[::2], features[1::2], labels[1::2], 3,
        fewshot.FewShotSettings(shots=(2,), runs=2, costs=(0.1, 1.0)),
    )
    entry = result["shots"]["2"]
    assert set(entry["costs"]) == {"0.1", "1.0"}
    assert entry["best_cost"] == max(entry["costs"], key=lambda c: entry["costs"][c]["map"]["mean"])
    with pytest.raises(ValueError):
        fewshot.FewShotSettings(shots=(0,))
