"""data.backend=ffcv: the decode-once multi-crop producer and the full two-stage loader."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_converter, load_tool, needs_ffcv
from carp_fast.data import DataPathError, MultiCropBatch, build_loader
from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from carp_fast.data.sampling import EpochShardSampler

RAMP_HEIGHT, RAMP_WIDTH = 200, 240
# CI installs FFCV (the test extra); the GPU machine has none, and runs what it can.


@pytest.fixture(scope="module")
def tiny_beton(tiny_dataset, tmp_path_factory):
    """The conftest's tiny train split (24 images, 6 classes), half raw and half JPEG."""
    out = tmp_path_factory.mktemp("beton") / "tiny.beton"
    load_converter().convert(tiny_dataset / "train", out, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def ramp_beton(tmp_path_factory):
    """48 raw images whose red level is the column and green level the row.

    A crop resampled from such an image reads its own box back: the red ramp across
    its columns gives the box's width (and a flip as a falling ramp), the green ramp
    its height.
    """
    root = tmp_path_factory.mktemp("ramp")
    y, x = np.mgrid[0:RAMP_HEIGHT, 0:RAMP_WIDTH]
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    for k in range(48):
        folder = root / "src" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    out = root / "ramp.beton"
    load_converter().convert(root / "src", out, max_side=0, raw_fraction=1.0, workers=2, progress=False)
    return out


def ffcv_config(tiny_config, path, **extra):
    return tiny_config(data__backend="ffcv", data__path=str(path), **extra)


def assert_producer_batch(batch) -> None:
    """The producer's contract on the tiny recipe at batch 6: uint8 views 2x32 + 2x16,
    channels-last, view-major (rows k and B + k are two crops of one image)."""
    assert isinstance(batch, MultiCropBatch)
    assert batch.global_views.shape == (2 * 6, 3, 32, 32) and batch.global_views.dtype == torch.uint8
    assert batch.local_views.shape == (2 * 6, 3, 16, 16) and batch.local_views.dtype == torch.uint8
    assert batch.global_views.is_contiguous(memory_format=torch.channels_last)
    assert batch.local_views.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (6,)
    # View-major: rows k and B + k are two crops of the same image.
    b = batch.batch_size
    first, second = batch.global_views[:b].float(), batch.global_views[b:].float()
    same = (first.mean((1, 2, 3)) - second.mean((1, 2, 3))).abs()
    other = (first.mean((1, 2, 3)) - second.roll(1, 0).mean((1, 2, 3))).abs()
    assert same.mean() < other.mean()


def assert_normalised_views(batch) -> None:
    """The full loader's contract: float32 views normalised by the ImageNet statistics."""
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for views, size in ((batch.global_views, 32), (batch.local_views, 16)):
        assert views.dtype == torch.float32 and views.shape[1:] == (3, size, size)
        assert views.is_contiguous(memory_format=torch.channels_last)
        assert views.min() >= low - 1e-4 and views.max() <= high + 1e-4
    assert batch.global_views.std() > 0.1


@needs_ffcv
def test_producer_yields_uint8_view_major_channels_last(tiny_config, tiny_beton):
    cfg = ffcv_config(tiny_config, tiny_beton, data__batch_size=6)
    threads = torch.get_num_threads()
    loader = build_loader(cfg, "cpu", device_augment=False)
    assert loader.num_images == 24 and len(loader) == 4
    batches = list(loader)
    assert torch.get_num_threads() == threads  # FFCV would leave the trainer one thread
    assert len(batches) == 4
    assert_producer_batch(batches[0])
    # Batches are the caller's: reading the epoch again gives the same, unaltered, data.
    again = list(loader)
    for a, c in zip(batches, again):
        assert torch.equal(a.global_views, c.global_views) and torch.equal(a.labels, c.labels)


@needs_ffcv
def test_full_loader_is_normalised_float_channels_last(tiny_config, tiny_beton):
    cfg = ffcv_config(tiny_config, tiny_beton)
    batch = next(iter(build_loader(cfg, "cpu")))
    assert_normalised_views(batch)


def epoch_labels(loader):
    return [label for batch in loader for label in batch.labels.tolist()]


@needs_ffcv
def test_shards_follow_the_torchvision_rule_and_reshuffle(tiny_config, tiny_beton):
    cfg = ffcv_config(tiny_config, tiny_beton, data__batch_size=3)
    all_labels = torch.tensor([label for label in range(6) for _ in range(4)])  # ImageFolder order
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "cpu", device_augment=False, rank=rank, world=2)
        assert len(loader) == 4
        order = loader.backend.order.sample_order(0)
        sampler = EpochShardSampler(24, 3, rank, 2, cfg.train.seed)
        assert order.tolist() == [index for index, _ in sampler]
        assert epoch_labels(loader) == all_labels[order].tolist()
        seen.append(set(order.tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
    loader.set_epoch(1)
    assert set(loader.backend.order.sample_order(1).tolist()) != seen[1]


@needs_ffcv
def test_crops_depend_on_seed_epoch_and_index_only(tiny_config, tiny_beton):
    one = build_loader(ffcv_config(tiny_config, tiny_beton, data__num_workers=1), "cpu", device_augment=False)
    two = build_loader(ffcv_config(tiny_config, tiny_beton, data__num_workers=2), "cpu", device_augment=False)
    a, b = list(one), list(two)
    for x, y in zip(a, b):
        assert torch.equal(x.global_views, y.global_views) and torch.equal(x.local_views, y.local_views)
    two.set_epoch(1)
    assert not torch.equal(next(iter(two)).global_views, a[0].global_views)
    # The seed enters every sample's stream, so a new seed moves every crop.
    from carp_fast.data.ffcv_loader import sample_crop_box, sample_stream

    boxes = [
        sample_crop_box(200, 240, 0.2, 1.0, -0.29, 0.29,
                        np.uint64(sample_stream(np.uint64(seed), np.uint64(0), np.uint64(i))))[:4]
        for seed in (0, 5) for i in range(8)
    ]
    assert all(p != q for p, q in zip(boxes[:8], boxes[8:]))


@needs_ffcv
def test_resume_skips_consumed_batches_and_repeats_augmentation(tiny_config, tiny_beton):
    loader = build_loader(ffcv_config(tiny_config, tiny_beton), "cpu")
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    for x, y in zip(full[2:], rest):
        torch.testing.assert_close(x.global_views, y.global_views, rtol=0, atol=0)
        torch.testing.assert_close(x.local_views, y.local_views, rtol=0, atol=0)


@needs_ffcv
def test_quasi_random_order_without_os_cache_shards_the_epoch(tiny_config, tiny_beton):
    cfg = ffcv_config(tiny_config, tiny_beton, data__ffcv__os_cache=False, data__ffcv__order="quasi_random",
                      data__batch_size=3)
    from carp_fast.data.ffcv_loader import _ShardOrder

    loader = build_loader(cfg, "cpu", device_augment=False, rank=0, world=2)
    assert len(epoch_labels(loader)) == 12
    # Rank 1's order from the same (seed, epoch) draw, without a second loader.
    mine = loader.backend.order
    theirs = _ShardOrder(24, 3, 1, 2, cfg.train.seed, mine.quasi_random)
    orders = [order.sample_order(0).tolist() for order in (mine, theirs)]
    assert all(len(order) == len(set(order)) == 12 for order in orders)
    assert not set(orders[0]) & set(orders[1])
    mine.set_epoch(1, 0)
    assert mine.sample_order(1).tolist() != orders[0]


@needs_ffcv
def test_a_failing_producer_raises_instead_of_hanging(tiny_config, tiny_beton, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    loader = build_loader(ffcv_config(tiny_config, tiny_beton), "cpu")

    def broken(self, *args):
        raise MemoryError("simulated failure in the producer thread")

    monkeypatch.setattr(EpochIterator, "run_pipeline", broken)
    with pytest.raises(RuntimeError, match="FFCV producer failed.*simulated failure"):
        list(loader)


@needs_ffcv
def test_data_path_errors_are_clear(tiny_config, tiny_dataset, tmp_path):
    with pytest.raises(DataPathError, match="does not exist.*convert_imagenet_ffcv"):
        build_loader(ffcv_config(tiny_config, tmp_path / "nope.beton"), "cpu")
    with pytest.raises(DataPathError, match="is not a file.*convert_imagenet_ffcv"):
        build_loader(ffcv_config(tiny_config, tiny_dataset / "train"), "cpu")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 64)
    with pytest.raises(DataPathError, match="not a readable FFCV"):
        build_loader(ffcv_config(tiny_config, tmp_path / "junk.beton"), "cpu")


def read_boxes(views: torch.Tensor):
    """(width, height, flipped) of each crop of a ramp image, read from its pixels."""
    size = views.shape[-1]
    keep = slice(3, size - 3)  # resampling taps are clipped at image borders
    coords = torch.arange(size, dtype=torch.float64)[keep]
    centred = coords - coords.mean()

    def slope(profile):
        profile = profile[:, keep]
        return ((profile - profile.mean(1, keepdim=True)) * centred).sum(1) / (centred**2).sum()

    red_by_column = views[:, 0].double().mean(1)
    green_by_row = views[:, 1].double().mean(2)
    dx, dy = slope(red_by_column), slope(green_by_row)
    return (dx.abs() * size).numpy(), (dy * size).numpy(), (dx < 0).numpy()


def assert_crop_statistics(found: dict, scales: dict, ratio, num_flips: int) -> None:
    """Boxes read back from ramp images (``found[kind]``: (widths, heights, flipped) per
    batch) follow torchvision's RandomResizedCrop draws, and half the views are flipped."""
    flips = []
    for kind, scale in scales.items():
        widths, heights, flipped = (np.concatenate(parts) for parts in zip(*found[kind]))
        flips.append(flipped)
        area = widths * heights / (RAMP_WIDTH * RAMP_HEIGHT)
        log_ratio = np.log(widths / heights)
        # Within the configured ranges, up to the integer rounding of box sides (which
        # torchvision does too) and the error of reading a box back from 8-bit pixels.
        assert area.min() > scale[0] * 0.95 and area.max() < scale[1] * 1.05, kind
        assert log_ratio.min() > math.log(ratio[0]) - 0.05 and log_ratio.max() < math.log(ratio[1]) + 0.05
        ref_area, ref_log_ratio = torchvision_boxes(scale, ratio, 4000)
        # Two-sample Kolmogorov-Smirnov distances, well under the 0.1 % critical values.
        critical = 1.95 * math.sqrt(1 / len(area) + 1 / len(ref_area))
        assert ks_distance(area, ref_area) < critical, kind
        assert ks_distance(log_ratio, ref_log_ratio) < critical, kind
    flips = np.concatenate(flips)
    assert len(flips) == num_flips
    assert abs(flips.mean() - 0.5) < 4 * math.sqrt(0.25 / len(flips))


def ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def torchvision_boxes(scale, ratio, n):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, RAMP_HEIGHT, RAMP_WIDTH)
    boxes = [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)]
    heights = np.array([h for _, _, h, _ in boxes], dtype=float)
    widths = np.array([w for _, _, _, w in boxes], dtype=float)
    return widths * heights / (RAMP_WIDTH * RAMP_HEIGHT), np.log(widths / heights)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


@needs_ffcv
def test_crops_match_torchvision_bicubic_on_pil_within_40_db():
    """The producer's crops against the published recipe's resampling of the same box.

    torchvision's ``resized_crop`` on a PIL image (cut the box, PIL BICUBIC with its
    antialiasing support) on generated photographs, at the published sizes and scales
    with the producer's own box draws and flips; plus boxes that take the small-box and
    small-output paths and an enlargement. Bound: 40 dB PSNR per crop (about 2.5 levels
    RMS); the float32 intermediate (PIL rounds it to 8 bits) keeps it near 55 dB.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from carp_fast.data.ffcv_loader import _uniform, resize_crop, sample_crop_box, sample_stream

    photograph = load_tool("bench_loaders").photograph
    views = [(224, (0.2, 1.0))] * 2 + [(96, (0.05, 0.2))] * 6
    cases = []
    for index in range(4):
        image = photograph(np.random.default_rng(index), 300 + 20 * index, 360 - 10 * index)
        state = sample_stream(np.uint64(3), np.uint64(0), np.uint64(index))
        for size, scale in views:
            top, left, h, w, state = sample_crop_box(image.shape[0], image.shape[1], scale[0], scale[1],
                                                     math.log(3 / 4), math.log(4 / 3), np.uint64(state))
            u, state = _uniform(np.uint64(state))
            cases.append((image, (top, left, h, w), size, u < 0.5))
    image = cases[0][0]
    cases += [(image, (5, 7, 15, 12), 24, True), (image, (40, 30, 120, 100), 6, False),
              (image, (10, 20, 60, 50), 96, False)]
    figures = []
    for image, (top, left, h, w), size, flip in cases:
        out = np.zeros((size, size, 3), np.uint8)
        resize_crop(image, top, left, h, w, out, flip)
        expected = np.asarray(F.resized_crop(Image.fromarray(image), top, left, h, w, [size, size],
                                             InterpolationMode.BICUBIC, antialias=True))
        if flip:
            expected = expected[:, ::-1]
        figures.append(psnr(out, expected))
    assert min(figures) > 40, figures
    # The old triangle filter (softer) would not pass: the figure means something.
    assert np.median(figures) > 50


@needs_ffcv
def test_crop_statistics_match_torchvision_random_resized_crop(tiny_config, ramp_beton):
    scales = {"global": (0.2, 1.0), "local": (0.05, 0.2)}
    ratio = (3 / 4, 4 / 3)
    cfg = ffcv_config(
        tiny_config, ramp_beton, data__batch_size=16, data__num_workers=2,
        crops__global_size=48, crops__global_scale=list(scales["global"]),
        crops__local_number=4, crops__local_size=24, crops__local_scale=list(scales["local"]),
    )
    loader = build_loader(cfg, "cpu", device_augment=False)
    found = {"global": [], "local": []}
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            found["global"].append(read_boxes(batch.global_views))
            found["local"].append(read_boxes(batch.local_views))
    assert_crop_statistics(found, scales, ratio, num_flips=48 * 4 * 6)


@needs_ffcv
def test_full_loader_applies_the_recipe_per_view(tiny_config, ramp_beton, monkeypatch):
    """The augmentation stage draws each view's probabilities and its output obeys them."""
    cfg = ffcv_config(tiny_config, ramp_beton, data__batch_size=16, crops__local_number=3)
    loader = build_loader(cfg, "cpu")
    drawn = []
    draw = loader.augment.draw

    def spy(rng, batch_size, views):
        params = draw(rng, batch_size, views)
        drawn.append((len(views), params))
        return params

    monkeypatch.setattr(loader.augment, "draw", spy)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gray_equal, gray_flagged = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            pixels = batch.global_views * std + mean
            params = drawn[-2][1]  # this batch's global draw (the local one follows)
            spread = (pixels.amax(1) - pixels.amin(1)).amax((1, 2))
            gray_equal.append((spread < 1e-5).numpy())
            gray_flagged.append(params.grayscale)
    # Ramp images are never gray, so channel-equal rows are exactly the grayscale draws.
    assert (np.concatenate(gray_equal) == np.concatenate(gray_flagged)).all()
    globals_ = [p for n, p in drawn if n == 2]  # the local draws have 3 views
    blur = np.stack([p.blur.reshape(2, -1) for p in globals_]).transpose(1, 0, 2).reshape(2, -1)
    solarize = np.stack([p.solarize.reshape(2, -1) for p in globals_]).transpose(1, 0, 2).reshape(2, -1)
    assert blur[0].all() and 0 < blur[1].mean() < 0.3
    assert not solarize[0].any() and 0.05 < solarize[1].mean() < 0.4


@needs_ffcv
def test_trainer_runs_on_the_ffcv_backend(tiny_config, tiny_beton):
    from carp_fast.trainer import Trainer

    record = Trainer(ffcv_config(tiny_config, tiny_beton, train__max_steps=2)).fit()
    assert record["step"] == 2 and math.isfinite(record["loss"])


def test_a_missing_ffcv_is_explained(tiny_config, tmp_path, monkeypatch):
    """Without FFCV, the backend and the converter say what to install."""
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes every `import ffcv...` fail
    monkeypatch.delitem(sys.modules, "carp_fast.data.ffcv_loader", raising=False)
    (tmp_path / "data.beton").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install ffcv numba"):
        build_loader(ffcv_config(tiny_config, tmp_path / "data.beton"), "cpu")
    converter = load_converter()
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert converter.main([str(tmp_path / "src"), str(tmp_path / "out.beton")]) == 1
    assert not (tmp_path / "out.beton").exists()
