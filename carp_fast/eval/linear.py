"""``python -m carp_fast.eval.linear --ckpt RUN_OR_FILE --train DIR --val DIR [--out DIR]``

Linear probe on a frozen backbone with the published CARP protocol
(``evaluations/linear/eval_linear.py`` of the CARP release): a linear layer
(weights N(0, 0.01), zero bias) on the backbone's pooled features, 100 epochs, LARS
(momentum 0.9, trust 0.001, no weight decay; the bias is neither adapted nor decayed)
at lr 1.0 for a batch of 2048, cosine decay to 0 stepped once per epoch, training images
random-resized-cropped and flipped, validation on centre crops. ``--optimizer sgd``
gives plain SGD with momentum instead (lr 0.1 per 256 images by default).

``--precomputed-features`` trains on centre-crop features extracted once instead of
augmented crops pushed through the backbone every epoch: 100x less backbone work (one
pass instead of 100), usually a point or so below the augmented protocol; say which one
you used when you report a number.

The output directory holds ``log.jsonl`` (one line per epoch: lr, train loss, top-1,
top-5), ``checkpoint.pt`` (classifier, optimiser, epoch; written atomically after every
epoch) and ``summary.json``. Running the same command again resumes where it stopped.

Exit status: 0 done, 1 failed, 2 bad arguments, checkpoint or data path.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from carp_fast import checkpoint, ownership

log = logging.getLogger(__name__)

STATE = "checkpoint.pt"
LOG = "log.jsonl"
SUMMARY = "summary.json"
PROBE_KIND = "linear probe"  # the ownership marker's kind for a probe's --out folder


@dataclass
class ProbeSettings:
    epochs: int = 100
    batch_size: int = 2048
    lr: float = 1.0
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    val_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("epochs, batch size and val-every must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"invalid optimiser settings: lr={self.lr}, weight_decay={self.weight_decay}, "
                f"momentum={self.momentum}"
            )
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"optimizer must be lars or sgd, got {self.optimizer!r}")


def default_lr(optimizer: str, batch_size: int) -> float:
    """1.0 for LARS as published (not scaled); 0.1 per 256 images for SGD."""
    return 1.0 if optimizer == "lars" else 0.1 * batch_size / 256


class LinearClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


def lr_at(epoch: int, settings: ProbeSettings) -> float:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch."""
    return settings.lr * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))


def build_optimizer(classifier: nn.Module, settings: ProbeSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "lars":
        from carp_fast.optim import LARS, param_groups

        # carp_fast's LARS is the published eval's update: adapted weights, plain bias.
        return LARS(
            param_groups(classifier), lr=settings.lr, weight_decay=settings.weight_decay,
            momentum=settings.momentum,
        )
    return torch.optim.SGD(
        classifier.parameters(), lr=settings.lr, momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


@torch.no_grad()
def accuracy(
    classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
    device: torch.device, batch_size: int = 4096,
) -> dict[str, float | None]:
    """top-1/top-5 in %, loss; top-5 is None with fewer than 5 classes."""
    classifier.eval()
    top1 = top5 = 0
    loss = 0.0
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device, non_blocking=True)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        logits = classifier(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        ranked = logits.topk(min(5, num_classes), dim=1).indices == y[:, None]
        top1 += int(ranked[:, :1].sum())
        top5 += int(ranked.any(dim=1).sum())
    n = features.shape[0]
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n if num_classes >= 5 else None,
        "val_loss": loss / n,
    }


def precomputed_epochs(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, device: torch.device
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Shuffled batches of fixed features; the order is a function of (seed, epoch)."""
    if device.type == "cuda":
        # The bank fits a GPU for any common dataset (ImageNet: 10.5 GB): no copy per batch.
        features, labels = features.to(device), labels.to(device)

    def epoch_batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for start in range(0, order.numel(), batch_size):
            index = order[start : start + batch_size]
            yield features[index].to(device, non_blocking=True), labels[index].to(device, non_blocking=True)

    return epoch_batches


def augmented_epochs(
    backbone: nn.Module,
    samples: list[tuple[str, int]],
    image_size: int,
    batch_size: int,
    forward_batch: int,
    num_workers: int,
    seed: int,
    device: torch.device,
    amp: str = "off",
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Batches of features of random-resized, flipped crops through the frozen backbone."""
    from carp_fast.eval import features as feat

    dataset = feat.ImageListDataset(samples, feat.train_transform(image_size), image_size)
    backbone = feat.prepare_backbone(backbone, device)

    @torch.no_grad()
    def forward(images: torch.Tensor) -> torch.Tensor:
        # The backbone needs no gradient, so micro-batches give the same features with
        # less activation memory than one forward over the whole optimiser batch.
        return torch.cat([
            feat.forward_features(backbone, chunk.to(device, non_blocking=True), amp)
            for chunk in images.split(forward_batch)
        ])

    def epoch_batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # crops drawn in-process when num_workers=0
        loader = feat.make_loader(dataset, batch_size, num_workers, device, shuffle=True, generator=generator)
        for images, labels, indices, errors in loader:
            good = torch.tensor([not e for e in errors], dtype=torch.bool)
            for index, error in zip(indices.tolist(), errors):
                if error:
                    log.warning("skipped unreadable image %s (%s)", samples[index][0], error)
            if not good.any():
                continue
            yield forward(images[good]), labels[good].to(device, non_blocking=True)

    return epoch_batches


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _probe_before_markers(out_dir: Path) -> bool:
    """Whether out_dir holds a probe state an older carp_fast wrote (before markers)."""
    try:
        state = checkpoint.load(out_dir / STATE)
    except checkpoint.CheckpointError:
        return False
    return {"classifier", "optimizer", "epoch", "meta"} <= state.keys()


def train_probe(
    train_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    dim: int,
    settings: ProbeSettings,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    identity: dict[str, Any] | None = None,
    stop_epoch: int | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Train (or resume) the probe in ``out_dir``; returns the per-epoch records.

    ``identity`` describes what is probed (checkpoint, network, data, protocol); a
    resume whose identity or settings differ from the saved ones is refused. With
    ``stop_epoch`` training pauses after that epoch (the next call resumes it).
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    ownership.claim_folder(out_dir, PROBE_KIND, _probe_before_markers,
                           "Choose a new or empty --out for the probe.")
    meta = {"dim": dim, "num_classes": num_classes, "settings": asdict(settings), **(identity or {})}
    meta = json.loads(json.dumps(meta))  # the form it takes once saved
    torch.manual_seed(settings.seed)
    classifier = LinearClassifier(dim, num_classes).to(device)
    optimizer = build_optimizer(classifier, settings)
    start_epoch = 0
    state_path = out_dir / STATE
    if state_path.is_file():
        state = checkpoint.load(state_path, map_location=device)
        saved = json.loads(state["meta"])
        if saved != meta:
            differing = sorted(
                k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k)
            )
            raise checkpoint.CheckpointError(
                f"{state_path} is a probe of something else; differing: "
                + "; ".join(f"{k}: saved {saved.get(k)!r} vs now {meta.get(k)!r}" for k in differing)
                + f". Use another --out or delete {out_dir}"
            )
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        echo(f"resumed linear probe from {state_path} after epoch {start_epoch}")
    # Keep only the log lines the checkpoint covers (a crash may fall between the two).
    records = [r for r in _read_log(out_dir / LOG) if r["epoch"] <= start_epoch]
    (out_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in records))

    last = settings.epochs if stop_epoch is None else min(stop_epoch, settings.epochs)
    for epoch in range(start_epoch, last):
        started = time.perf_counter()
        lr = lr_at(epoch, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        classifier.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for x, y in train_epoch(epoch):
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / max(seen, 1)}
        if (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs:
            record.update(accuracy(classifier, val_features, val_labels, num_classes, device))
        record["seconds"] = round(time.perf_counter() - started, 3)
        records.append(record)
        with open(out_dir / LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        checkpoint.save_atomic(
            {
                "classifier": classifier.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "meta": json.dumps(meta),
            },
            state_path,
        )
        top = (
            f" top-1 {record['top1']:.2f}%" + (f" top-5 {record['top5']:.2f}%" if record["top5"] is not None else "")
            if "top1" in record else ""
        )
        echo(f"epoch {epoch + 1}/{settings.epochs} lr {lr:.4g} loss {record['train_loss']:.4f}{top}")
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m carp_fast.eval.linear",
        description="Linear probe on a frozen CARP backbone (published CARP protocol by default).",
    )
    parser.add_argument("--ckpt", required=True, help="run directory (uses last.pt), carp_fast or published CARP checkpoint, or exported backbone")
    parser.add_argument("--train", required=True, help="ImageFolder to train the probe on")
    parser.add_argument("--val", required=True, help="ImageFolder to report accuracy on")
    parser.add_argument("--out", default=None, help="output directory (default: linear_<which> beside the checkpoint); rerun to resume")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--arch", default=None, help="backbone architecture; default: the one the checkpoint names, else the one its shapes match, else resnet50")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2048, help="images per optimiser step (published: 2048)")
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default="lars", help="lars as published, or sgd")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1.0 for lars, 0.1*batch/256 for sgd)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=1, help="epochs between validations (the last epoch always)")
    parser.add_argument("--precomputed-features", action="store_true", help="train on centre-crop features extracted once (fast; no augmentation)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--forward-batch", type=int, default=256, help="images per backbone forward (memory bound, not the optimiser batch)")
    parser.add_argument("--num-workers", type=int, default=min(8, len(os.sched_getaffinity(0))))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast for the backbone on GPU")
    parser.add_argument("--cache-dir", default=None, help="read/write extracted features here")
    parser.add_argument("--progress", action="store_true", help="progress bar while extracting features")
    return parser.parse_args(argv)


def default_out_dir(ckpt: str | Path, which: str) -> Path:
    ckpt = Path(ckpt)
    return (ckpt if ckpt.is_dir() else ckpt.parent) / f"linear_{which}"


def run(args: argparse.Namespace) -> list[dict]:
    from carp_fast.eval import features as feat

    device = feat.resolve_device(args.device)
    lr = args.lr if args.lr is not None else default_lr(args.optimizer, args.batch_size)
    settings = ProbeSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, val_every=args.val_every,
    )
    train_set, val_set = feat.load_splits(args.train, args.val)
    encoder, weights = feat.load_encoder(args.ckpt, args.which, args.arch)
    common = dict(
        cache_dir=args.cache_dir, image_size=args.image_size, amp=args.amp, batch_size=args.forward_batch,
        num_workers=args.num_workers, device=device, progress=args.progress,
    )
    (val,) = feat.cached_features([encoder], val_set.samples, **common)
    dim = val.features.shape[1]
    if args.precomputed_features:
        (train,) = feat.cached_features([encoder], train_set.samples, **common)
        epochs = precomputed_epochs(train.features, train.labels, settings.batch_size, settings.seed, device)
    else:
        epochs = augmented_epochs(
            encoder.backbone, train_set.samples, args.image_size, settings.batch_size,
            args.forward_batch, args.num_workers, settings.seed, device, args.amp,
        )
    out_dir = Path(args.out) if args.out else default_out_dir(args.ckpt, args.which)
    identity = {
        "encoder": encoder.identity,
        "train": str(train_set.root.resolve()),
        "val": str(val_set.root.resolve()),
        "image_size": args.image_size,
        "precomputed_features": args.precomputed_features,
    }
    print(
        f"linear probe of the {args.which} {encoder.identity['arch']} of {weights['source']}: "
        f"{len(train_set.samples)} train / {val.labels.numel()} val images, "
        f"{len(train_set.classes)} classes, {settings.optimizer} lr {lr:g} batch {settings.batch_size}, "
        f"{'precomputed centre-crop' if args.precomputed_features else 'augmented'} features; "
        f"writing {out_dir}",
        flush=True,
    )
    records = train_probe(
        epochs, val.features, val.labels, len(train_set.classes), dim, settings, out_dir, device,
        identity, echo=lambda line: print(line, flush=True),
    )
    evaluated = [r for r in records if "top1" in r]
    if evaluated:
        final, best = evaluated[-1], max(evaluated, key=lambda r: r["top1"])
        summary = {
            "final_top1": final["top1"], "final_top5": final.get("top5"),
            "best_top1": best["top1"], "best_epoch": best["epoch"],
            "epochs_done": records[-1]["epoch"], **identity, "settings": asdict(settings),
        }
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"linear probe top-1 {final['top1']:.2f}% after {records[-1]['epoch']} epochs "
              f"(best {best['top1']:.2f}% at epoch {best['epoch']})", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    from carp_fast.eval import run_cli

    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
