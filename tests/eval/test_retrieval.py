import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carp_fast.eval import retrieval


def test_ap_from_ranks_by_hand():
    # Positives at ranks 0 and 2 of 2: trapezoids (1 + 1) / 2 and (1/2 + 2/3) / 2, each of width 1/2.
    assert retrieval.ap_from_ranks([0, 2], 2) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    # One positive at rank 1: (0/1 + 1/2) / 2 (the Holidays trapezoid's left side is 0).
    assert retrieval.ap_from_ranks([1], 1) == pytest.approx(0.25)
    # A positive never retrieved adds nothing.
    assert retrieval.ap_from_ranks([0], 2) == pytest.approx(0.5)


def test_junk_is_taken_out_of_the_ranking():
    order = np.array([5, 3, 1, 0, 2, 4])  # image ids, best first
    ranks = retrieval.ranks_without_junk(order, np.array([4, 1]), np.array([3]))
    assert ranks.tolist() == [1, 4]  # 1 at position 2, 4 at 5, each after the one junk image


def gnd_entry(easy, hard, junk):
    return {"easy": easy, "hard": hard, "junk": junk, "bbx": [0, 0, 10, 10]}


def test_revisited_map_by_hand():
    # 1 query, 5 images ranked 0,1,2,3,4 (similarity decreasing).
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    gnd = [gnd_entry(easy=[1], hard=[3], junk=[0])]
    out = retrieval.revisited_map(similarity, gnd)
    # Easy: ok {1}, junk {0, 3}: image 1 at rank 0 once junk 0 is out -> AP 1.
    assert out["easy"]["map"] == pytest.approx(100.0)
    # Medium: ok {1, 3}, junk {0}: ranks 0 and 2 -> AP as in test_ap_from_ranks_by_hand.
    assert out["medium"]["map"] == pytest.approx(100 * (1.0 + (0.5 + 2 / 3) / 2) / 2)
    # Hard: ok {3}, junk {0, 1}: rank 3 - 2 = 1 -> 0.25.
    assert out["hard"]["map"] == pytest.approx(25.0)
    # mP@5 for Medium: positives at 1-based 1 and 3, k = min(5, 3) -> 2/3.
    assert out["medium"]["mp@5"] == pytest.approx(100 * 2 / 3)
    assert out["medium"]["mp@1"] == pytest.approx(100.0)


def test_queries_without_positives_are_left_out():
    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    gnd = [gnd_entry([0], [], []), gnd_entry([], [1], [])]
    out = retrieval.revisited_map(similarity, gnd)
    assert out["easy"]["num_queries"] == 1 and out["easy"]["map"] == pytest.approx(100.0)
    assert out["hard"]["num_queries"] == 1 and out["hard"]["map"] == pytest.approx(100.0)
    assert out["medium"]["num_queries"] == 2


def test_perfect_and_random_features():
    generator = torch.Generator().manual_seed(0)
    landmarks = F.normalize(torch.randn(4, 32, generator=generator), dim=1)
    image_of = torch.arange(40) % 4
    images = landmarks[image_of] + 0.01 * torch.randn(40, 32, generator=generator)
    # Query q's positives are the images of landmark q: the first half easy, the rest hard.
    members = [[i for i in range(40) if image_of[i] == q] for q in range(4)]
    gnd = [gnd_entry(m[: len(m) // 2], m[len(m) // 2 :], []) for m in members]
    perfect = retrieval.revisited_evaluate(landmarks, images, gnd)
    assert all(perfect[level]["map"] == pytest.approx(100.0) for level in ("easy", "medium", "hard"))
    noise = torch.randn(4, 32, generator=generator)
    chance = retrieval.revisited_evaluate(noise, torch.randn(40, 32, generator=generator), gnd)
    assert chance["medium"]["map"] < 60.0  # 10 positives in 40: chance AP about 0.25


def write_revisited(root, name="rtoy", num_images=6, num_queries=2, gnd=None):
    from PIL import Image

    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"img{i}" for i in range(num_images)]
    qimlist = [f"query{i}" for i in range(num_queries)]
    for index, stem in enumerate(imlist + qimlist):
        Image.new("RGB", (30 + index, 20), (index * 20 % 255, 80, 160)).save(folder / "jpg" / f"{stem}.jpg")
    gnd = gnd if gnd is not None else [gnd_entry([q], [q + 2], [q + 4]) for q in range(num_queries)]
    with open(folder / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, handle)
    return folder


def test_load_revisited_reads_the_toolkit_layout(tmp_path):
    folder = write_revisited(tmp_path)
    data = retrieval.load_revisited(folder)
    assert data.name == "rtoy"
    assert data.images[0] == str(folder / "jpg" / "img0.jpg") and len(data.queries) == 2
    assert data.gnd[1]["hard"] == [3]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "gnd_rtoy.pkl").unlink(), "exactly one gnd_<name>.pkl"),
        (lambda f: (f / "gnd_rtoy.pkl").write_bytes(b"not a pickle"), "cannot read .*gnd_rtoy.pkl"),
        (lambda f: pickle.dump({"imlist": []}, open(f / "gnd_rtoy.pkl", "wb")), "imlist, qimlist and gnd"),
        (lambda f: pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]},
                               open(f / "gnd_rtoy.pkl", "wb")), r"gnd\[0\]\['easy'\] indexes outside"),
        (lambda f: pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0]}]},
                               open(f / "gnd_rtoy.pkl", "wb")), r"gnd\[0\] lacks hard, junk"),
    ],
)
def test_bad_ground_truth_is_named(tmp_path, breakage, message):
    folder = write_revisited(tmp_path)
    breakage(folder)
    with pytest.raises(retrieval.RetrievalDataError, match=message):
        retrieval.load_revisited(folder)


def test_queries_cropped_to_their_box_once(tmp_path):
    from PIL import Image

    data = retrieval.load_revisited(write_revisited(tmp_path))
    crops = retrieval.crop_queries(data, tmp_path / "crops")
    assert len(crops) == 2
    with Image.open(crops[1]) as image:
        assert image.size == (10, 10)  # gnd_entry's bbx [0, 0, 10, 10]
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "crops").iterdir()]
    assert retrieval.crop_queries(data, tmp_path / "crops") == crops
    assert [p.stat().st_mtime_ns for p in (tmp_path / "crops").iterdir()] == mtimes  # reused
    data.gnd[0]["bbx"] = None
    with pytest.raises(retrieval.RetrievalDataError, match="query 0 .* has no bbx"):
        retrieval.crop_queries(data, tmp_path / "crops")


def test_thumbnail_keeps_the_aspect_and_never_enlarges():
    from PIL import Image

    transform = retrieval.thumbnail_transform(50)
    assert transform(Image.new("RGB", (200, 100))).shape == (3, 25, 50)
    assert transform(Image.new("RGB", (30, 20))).shape == (3, 20, 30)


def brute_force_map_at_r(queries, query_labels, db, db_labels):
    total = 0.0
    for q, label in zip(queries.tolist(), query_labels.tolist()):
        sims = [(sum(a * b for a, b in zip(q, d)) / (np.linalg.norm(q) * np.linalg.norm(d)), l)
                for d, l in zip(db.tolist(), db_labels.tolist())]
        ranked = [l for _, l in sorted(sims, key=lambda s: -s[0])]
        r = db_labels.tolist().count(label)
        hits, score = 0, 0.0
        for i, l in enumerate(ranked[:r], 1):
            if l == label:
                hits += 1
                score += hits / i
        total += score / r
    return 100 * total / len(query_labels)


def test_map_at_r_matches_brute_force_and_hand_case():
    generator = torch.Generator().manual_seed(1)
    db, db_labels = torch.randn(30, 5, generator=generator), torch.randint(0, 3, (30,), generator=generator)
    queries = db[:9] + 0.7 * torch.randn(9, 5, generator=generator)
    query_labels = db_labels[:9]
    out = retrieval.map_at_r(queries, query_labels, db, db_labels, chunk_size=4)
    assert out["map@r"] == pytest.approx(brute_force_map_at_r(queries, query_labels, db, db_labels))
    # By hand: class 0 has R=2 database images; the query ranks them 1st and 3rd.
    db = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    out = retrieval.map_at_r(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), db, torch.tensor([0, 1, 0]))
    assert out["map@r"] == pytest.approx(50.0)  # (1/1 + 0) / 2: the 3rd is beyond R
    assert out["r_precision"] == pytest.approx(50.0) and out["precision@1"] == pytest.approx(100.0)


def test_map_at_r_perfect_and_random():
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 16, generator=generator) * 5
    labels = torch.arange(4).repeat(25)
    perfect = retrieval.map_at_r(centres[labels] + 0.01 * torch.randn(100, 16, generator=generator), labels,
                                 centres[labels] + 0.01 * torch.randn(100, 16, generator=generator), labels)
    assert perfect["map@r"] == pytest.approx(100.0)
    random = retrieval.map_at_r(torch.randn(200, 16, generator=generator), torch.randint(0, 4, (200,), generator=generator),
                                torch.randn(400, 16, generator=generator), torch.randint(0, 4, (400,), generator=generator))
    assert random["map@r"] < 15.0 and abs(random["r_precision"] - 25.0) < 5.0


def test_multiscale_features_are_the_mean_over_bilinear_rescales():
    from carp_fast.eval import features as feat

    backbone = feat.random_encoder("resnet18", seed=1).backbone
    images = torch.randn(2, 3, 64, 48)
    expected = sum(
        backbone(F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else images)
        for s in retrieval.MULTISCALE
    ) / 3
    with torch.no_grad():
        got = feat.forward_features(backbone, images, scales=retrieval.MULTISCALE)
        assert torch.allclose(got, expected.detach(), atol=1e-5)
        assert not torch.allclose(got, feat.forward_features(backbone, images), atol=1e-3)
