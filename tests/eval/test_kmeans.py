import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from carp_fast.eval import kmeans  # noqa: E402


def separated(num_classes, per_class, dim, generator, noise=0.05):
    """Points tightly around one random direction per class: clusters a k-means must find."""
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1) * 5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=generator)
    order = torch.randperm(labels.numel(), generator=generator)
    return points[order], labels[order]


def test_separated_classes_score_100():
    points, labels = separated(7, 40, 16, torch.Generator().manual_seed(1))
    fit, val, val_labels = points[:140], points[140:], labels[140:]  # one set of centres, two splits
    result = kmeans.kmeans_evaluate(fit, val, val_labels, 7, kmeans.KMeansSettings(seeds=(0, 1, 2)))
    assert result["nmi"] == pytest.approx(100.0)
    assert result["ami"] == pytest.approx(100.0)
    assert result["ari"] == pytest.approx(100.0)
    assert len(result["seeds"]) == 3 and result["mean"]["nmi"] == pytest.approx(100.0)
    assert all(run["clusters_used"] == 7 for run in result["seeds"])


def test_random_features_score_near_chance():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(1200, 32, generator=generator)
    labels = torch.randint(0, 10, (1200,), generator=generator)
    result = kmeans.kmeans_evaluate(features[:600], features[600:], labels[600:], 10, kmeans.KMeansSettings(seeds=(0,)))
    # Labels independent of the features: the adjusted scores are 0 in expectation.
    assert abs(result["ami"]) < 2.0
    assert abs(result["ari"]) < 2.0
    assert result["nmi"] < 5.0


def test_converged_clustering_is_a_fixed_point_and_chunking_changes_nothing():
    generator = torch.Generator().manual_seed(3)
    points = F.normalize(torch.randn(300, 8, generator=generator), dim=1)
    whole = kmeans.spherical_kmeans(points, 5, seed=4, iterations=200)
    chunked = kmeans.spherical_kmeans(points, 5, seed=4, iterations=200, chunk_size=7)
    assert torch.equal(whole.assignments, chunked.assignments)
    assert torch.allclose(whole.centroids, chunked.centroids, atol=1e-6)
    assert whole.iterations < 200  # converged
    # Definition, one point at a time: each point sits with its most similar centroid...
    for point, cluster in zip(points, whole.assignments):
        sims = [float(point @ c) for c in whole.centroids]
        assert sims[int(cluster)] == pytest.approx(max(sims), abs=1e-6)
    # ...and each centroid is the normalised mean of its points.
    for c in range(5):
        members = points[whole.assignments == c]
        assert torch.allclose(whole.centroids[c], F.normalize(members.sum(0), dim=0), atol=1e-5)


def test_more_clusters_than_distinct_points_still_gives_k_clusters():
    points = F.normalize(torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5), dim=1)
    result = kmeans.spherical_kmeans(points, 4, seed=0)
    assert result.centroids.shape == (4, 2)
    assert torch.isfinite(result.centroids).all()
    assert result.assignments.unique().numel() >= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="k-means needs 1 <= k"):
        kmeans.spherical_kmeans(F.normalize(torch.randn(3, 4), dim=1), 4)
    with pytest.raises(ValueError, match="seed"):
        kmeans.KMeansSettings(seeds=())


def test_scores_ignore_cluster_names():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    renamed = torch.tensor([2, 2, 0, 0, 1, 1])
    assert kmeans.cluster_scores(labels, renamed) == pytest.approx({"nmi": 100.0, "ami": 100.0, "ari": 100.0})


def test_standardisation_uses_the_fitting_split():
    fit = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    other = torch.tensor([[2.0, 30.0]])
    fit_n, other_n = kmeans.prepare(fit, other, standardize=True, device="cpu")
    # Mean (2, 20), std (1, 10): the other point becomes (0, 1).
    assert torch.allclose(other_n, torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(fit_n, F.normalize(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), dim=1))


@pytest.mark.cuda
def test_gpu_matches_cpu():
    points, labels = separated(5, 50, 16, torch.Generator().manual_seed(5), noise=0.5)
    cpu = kmeans.kmeans_evaluate(points, points, labels, 5, kmeans.KMeansSettings(seeds=(0,)), "cpu")
    gpu = kmeans.kmeans_evaluate(points, points, labels, 5, kmeans.KMeansSettings(seeds=(0,)), "cuda")
    assert gpu["nmi"] == pytest.approx(cpu["nmi"], abs=1e-6)
