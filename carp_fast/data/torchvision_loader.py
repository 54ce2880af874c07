"""The reference backend: the published recipe with PIL and torchvision on CPU workers.

Each image is decoded once per sample and every crop is cut from it. Augmentation
randomness is a pure function of (seed, epoch, sample index), so results do not depend on
the number of workers and a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset

from carp_fast.config import Config
from carp_fast.data import recipe
from carp_fast.data.batch import MultiCropBatch
from carp_fast.data.crops import sample_crop
from carp_fast.data.folder import list_image_folder
from carp_fast.data.sampling import EpochShardSampler, ShardedLoader, sample_rng

log = logging.getLogger(__name__)


class MultiCropTransform:
    """Cuts and augments all views of one decoded image (the published recipe)."""

    def __init__(self, cfg: Config, augment: bool = True):
        crops = cfg.crops
        self.views = recipe.view_specs(crops)
        self.ratio = crops.ratio
        self.global_number = crops.global_number
        self.augments = recipe.view_augments(crops.global_number, crops.local_number)
        self.augment = augment
        self.mean = torch.tensor(recipe.IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(recipe.IMAGENET_STD).view(3, 1, 1)

    def crop(self, image: Image.Image, size: int, scale, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = sample_crop(image.height, image.width, scale, self.ratio, rng)
        view = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < recipe.FLIP_P:
            view = ImageOps.mirror(view)
        return view

    @staticmethod
    def colour(view: Image.Image, spec: recipe.ViewAugment, rng: np.random.Generator) -> Image.Image:
        if rng.random() < recipe.JITTER_P:
            b = rng.uniform(1 - recipe.JITTER_BRIGHTNESS, 1 + recipe.JITTER_BRIGHTNESS)
            c = rng.uniform(1 - recipe.JITTER_CONTRAST, 1 + recipe.JITTER_CONTRAST)
            s = rng.uniform(1 - recipe.JITTER_SATURATION, 1 + recipe.JITTER_SATURATION)
            h = rng.uniform(-recipe.JITTER_HUE, recipe.JITTER_HUE)
            # torchvision's ColorJitter applies the four in a random order.
            for op in rng.permutation(4):
                if op == 0:
                    view = TF.adjust_brightness(view, b)
                elif op == 1:
                    view = TF.adjust_contrast(view, c)
                elif op == 2:
                    view = TF.adjust_saturation(view, s)
                else:
                    view = TF.adjust_hue(view, h)
        if rng.random() < recipe.GRAYSCALE_P:
            view = TF.rgb_to_grayscale(view, num_output_channels=3)
        if rng.random() < spec.blur_p:
            view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*recipe.BLUR_SIGMA)))
        if rng.random() < spec.solarize_p:
            view = ImageOps.solarize(view, recipe.SOLARIZE_THRESHOLD)
        return view

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        out = []
        for (size, scale), spec in zip(self.views, self.augments):
            view = self.crop(image, size, scale, rng)
            if self.augment:
                view = self.colour(view, spec, rng)
            pixels = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)
            if self.augment:
                pixels = (pixels.float() / 255 - self.mean) / self.std
            out.append(pixels)
        return out


class MultiCropFolder(Dataset):
    """ImageFolder whose items are all views of one image, keyed by ``(index, epoch)``.

    An unreadable image is reported by path (once) and replaced by the next readable one,
    so a few broken files never stop a run or change the batch shape.
    """

    def __init__(self, root: str | Path, transform: MultiCropTransform, seed: int):
        self.samples, self.classes = list_image_folder(root)
        self.transform = transform
        self.seed = seed
        self.bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The decoded image at ``index`` or, if unreadable, the next readable one."""
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            if path in self.bad_paths:
                continue
            try:
                with Image.open(path) as handle:
                    return handle.convert("RGB"), label
            except Exception as error:  # truncated, corrupt, or not an image at all
                self.bad_paths.add(path)
                log.warning("skipping unreadable image %s (%s)", path, error)
        raise RuntimeError(f"no readable image under the dataset root ({len(self.samples)} tried)")

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.load(index)
        views = self.transform(image, sample_rng(self.seed, epoch, index))
        return views, label


def collate_views(global_number: int):
    """Stacks samples into view-major ``[V*B, 3, H, W]`` global and local tensors."""

    def collate(items):
        views = list(zip(*[views for views, _ in items]))  # views[v] = B tensors
        labels = torch.tensor([label for _, label in items])
        global_views = torch.cat([torch.stack(v) for v in views[:global_number]])
        local = views[global_number:]
        local_views = torch.cat([torch.stack(v) for v in local]) if local else None
        return MultiCropBatch(global_views, local_views, labels)

    return collate


class TorchvisionLoader(ShardedLoader):
    """DataLoader over :class:`MultiCropFolder` with workers, pinning and sharding."""

    def __init__(self, cfg: Config, rank: int, world: int, pin_memory: bool, augment: bool = True):
        self.dataset = MultiCropFolder(cfg.data.path, MultiCropTransform(cfg, augment), cfg.train.seed)
        self.sampler = EpochShardSampler(
            len(self.dataset), cfg.data.batch_size, rank, world, cfg.train.seed
        )
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.data.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_views(cfg.crops.global_number),
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=cfg.data.persistent_workers and workers > 0,
            prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        )

    def __iter__(self):
        return iter(self.loader)
