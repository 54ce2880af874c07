"""data.generate_demo: the demo dataset is generated only where nothing of anyone else's is.

A demo dataset carp_fast wrote is recognised by its sealed marker (carp_fast/ownership.py),
never by a bare ``.complete``; an outdated one is regenerated removing only the files its
marker lists; an interrupted generation leaves nothing that looks complete.
"""

import json

import pytest

from carp_fast import ownership
from carp_fast.data import demo
from carp_fast.data.demo import generate_demo_dataset, prepare_demo
from carp_fast.ownership import OwnershipError

SMALL = {"train_per_class": 1, "val_per_class": 1, "size": 24, "seed": 3}


def snapshot(folder):
    """Every file under ``folder`` with its bytes (the marker included)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_dataset_is_deterministic_and_sealed(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, size=24, seed=3)
    b = generate_demo_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, size=24, seed=3)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert len(files_a) == 6 * 3
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    marker = ownership.read_marker(a, demo.KIND)
    assert marker["version"] == demo.VERSION
    assert sorted(marker["files"]) == sorted(f.as_posix() for f in files_a)
    # A second call on a current dataset is a no-op.
    before = snapshot(a)
    assert generate_demo_dataset(a, train_per_class=2, val_per_class=1, size=24, seed=3) == a
    assert snapshot(a) == before
    # No staging folder is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_tampered_marker_proves_nothing(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", **SMALL)
    record = json.loads((root / ownership.MARKER).read_text())
    record["version"] = "demo dataset v0"  # changed without re-sealing: the digest fails
    (root / ownership.MARKER).write_text(json.dumps(record))
    assert ownership.read_marker(root, demo.KIND) is None
    before = snapshot(root)
    with pytest.raises(OwnershipError, match="did not write"):
        generate_demo_dataset(root, **SMALL)
    assert snapshot(root) == before


def reseal_as_outdated(root, files=None):
    marker = ownership.read_marker(root, demo.KIND)
    ownership.write_marker(root, demo.KIND, "demo dataset v0",
                           marker["files"] if files is None else files)


def test_an_outdated_demo_dataset_is_regenerated(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", **SMALL)
    reseal_as_outdated(root)
    generate_demo_dataset(root, **SMALL)
    assert ownership.read_marker(root, demo.KIND)["version"] == demo.VERSION
    assert len(list(root.rglob("*.jpg"))) == 6 * 2
    # A removal interrupted half-way (some listed files gone, the marker still there) is
    # finished by the next run.
    reseal_as_outdated(root)
    for path in sorted(root.rglob("*.jpg"))[:5]:
        path.unlink()
    generate_demo_dataset(root, **SMALL)
    assert ownership.read_marker(root, demo.KIND)["version"] == demo.VERSION
    assert len(list(root.rglob("*.jpg"))) == 6 * 2


def test_an_outdated_demo_dataset_with_anything_else_in_it_is_left_alone(tmp_path):
    root = generate_demo_dataset(tmp_path / "demo", **SMALL)
    reseal_as_outdated(root)
    (root / "train.beton").write_bytes(b"the user's conversion")
    listed = sorted(ownership.read_marker(root, demo.KIND)["files"])
    (root / listed[0]).write_bytes(b"a listed name holding other bytes")
    before = snapshot(root)
    with pytest.raises(OwnershipError) as error:
        generate_demo_dataset(root, **SMALL)
    assert str(root) in str(error.value) and "train.beton" in str(error.value)
    assert listed[0] in str(error.value)
    assert "data.generate_demo=false" in str(error.value)
    assert snapshot(root) == before


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    drawn = []
    original = demo._draw

    def interrupted(*args):
        if len(drawn) == 7:
            raise KeyboardInterrupt
        drawn.append(1)
        return original(*args)

    monkeypatch.setattr(demo, "_draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder
    # An interrupted regeneration keeps the outdated dataset whole, still carp_fast's.
    monkeypatch.setattr(demo, "_draw", original)
    root = generate_demo_dataset(tmp_path / "demo", **SMALL)
    reseal_as_outdated(root)
    before = snapshot(root)
    drawn.clear()
    monkeypatch.setattr(demo, "_draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(root, **SMALL)
    assert snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    monkeypatch.setattr(demo, "_draw", original)
    generate_demo_dataset(root, **SMALL)
    assert ownership.read_marker(root, demo.KIND)["version"] == demo.VERSION


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "demo").mkdir()
    generate_demo_dataset(tmp_path / "demo", **SMALL)
    assert len(list((tmp_path / "demo").rglob("*.jpg"))) == 6 * 2


def user_images(root, with_complete, splits=("train", "val")):
    for split in splits:
        for name in ("cats", "dogs"):
            folder = root / split / name
            folder.mkdir(parents=True)
            (folder / f"{name}_1.jpg").write_bytes(b"\xff\xd8 the user's photo " + name.encode())
    (root / "notes.txt").write_text("three days of labelling")
    if with_complete:
        (root / ".complete").write_text("download finished\n")
    return root


@pytest.mark.parametrize("with_complete", [True, False])
def test_prepare_demo_uses_an_existing_image_folder_as_it_is(tmp_path, with_complete):
    root = user_images(tmp_path / "mine", with_complete)
    before = snapshot(root)
    assert prepare_demo(root / "train") == root
    assert snapshot(root) == before


@pytest.mark.parametrize("with_complete", [True, False])
def test_prepare_demo_refuses_a_foreign_folder_naming_it(tmp_path, with_complete):
    root = user_images(tmp_path / "mine", with_complete, splits=("train",))
    before = snapshot(root)
    with pytest.raises(OwnershipError) as error:
        prepare_demo(root / "val")  # no images there, and its root mine/ is the user's
    assert f"{root} holds files carp_fast did not write" in str(error.value)
    assert "data.path" in str(error.value) and "data.generate_demo=false" in str(error.value)
    assert snapshot(root) == before


def test_prepare_demo_generates_where_nothing_is(tmp_path):
    assert prepare_demo(tmp_path / "data" / "demo" / "train") == tmp_path / "data" / "demo"
    assert demo.is_current_demo(tmp_path / "data" / "demo")
