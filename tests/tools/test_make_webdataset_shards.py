"""tools/make_webdataset_shards.py: ImageFolder -> webdataset .tar shards + DALI indexes."""

import importlib.util
import tarfile
from pathlib import Path

import numpy as np
import pytest

from carp_fast.data.folder import list_image_folder

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    path = ROOT / "tools" / "make_webdataset_shards.py"
    spec = importlib.util.spec_from_file_location("make_webdataset_shards", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


tool = _load_tool()


def _members(tar_path):
    with tarfile.open(tar_path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive if m.isreg()]


def test_shards_hold_every_image_once_with_its_label(tiny_dataset, tmp_path):
    samples, classes = list_image_folder(tiny_dataset / "train")
    shards, skipped = tool.write_shards(tiny_dataset / "train", tmp_path / "out", samples_per_shard=7)
    assert not skipped
    assert [s.name for s in shards] == [f"shard-{i:06d}.tar" for i in range(4)]  # 24 = 7+7+7+3
    assert all(s.with_suffix(".idx").is_file() for s in shards)
    members = [m for s in shards for m in _members(s)]
    images, labels = members[0::2], members[1::2]
    assert [name for name, _ in images] == [f"{classes[label]}/{Path(path).stem}.jpg" for path, label in samples]
    assert [data for _, data in images] == [Path(path).read_bytes() for path, _ in samples]
    assert [name.endswith(".cls") for name, _ in labels] == [True] * len(samples)
    assert [int(data) for _, data in labels] == [label for _, label in samples]
    assert (tmp_path / "out" / "classes.txt").read_text().split() == classes
    assert not list((tmp_path / "out").glob(".*partial"))


def test_index_points_at_every_component(tiny_dataset, tmp_path):
    shards, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "out", samples_per_shard=10)
    for shard in shards:
        lines = shard.with_suffix(".idx").read_text().splitlines()
        assert lines[0] == f"v1.2 {len(lines) - 1}"
        raw = shard.read_bytes()
        contents = dict(_members(shard))
        for line in lines[1:]:
            fields = line.split()
            assert [fields[i] for i in range(0, len(fields), 4)] == ["jpg", "cls"]
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                assert raw[int(offset) : int(offset) + int(size)] == contents[name]


def test_index_is_what_dalis_wds2idx_writes(tiny_dataset, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx is not installed")
    shards, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "out", samples_per_shard=9)
    for shard in shards:
        theirs = tmp_path / f"{shard.stem}.wds2idx"
        with wds2idx.IndexCreator(str(shard), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_text() == shard.with_suffix(".idx").read_text()


def test_shards_are_reproducible_and_index_only_rewrites_the_index(tiny_dataset, tmp_path):
    first, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "a", samples_per_shard=10)
    second, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "b", samples_per_shard=10)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".idx").read_bytes() == b.with_suffix(".idx").read_bytes()
    expected = first[0].with_suffix(".idx").read_bytes()
    for shard in first:
        shard.with_suffix(".idx").unlink()
    assert tool.main(["--index-only", str(tmp_path / "a")]) == 0
    assert first[0].with_suffix(".idx").read_bytes() == expected
    # Rewriting the index of shards this tool wrote needs no flag; a foreign .idx does.
    assert tool.main(["--index-only", str(tmp_path / "a")]) == 0
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "x.tar").write_bytes(first[0].read_bytes())
    (foreign / "x.idx").write_text("their own index\n")
    assert tool.main(["--index-only", str(foreign)]) == 2
    assert (foreign / "x.idx").read_text() == "their own index\n"
    assert tool.main(["--index-only", "--overwrite", str(foreign)]) == 0
    assert (foreign / "x.idx").read_bytes() == expected
    # Shards this tool wrote are replaced whole (only its own files go); others refused.
    again, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "a", samples_per_shard=10)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in second]
    with pytest.raises(FileExistsError, match="did not write"):
        tool.write_shards(tiny_dataset / "train", foreign)
    assert (foreign / "x.idx").read_bytes() == expected


def test_shuffled_shards_hold_the_same_samples(tiny_dataset, tmp_path):
    plain, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "plain", samples_per_shard=10)
    mixed, _ = tool.write_shards(
        tiny_dataset / "train", tmp_path / "mixed", samples_per_shard=10, shuffle_seed=3
    )
    plain_members = [m for s in plain for m in _members(s)]
    mixed_members = [m for s in mixed for m in _members(s)]
    assert plain_members != mixed_members and sorted(plain_members) == sorted(mixed_members)


def test_unreadable_images_are_left_out_and_listed(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset / "train", root)
    victims = sorted((root / "disc").glob("*.jpg"))
    victims[0].write_bytes(b"not a jpeg at all")
    victims[1].write_bytes(victims[1].read_bytes()[:-300])  # truncated: PIL opens it, cannot decode it
    shards, skipped = tool.write_shards(root, tmp_path / "quick")
    assert [line.split(":")[0] for line in skipped] == [str(victims[0])]
    shards, skipped = tool.write_shards(root, tmp_path / "verified", verify=True)
    assert [line.split(":")[0] for line in skipped] == [str(victims[0]), str(victims[1])]
    assert len(_members(shards[0])) == 2 * 22


def test_names_that_break_the_index_format_are_made_safe(tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "my class"
    folder.mkdir(parents=True)
    pixels = np.zeros((8, 8, 3), np.uint8)
    for name in ("a b.jpg", "a.b.jpg", "a_b.jpg"):
        Image.fromarray(pixels).save(folder / name)
    shards, _ = tool.write_shards(tmp_path / "images", tmp_path / "out")
    names = [name for name, _ in _members(shards[0])]
    keys = [name.rsplit(".", 1)[0] for name in names[0::2]]
    assert len(set(keys)) == 3 and all(" " not in k and "." not in k for k in keys)
    assert shards[0].with_suffix(".idx").read_text().startswith("v1.2 3\n")


def test_dalis_webdataset_reader_reads_the_shards(tiny_dataset, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    samples, _ = list_image_folder(tiny_dataset / "train")
    shards, _ = tool.write_shards(tiny_dataset / "train", tmp_path / "out", samples_per_shard=10)
    pipe = Pipeline(batch_size=len(samples), num_threads=1, device_id=None)
    with pipe:
        image, label = fn.readers.webdataset(
            paths=[str(s) for s in shards], index_paths=[str(s.with_suffix(".idx")) for s in shards],
            ext=["jpg", "cls"], missing_component_behavior="error",
        )
        pipe.set_outputs(image, label)
    pipe.build()
    images, labels = pipe.run()
    read = sorted((bytes(np.array(images[i])), int(bytes(np.array(labels[i])))) for i in range(len(samples)))
    assert read == sorted((Path(p).read_bytes(), label) for p, label in samples)
