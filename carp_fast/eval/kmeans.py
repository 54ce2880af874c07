"""k-means on frozen features, scored against the labels: NMI, AMI, ARI.

The CARP paper (Silva & Ramírez Rivera, "Representation Learning via Consistent
Assignment of Views over Random Partitions", NeurIPS 2023) clusters frozen backbone
features into k = number of classes and reports NMI, adjusted NMI and adjusted Rand
index. Its released evaluation (``evaluations/kmeans`` with ``helpers/clustering.py``)
standardises the features (per-dimension mean and variance of the fitting set), runs
spherical k-means (faiss, 100 iterations, the best of 10 restarts by objective) on the
*train* split and scores the assignment of the *val* split to the nearest centroid.

This module does the same without faiss: features are standardised (optional), then
L2-normalised, and clustered by spherical k-means (cosine similarity, centroids
re-normalised after each update) with k-means++ initialisation, from several seeds; the
run with the best objective (sum of cosine similarities to the assigned centroid) is
the reported one, as faiss' ``nredo`` does, and every seed's scores are kept too.
Similarities are computed a chunk of points at a time, so a bank of any size (ImageNet
train, 1.28M x 2048) needs the bank plus a few hundred MB, on CPU or GPU.

The scores themselves are scikit-learn's (``pip install scikit-learn``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from carp_fast.eval.knn import CHUNK_BYTES, _exact_fp32_matmul

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Clustering:
    centroids: torch.Tensor  # [k, D], unit norm
    assignments: torch.Tensor  # [N] int64, of the fitted points
    objective: float  # mean cosine similarity of each point to its centroid
    iterations: int
    seed: int


def _chunk_rows(num_columns: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, min(65536, CHUNK_BYTES // (4 * max(1, num_columns))))


@torch.no_grad()
def assign(points: torch.Tensor, centroids: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and cosine similarity of each (unit-norm) point's nearest (unit-norm) centroid."""
    rows = _chunk_rows(centroids.shape[0], chunk_size)
    index = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    best = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
    with _exact_fp32_matmul():
        for start in range(0, points.shape[0], rows):
            sims = points[start : start + rows] @ centroids.T
            best[start : start + rows], index[start : start + rows] = sims.max(dim=1)
    return index, best


@torch.no_grad()
def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with the distance 1 - cosine.

    Each new centre is drawn with probability proportional to the squared distance
    (on unit vectors, ``2 - 2 cos``) to the nearest centre chosen so far; one pass over
    the points per centre, a matrix-vector product each.
    """
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    nearest = (2 - 2 * (points @ points[first])).clamp_min_(0)
    for _ in range(1, k):
        total = float(nearest.sum())  # intended sync: the draw needs the normaliser
        if total <= 0:  # fewer distinct points than k: any point is as good as another
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial((nearest / total).cpu(), 1, generator=generator))
        centres.append(points[pick])
        nearest = torch.minimum(nearest, (2 - 2 * (points @ points[pick])).clamp_min_(0))
    return torch.stack(centres)


@torch.no_grad()
def spherical_kmeans(
    points: torch.Tensor,
    k: int,
    seed: int = 0,
    iterations: int = 100,
    chunk_size: int | None = None,
) -> Clustering:
    """Lloyd iterations on unit vectors from a k-means++ start; stops when no point moves.

    ``points`` must be L2-normalised. An empty cluster is re-seeded with the point
    farthest from its centroid, so exactly ``k`` clusters come back.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(points, k, generator)
    assignments = None
    done = 0
    for done in range(1, iterations + 1):
        new, sims = assign(points, centroids, chunk_size)
        sums = torch.zeros_like(centroids).index_add_(0, new, points)
        counts = torch.bincount(new, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # The worst-served points become the empty clusters' centres.
            far = sims.topk(empty.numel(), largest=False).indices
            sums[empty] = points[far]
            new[far] = empty
        centroids = F.normalize(sums, dim=1)
        # Intended sync, once an iteration: convergence is a host decision.
        if assignments is not None and bool((new == assignments).all()):
            assignments = new
            break
        assignments = new
    assignments, sims = assign(points, centroids, chunk_size)
    return Clustering(centroids, assignments, float(sims.mean()), done, seed)


@dataclass
class KMeansSettings:
    seeds: Sequence[int] = DEFAULT_SEEDS
    iterations: int = 100
    standardize: bool = True  # as CARP's released evaluation (StandardScaler before k-means)
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("k-means needs at least one seed")
        if self.iterations < 1:
            raise ValueError(f"k-means iterations must be positive, got {self.iterations}")


def prepare(fit: torch.Tensor, *others: torch.Tensor, standardize: bool, device) -> list[torch.Tensor]:
    """Standardise with the fitting set's statistics (optional), then L2-normalise all."""
    fit = fit.to(device, torch.float32)
    others = [o.to(device, torch.float32) for o in others]
    if standardize:
        mean, std = fit.mean(0), fit.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant dimensions stay 0
        fit = (fit - mean) / std
        others = [(o - mean) / std for o in others]
    return [F.normalize(x, dim=1) for x in (fit, *others)]


def cluster_scores(labels: torch.Tensor, clusters: torch.Tensor) -> dict[str, float]:
    """NMI, AMI and ARI in %, scikit-learn's definitions (arithmetic-mean normalisation)."""
    try:
        from sklearn import metrics
    except ImportError as error:  # optional dependency of the evaluation only
        raise ImportError("k-means scores need scikit-learn: pip install scikit-learn") from error
    y, c = labels.cpu().numpy(), clusters.cpu().numpy()
    return {
        "nmi": 100.0 * float(metrics.normalized_mutual_info_score(y, c)),
        "ami": 100.0 * float(metrics.adjusted_mutual_info_score(y, c)),
        "ari": 100.0 * float(metrics.adjusted_rand_score(y, c)),
    }


def kmeans_evaluate(
    fit_features: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    num_clusters: int,
    settings: KMeansSettings | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Cluster ``fit_features`` (CARP: the train split) into ``num_clusters``, assign
    ``eval_features`` (CARP: val) to the nearest centroid and score against ``eval_labels``.

    Returns the scores of the best-objective seed at the top level, and every seed's
    scores with their mean under ``"seeds"`` and ``"mean"``.
    """
    settings = settings or KMeansSettings()
    fit, evaluated = prepare(fit_features, eval_features, standardize=settings.standardize, device=device)
    runs = []
    for seed in settings.seeds:
        clustering = spherical_kmeans(fit, num_clusters, seed, settings.iterations, settings.chunk_size)
        predicted, _ = assign(evaluated, clustering.centroids, settings.chunk_size)
        runs.append({
            "seed": seed, "objective": clustering.objective, "iterations": clustering.iterations,
            "clusters_used": int(predicted.unique().numel()),
            **cluster_scores(eval_labels, predicted),
        })
    best = max(runs, key=lambda r: r["objective"])
    mean = {m: sum(r[m] for r in runs) / len(runs) for m in ("nmi", "ami", "ari")}
    return {
        "k": num_clusters, "num_fit": int(fit.shape[0]), "num_eval": int(evaluated.shape[0]),
        "standardize": settings.standardize,
        **{m: best[m] for m in ("nmi", "ami", "ari")}, "best_seed": best["seed"],
        "mean": mean, "seeds": runs,
    }
