import json
import math
import shutil

import pytest
import torch

from carp_fast.config import ModelConfig
from carp_fast.eval import features as feat
from carp_fast.eval import knn
from carp_fast.model import CarpModel


def brute_force_knn(train, train_labels, test, test_labels, num_classes, k, temperature):
    """One query at a time, plain Python: the definition the fast path must match."""
    top1 = top5 = 0
    for query, target in zip(test.tolist(), test_labels.tolist()):
        q_norm = math.sqrt(sum(x * x for x in query))
        sims = []
        for row, label in zip(train.tolist(), train_labels.tolist()):
            r_norm = math.sqrt(sum(x * x for x in row))
            sims.append((sum(a * b for a, b in zip(query, row)) / (q_norm * r_norm), label))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])[: min(5, k)]
        top1 += ranked[0] == target
        top5 += target in ranked and votes[target] > 0  # no vote, no prediction
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_brute_force(temperature):
    generator = torch.Generator().manual_seed(3)
    num_classes = 7
    train = torch.randn(61, 6, generator=generator) * 3
    train_labels = torch.randint(0, num_classes, (61,), generator=generator)
    # Queries near train points of known class, so the vote is not pure chance.
    test = train[:23] + 0.8 * torch.randn(23, 6, generator=generator)
    test_labels = train_labels[:23].clone()
    test_labels[::4] = torch.randint(0, num_classes, (6,), generator=generator)
    ks = [1, 3, 10, 20, 61, 100]
    results = knn.knn_classify(
        train, train_labels, test, test_labels, num_classes, ks, temperature, chunk_size=5
    )
    for k in ks:
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, num_classes, min(k, 61), temperature)
        assert results[k]["top1"] == pytest.approx(top1), k
        assert results[k]["top5"] == pytest.approx(top5), k
    # Chunking changes nothing.
    whole = knn.knn_classify(train, train_labels, test, test_labels, num_classes, ks, temperature)
    assert whole == results


def test_top5_counts_only_classes_that_got_a_vote():
    # One neighbour votes for one class: top-5 can be no better than top-1, whichever
    # zero-vote classes topk happens to rank behind it.
    generator = torch.Generator().manual_seed(5)
    train, test = torch.randn(200, 8, generator=generator), torch.randn(50, 8, generator=generator)
    train_labels = torch.randint(0, 10, (200,), generator=generator)
    test_labels = torch.randint(0, 10, (50,), generator=generator)
    results = knn.knn_classify(train, train_labels, test, test_labels, 10, [1, 3])
    assert results[1]["top5"] == results[1]["top1"]
    assert results[3]["top1"] <= results[3]["top5"]


def test_knn_top5_is_none_with_fewer_than_five_classes():
    train = torch.randn(20, 4)
    labels = torch.arange(20) % 3
    results = knn.knn_classify(train, labels, train, labels, 3, [1])
    assert results[1]["top1"] == 100.0 and results[1]["top5"] is None


def test_knn_rejects_bad_arguments():
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        knn.knn_classify(x, y, x, y, 2, [1], temperature=0)
    with pytest.raises(ValueError, match="positive"):
        knn.knn_classify(x, y, x, y, 2, [0])


def save_run_checkpoint(cfg, path, seed=0):
    """A carp_fast checkpoint of an untrained tiny model, as the trainer writes it."""
    torch.manual_seed(seed)
    model = CarpModel(cfg.model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(
        {"student": state, "teacher": state, "optimizer": {}, "scaler": {}, "step": 0, "epoch": 0,
         "config": cfg.to_dict(), "rng": {}, "format": "carp_fast/1"},
        path,
    )
    return model


def test_random_encoder_is_the_runs_initial_backbone():
    cfg = ModelConfig(arch="resnet18", num_prototypes=64, partition_size=16, hidden_dim=32, bottleneck_dim=16)
    torch.manual_seed(5)
    initial = CarpModel(cfg).backbone.state_dict()
    encoder = feat.random_encoder("resnet18", seed=5, zero_init_residual=cfg.zero_init_residual)
    rebuilt = encoder.backbone.state_dict()
    assert initial.keys() == rebuilt.keys()
    assert all(torch.equal(initial[k], rebuilt[k]) for k in initial)


@pytest.mark.slow
def test_knn_cli_with_random_comparison_and_cache(tiny_config, tiny_dataset, tmp_path, capsys):
    cfg = tiny_config()
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    save_run_checkpoint(cfg, run_dir / "last.pt")
    out = tmp_path / "knn.json"
    argv = [
        "--ckpt", str(run_dir), "--train", str(tiny_dataset / "train"), "--val", str(tiny_dataset / "val"),
        "--k", "1", "5", "--image-size", "32", "--batch-size", "8", "--num-workers", "0",
        "--device", "cpu", "--compare-random", "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
    ]
    assert knn.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["arch"] == "resnet18" and report["which"] == "teacher"
    assert report["num_train"] == 24 and report["num_val"] == 12 and report["num_classes"] == 6
    assert set(report["results"]) == {"1", "5"}
    # The checkpoint holds the untrained model with the run's seed: the same network.
    assert report["random_init"]["results"] == report["results"]
    assert "trained" in capsys.readouterr().out
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 4  # {checkpoint, random} x {train, val}
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert knn.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # read, not rewritten
    assert json.loads(out.read_text())["results"] == report["results"]


def test_unreadable_images_are_reported_and_skipped(tiny_dataset, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset / "val", root)
    bad = root / "disc" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    samples, _ = feat.list_image_folder(root)
    encoder = feat.random_encoder("resnet18")
    (out,) = feat.extract_features([encoder], samples, image_size=32, batch_size=5, num_workers=0)
    assert out.features.shape == (len(samples) - 1, 512)
    assert out.labels.numel() == len(samples) - 1
    assert [p for p, _ in out.skipped] == [str(bad)]
    assert str(bad) in caplog.text


def test_val_class_missing_from_train_is_an_error(tiny_dataset, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(tiny_dataset / "val", val)
    (val / "unicorn").mkdir()
    shutil.copy(next((val / "disc").iterdir()), val / "unicorn" / "x.jpg")
    with pytest.raises(ValueError, match="unicorn"):
        feat.load_splits(tiny_dataset / "train", val)


@pytest.mark.cuda
def test_knn_and_features_on_gpu_match_cpu(tiny_dataset):
    generator = torch.Generator().manual_seed(1)
    train, test = torch.randn(500, 32, generator=generator), torch.randn(70, 32, generator=generator)
    train_labels = torch.randint(0, 10, (500,), generator=generator)
    test_labels = torch.randint(0, 10, (70,), generator=generator)
    cpu = knn.knn_classify(train, train_labels, test, test_labels, 10, [5, 50], chunk_size=16)
    gpu = knn.knn_classify(train, train_labels, test, test_labels, 10, [5, 50], chunk_size=16, device="cuda")
    assert gpu == cpu
    samples, _ = feat.list_image_folder(tiny_dataset / "val")
    encoder = feat.random_encoder("resnet18")
    (on_cpu,) = feat.extract_features([encoder], samples, image_size=32, num_workers=0, device="cpu")
    (on_gpu,) = feat.extract_features([encoder], samples, image_size=32, num_workers=0, device="cuda")
    torch.testing.assert_close(on_gpu.features, on_cpu.features, rtol=1e-3, atol=1e-3)
