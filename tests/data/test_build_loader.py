import numpy as np
import pytest
import torch

from carp_fast.data import DataPathError, MultiCropBatch, build_loader
from carp_fast.data.crops import sample_crop
from carp_fast.data.folder import list_image_folder
from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD


def test_loader_contract(tiny_config):
    cfg = tiny_config()
    loader = build_loader(cfg, "cpu")
    batch = next(iter(loader))
    b = cfg.data.batch_size
    assert isinstance(batch, MultiCropBatch)
    assert batch.global_views.shape == (2 * b, 3, 32, 32)
    assert batch.local_views.shape == (2 * b, 3, 16, 16)
    assert batch.labels.shape == (b,)
    assert batch.global_views.dtype == torch.float32
    assert batch.global_views.is_contiguous(memory_format=torch.channels_last)
    assert batch.num_views() == 4
    # Normalised: values span roughly the normalised range of [0, 1] pixels.
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert batch.global_views.min() >= low - 1e-4 and batch.global_views.max() <= high + 1e-4
    assert len(loader) == loader.num_images // b


def test_views_are_view_major(tiny_config):
    # With augmentation off, both global views of image k are crops of that image:
    # rows k and B + k belong to the same label and the same source.
    cfg = tiny_config(data__batch_size=6)
    loader = build_loader(cfg, "cpu", device_augment=False)
    batch = next(iter(loader))
    assert batch.global_views.dtype == torch.uint8
    b = batch.batch_size
    first, second = batch.global_views[:b].float(), batch.global_views[b:].float()
    same = (first.mean((1, 2, 3)) - second.mean((1, 2, 3))).abs()
    other = (first.mean((1, 2, 3)) - second.roll(1, 0).mean((1, 2, 3))).abs()
    assert same.mean() < other.mean()


def test_shards_cover_the_epoch_once_and_reshuffle(tiny_config):
    cfg = tiny_config(data__batch_size=2)
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "cpu", rank=rank, world=2)
        keys = list(iter(loader.backend.sampler))
        seen.append([index for index, _ in keys])
    assert not set(seen[0]) & set(seen[1])
    total = len(seen[0]) + len(seen[1])
    assert total == (loader.num_images // 2 // 2) * 2 * 2
    loader.set_epoch(1)
    assert [i for i, _ in loader.backend.sampler] != seen[1]


def test_same_seed_same_crops_any_worker_count(tiny_config):
    a = next(iter(build_loader(tiny_config(data__num_workers=0), "cpu")))
    b = next(iter(build_loader(tiny_config(data__num_workers=2), "cpu")))
    torch.testing.assert_close(a.global_views, b.global_views)
    c = next(iter(build_loader(tiny_config(train__seed=5), "cpu")))
    assert not torch.equal(a.global_views, c.global_views)


def test_resume_position_skips_consumed_batches(tiny_config):
    loader = build_loader(tiny_config(), "cpu")
    full = list(loader)
    loader.set_epoch(0, start_batch=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    torch.testing.assert_close(rest[0].global_views, full[2].global_views)


def test_missing_and_empty_paths_are_clear(tiny_config, tmp_path):
    with pytest.raises(DataPathError, match="does not exist"):
        build_loader(tiny_config(data__path=str(tmp_path / "nope")), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="no class folders"):
        build_loader(tiny_config(data__path=str(tmp_path / "empty")), "cpu")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataPathError, match="holds no images"):
        list_image_folder(tmp_path / "empty")


def test_unreadable_images_are_reported_and_skipped(tiny_dataset, tiny_config, tmp_path, caplog):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset / "train", root)
    victims = sorted((root / "disc").glob("*.jpg"))
    victims[0].write_bytes(b"not a jpeg at all")
    victims[1].write_bytes(victims[1].read_bytes()[:100])  # truncated
    (root / "disc" / "notes.png").write_text("text pretending to be an image")
    cfg = tiny_config(data__path=str(root), data__batch_size=2)
    loader = build_loader(cfg, "cpu")
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == len(loader)
    assert all(torch.isfinite(b.global_views).all() for b in batches)
    reported = " ".join(r.getMessage() for r in caplog.records)
    assert str(victims[0]) in reported and "notes.png" in reported
    assert loader.backend.dataset.bad_paths >= {str(victims[0]), str(root / "disc" / "notes.png")}


def test_crop_parameters_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = sample_crop(300, 400, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        areas.append(h * w / (300 * 400))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() > 0.19 and areas.max() <= 1.0
    assert np.quantile(ratios, 0.02) > 0.7 and np.quantile(ratios, 0.98) < 1.4
