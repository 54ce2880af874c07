"""Nothing a user owns is lost: every entry point that writes near a user's folder leaves
it byte for byte as it was, with a foreign ``.complete`` in it or without one."""

import json

import pytest
import torch

from carp_fast import checkpoint, export, ownership, train
from carp_fast.data import demo
from carp_fast.eval import features as feat
from carp_fast.eval import linear
from carp_fast.ownership import OwnershipError
from conftest import load_converter, load_tool, needs_ffcv, tiny_overrides

shards = load_tool("make_webdataset_shards")


@pytest.fixture(params=[True, False], ids=["foreign_complete", "no_marker"])
def user_folder(request, tmp_path, tiny_dataset):
    """mine/: the user's images (train/<class>/*.jpg), notes, a results JSON, maybe a .complete."""
    root = tmp_path / "mine"
    for source in sorted((tiny_dataset / "train").rglob("*.jpg"))[::2]:
        target = root / "train" / source.parent.name / f"photo_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (root / "notes.txt").write_text("three days of labelling")
    (root / "results.json").write_text(json.dumps({"command": "my own script", "top1": 71.3}))
    (root / "ckpt_00000001.pt").write_bytes(b"a checkpoint of another project")
    if request.param:
        (root / ".complete").write_text("download finished\n")
    return root


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def survives(folder, before):
    """Every file that was there is there with the same bytes (new files may be added)."""
    after = snapshot(folder)
    return all(after.get(name) == data for name, data in before.items())


def test_train_with_generate_demo_trains_on_the_users_images_and_changes_nothing(user_folder, tmp_path):
    before = snapshot(user_folder)
    overrides = tiny_overrides(user_folder / "train", tmp_path / "run", **{
        "data.generate_demo": True, "train.max_steps": 1})
    assert train.main(["--cfg", "demo_cpu.yaml", *overrides]) == train.EXIT_OK
    assert snapshot(user_folder) == before
    assert checkpoint.load(tmp_path / "run" / checkpoint.LAST)["step"] == 1


def test_train_refuses_a_data_path_it_would_have_to_write_into(user_folder, tmp_path, capsys):
    before = snapshot(user_folder)
    overrides = tiny_overrides(user_folder / "val", tmp_path / "run", **{"data.generate_demo": True})
    assert train.main(["--cfg", "demo_cpu.yaml", *overrides]) == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(user_folder) in err and "data.generate_demo=false" in err
    assert snapshot(user_folder) == before
    assert demo.is_current_demo(user_folder) is False


def test_train_refuses_the_users_folder_as_run_directory(user_folder, tiny_dataset, capsys):
    before = snapshot(user_folder)
    overrides = tiny_overrides(tiny_dataset / "train", user_folder, **{"train.max_steps": 1})
    assert train.main(["--cfg", "demo_cpu.yaml", *overrides]) == train.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{user_folder} holds files carp_fast did not write" in err and "train.out_dir" in err
    assert snapshot(user_folder) == before


def test_the_demo_generator_refuses_the_users_folder(user_folder):
    before = snapshot(user_folder)
    with pytest.raises(OwnershipError, match="did not write"):
        demo.generate_demo_dataset(user_folder, train_per_class=1, val_per_class=1, size=24)
    assert snapshot(user_folder) == before


@needs_ffcv
def test_the_ffcv_converter_never_replaces_a_users_file(user_folder):
    converter = load_converter()
    before = snapshot(user_folder)
    with pytest.raises(OwnershipError, match="--overwrite"):
        converter.convert(user_folder / "train", user_folder / "notes.txt", workers=1, progress=False)
    assert converter.main([str(user_folder / "train"), str(user_folder / "notes.txt"), "--workers", "1"]) == 2
    # A new output beside the user's files adds one file and changes none.
    converter.convert(user_folder / "train", user_folder / "train.beton", workers=1, progress=False)
    assert survives(user_folder, before)
    assert sorted(set(snapshot(user_folder)) - set(before)) == ["train.beton"]


def test_the_shard_writer_refuses_the_users_folder(user_folder):
    before = snapshot(user_folder)
    for out in (user_folder, user_folder / "train"):
        with pytest.raises(OwnershipError, match="did not write"):
            shards.write_shards(user_folder / "train", out, samples_per_shard=4)
        assert shards.main([str(user_folder / "train"), str(out)]) == 2
    assert snapshot(user_folder) == before
    # Into a new folder inside it: only that folder is added.
    shards.write_shards(user_folder / "train", user_folder / "shards", samples_per_shard=4)
    assert survives(user_folder, before)
    assert all(name.startswith("shards/") for name in set(snapshot(user_folder)) - set(before))


def test_export_never_replaces_a_users_file(user_folder, tiny_config, tmp_path):
    from carp_fast.model import CarpModel

    cfg = tiny_config()
    model = CarpModel(cfg.model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    checkpoint.save_atomic({"student": state, "teacher": state, "config": cfg.to_dict(),
                            "format": "carp_fast/1"}, tmp_path / "ckpt.pt")
    before = snapshot(user_folder)
    for name in ("notes.txt", "results.json", "ckpt_00000001.pt"):
        assert export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(user_folder / name)]) == 2
    assert snapshot(user_folder) == before


def test_the_linear_probe_refuses_the_users_folder(user_folder):
    before = snapshot(user_folder)
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    settings = linear.ProbeSettings(epochs=1, batch_size=4, lr=0.1)
    epochs = linear.precomputed_epochs(x, y, 4, 0, torch.device("cpu"))
    with pytest.raises(OwnershipError, match="did not write"):
        linear.train_probe(epochs, x, y, 2, 4, settings, user_folder, echo=lambda line: None)
    assert snapshot(user_folder) == before


def test_the_feature_cache_only_adds_its_own_files(user_folder):
    before = snapshot(user_folder)
    samples = [(str(user_folder / name), 0) for name in sorted(before) if name.endswith(".jpg")][:3]
    encoder = feat.random_encoder("resnet18", seed=0)
    feat.cached_features([encoder], samples, cache_dir=user_folder, image_size=32, batch_size=4, num_workers=0)
    assert survives(user_folder, before)
    added = sorted(set(snapshot(user_folder)) - set(before))
    assert len(added) == 1 and added[0].startswith("features_") and added[0].endswith(".pt")


def test_reports_replace_only_reports_carp_fast_wrote(user_folder):
    before = snapshot(user_folder)
    for name in ("notes.txt", "results.json"):
        with pytest.raises(OwnershipError, match="not a report carp_fast wrote"):
            ownership.write_report(user_folder / name, {"top1": 1.0})
    assert snapshot(user_folder) == before
    report = user_folder / "knn.json"
    ownership.write_report(report, {"top1": 1.0})
    ownership.write_report(report, {"top1": 2.0})  # its own: replaced
    assert json.loads(report.read_text()) == {"top1": 2.0, "written_by": "carp_fast"}
    legacy = user_folder / "old_benchmark.json"
    legacy.write_text(json.dumps({"command": "python tools/bench_loss.py --json x", "median_ms": 1}))
    ownership.write_report(legacy, {"median_ms": 2})  # written by a tool before signatures
    assert json.loads(legacy.read_text())["median_ms"] == 2


def test_benchmark_photo_folders_refuse_the_users_folder(user_folder):
    before = snapshot(user_folder)
    bench_loaders = load_tool("bench_loaders")
    with pytest.raises(OwnershipError, match="did not write"):
        bench_loaders.make_photos(user_folder / "train", 4, workers=1)
    assert snapshot(user_folder) == before


def test_checkpoint_rotation_removes_only_the_numbered_files_it_listed(tmp_path):
    out = tmp_path / "run"
    ownership.claim_folder(out, checkpoint.RUN_KIND, lambda folder: False, "")
    foreign = out / "ckpt_00000001.pt"
    foreign.write_bytes(b"named like ours, written by someone else")
    for step in (2, 3, 4):
        checkpoint.save_numbered({"step": step}, out, step, keep_last=2)
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == [
        "ckpt_00000001.pt", "ckpt_00000003.pt", "ckpt_00000004.pt"]
    assert foreign.read_bytes() == b"named like ours, written by someone else"
    # A listed checkpoint that someone replaced (another size) is not removed either.
    (out / "ckpt_00000003.pt").write_bytes(b"replaced")
    checkpoint.save_numbered({"step": 5}, out, 5, keep_last=1)
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == [
        "ckpt_00000001.pt", "ckpt_00000003.pt", "ckpt_00000005.pt"]
    # Temporaries are cleared only under save_atomic's names.
    (out / ".last.pt.abcd1234.tmp").write_bytes(b"killed writer")
    (out / ".mine.tmp").write_bytes(b"the user's")
    assert [p.name for p in checkpoint.remove_stale_temporaries(out)] == [".last.pt.abcd1234.tmp"]
    assert (out / ".mine.tmp").read_bytes() == b"the user's"


def test_remove_owned_removes_only_listed_files_at_their_listed_sizes(tmp_path):
    folder = tmp_path / "f"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "ours.bin").write_bytes(b"1234")
    (folder / "a" / "changed.bin").write_bytes(b"12")
    ownership.write_marker(folder, "test kind", "1", ownership.list_files(folder))
    (folder / "a" / "changed.bin").write_bytes(b"123456")  # someone else's bytes now
    (folder / "a" / "theirs.bin").write_bytes(b"x")
    marker = ownership.read_marker(folder, "test kind")
    assert ownership.read_marker(folder, "another kind") is None
    assert sorted(ownership.foreign_entries(folder, marker)) == ["a/changed.bin", "a/theirs.bin"]
    ownership.remove_owned(folder, marker)
    assert sorted(p.name for p in (folder / "a").iterdir()) == ["changed.bin", "theirs.bin"]
    assert not (folder / ownership.MARKER).exists()
