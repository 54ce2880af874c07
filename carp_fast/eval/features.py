"""Frozen-backbone features of an ImageFolder tree, with an optional on-disk cache.

The evaluation transform is the published one (DINO/CARP ``eval_knn``/``eval_linear``):
resize the shorter side to ``size * 256 / 224`` (bicubic), centre-crop ``size``,
ImageNet normalisation. Images that cannot be decoded are reported by path and left
out, so one bad file does not end a run over a million images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from carp_fast import checkpoint
from carp_fast.data.folder import list_image_folder
from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {choice} but no CUDA device is visible")
    return torch.device(choice)


def eval_transform(size: int = 224) -> Callable:
    """Resize the shorter side to ``size * 256 / 224``, centre-crop ``size``, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(size: int = 224) -> Callable:
    """The linear probe's training augmentation: random-resized crop and flip."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageListDataset(torch.utils.data.Dataset):
    """``(image, label, index, error)``; an unreadable image gives zeros and its error."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, size: int):
        self.samples = list(samples)
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                tensor = self.transform(image.convert("RGB"))
            return tensor, label, index, ""
        except Exception as error:  # truncated JPEG, not an image, permission denied, ...
            return torch.zeros(3, self.size, self.size), label, index, f"{type(error).__name__}: {error}"


@dataclass
class ImageSet:
    """The samples of one split, with labels in a shared class order."""

    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]


def load_splits(train_root: str | Path, val_root: str | Path) -> tuple[ImageSet, ImageSet]:
    """Both splits with val labels mapped onto the train classes by folder name."""
    train_samples, classes = list_image_folder(train_root)
    val_samples, val_classes = list_image_folder(val_root)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in val_classes if name not in index]
    if unknown:
        raise ValueError(
            f"{val_root} has classes that {train_root} lacks: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    val_samples = [(path, index[val_classes[label]]) for path, label in val_samples]
    return ImageSet(Path(train_root), train_samples, classes), ImageSet(Path(val_root), val_samples, classes)


# ----------------------------------------------------------------------------- encoders
@dataclass
class Encoder:
    """A frozen backbone and what identifies its weights (for the cache and reports)."""

    name: str
    backbone: nn.Module
    identity: dict[str, Any] = field(default_factory=dict)


def _zero_init_residual(weights: dict[str, Any] | None) -> bool:
    config = (weights or {}).get("config") or {}
    return bool(config.get("model", {}).get("zero_init_residual", True))


def load_encoder(
    ckpt: str | Path, which: str = "teacher", arch: str | None = None
) -> tuple[Encoder, dict[str, Any]]:
    """The ``which`` backbone of ``ckpt`` in eval mode; raises CheckpointError if it does not fit."""
    from carp_fast.model import build_backbone

    weights = checkpoint.read_weights(ckpt)
    arch = checkpoint.weights_arch(weights, which, arch)
    state = checkpoint.backbone_state_dict(weights, which)
    backbone, _ = build_backbone(arch, zero_init_residual=False)
    checkpoint.check_backbone(state, backbone, arch, f"{which} backbone", weights["source"])
    backbone.load_state_dict(state)
    backbone.eval().requires_grad_(False)
    source = Path(weights["source"])
    stat = source.stat()
    identity = {
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "which": which,
        "arch": arch,
    }
    return Encoder(f"{which}", backbone, identity), weights


def random_encoder(arch: str, seed: int = 0, zero_init_residual: bool = True) -> Encoder:
    """``arch`` at random initialisation from ``seed``.

    With the run's seed and zero-init setting these are exactly the weights the run
    started from: the trainer seeds, then builds the backbone before anything else.
    """
    from carp_fast.model import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, _ = build_backbone(arch, zero_init_residual)
    backbone.eval().requires_grad_(False)
    # Initial values depend on torch's initialisers, so its version is part of the key.
    identity = {
        "random_init": arch, "seed": seed, "zero_init_residual": zero_init_residual,
        "torch": torch.__version__,
    }
    return Encoder("random-init", backbone, identity)


# --------------------------------------------------------------------------- extraction
@dataclass
class Features:
    features: torch.Tensor  # [N, D] float32 on CPU
    labels: torch.Tensor  # [N] int64
    skipped: list[tuple[str, str]]  # (path, error) of images left out


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def prepare_backbone(backbone: nn.Module, device: torch.device) -> nn.Module:
    backbone = backbone.to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def forward_features(
    backbone: nn.Module, images: torch.Tensor, amp: str = "off", scales: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """Pooled features; with several ``scales`` (bilinear resizes of the input) their mean,
    DINO's multi-scale retrieval descriptor."""
    if tuple(scales) != (1.0,):
        return sum(
            forward_features(backbone, images if s == 1 else torch.nn.functional.interpolate(
                images, scale_factor=s, mode="bilinear", align_corners=False), amp)
            for s in scales
        ) / len(scales)
    if images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    if amp == "bf16" and images.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return backbone(images).float()
    return backbone(images).float()


@torch.no_grad()
def extract_features(
    encoders: Sequence[Encoder],
    samples: Sequence[tuple[str, int]],
    image_size: int = 224,
    batch_size: int = 256,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
    amp: str = "off",
    progress: bool = False,
    transform: Callable | None = None,
    scales: Sequence[float] = (1.0,),
) -> list[Features]:
    """Features of every sample under each encoder, decoding each image once.

    ``transform`` replaces the centre-crop :func:`eval_transform` (images of different
    sizes then need ``batch_size=1``); ``scales`` as :func:`forward_features`.
    """
    device = torch.device(device)
    dataset = ImageListDataset(samples, transform or eval_transform(image_size), image_size)
    loader = make_loader(dataset, batch_size, num_workers, device)
    backbones = [prepare_backbone(e.backbone, device) for e in encoders]
    outputs: list[torch.Tensor | None] = [None] * len(encoders)
    keep = torch.ones(len(samples), dtype=torch.bool)
    skipped: list[tuple[str, str]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), unit="img", desc="features", leave=False)
    for images, _, indices, errors in loader:
        for index, error in zip(indices.tolist(), errors):
            if error:
                keep[index] = False
                skipped.append((samples[index][0], error))
                log.warning("skipped unreadable image %s (%s)", samples[index][0], error)
        images = images.to(device, non_blocking=True)
        for slot, backbone in enumerate(backbones):
            feats = forward_features(backbone, images, amp, scales).cpu()
            if outputs[slot] is None:
                # One allocation for the whole split: no list of batches to concatenate.
                outputs[slot] = torch.empty(len(samples), feats.shape[1], dtype=torch.float32)
            outputs[slot][indices] = feats
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    if not keep.any():
        raise RuntimeError(f"none of the {len(samples)} images could be read")
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)[keep]
    return [Features(out[keep], labels, skipped) for out in outputs]


# -------------------------------------------------------------------------------- cache
def dataset_fingerprint(samples: Sequence[tuple[str, int]]) -> str:
    """Hash of the file list and labels (not the pixels: images changed in place keep it)."""
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(os.path.abspath(path).encode())
        digest.update(b"\0%d\n" % label)
    return digest.hexdigest()


def cache_key(encoder: Encoder, samples: Sequence[tuple[str, int]], image_size: int, amp: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "encoder": encoder.identity,
        "dataset": dataset_fingerprint(samples),
        "num_samples": len(samples),
        "image_size": image_size,
        "amp": amp,
    }


def _cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"features_{digest}.pt"


def cached_features(
    encoders: Sequence[Encoder],
    samples: Sequence[tuple[str, int]],
    cache_dir: str | Path | None = None,
    image_size: int = 224,
    amp: str = "off",
    **extract_kwargs: Any,
) -> list[Features]:
    """:func:`extract_features`, reading and writing ``cache_dir`` when given.

    The key covers the weights (file path, size, mtime, which network, arch), the file
    list and labels, the image size and the precision; a stale or unreadable cache file
    is recomputed, never trusted.
    """
    results: list[Features | None] = [None] * len(encoders)
    paths: list[Path | None] = [None] * len(encoders)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        for slot, encoder in enumerate(encoders):
            key = cache_key(encoder, samples, image_size, amp)
            paths[slot] = _cache_path(cache_dir, key)
            if paths[slot].is_file():
                try:
                    state = checkpoint.load(paths[slot])
                except checkpoint.CheckpointError as error:
                    log.warning("ignoring unreadable feature cache %s: %s", paths[slot], error)
                    continue
                if state.get("key") == json.dumps(key, sort_keys=True):
                    results[slot] = Features(
                        state["features"], state["labels"], [tuple(s) for s in state["skipped"]]
                    )
                    log.info("features of %s read from %s", encoder.name, paths[slot])
    missing = [slot for slot, r in enumerate(results) if r is None]
    if missing:
        fresh = extract_features(
            [encoders[s] for s in missing], samples, image_size=image_size, amp=amp, **extract_kwargs
        )
        for slot, features in zip(missing, fresh):
            results[slot] = features
            if paths[slot] is not None:
                key = cache_key(encoders[slot], samples, image_size, amp)
                checkpoint.save_atomic(
                    {
                        "key": json.dumps(key, sort_keys=True),
                        "features": features.features,
                        "labels": features.labels,
                        "skipped": [list(s) for s in features.skipped],
                    },
                    paths[slot],
                )
    return results  # type: ignore[return-value]
