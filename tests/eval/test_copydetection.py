import pytest
import torch
import torch.nn.functional as F

from carp_fast.eval import copydetection
from carp_fast.eval.retrieval import RetrievalDataError


def write_copydays(root, originals=("200000", "200100", "200200"), strong=("200001", "200002", "200101", "200201")):
    from PIL import Image

    for folder, names in (("original", originals), ("strong", strong)):
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (40, 30), (i * 50, 100, 200)).save(root / folder / f"{name}.jpg")
    return root


def test_layout_and_positives_by_file_name(tmp_path):
    root = write_copydays(tmp_path / "copydays")
    (tmp_path / "yfcc").mkdir()
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "yfcc" / "d.png")
    data = copydetection.load_copydays(root, distractors=tmp_path / "yfcc")
    assert [p.rsplit("/", 1)[1] for p in data.strong] == ["200001.jpg", "200002.jpg", "200101.jpg", "200201.jpg"]
    assert data.positives == [[0], [0], [1], [2]]
    assert len(data.distractors) == 1 and data.whitening == []


def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(RetrievalDataError, match="original folder .* does not exist"):
        copydetection.load_copydays(tmp_path / "nowhere")
    root = write_copydays(tmp_path / "cd", strong=("200001", "999901"))
    with pytest.raises(RetrievalDataError, match="999901.jpg has no original"):
        copydetection.load_copydays(root)
    (tmp_path / "empty").mkdir()
    root = write_copydays(tmp_path / "cd2")
    with pytest.raises(RetrievalDataError, match="distractor folder .*empty holds no image"):
        copydetection.load_copydays(root, distractors=tmp_path / "empty")


def test_perfect_features_give_100_and_a_copy_at_rank_1_gives_25():
    generator = torch.Generator().manual_seed(0)
    originals = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    distractors = torch.randn(20, 8, generator=generator)
    database = torch.cat([originals, distractors])
    positives = [[0], [0], [1], [2]]
    queries = originals[[0, 0, 1, 2]] + 0.01 * torch.randn(4, 8, generator=generator)
    assert copydetection.copydetection_evaluate(queries, database, positives)["map"] == pytest.approx(100.0)
    # One query whose best match is a distractor, its original second: AP (0/1 + 1/2) / 2.
    database = torch.cat([originals, queries[:1] * 2])  # a distractor identical in direction to query 0
    result = copydetection.copydetection_evaluate(queries, database, positives)
    assert result["map"] == pytest.approx((0.25 + 1 + 1 + 1) / 4 * 100)


def test_positive_beyond_max_rank_scores_zero():
    query = torch.tensor([[1.0, 0.0]])
    database = torch.tensor([[0.0, 1.0]] + [[1.0, 0.01 * i] for i in range(1, 4)])  # the original is last
    assert copydetection.copydetection_evaluate(query, database, [[0]], max_rank=3)["map"] == 0.0
    assert copydetection.copydetection_evaluate(query, database, [[0]], max_rank=4)["map"] == pytest.approx(100 * (0 + 1 / 4) / 2)


def test_random_features_score_near_zero():
    generator = torch.Generator().manual_seed(1)
    queries, database = torch.randn(200, 16, generator=generator), torch.randn(400, 16, generator=generator)
    positives = [[i % 50] for i in range(200)]
    assert copydetection.copydetection_evaluate(queries, database, positives)["map"] < 5.0


def test_whitening_makes_the_learning_set_white():
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(6, 6, generator=generator)
    features = torch.randn(5000, 6, generator=generator) @ mixing + 3.0
    mean, projection = copydetection.learn_whitening(features)
    white = (features - mean) @ projection
    assert torch.allclose(white.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(white.T @ white / white.shape[0], torch.eye(6), atol=1e-3)
    result = copydetection.copydetection_evaluate(features[:3], features[:10], [[0], [1], [2]], whitening_features=features)
    assert result["whitened"] and result["map"] == pytest.approx(100.0)


def test_square_transform():
    from PIL import Image

    assert copydetection.square_transform(32)(Image.new("RGB", (100, 50))).shape == (3, 32, 32)
