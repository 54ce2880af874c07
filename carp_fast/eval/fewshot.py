"""Low-shot classification on frozen features: linear SVMs on k images per class.

The CARP paper's few-shot results (``evaluations/few-shot/eval_svm_voc.py`` of its
release) follow the low-shot protocol of Goyal et al. 2019 ("Scaling and Benchmarking
Self-Supervised Visual Representation Learning", the VOC07 low-shot benchmark also used
by PIRL and PCL): features L2-normalised, k in {1, 2, 4, 8, 16} training images per
class drawn at random, one linear SVM per class against the rest (squared hinge, L2
penalty, cost C = 0.5, positives weighted 2 : 1, 2000 iterations), scored by the
average precision of each class's SVM over the whole test split, averaged over classes
(mAP); 5 random draws per k. We report the mean over the draws with a 95 % interval
(Student t over the draws), and also top-1 accuracy (arg-max over the class SVMs),
the natural score for a single-label ImageFolder.

With several costs the cited code keeps, for each k, the best cost's mean mAP, which is
chosen on the test split; we report every cost and mark that choice as such.

CARP's other low-shot result, iNaturalist 2018 with k images per class, trains a linear
layer with SGD on augmented crops (``evaluate_inat2018.py``); that is the linear probe's
protocol on a k-shot subset, not this module's.

The SVMs are scikit-learn's ``LinearSVC`` (``pip install scikit-learn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_RUNS = 5
DEFAULT_COSTS = (0.5,)


@dataclass
class FewShotSettings:
    shots: Sequence[int] = DEFAULT_SHOTS
    runs: int = DEFAULT_RUNS
    costs: Sequence[float] = DEFAULT_COSTS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.shots or any(k < 1 for k in self.shots):
            raise ValueError(f"few-shot needs positive shot counts, got {list(self.shots)}")
        if self.runs < 1:
            raise ValueError(f"few-shot needs at least one run, got {self.runs}")
        if not self.costs or any(c <= 0 for c in self.costs):
            raise ValueError(f"SVM costs must be positive, got {list(self.costs)}")


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision envelope at each recall step (VOC, as the cited code).

    Ranks by descending score (ties in input order); precision is made monotone from the
    right, then summed over the ranks where recall rises. 0 when there is no positive.
    """
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    num_pos = hits.sum()
    if num_pos == 0:
        return 0.0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float((envelope * hits).sum() / num_pos)


def interval95(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample std and the half-width of the 95 % Student-t interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy import stats  # scikit-learn's own dependency

    return {"mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), "n": n}


def sample_shots(labels: torch.Tensor, num_classes: int, shots: int, generator: torch.Generator) -> torch.Tensor:
    """``shots`` random indices of each class (sorted by class), or ValueError naming the class."""
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < shots:
            raise ValueError(f"{shots}-shot needs {shots} training images of class {c}, it has {members.numel()}")
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.cat(picked)


def svm_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, cost: float) -> np.ndarray:
    """``[N_test, C]`` decision values of one-vs-rest linear SVMs, the cited settings."""
    try:
        from sklearn.svm import LinearSVC
    except ImportError as error:  # optional dependency of the evaluation only
        raise ImportError("few-shot evaluation needs scikit-learn: pip install scikit-learn") from error
    scores = np.empty((test_x.shape[0], num_classes), dtype=np.float64)
    for c in range(num_classes):
        target = np.where(train_y == c, 1, -1)
        svm = LinearSVC(
            C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
            loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0,
        )
        svm.fit(train_x, target)
        scores[:, c] = svm.decision_function(test_x)
    return scores


def fewshot_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: FewShotSettings | None = None,
) -> dict:
    """``{"shots": {k: {"cost": {C: {"map": interval, "top1": interval, "runs": [...]}}, "best_cost": C}}}``.

    Draw ``r`` of ``k``-shot uses a generator seeded from ``(seed, k, r)``, so a draw
    does not depend on which other shot counts are evaluated.
    """
    settings = settings or FewShotSettings()
    bank = F.normalize(train_features.float(), dim=1)
    test_x = F.normalize(test_features.float(), dim=1).numpy()
    test_y = test_labels.numpy()
    present = [c for c in range(num_classes) if (test_y == c).any()]
    report: dict = {"num_classes": num_classes, "num_test": int(test_y.size), "runs": settings.runs, "shots": {}}
    for shots in settings.shots:
        per_cost = {}
        for cost in settings.costs:
            runs = []
            for run in range(settings.runs):
                generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + shots * 1009 + run)
                index = sample_shots(train_labels, num_classes, shots, generator)
                scores = svm_scores(bank[index].numpy(), train_labels[index].numpy(), test_x, num_classes, cost)
                # Classes with no test image have no AP (the cited data set has none such).
                ap = [average_precision(scores[:, c], test_y == c) for c in present]
                runs.append({
                    "map": 100.0 * sum(ap) / len(ap),
                    "top1": 100.0 * float((scores.argmax(1) == test_y).mean()),
                })
            per_cost[str(cost)] = {
                "map": interval95([r["map"] for r in runs]),
                "top1": interval95([r["top1"] for r in runs]),
                "runs": runs,
            }
        best = max(per_cost, key=lambda c: per_cost[c]["map"]["mean"])
        report["shots"][str(shots)] = {
            "costs": per_cost,
            "best_cost": best,
            "best_cost_chosen_on": "test split (as the cited code)" if len(per_cost) > 1 else "only cost",
        }
    return report
