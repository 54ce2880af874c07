import json

import pytest
import torch

from carp_fast import checkpoint
from carp_fast.eval import linear
from carp_fast.model import CarpModel


@pytest.fixture
def one_thread():
    # Hundreds of tiny steps: a thread pool only adds wake-up latency on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable_problem(num_classes=4, dim=16, per_class=40, seed=0):
    """Gaussian blobs around well-separated class means: linearly separable."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=generator) * 4

    def draw(n):
        labels = torch.arange(num_classes).repeat_interleave(n)
        return means[labels] + torch.randn(labels.numel(), dim, generator=generator), labels

    return draw(per_class), draw(per_class // 2)


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_probe_learns_a_linearly_separable_problem(tmp_path, optimizer, one_thread):
    (train_x, train_y), (val_x, val_y) = separable_problem(num_classes=6)
    settings = linear.ProbeSettings(
        epochs=20, batch_size=16, lr=linear.default_lr(optimizer, 16), optimizer=optimizer
    )
    epochs = linear.precomputed_epochs(train_x, train_y, settings.batch_size, settings.seed, torch.device("cpu"))
    records = linear.train_probe(
        epochs, val_x, val_y, 6, 16, settings, tmp_path, echo=lambda line: None
    )
    assert [r["epoch"] for r in records] == list(range(1, 21))
    assert records[-1]["top1"] == 100.0 and records[-1]["top5"] == 100.0
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert records[-1]["lr"] < records[0]["lr"]  # cosine decay
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 20


def test_probe_resumes_to_the_same_result(tmp_path, one_thread):
    (train_x, train_y), (val_x, val_y) = separable_problem(num_classes=3, per_class=20)
    settings = linear.ProbeSettings(epochs=6, batch_size=8, lr=1.0)
    make_epochs = lambda: linear.precomputed_epochs(train_x, train_y, 8, 0, torch.device("cpu"))  # noqa: E731
    quiet = lambda line: None  # noqa: E731
    straight = linear.train_probe(make_epochs(), val_x, val_y, 3, 16, settings, tmp_path / "a", echo=quiet)
    linear.train_probe(make_epochs(), val_x, val_y, 3, 16, settings, tmp_path / "b", stop_epoch=2, echo=quiet)
    # A crash after the log line but before the checkpoint leaves a line to drop.
    with open(tmp_path / "b" / "log.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": 3, "train_loss": 9.9}) + "\n")
    resumed = linear.train_probe(make_epochs(), val_x, val_y, 3, 16, settings, tmp_path / "b", echo=quiet)
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(resumed) == strip(straight)
    a = checkpoint.load(tmp_path / "a" / "checkpoint.pt")["classifier"]
    b = checkpoint.load(tmp_path / "b" / "checkpoint.pt")["classifier"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A probe of something else in the same directory is refused, naming the difference.
    other = linear.ProbeSettings(epochs=6, batch_size=8, lr=0.5)
    with pytest.raises(checkpoint.CheckpointError, match="settings"):
        linear.train_probe(make_epochs(), val_x, val_y, 3, 16, other, tmp_path / "b", echo=quiet)


@pytest.mark.slow
def test_linear_cli_on_images(tiny_config, tiny_dataset, tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    state = CarpModel(cfg.model).state_dict()
    torch.save({"student": state, "teacher": state, "config": cfg.to_dict(), "format": "carp_fast/1"},
               tmp_path / "ckpt.pt")
    common = [
        "--ckpt", str(tmp_path / "ckpt.pt"), "--train", str(tiny_dataset / "train"),
        "--val", str(tiny_dataset / "val"), "--epochs", "2", "--batch-size", "8", "--image-size", "32",
        "--num-workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
    ]
    assert linear.main(common + ["--precomputed-features", "--out", str(tmp_path / "pre")]) == 0
    lines = (tmp_path / "pre" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert summary["precomputed_features"] is True and 0 <= summary["final_top1"] <= 100
    # The published protocol: augmented crops through the backbone every epoch (val
    # features come from the cache the first run wrote).
    augmented = common + ["--out", str(tmp_path / "aug"), "--forward-batch", "5"]
    augmented[augmented.index("--epochs") + 1] = "1"
    assert linear.main(augmented) == 0
    assert len((tmp_path / "aug" / "log.jsonl").read_text().splitlines()) == 1
    # Rerunning a finished probe resumes at its end and trains nothing more.
    assert linear.main(augmented) == 0
    assert len((tmp_path / "aug" / "log.jsonl").read_text().splitlines()) == 1
