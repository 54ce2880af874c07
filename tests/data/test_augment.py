"""The shared device-side augmentation stage (carp_fast/data/augment.py)."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from carp_fast.data import MultiCropBatch
from carp_fast.data.augment import MultiCropAugment, adjust_hue, gaussian_blur
from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, view_augments

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def uint8_views(n, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Smooth content plus noise, so blur and contrast have something to act on.
    base = torch.rand(n, 3, size // 4, size // 4, generator=generator)
    smooth = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    noisy = smooth + 0.1 * torch.rand(n, 3, size, size, generator=generator)
    pixels = (noisy.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.contiguous(memory_format=torch.channels_last)


def batch_of(b=4, global_size=24, local_size=12, globals_=2, locals_=3, seed=0):
    return MultiCropBatch(
        uint8_views(globals_ * b, global_size, seed),
        uint8_views(locals_ * b, local_size, seed + 1) if locals_ else None,
        torch.arange(b),
    )


def test_identity_when_every_probability_is_zero():
    batch = batch_of()
    augment = MultiCropAugment(2, 3, views=[ViewAugment(0.0, 0.0)] * 5, jitter_p=0.0, grayscale_p=0.0)
    out = augment(batch, epoch=0, step=0)
    for got, views in ((out.global_views, batch.global_views), (out.local_views, batch.local_views)):
        expected = (views.float() / 255 - MEAN) / STD
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(out.labels, batch.labels)


def test_output_is_normalised_channels_last_in_the_requested_dtype():
    augment = MultiCropAugment(2, 3, seed=1)
    out = augment(batch_of(), epoch=0, step=0, dtype=torch.bfloat16)
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    for views in (out.global_views, out.local_views):
        assert views.dtype == torch.bfloat16
        assert views.is_contiguous(memory_format=torch.channels_last)
        assert views.float().min() >= low - 0.02 and views.float().max() <= high + 0.02


def test_draws_follow_the_recipe_per_view():
    augment = MultiCropAugment(2, 6)
    b, steps = 64, 30
    counts = {k: np.zeros(8) for k in ("jitter", "grayscale", "blur", "solarize")}
    sigmas = []
    for step in range(steps):
        rng = np.random.default_rng(step)
        params = augment.draw(rng, b, view_augments(2, 6))
        for key in counts:
            counts[key] += getattr(params, key).reshape(8, b).sum(1)
        sigmas.append(params.sigma)
        # Every row's jitter order is a permutation of the four operations.
        assert (np.sort(params.order, axis=1) == np.arange(4)).all()
        assert (params.factors[:, :3] >= [0.6, 0.6, 0.8]).all() and (params.factors[:, :3] <= [1.4, 1.4, 1.2]).all()
        assert (np.abs(params.factors[:, 3]) <= 0.1).all()
    rate = {k: v / (b * steps) for k, v in counts.items()}
    tol = 4 * math.sqrt(0.25 / (b * steps))  # four standard deviations at worst
    assert rate["blur"][0] == 1.0
    assert abs(rate["blur"][1] - 0.1) < tol and np.all(np.abs(rate["blur"][2:] - 0.5) < tol)
    assert rate["solarize"][0] == 0 and abs(rate["solarize"][1] - 0.2) < tol
    assert np.all(rate["solarize"][2:] == 0)
    assert np.all(np.abs(rate["jitter"] - 0.8) < tol) and np.all(np.abs(rate["grayscale"] - 0.2) < tol)
    sigmas = np.concatenate(sigmas)
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(np.median(sigmas) - 1.05) < 0.05


def reference_row(pixels, params, row):
    """One row through torchvision's functional ops with the module's own draws."""
    x = pixels.float() / 255
    if params.jitter[row]:
        b, c, s, h = params.factors[row]
        for op in params.order[row]:
            x = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](
                x, float([b, c, s, h][op])
            )
    if params.grayscale[row]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[row]:
        sigma = float(params.sigma[row])
        x = TF.gaussian_blur(x, 2 * math.ceil(3 * sigma) + 1, sigma)
    if params.solarize[row]:
        x = TF.solarize(x, 128 / 255)
    return (x - MEAN[0]) / STD[0]


def test_each_row_matches_torchvision_with_its_draws():
    """Colour jitter (in each row's random order), grayscale, blur and solarize, row by row.

    Borders are left out: blur repeats edge pixels here (PIL's rule, the reference
    recipe's) where torchvision's tensor blur reflects.
    """
    b = 16
    views = uint8_views(2 * b, 40, seed=3)
    augment = MultiCropAugment(2, 0, seed=7)
    specs = [ViewAugment(0.6, 0.5), ViewAugment(0.6, 0.5)]  # every branch well represented
    params = augment.draw(np.random.default_rng(11), b, specs)
    out = augment.apply(views, params, torch.float32)
    for row in range(2 * b):
        expected = reference_row(views[row], params, row)
        margin = 7
        torch.testing.assert_close(
            out[row, :, margin:-margin, margin:-margin], expected[:, margin:-margin, margin:-margin],
            rtol=0, atol=2e-4,
        )
    assert params.jitter.any() and params.grayscale.any() and params.solarize.any() and params.blur.any()
    assert (params.order[params.jitter] == 3).any()


def test_hue_matches_torchvision_including_gray_and_saturated_pixels():
    x = torch.rand(6, 3, 10, 10)
    x[0] = 0.5
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[2, :, :4] = torch.tensor([0.3, 0.3, 0.9]).view(3, 1, 1)
    shift = torch.tensor([0.1, -0.1, 0.05, 0.0, 0.099, -0.07])
    expected = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(6)])
    torch.testing.assert_close(adjust_hue(x, shift), expected, rtol=0, atol=1e-5)


def test_blur_uses_each_rows_sigma():
    x = torch.zeros(2, 3, 31, 31)
    x[:, :, 15, 15] = 1.0
    sigma = torch.tensor([0.5, 2.0])
    out = gaussian_blur(x, sigma, half=6)
    for row, s in enumerate(sigma.tolist()):
        offsets = torch.arange(-6, 7, dtype=torch.float32)
        g = torch.exp(-0.5 * (offsets / s) ** 2) * (offsets.abs() <= math.ceil(3 * s))
        g = g / g.sum()
        torch.testing.assert_close(out[row, 0, 9:22, 9:22], torch.outer(g, g), rtol=0, atol=1e-6)
    assert torch.allclose(out.sum((2, 3)), torch.ones(2, 3))


def test_same_key_same_result_and_keys_differ():
    batch = batch_of(b=8)
    augment = MultiCropAugment(2, 3, seed=0, rank=0)
    a = augment(batch, epoch=1, step=5)
    torch.testing.assert_close(augment(batch, epoch=1, step=5).global_views, a.global_views, rtol=0, atol=0)
    for other in (augment(batch, epoch=1, step=6), augment(batch, epoch=2, step=5),
                  MultiCropAugment(2, 3, seed=0, rank=1)(batch, epoch=1, step=5),
                  MultiCropAugment(2, 3, seed=1, rank=0)(batch, epoch=1, step=5)):
        assert not torch.equal(other.global_views, a.global_views)


def test_refuses_float_input_and_wrong_view_count():
    with pytest.raises(TypeError, match="uint8"):
        MultiCropAugment(2, 0).apply(torch.rand(2, 3, 8, 8), MultiCropAugment(2, 0).draw(
            np.random.default_rng(0), 1, view_augments(2, 0)), torch.float32)
    with pytest.raises(ValueError, match="view augmentations"):
        MultiCropAugment(2, 2, views=view_augments(2, 0))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    batch = batch_of(b=8, global_size=32, local_size=16)
    augment = MultiCropAugment(2, 3, seed=2)
    on_cpu = augment(batch, epoch=0, step=3)
    moved = MultiCropBatch(batch.global_views.cuda(), batch.local_views.cuda(), batch.labels.cuda())
    on_gpu = augment(moved, epoch=0, step=3, dtype=torch.bfloat16)
    assert on_gpu.global_views.is_cuda and on_gpu.global_views.dtype == torch.bfloat16
    assert on_gpu.global_views.is_contiguous(memory_format=torch.channels_last)
    for gpu, cpu in ((on_gpu.global_views, on_cpu.global_views), (on_gpu.local_views, on_cpu.local_views)):
        torch.testing.assert_close(gpu.float().cpu(), cpu, rtol=0, atol=0.05)  # bf16 rounding
