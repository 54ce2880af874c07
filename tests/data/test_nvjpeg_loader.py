"""data.backend=nvjpeg: GPU decode and batched crops with torch + torchvision, on CPU here.

The CPU runs the backend's own code with the CPU decoders (libjpeg-turbo through
torchvision or TorchCodec) and roi_align's CPU kernel; the tests marked cuda run the nvJPEG
path where a GPU exists.
"""

import importlib
import io
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tool, needs_ffcv
from carp_fast.config import ConfigError
from carp_fast.data import DataPathError, build_loader
from carp_fast.data import nvjpeg_loader as nv
from carp_fast.data.sampling import EpochShardSampler
from test_dali_loader import break_files, make_shards
from test_ffcv_loader import (RAMP_HEIGHT, RAMP_WIDTH, assert_crop_statistics, assert_normalised_views,
                              assert_producer_batch, read_boxes)


def _has_torchcodec() -> bool:
    try:
        nv.select_codec("torchcodec")
    except ImportError:
        return False
    return True


DECODERS = ["torchvision", pytest.param("torchcodec", marks=pytest.mark.skipif(
    not _has_torchcodec(), reason="TorchCodec is not installed"))]


def nvjpeg_config(tiny_config, **extra):
    return tiny_config(data__backend="nvjpeg", **extra)


def epoch_batches(loader, epoch=0, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.global_views, b.global_views)
        assert torch.equal(a.local_views, b.local_views)


def encode(pixels: np.ndarray, mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=save.pop("format", "JPEG"), **save)
    return buffer.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 generated photographs (tools/bench_loaders.py's generator, ~400x350, quality 90)."""
    bench = load_tool("bench_loaders")
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for i in range(12):
        height, width = int(rng.integers(330, 371)), int(rng.integers(380, 421))
        folder = root / f"c{i % 2}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(encode(bench.photograph(rng, height, width), quality=90))
    return root


@pytest.fixture(scope="module")
def ramp_folder(tmp_path_factory):
    """48 lossless ramp images (red = column, green = row), as the FFCV statistics test uses."""
    root = tmp_path_factory.mktemp("ramp")
    y, x = np.mgrid[0:RAMP_HEIGHT, 0:RAMP_WIDTH]
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    for k in range(48):
        folder = root / f"c{k % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return root


@pytest.mark.parametrize("decoder", DECODERS)
def test_producer_yields_uint8_view_major_channels_last(tiny_config, decoder):
    cfg = nvjpeg_config(tiny_config, data__batch_size=6, data__nvjpeg__decoder=decoder)
    loader = build_loader(cfg, "cpu", device_augment=False)
    assert loader.backend.codec.name == decoder
    assert loader.num_images == 24 and len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4
    assert_producer_batch(batches[0])
    # Batches are the caller's: the next epoch's pass does not alter them.
    kept = [v.global_views.clone() for v in batches]
    list(loader)
    assert all(torch.equal(k, v.global_views) for k, v in zip(kept, batches))


def test_full_loader_is_normalised_float_channels_last(tiny_config):
    batch = next(iter(build_loader(nvjpeg_config(tiny_config), "cpu")))
    assert_normalised_views(batch)


def test_crops_are_within_32_db_of_pil_bicubic(photos, tiny_config):
    """Every crop at the published sizes and scales against PIL's antialiased BICUBIC
    resize of the same box of the same decoded image (the recipe's resampling).

    Measured here: minimum 35.5 dB over the 96 crops (median 40.7 dB); the bound is 32.
    """
    cfg = nvjpeg_config(
        tiny_config, data__path=str(photos), data__batch_size=4, crops__global_size=224,
        crops__local_number=6, crops__local_size=96, crops__global_scale=[0.2, 1.0],
        crops__local_scale=[0.05, 0.2],
    )
    loader = build_loader(cfg, "cpu", device_augment=False)
    backend = loader.backend
    files = [path for path, _ in backend.source.samples]
    figures = []
    order = [index for index, _ in backend.sampler]
    for k, batch in enumerate(loader):
        indices = order[k * 4 : (k + 1) * 4]
        images = [Image.open(files[i]).convert("RGB") for i in indices]
        boxes, flips = nv.draw_views(cfg.train.seed, 0, indices, [im.height for im in images],
                                     [im.width for im in images], backend.scales, backend.ratio)
        for v in range(8):
            group, row0 = (batch.global_views, v) if v < 2 else (batch.local_views, v - 2)
            size = group.shape[-1]
            for i, image in enumerate(images):
                top, left, h, w = boxes[v, i].tolist()
                ref = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
                ref = np.asarray(ref)[:, ::-1] if flips[v, i] else np.asarray(ref)
                got = group[row0 * 4 + i].permute(1, 2, 0).numpy()
                figures.append(psnr(got, ref))
    assert len(figures) == 3 * 4 * 8
    print(f"PSNR against PIL BICUBIC: min {min(figures):.1f} dB, median {np.median(figures):.1f} dB")
    assert min(figures) > 32


@pytest.mark.parametrize("period", [2.7, 3.3, 5.0])
def test_a_400px_box_shrunk_to_96_does_not_alias(period):
    """A grating finer than the output's pixels (their Nyquist period is 8.3 source pixels)
    averages out instead of coming back at a false frequency, as point sampling brings it.

    Measured (residual standard deviation of a 0-255 cosine, periods 2.7 / 3.3 / 5.0 px):
    these crops 14 / 14 / 16, point sampling 59 / 67 / 79, PIL's BICUBIC 0.8 / 0.5 / 1.5.
    """
    x = np.arange(420)
    grating = (127.5 + 127.5 * np.cos(2 * np.pi * x / period)).round().astype(np.uint8)
    pixels = np.repeat(np.repeat(grating[None, :, None], 410, 0), 3, 2)
    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    boxes = np.array([[[5, 10, 400, 400]]])
    crop = nv.cut_crops([image], boxes, np.zeros((1, 1), bool), [(0, 1, 96)])[0][0, 0].float()
    from torchvision.ops import roi_align

    point = roi_align(image[None].float(), torch.tensor([[0.0, 10, 5, 410, 405]]), (96, 96),
                      sampling_ratio=1, aligned=True)[0, 0]
    assert point.std() > 50  # aliased: the grating survives at a false frequency
    assert crop.std() < 20
    assert abs(crop.mean().item() - 127.5) < 3


def test_boxes_and_flips_are_the_ffcv_backends_draws_when_ffcv_is_absent():
    """The NumPy draws against a plain-Python transcription of the compiled ones."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    golden = 0x9E3779B97F4A7C15

    def uniform(state):
        state = (state + golden) % 2**64
        return (mix(state) >> 11) / 2**53, state

    def box(height, width, scale, log_ratio, state):
        area = height * width
        for _ in range(10):
            u, state = uniform(state)
            target = area * (scale[0] + (scale[1] - scale[0]) * u)
            u, state = uniform(state)
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u)
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                u, state = uniform(state)
                top = int(u * (height - h + 1))
                u, state = uniform(state)
                return (top, int(u * (width - w + 1)), h, w), state
        lo, hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
        w, h = (width, int(round(width / lo))) if width / height < lo else (
            (int(round(height * hi)), height) if width / height > hi else (width, height))
        return ((height - h) // 2, (width - w) // 2, h, w), state

    scales = [(0.2, 1.0), (0.05, 0.2), (0.05, 0.2)]
    ratio = (3 / 4, 4 / 3)
    log_ratio = np.log(np.array(ratio))
    rng = np.random.default_rng(1)
    # Ordinary photos, and strips so thin that every try misses (the centre-crop rule).
    heights = np.concatenate([rng.integers(20, 600, 60), [8, 400]])
    widths = np.concatenate([rng.integers(20, 600, 60), [400, 8]])
    indices = rng.integers(0, 2**40, len(heights))
    for seed, epoch in ((0, 0), (3, 17)):
        boxes, flips = nv.draw_views(seed, epoch, indices, heights, widths, scales, ratio)
        for i, index in enumerate(indices.tolist()):
            state = mix((seed + golden) % 2**64)
            state = mix(state ^ ((epoch + golden) % 2**64))
            state = mix(state ^ ((index + golden) % 2**64))
            for v, scale in enumerate(scales):
                expected, state = box(int(heights[i]), int(widths[i]), scale, log_ratio, state)
                u, state = uniform(state)
                assert tuple(boxes[v, i]) == expected and flips[v, i] == (u < 0.5), (i, v)
    assert (boxes[:, -2:, 2:] <= np.array([[8, 400], [400, 8]])).all()  # the thin strips fit


@needs_ffcv
def test_boxes_and_flips_equal_the_ffcv_backends():
    from carp_fast.data import ffcv_loader

    scales = [(0.2, 1.0), (0.2, 1.0), (0.05, 0.2)]
    ratio = (3 / 4, 4 / 3)
    log_ratio = np.log(np.array(ratio, dtype=np.float64))
    rng = np.random.default_rng(2)
    heights = np.concatenate([rng.integers(20, 900, 200), [6]])
    widths = np.concatenate([rng.integers(20, 900, 200), [500]])
    indices = np.arange(len(heights)) * 7919
    boxes, flips = nv.draw_views(5, 3, indices, heights, widths, scales, ratio)
    for i in range(len(heights)):
        # Every state passes as np.uint64: a Python int would compile an int64 variant,
        # whose int64 + uint64 arithmetic numba does in float64.
        state = np.uint64(ffcv_loader.sample_stream(np.uint64(5), np.uint64(3), np.uint64(indices[i])))
        for v, scale in enumerate(scales):
            *box, state = ffcv_loader.sample_crop_box(
                int(heights[i]), int(widths[i]), scale[0], scale[1], log_ratio[0], log_ratio[1],
                np.uint64(state))
            u, state = ffcv_loader._uniform(np.uint64(state))
            assert tuple(boxes[v, i]) == tuple(box) and flips[v, i] == (u < ffcv_loader.FLIP_P)


def test_crop_statistics_match_torchvision_random_resized_crop(tiny_config, ramp_folder):
    """The FFCV backend's statistics test (the same helpers and bounds), on this backend:
    boxes read back from the pixels of ramp images."""
    scales = {"global": (0.2, 1.0), "local": (0.05, 0.2)}
    ratio = (3 / 4, 4 / 3)
    cfg = nvjpeg_config(
        tiny_config, data__path=str(ramp_folder), data__batch_size=16, data__num_workers=2,
        crops__global_size=48, crops__global_scale=list(scales["global"]),
        crops__local_number=4, crops__local_size=24, crops__local_scale=list(scales["local"]),
    )
    loader = build_loader(cfg, "cpu", device_augment=False)
    found = {"global": [], "local": []}
    drawn = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        order = [index for index, _ in loader.backend.sampler]
        for k, batch in enumerate(loader):
            found["global"].append(read_boxes(batch.global_views))
            found["local"].append(read_boxes(batch.local_views))
            indices = order[k * 16 : (k + 1) * 16]
            boxes, _ = nv.draw_views(cfg.train.seed, epoch, indices, [RAMP_HEIGHT] * 16,
                                     [RAMP_WIDTH] * 16, loader.backend.scales, ratio)
            drawn.append(boxes)
    assert_crop_statistics(found, scales, ratio, num_flips=48 * 4 * 6)
    # The pixels say the drawn boxes: roi_align's geometry is PIL's.
    drawn = np.concatenate([d[:2].reshape(-1, 4) for d in drawn])
    widths = np.concatenate([w for w, _, _ in found["global"]])
    assert np.median(np.abs(widths - drawn[:, 3])) < 0.5


def test_crops_depend_on_seed_epoch_and_index_only(tiny_config):
    one = build_loader(nvjpeg_config(tiny_config, data__num_workers=0), "cpu", device_augment=False)
    two = build_loader(nvjpeg_config(tiny_config, data__num_workers=2), "cpu", device_augment=False)
    assert_same_batches(epoch_batches(one), epoch_batches(two))
    assert_same_batches(epoch_batches(one, 1), epoch_batches(two, 1))
    assert not torch.equal(epoch_batches(two, 1)[0].global_views, epoch_batches(one)[0].global_views)
    # The seed enters every sample's stream: a new seed moves every sample's boxes.
    draws = [nv.draw_views(seed, 0, range(8), [40] * 8, [40] * 8, one.backend.scales, (0.75, 4 / 3))[0]
             for seed in (0, 5)]
    assert all(not np.array_equal(draws[0][:, i], draws[1][:, i]) for i in range(8))


def test_resume_repeats_the_rest_of_the_epoch_exactly(tiny_config):
    loader = build_loader(nvjpeg_config(tiny_config), "cpu")
    full = epoch_batches(loader, 2)
    rest = epoch_batches(loader, 2, start_batch=2)
    assert len(rest) == len(full) - 2
    for x, y in zip(full[2:], rest):
        torch.testing.assert_close(x.global_views, y.global_views, rtol=0, atol=0)
        torch.testing.assert_close(x.local_views, y.local_views, rtol=0, atol=0)


def test_shards_follow_the_torchvision_rule(tiny_config):
    cfg = nvjpeg_config(tiny_config, data__batch_size=3)
    all_labels = torch.tensor([label for label in range(6) for _ in range(4)])  # ImageFolder order
    seen = []
    for rank in range(2):
        loader = build_loader(cfg, "cpu", device_augment=False, rank=rank, world=2)
        order = [index for index, _ in EpochShardSampler(24, 3, rank, 2, cfg.train.seed)]
        labels = [label for batch in loader for label in batch.labels.tolist()]
        assert labels == all_labels[order].tolist()
        seen.append(set(order))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


def test_webdataset_shards_give_the_folders_batches(tiny_dataset, tiny_config, tmp_path):
    make_shards(tiny_dataset / "train", tmp_path / "shards", samples_per_shard=5)
    from_folder = list(build_loader(nvjpeg_config(tiny_config), "cpu", device_augment=False))
    loader = build_loader(nvjpeg_config(tiny_config, data__path=str(tmp_path / "shards")), "cpu",
                          device_augment=False)
    assert loader.num_images == 24
    assert_same_batches(from_folder, list(loader))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("decoder", DECODERS)
def test_cmyk_grayscale_progressive_and_disguised_png_decode_as_pil_does(decoder, device):
    """On the CPU within 2 levels of PIL; on a GPU (nvJPEG's own IDCT and chroma
    upsampling for the JPEGs it takes) within 30 dB."""
    rng = np.random.default_rng(0)
    rgb = load_tool("bench_loaders").photograph(rng, 30, 44)
    cmyk = (rng.random((30, 44, 4)) * 255).astype(np.uint8)
    files = {
        "baseline": encode(rgb, quality=95),
        "cmyk": encode(cmyk, "CMYK", quality=95),
        "gray": encode(rgb[..., 0], quality=95),
        "progressive": encode(rgb, quality=95, progressive=True),
        "png named .jpg": encode(rgb, format="PNG"),
    }
    kinds = [nv.sample_kind(data) for data in files.values()]
    assert kinds == [nv.BASELINE, nv.CMYK, nv.BASELINE, nv.PROGRESSIVE, nv.OTHER]
    codec = nv.select_codec(decoder)
    batched, jpegs = [], codec.jpegs
    codec.jpegs = lambda datas, device: batched.append(len(datas)) or jpegs(datas, device)
    images = nv.decode_images([as_tensor(d) for d in files.values()], kinds, torch.device(device), codec)
    assert batched == [2]  # the baseline JPEGs (color and gray) in one call; the rest apart
    for (name, data), image in zip(files.items(), images):
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.shape == (3, 30, 44) and image.dtype == torch.uint8, name
        assert image.device.type == device, name
        got = image.permute(1, 2, 0).cpu().numpy()
        if device == "cpu":
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2, name
        else:
            assert psnr(got, expected) > 30, name
    gray = images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_a_failing_batched_call_falls_back_per_image_then_to_the_cpu(tiny_config, monkeypatch):
    loader = build_loader(nvjpeg_config(tiny_config), "cpu", device_augment=False)
    expected = list(loader)
    codec = loader.backend.codec
    calls = {"jpegs": 0, "jpeg": 0}

    def failing(name):
        def fail(*args, **kwargs):
            calls[name] += 1
            raise RuntimeError("simulated: nvJPEG refuses the whole batch")
        return fail

    monkeypatch.setattr(codec, "jpegs", failing("jpegs"))
    assert_same_batches(expected, list(loader))  # one call per image instead
    monkeypatch.setattr(codec, "jpeg", failing("jpeg"))
    assert_same_batches(expected, list(loader))  # the CPU's general decoder
    assert calls["jpegs"] == 12 and calls["jpeg"] == 24
    assert not loader.backend.bad_paths


def test_unreadable_files_are_reported_by_path_and_skipped(tiny_dataset, tiny_config, tmp_path, caplog):
    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset / "train", root)
    victims = break_files(root)
    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    (root / "ring" / "cmyk.jpg").write_bytes(encode(np.dstack([rgb, rgb[..., :1]]), "CMYK", quality=90))
    (root / "ring" / "png_named.jpg").write_bytes(encode(rgb, format="PNG"))
    (root / "ring" / "gray.jpg").write_bytes(encode(rgb[..., 1], quality=90))
    # 28 files in batches of 7: every one of them is read this epoch.
    cfg = nvjpeg_config(tiny_config, data__path=str(root), data__batch_size=7)
    loader = build_loader(cfg, "cpu")
    with caplog.at_level("WARNING"):
        batches = list(loader)
        again = list(loader)
    assert len(batches) == len(loader) == 4 and len(again) == 4
    assert all(torch.isfinite(b.global_views).all() for b in batches)
    expected = {str(v) for v in victims} | {str(root / "disc" / "notes.png")}
    assert loader.backend.bad_paths == expected
    reported = [r.getMessage() for r in caplog.records]
    assert all(any(path in message for message in reported) for path in expected)
    assert len(reported) == 5  # each once, though the second epoch reads them again
    text = " ".join(reported)
    assert "truncated JPEG" in text and "not a JPEG" in text and "5 skipped so far" in text
    assert "no decoder reads it" in text


def test_an_abandoned_epoch_stops_its_producer(tiny_config):
    import threading

    loader = build_loader(nvjpeg_config(tiny_config, data__num_workers=2), "cpu", device_augment=False)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert not any(t.name == "carp-nvjpeg-producer" for t in threading.enumerate())
    assert len(list(loader)) == len(loader)
    # A pass left open is stopped by the next one, and says so if resumed.
    stale = iter(loader)
    next(stale)
    assert len(list(loader)) == len(loader)
    with pytest.raises(RuntimeError, match="abandoned: a newer pass"):
        list(stale)


def test_the_trainer_runs_on_the_nvjpeg_backend(tiny_config):
    from carp_fast.trainer import Trainer

    record = Trainer(nvjpeg_config(tiny_config, train__max_steps=2)).fit()
    assert record["step"] == 2 and math.isfinite(record["loss"])


def test_data_path_errors_name_this_backend(tiny_config, tmp_path):
    with pytest.raises(DataPathError, match="does not exist"):
        build_loader(nvjpeg_config(tiny_config, data__path=str(tmp_path / "nope")), "cpu")
    (tmp_path / "train.beton").write_bytes(b"x")
    with pytest.raises(DataPathError, match="is a file; data.backend=nvjpeg reads an ImageFolder"):
        build_loader(nvjpeg_config(tiny_config, data__path=str(tmp_path / "train.beton")), "cpu")


def test_settings_are_validated_and_torchcodec_is_explained(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match="data.nvjpeg.ahead must be positive"):
        nvjpeg_config(tiny_config, data__nvjpeg__ahead=0)
    with pytest.raises(ConfigError, match="data.nvjpeg.decoder"):
        nvjpeg_config(tiny_config, data__nvjpeg__decoder="pil")
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with pytest.raises(ImportError, match="pip install torchcodec"):
        build_loader(nvjpeg_config(tiny_config, data__nvjpeg__decoder="torchcodec"), "cpu")
    assert build_loader(nvjpeg_config(tiny_config), "cpu").backend.codec.name == "torchvision"


def test_the_backend_needs_neither_ffcv_nor_dali(tiny_config, monkeypatch):
    for name in ("ffcv", "numba", "nvidia.dali", "carp_fast.data.ffcv_loader", "carp_fast.data.dali_loader"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "carp_fast.data.nvjpeg_loader")
    module = importlib.import_module("carp_fast.data.nvjpeg_loader")
    assert len(list(module.NvjpegLoader(nvjpeg_config(tiny_config), 0, 1))) == 6


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("decoder", DECODERS)
def test_gpu_crops_match_the_cpu_path(photos, tiny_config, decoder):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so pixels differ a little."""
    cfg = nvjpeg_config(tiny_config, data__path=str(photos), data__batch_size=4,
                        data__nvjpeg__decoder=decoder)
    on_cpu = list(build_loader(cfg, "cpu", device_augment=False))
    on_gpu = list(build_loader(cfg, "cuda", device_augment=False))
    for a, b in zip(on_cpu, on_gpu):
        assert b.global_views.is_cuda and b.global_views.is_contiguous(memory_format=torch.channels_last)
        for x, y in ((a.global_views, b.global_views), (a.local_views, b.local_views)):
            assert psnr(x.numpy(), y.cpu().numpy()) > 30
        assert torch.equal(a.labels, b.labels.cpu())


@pytest.mark.cuda
def test_gpu_decode_leaves_memory_the_training_stream_still_reads(photos, tiny_config):
    """pytorch/vision#9606: tensors freed while kernels queued on the training stream still
    read them must not be overwritten by a decode."""
    cfg = nvjpeg_config(tiny_config, data__path=str(photos), data__batch_size=4)
    loader = build_loader(cfg, "cuda", device_augment=False)
    for _ in range(5):
        # Blocks of a decoded image's size class (~420 KB), freed with reads still queued.
        victims = [torch.full((100_000,), 1.5, device="cuda") for _ in range(64)]
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # keeps the reads below queued while decoding runs
        sums = [v.sum() for v in victims]
        del victims
        batches = list(loader)
        assert all(s.item() == 1.5 * 100_000 for s in sums)
        assert all(b.global_views.float().std() > 1 for b in batches)


@pytest.mark.cuda
def test_the_training_stream_waits_for_the_side_stream(photos, tiny_config):
    cfg = nvjpeg_config(tiny_config, data__path=str(photos), data__batch_size=4)
    reference = list(build_loader(cfg, "cuda", device_augment=False))
    loader = build_loader(cfg, "cuda", device_augment=False)
    for k, batch in enumerate(loader):
        # Read at once on the training stream, with no host synchronisation in between.
        assert torch.equal(batch.global_views.sum((1, 2, 3)), reference[k].global_views.sum((1, 2, 3)))
