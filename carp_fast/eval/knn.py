"""``python -m carp_fast.eval.knn --ckpt RUN_OR_FILE --train DIR --val DIR``

Weighted k-NN on frozen features, the DINO/CARP protocol: L2-normalised features,
cosine similarity of each val image to the whole train bank, the k nearest vote for
their class with weight ``exp(similarity / T)``, and the class with the largest sum
wins. Similarities are computed a chunk of val images at a time, so an ImageNet-size
bank (1.28M x 2048) needs a few hundred MB beyond the bank itself.

Exit status: 0 done, 1 evaluation failed, 2 bad arguments, checkpoint or data path.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from carp_fast import ownership

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 100, 200)
# Bytes of one chunk's similarity matrix; bounds the working memory for any bank size.
CHUNK_BYTES = 256 * 2**20


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float | None]]:
    """``{k: {"top1": %, "top5": % or None}}`` of temperature-weighted k-NN voting.

    Features are L2-normalised here (callers pass raw backbone outputs). ``k`` larger
    than the bank is clipped to the bank size. top-5 is None with fewer than 5 classes,
    where it would be 100% whatever the features.
    """
    if not ks:
        raise ValueError("at least one k is needed")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be positive, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = torch.device(device) if device is not None else train_features.device
    bank = F.normalize(train_features.to(device, torch.float32), dim=1)
    bank_labels = train_labels.to(device)
    num_test = test_features.shape[0]
    max_k = min(max(ks), bank.shape[0])
    if chunk_size is None:
        chunk_size = max(1, min(4096, CHUNK_BYTES // (4 * bank.shape[0])))
    correct = {k: [0, 0] for k in ks}
    for start in range(0, num_test, chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)
        targets = test_labels[start : start + chunk_size].to(device)
        with _exact_fp32_matmul():
            similarity = queries @ bank.T
        top_sim, top_index = similarity.topk(max_k, dim=1, largest=True, sorted=True)
        top_labels = bank_labels[top_index]
        top_weights = (top_sim / temperature).exp()
        for k in ks:
            kk = min(k, max_k)
            votes = torch.zeros(queries.shape[0], num_classes, device=device)
            votes.scatter_add_(1, top_labels[:, :kk], top_weights[:, :kk])
            # As DINO: top-5 looks at no more than k predictions. A class no neighbour voted
            # for is no prediction: counting it would let topk's tie order (which differs
            # between devices) decide hits among the zero-vote classes.
            top_votes, ranked = votes.topk(min(5, num_classes, kk), dim=1)
            hits = (ranked == targets[:, None]) & (top_votes > 0)
            correct[k][0] += int(hits[:, :1].sum())
            correct[k][1] += int(hits.any(dim=1).sum())
    return {
        k: {
            "top1": 100.0 * top1 / num_test,
            "top5": 100.0 * top5 / num_test if num_classes >= 5 else None,
        }
        for k, (top1, top5) in correct.items()
    }


@contextlib.contextmanager
def _exact_fp32_matmul():
    """Full fp32 matrix products inside, whatever the process allowed (a trainer on the same
    GPU turns TF32 on, and its 10-bit mantissa reorders nearly tied neighbours)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def format_results(title: str, results: dict[int, dict[str, float | None]]) -> str:
    lines = [title]
    for k, r in results.items():
        top5 = "  n/a" if r["top5"] is None else f"{r['top5']:5.1f}"
        lines.append(f"  k={k:<4d} top-1 {r['top1']:5.1f}%  top-5 {top5}%")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m carp_fast.eval.knn",
        description="Weighted k-NN accuracy of a frozen CARP backbone (DINO protocol).",
    )
    parser.add_argument("--ckpt", required=True, help="run directory (uses last.pt), carp_fast or published CARP checkpoint, or exported backbone")
    parser.add_argument("--train", required=True, help="ImageFolder of the bank (e.g. imagenet/train)")
    parser.add_argument("--val", required=True, help="ImageFolder of the queries (e.g. imagenet/val)")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts (default: 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher", help="network to evaluate (default teacher)")
    parser.add_argument("--arch", default=None, help="backbone architecture; default: the one the checkpoint names, else the one its shapes match, else resnet50")
    parser.add_argument("--image-size", type=int, default=224, help="centre crop side; images are first resized to size*256/224 (default 224)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--num-workers", type=int, default=min(8, len(os.sched_getaffinity(0))), help="decoding processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast for feature extraction on GPU (default off)")
    parser.add_argument("--chunk-size", type=int, default=None, help="val images per similarity chunk (default: sized to ~256 MB)")
    parser.add_argument("--cache-dir", default=None, help="read/write extracted features here, keyed by checkpoint, network, data and size")
    parser.add_argument("--compare-random", action="store_true", help="also evaluate the same architecture at random initialisation (the run's own seed when known)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random-init model (default: the run's train.seed, else 0)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while extracting features")
    args = parser.parse_args(argv)
    if args.image_size <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        parser.error("--image-size and --batch-size must be positive, --num-workers not negative")
    return args


def run(args: argparse.Namespace) -> dict:
    from carp_fast.eval import features as feat

    device = feat.resolve_device(args.device)
    train_set, val_set = feat.load_splits(args.train, args.val)
    encoder, weights = feat.load_encoder(args.ckpt, args.which, args.arch)
    arch = encoder.identity["arch"]
    encoders = [encoder]
    if args.compare_random:
        config = weights.get("config") or {}
        seed = args.seed if args.seed is not None else config.get("train", {}).get("seed", 0)
        encoders.append(feat.random_encoder(arch, seed, feat._zero_init_residual(weights)))
    common = dict(
        cache_dir=args.cache_dir, image_size=args.image_size, amp=args.amp, batch_size=args.batch_size,
        num_workers=args.num_workers, device=device, progress=args.progress,
    )
    start = time.perf_counter()
    bank = feat.cached_features(encoders, train_set.samples, **common)
    queries = feat.cached_features(encoders, val_set.samples, **common)
    extract_s = time.perf_counter() - start
    num_classes = len(train_set.classes)
    report = {
        "checkpoint": weights["source"],
        "checkpoint_format": weights["format"],
        "which": args.which,
        "arch": arch,
        "image_size": args.image_size,
        "temperature": args.temperature,
        "train": str(train_set.root),
        "val": str(val_set.root),
        "num_classes": num_classes,
        "feature_seconds": round(extract_s, 2),
    }
    for encoder, train_feats, val_feats in zip(encoders, bank, queries):
        results = knn_classify(
            train_feats.features, train_feats.labels, val_feats.features, val_feats.labels,
            num_classes, args.k, args.temperature, args.chunk_size, device,
        )
        entry = {
            "num_train": int(train_feats.labels.numel()),
            "num_val": int(val_feats.labels.numel()),
            "skipped": [{"path": p, "error": e} for p, e in train_feats.skipped + val_feats.skipped],
            "results": {str(k): v for k, v in results.items()},
        }
        label = f"{args.which} ({weights['source']})" if encoder is encoders[0] else (
            f"random init (seed {encoder.identity['seed']})"
        )
        print(format_results(
            f"k-NN {label}, {arch} at {args.image_size}px: {entry['num_val']} val images against "
            f"{entry['num_train']} train images, {num_classes} classes, T={args.temperature}",
            results,
        ), flush=True)
        if encoder is encoders[0]:
            report.update(entry)
        else:
            report["random_init"] = {"seed": encoder.identity["seed"], **entry}
    if args.compare_random:
        k = str(args.k[0])
        trained, random = report["results"][k]["top1"], report["random_init"]["results"][k]["top1"]
        print(f"{k}-NN top-1: trained {trained:.1f}% vs random init {random:.1f}% "
              f"({trained - random:+.1f} points)", flush=True)
    if args.json:
        ownership.write_report(args.json, report)  # replaces only a report carp_fast wrote
    return report


def main(argv: list[str] | None = None) -> int:
    from carp_fast.eval import run_cli

    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
