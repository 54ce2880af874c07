"""The DALI backend (data.backend=dali), in CPU mode here; the GPU path where one exists."""

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carp_fast.data import DataPathError, MultiCropBatch, build_loader
from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from carp_fast.data.sampling import sample_rng


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


needs_dali = pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed")
ROOT = Path(__file__).resolve().parents[2]


def dali_config(tiny_config, **extra):
    return tiny_config(data__backend="dali", **extra)


def make_shards(source, out, samples_per_shard):
    path = ROOT / "tools" / "make_webdataset_shards.py"
    spec = importlib.util.spec_from_file_location("make_webdataset_shards", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shards, skipped = tool.write_shards(source, out, samples_per_shard)
    assert not skipped
    return shards


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.global_views, b.global_views)
        assert torch.equal(a.local_views, b.local_views)


@needs_dali
def test_contract_with_device_augmentation(tiny_config):
    cfg = dali_config(tiny_config)
    loader = build_loader(cfg, "cpu")
    batches = list(loader)
    b = cfg.data.batch_size
    assert len(batches) == len(loader) == loader.num_images // b == 6
    batch = batches[0]
    assert isinstance(batch, MultiCropBatch)
    assert batch.global_views.shape == (2 * b, 3, 32, 32)
    assert batch.local_views.shape == (2 * b, 3, 16, 16)
    assert batch.labels.shape == (b,) and batch.labels.dtype == torch.int64
    assert batch.global_views.dtype == torch.float32
    assert batch.global_views.is_contiguous(memory_format=torch.channels_last)
    assert batch.local_views.is_contiguous(memory_format=torch.channels_last)
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert batch.global_views.min() >= low - 1e-4 and batch.global_views.max() <= high + 1e-4


@needs_dali
def test_producer_cuts_the_torchvision_producers_crops(tiny_config):
    # Same order, same boxes and flips (same draws), same JPEG decoder: only the bicubic
    # resampling differs (DALI's vs PIL's), by a fraction of a grey level on average.
    dali = list(build_loader(dali_config(tiny_config), "cpu", device_augment=False))
    reference = list(build_loader(tiny_config(), "cpu", device_augment=False))
    assert len(dali) == len(reference)
    for ours, theirs in zip(dali, reference):
        assert ours.global_views.dtype == torch.uint8
        assert ours.global_views.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours.labels, theirs.labels)
        for mine, ref in ((ours.global_views, theirs.global_views), (ours.local_views, theirs.local_views)):
            diff = (mine.float() - ref.float()).abs()
            mismatched = (mine.float() - ref.roll(1, 0).float()).abs().mean()
            assert diff.mean() < 1.0 and diff.mean() < mismatched / 20


@needs_dali
def test_shards_cover_the_epoch_once_and_reshuffle(tiny_config):
    cfg = dali_config(tiny_config, data__batch_size=2)
    orders = []
    for rank in range(2):
        loader = build_loader(cfg, "cpu", device_augment=False, rank=rank, world=2)
        order = loader.backend.epoch_order()
        batches = list(loader)
        assert len(batches) == len(loader) == 6
        samples = loader.backend.source.samples
        assert torch.cat([b.labels for b in batches]).tolist() == [samples[i][1] for i in order]
        orders.append(order)
    assert not set(orders[0]) & set(orders[1])
    assert len(orders[0]) + len(orders[1]) == loader.num_images == 24
    loader.set_epoch(1)
    assert not np.array_equal(loader.backend.epoch_order(), orders[1])


@needs_dali
def test_last_partial_batch_is_dropped_on_every_rank(tiny_config):
    # 24 images, 2 ranks of 5: 12 each, two whole batches, the two left over are dropped.
    cfg = dali_config(tiny_config, data__batch_size=5)
    for rank in range(2):
        loader = build_loader(cfg, "cpu", device_augment=False, rank=rank, world=2)
        assert len(loader) == 2
        assert [b.batch_size for b in loader] == [5, 5]


@needs_dali
def test_same_seed_same_crops_any_thread_count(tiny_config):
    one = list(build_loader(dali_config(tiny_config, data__num_workers=1), "cpu", device_augment=False))
    two = list(build_loader(dali_config(tiny_config, data__num_workers=2), "cpu", device_augment=False))
    assert_same_batches(one, two)
    other = next(iter(build_loader(dali_config(tiny_config, train__seed=5), "cpu", device_augment=False)))
    assert not torch.equal(one[0].global_views, other.global_views)


@needs_dali
def test_epochs_differ_and_resume_repeats_the_rest_of_an_epoch(tiny_config):
    loader = build_loader(dali_config(tiny_config), "cpu")
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(0)
    assert not torch.equal(next(iter(loader)).global_views, full[0].global_views)
    loader.set_epoch(1, start_batch=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    torch.testing.assert_close(rest[0].global_views, full[2].global_views)
    torch.testing.assert_close(rest[-1].local_views, full[-1].local_views)


@needs_dali
def test_crop_statistics_follow_the_recipe():
    from carp_fast.data.dali_loader import draw_rois

    views = [(224, (0.2, 1.0))] * 2 + [(96, (0.05, 0.2))] * 6
    ratio = (3 / 4, 4 / 3)
    height, width = 300, 400
    starts, ends = zip(*(draw_rois(height, width, views, ratio, sample_rng(0, 0, i)) for i in range(600)))
    starts, ends = np.stack(starts), np.stack(ends)  # [N, V, 2] (y, x)
    h = ends[..., 0] - starts[..., 0]
    w = np.abs(ends[..., 1] - starts[..., 1])
    flips = ends[..., 1] < starts[..., 1]
    assert (starts[..., 0] >= 0).all() and (ends[..., 0] <= height).all()
    assert (np.minimum(starts[..., 1], ends[..., 1]) >= 0).all()
    assert (np.maximum(starts[..., 1], ends[..., 1]) <= width).all()
    area = h * w / (height * width)
    tol = 0.01  # rounding of the box to whole pixels
    assert area[:, :2].min() > 0.2 - tol and area[:, :2].max() <= 1.0
    assert area[:, 2:].min() > 0.05 - tol and area[:, 2:].max() < 0.2 + tol
    assert area[:, 2:].mean() == pytest.approx(0.125, abs=0.005)  # uniform in scale
    aspect = w / h
    assert aspect.min() > 0.75 - 0.02 and aspect.max() < 4 / 3 + 0.02
    assert np.log(aspect[:, 2:]).mean() == pytest.approx(0.0, abs=0.01)  # log-uniform
    assert flips.mean() == pytest.approx(0.5, abs=0.03)


@needs_dali
def test_pixels_come_from_the_drawn_boxes(tiny_config, tmp_path):
    # Images whose red channel is the x coordinate and green the y coordinate (lossless
    # PNG): each view's corner pixels say which box DALI cut and whether it mirrored it.
    from PIL import Image

    from carp_fast.data.dali_loader import draw_rois

    height, width = 200, 240
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    for name in ("a", "b"):
        (tmp_path / "coords" / name).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(pixels).save(tmp_path / "coords" / name / f"{i:02d}.png")
    cfg = dali_config(
        tiny_config, data__path=str(tmp_path / "coords"), data__batch_size=8,
        crops__global_size=48, crops__local_size=24, crops__global_scale=[0.2, 1.0],
        crops__local_scale=[0.05, 0.2],
    )
    loader = build_loader(cfg, "cpu", device_augment=False)
    backend = loader.backend
    found, drawn = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        order = backend.epoch_order()
        for k, batch in enumerate(loader):
            b = batch.batch_size
            for row, index in enumerate(order[k * b : (k + 1) * b]):
                rng = sample_rng(cfg.train.seed, epoch, int(index))
                start, end = draw_rois(height, width, backend.views, backend.ratio, rng)
                for v in range(len(backend.views)):
                    group = batch.global_views if v < 2 else batch.local_views
                    view = group[(v % 2) * b + row].float()
                    size = view.shape[-1]
                    # Pixel centre c samples x = left + (c + 0.5) * w / size, whose value is x - 0.5.
                    r0, r1 = view[0, :, 0].mean(), view[0, :, -1].mean()
                    g0, g1 = view[1, 0, :].mean(), view[1, -1, :].mean()
                    flip = bool(r1 < r0)
                    w = abs(r1 - r0).item() * size / (size - 1)
                    h = abs(g1 - g0).item() * size / (size - 1)
                    left = min(r0, r1).item() + 0.5 - 0.5 * w / size
                    top = g0.item() + 0.5 - 0.5 * h / size
                    found.append((top, left, h, w, flip))
                    (y0, xa), (y1, xb) = start[v], end[v]
                    drawn.append((y0, min(xa, xb), y1 - y0, abs(xb - xa), bool(xb < xa)))
    found, drawn = np.array(found, dtype=np.float64), np.array(drawn, dtype=np.float64)
    assert (found[:, 4] == drawn[:, 4]).all()
    # Within a pixel: uint8 rounding, and antialiasing filters that reach past the image
    # border for boxes touching it.
    assert np.median(np.abs(found[:, :4] - drawn[:, :4])) < 0.5
    assert np.abs(found[:, :4] - drawn[:, :4]).max() < 2
    area = found[:, 2] * found[:, 3] / (height * width)
    views = np.tile(np.arange(4), len(found) // 4)
    assert area[views < 2].min() > 0.17 and area[views < 2].max() < 1.03
    assert area[views >= 2].min() > 0.04 and area[views >= 2].max() < 0.22
    aspect = found[:, 3] / found[:, 2]
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    assert 0.35 < found[:, 4].mean() < 0.65


@needs_dali
def test_webdataset_shards_give_the_folders_batches(tiny_dataset, tiny_config, tmp_path):
    make_shards(tiny_dataset / "train", tmp_path / "shards", samples_per_shard=5)
    from_folder = list(build_loader(dali_config(tiny_config), "cpu", device_augment=False))
    cfg = dali_config(tiny_config, data__path=str(tmp_path / "shards"))
    loader = build_loader(cfg, "cpu", device_augment=False)
    assert loader.num_images == 24
    assert_same_batches(from_folder, list(loader))


@needs_dali
def test_missing_and_malformed_paths_are_clear(tiny_dataset, tiny_config, tmp_path):
    with pytest.raises(DataPathError, match="does not exist"):
        build_loader(dali_config(tiny_config, data__path=str(tmp_path / "nope")), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="no class folders"):
        build_loader(dali_config(tiny_config, data__path=str(tmp_path / "empty")), "cpu")
    (tmp_path / "file.beton").write_bytes(b"x")
    with pytest.raises(DataPathError, match="is a file"):
        build_loader(dali_config(tiny_config, data__path=str(tmp_path / "file.beton")), "cpu")
    shards = make_shards(tiny_dataset / "train", tmp_path / "shards", samples_per_shard=12)
    shards[1].with_suffix(".idx").unlink()
    with pytest.raises(DataPathError, match="no DALI index file.*--index-only"):
        build_loader(dali_config(tiny_config, data__path=str(tmp_path / "shards")), "cpu")
    shards[1].with_suffix(".idx").write_text("v1.2 12\njpg 0 1 x.jpg\n")
    with pytest.raises(DataPathError, match="announces 12 samples but lists 1"):
        build_loader(dali_config(tiny_config, data__path=str(tmp_path / "shards")), "cpu")


def _break_huffman_table(data: bytes) -> bytes:
    """A JPEG whose headers and end marker are intact but whose Huffman table is not:
    only a real decoder notices."""
    at = data.find(b"\xff\xc4")
    return data[: at + 4] + b"\xff" * 17 + data[at + 21 :]


def break_files(root: Path) -> list[Path]:
    """Four of root/disc's JPEGs broken as real data breaks (not an image, truncated in its
    headers, truncated in its scan data, a bad Huffman table that only a decoder notices)
    and a text file named .png beside them; returns the four."""
    victims = sorted((root / "disc").glob("*.jpg"))
    victims[0].write_bytes(b"not a jpeg at all")
    victims[1].write_bytes(victims[1].read_bytes()[:100])
    victims[2].write_bytes(victims[2].read_bytes()[:-300])
    victims[3].write_bytes(_break_huffman_table(victims[3].read_bytes()))
    (root / "disc" / "notes.png").write_text("text pretending to be an image")
    return victims[:4]


@needs_dali
def test_unreadable_images_are_reported_and_skipped(tiny_dataset, tiny_config, tmp_path, caplog):
    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset / "train", root)
    victims = break_files(root)
    # 25 files in batches of 5: every one of them is read this epoch.
    loader = build_loader(dali_config(tiny_config, data__path=str(root), data__batch_size=5), "cpu")
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == len(loader) == 5
    assert all(torch.isfinite(b.global_views).all() for b in batches)
    expected = {str(v) for v in victims} | {str(root / "disc" / "notes.png")}
    assert loader.backend.bad_paths == expected
    reported = " ".join(r.getMessage() for r in caplog.records)
    assert all(path in reported for path in expected)
    assert "truncated JPEG" in reported and "not a JPEG" in reported and "5 skipped so far" in reported


@needs_dali
def test_a_decoder_failure_pil_cannot_explain_names_the_files(
    tiny_dataset, tiny_config, tmp_path, monkeypatch
):
    from carp_fast.data import dali_loader

    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset / "train", root)
    victim = min((root / "disc").glob("*.jpg"))
    victim.write_bytes(_break_huffman_table(victim.read_bytes()))
    monkeypatch.setattr(dali_loader, "_pil_decode_error", lambda data: None)
    loader = build_loader(dali_config(tiny_config, data__path=str(root), data__batch_size=6), "cpu")
    with pytest.raises(RuntimeError, match=f"all pass PIL's decoder.*{victim.name}"):
        list(loader)


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "nvjpeg"])
def test_a_folder_without_a_readable_image_says_so(tiny_config, tmp_path, backend):
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "junk" / "cls" / f"{i}.jpg").write_bytes(b"not an image")
    loader = build_loader(tiny_config(data__backend=backend, data__path=str(tmp_path / "junk")), "cpu")
    with pytest.raises(RuntimeError, match=r"no readable image in data.path \(4 tried\)"):
        next(iter(loader))


def test_missing_dali_says_how_to_install_it(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if absent
    monkeypatch.delitem(sys.modules, "carp_fast.data.dali_loader", raising=False)
    with pytest.raises(ImportError, match=r"pip install nvidia-dali-cuda120"):
        importlib.import_module("carp_fast.data.dali_loader")
    with pytest.raises(ImportError, match=r"data.backend=dali needs NVIDIA DALI"):
        build_loader(dali_config(tiny_config), "cpu")


@needs_dali
def test_gpu_graph_is_valid_without_a_gpu(tiny_config):
    # Defining the graph checks every operator argument against DALI's schemas (the
    # hardware-decoder share and memory paddings of the mixed decoder, ROIs of GPU
    # resizes fed from the host); only building it needs the GPU.
    cfg = dali_config(tiny_config, data__dali__hw_decoder_load=0.5)
    backend = build_loader(cfg, "cpu", device_augment=False).backend
    _, views = backend._define_pipeline(lambda: None, device_id=0)
    assert len(views) == 4 and all(view.device == "gpu" for view in views)


@pytest.mark.cuda
@needs_dali
def test_gpu_decode_and_crops_match_cpu_mode(tiny_config):
    cfg = dali_config(tiny_config)
    on_cpu = next(iter(build_loader(cfg, "cpu", device_augment=False)))
    on_gpu = next(iter(build_loader(cfg, "cuda", device_augment=False)))
    assert on_gpu.global_views.is_cuda and on_gpu.global_views.dtype == torch.uint8
    assert on_gpu.global_views.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.labels.cpu(), on_cpu.labels)
    # nvJPEG's IDCT and the GPU resampling round differently from libjpeg-turbo and the CPU.
    for gpu, cpu in ((on_gpu.global_views, on_cpu.global_views), (on_gpu.local_views, on_cpu.local_views)):
        assert (gpu.cpu().float() - cpu.float()).abs().mean() < 3
    finished = next(iter(build_loader(cfg, "cuda", dtype=torch.bfloat16)))
    assert finished.global_views.is_cuda and finished.global_views.dtype == torch.bfloat16
    assert finished.local_views.is_contiguous(memory_format=torch.channels_last)
