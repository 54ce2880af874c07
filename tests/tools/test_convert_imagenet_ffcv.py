"""tools/convert_imagenet_ffcv.py: round trip, bad inputs, atomic output."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_converter, needs_ffcv
from carp_fast.data import DataPathError

# CI installs FFCV (the test extra); the GPU machine has none, and runs what it can.
pytestmark = needs_ffcv


converter = load_converter()


def make_tree(root: Path, classes=("apple", "bus", "cat"), per_class=6, size=(48, 40), seed=0) -> dict:
    """An ImageFolder of smooth, JPEG-friendly images; returns {path: (label, pixels)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            phase = rng.uniform(0, 6, 3)
            pixels = np.stack(
                [127 + 100 * np.sin(x / (6 + c) + y / (9 - c) + phase[c]) for c in range(3)], -1
            ).astype(np.uint8)
            path = root / name / f"{name}_{k}.jpg"
            Image.fromarray(pixels).save(path, quality=95)
            with Image.open(path) as image:
                truth[str(path)] = (label, np.asarray(image.convert("RGB")))
    return truth


def read_beton(path: Path):
    """Every sample of a .beton in file order: (images, labels, storage modes).

    Read with FFCV's Reader and decoded here (no compiled FFCV pipeline, which would
    cost seconds of compilation per test).
    """
    import cv2
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta = reader.metadata
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(path, np.uint8, mode="r")
    images = []
    for sample in meta["f0"]:
        start = int(sample["data_ptr"])
        blob = np.asarray(data[start : start + sizes[start]])
        if sample["mode"] == 0:
            images.append(cv2.cvtColor(cv2.imdecode(blob, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        else:
            images.append(blob.reshape(sample["height"], sample["width"], 3))
    return images, meta["f1"].reshape(-1), meta["f0"]["mode"]


def test_round_trip_keeps_counts_labels_and_pixels(tmp_path):
    truth = make_tree(tmp_path / "src")
    out = tmp_path / "out.beton"
    summary = converter.convert(tmp_path / "src", out, max_side=500, quality=90, raw_fraction=0.5,
                                workers=2, progress=False)
    assert summary.images == len(truth) == 18 and summary.classes == 3 and not summary.skipped
    assert summary.bytes == out.stat().st_size > 0
    images, labels, modes = read_beton(out)
    expected = [truth[p] for p in sorted(truth)]  # ImageFolder order: class, then file name
    assert labels.tolist() == [label for label, _ in expected]
    # Both storage modes are present; raw samples are exact, JPEG ones within JPEG error.
    raw, jpeg = modes == 1, modes == 0
    assert raw.any() and jpeg.any()
    for image, (_, pixels), is_raw in zip(images, expected, raw):
        diff = np.abs(image.astype(int) - pixels.astype(int))
        if is_raw:
            assert diff.max() == 0
        else:
            assert diff.mean() < 3 and diff.max() < 40
    # Which samples are raw is reproducible.
    again = converter.convert(tmp_path / "src", tmp_path / "again.beton", workers=2, progress=False)
    assert again.images == 18
    assert (read_beton(tmp_path / "again.beton")[2] == modes).all()


def test_long_side_is_capped(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.full((90, 300, 3), 200, np.uint8)).save(tmp_path / "src" / "a" / "wide.jpg")
    Image.fromarray(np.full((50, 60, 3), 10, np.uint8)).save(tmp_path / "src" / "a" / "small.png")
    converter.convert(tmp_path / "src", tmp_path / "o.beton", max_side=100, workers=1, progress=False)
    from ffcv.reader import Reader

    meta = Reader(str(tmp_path / "o.beton")).metadata["f0"]
    sizes = sorted(zip(meta["width"].tolist(), meta["height"].tolist()))
    assert sizes == [(60, 50), (100, 30)]


def test_unreadable_files_are_reported_by_path_and_skipped(tmp_path, capsys):
    truth = make_tree(tmp_path / "src", per_class=3)
    garbage = tmp_path / "src" / "bus" / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    truncated = tmp_path / "src" / "cat" / "truncated.jpg"
    truncated.write_bytes(Path(sorted(truth)[0]).read_bytes()[:200])
    out = tmp_path / "out.beton"
    assert converter.main([str(tmp_path / "src"), str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    for bad in (garbage, truncated):
        assert str(bad) in captured.err and str(bad) in captured.out
    assert "9 images, 3 classes" in captured.out and "2 unreadable" in captured.out
    assert "images/s" in captured.out
    _, labels, _ = read_beton(out)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_missing_or_empty_source_is_refused(tmp_path, capsys):
    out = tmp_path / "out.beton"
    with pytest.raises(DataPathError, match="does not exist"):
        converter.convert(tmp_path / "nope", out, progress=False)
    assert converter.main([str(tmp_path / "nope"), str(out)]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert converter.main([str(tmp_path / "empty"), str(out)]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DataPathError, match="no readable image"):
        converter.convert(tmp_path / "junk", out, workers=1, progress=False)
    assert not out.exists()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out.beton"))


def test_interrupted_conversion_leaves_no_output(tmp_path, monkeypatch):
    make_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out.beton"
    from ffcv.writer import DatasetWriter

    def interrupted(self, allocations):
        raise KeyboardInterrupt  # as if Ctrl-C arrived after the data, before the index

    monkeypatch.setattr(DatasetWriter, "finalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(tmp_path / "src", out, workers=2, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []
    # An earlier file at OUT is refused without --overwrite, and survives a failed
    # conversion with it untouched.
    out.write_bytes(b"previous")
    assert converter.main([str(tmp_path / "src"), str(out), "--workers", "1"]) == 2
    assert converter.main([str(tmp_path / "src"), str(out), "--workers", "1", "--overwrite"]) == 130
    assert out.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_a_dying_writer_process_fails_the_conversion_cleanly(tmp_path, monkeypatch, capsys):
    make_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "out.beton"
    original = converter.FolderImages.__getitem__

    def crash_on_fifth(self, index):
        if index == 5:
            os._exit(3)  # a worker killed mid-conversion (OOM killer, segfault, ...)
        return original(self, index)

    monkeypatch.setattr(converter.FolderImages, "__getitem__", crash_on_fifth)
    assert converter.main([str(tmp_path / "src"), str(out), "--workers", "2"]) == 1
    assert "exited with code 3" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []
