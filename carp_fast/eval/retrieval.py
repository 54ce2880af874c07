"""Image retrieval on frozen features: revisited Oxford/Paris, and class-based mAP@R.

**Revisited Oxford and Paris** (Radenović et al. 2018, "Revisiting Oxford and Paris:
Large-Scale Image Retrieval Benchmarking"), as DINO evaluates them (Caron et al. 2021,
``eval_image_retrieval.py``), which the CARP paper and its release follow: every image
is shrunk to fit ``imsize`` (aspect kept, PIL thumbnail; 224 by default in the cited code,
DINO's paper uses 512), ImageNet-normalised and, with ``multiscale``, passed through the
backbone at scales 1, 1/sqrt(2) and 1/2 (bilinear) with the three features averaged;
features are L2-normalised and the database ranked by cosine similarity to each query.
Queries are not cropped to their box by default (as the cited code); with
``crop_queries`` each query is first cropped to its ``bbx`` (the revisited toolkit's own
protocol), the crops kept losslessly in the feature cache. Scores follow the revisited protocol: for **Easy** the positives
are ``easy`` and ``junk + hard`` is ignored, for **Medium** ``easy + hard`` against
``junk``, for **Hard** ``hard`` against ``junk + easy``; an ignored image is taken out of
the ranking before the AP is computed. The AP is the trapezoid area of the precision-recall
curve (the Oxford/Holidays ``compute_ap``); queries without positives are left out of
the mean. mP@k (k = 1, 5, 10) as the revisited toolkit: precision at min(k, the rank of
the last positive).

Data layout: the revisited toolkit's, ``DIR/gnd_<name>.pkl`` (a pickle of ``imlist``,
``qimlist`` and ``gnd``, one ``{"easy", "hard", "junk", "bbx"}`` per query) with the
images in ``DIR/jpg/<id>.jpg``.

**Class-based retrieval** for any labelled ImageFolder: each query (val image) ranks the
database (train images); MAP@R (Musgrave et al. 2020, "A Metric Learning Reality
Check") with R the number of database images of the query's class, R-precision and
precision@1.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from carp_fast.eval.knn import CHUNK_BYTES, _exact_fp32_matmul

MULTISCALE = (1.0, 2 ** -0.5, 0.5)
PRECISION_AT = (1, 5, 10)


class RetrievalDataError(ValueError):
    """A data set on disk does not have the layout its protocol reads."""


# ----------------------------------------------------------------------- average precision
def ap_from_ranks(ranks: Sequence[int], num_positives: int) -> float:
    """Trapezoid AP of one query from the 0-based ranks of its retrieved positives (sorted).

    Between consecutive positives the precision curve is taken as linear, so a positive
    at rank ``r`` (the ``j``-th, 0-based) adds ``(j / r + (j + 1) / (r + 1)) / 2``
    (``j / r`` read as 1 at ``r = 0``) times the recall step ``1 / num_positives``.
    Positives never retrieved add nothing.
    """
    ap = 0.0
    for j, rank in enumerate(ranks):
        before = 1.0 if rank == 0 else j / rank
        ap += (before + (j + 1) / (rank + 1)) / 2.0
    return ap / num_positives


def ranks_without_junk(order: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of ``positives`` in ``order`` once the ``junk`` images are taken out."""
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    pos = np.sort(position[positives]) if positives.size else np.empty(0, np.int64)
    junk_pos = np.sort(position[junk]) if junk.size else np.empty(0, np.int64)
    return pos - np.searchsorted(junk_pos, pos)


def revisited_map(similarity: torch.Tensor, gnd: Sequence[dict], ks: Sequence[int] = PRECISION_AT) -> dict:
    """Easy / Medium / Hard mAP and mP@k in % from ``[num_queries, num_images]`` similarities."""
    settings = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    orders = torch.argsort(-similarity.float().cpu(), dim=1, stable=True).numpy()
    report = {}
    for name, (ok_keys, junk_keys) in settings.items():
        aps, precisions = [], []
        for order, query in zip(orders, gnd):
            ok = np.concatenate([np.asarray(query[key], dtype=np.int64) for key in ok_keys])
            junk = np.concatenate([np.asarray(query[key], dtype=np.int64) for key in junk_keys])
            if ok.size == 0:
                continue  # the toolkit leaves such queries out of the mean
            ranks = ranks_without_junk(order, ok, junk)
            aps.append(ap_from_ranks(ranks, ok.size))
            hit_at = ranks + 1
            precisions.append([(hit_at <= min(hit_at.max(), k)).sum() / min(hit_at.max(), k) for k in ks])
        report[name] = {
            "map": 100.0 * float(np.mean(aps)) if aps else None,
            **{f"mp@{k}": 100.0 * float(np.mean([p[i] for p in precisions])) if precisions else None
               for i, k in enumerate(ks)},
            "num_queries": len(aps),
        }
    return report


# ------------------------------------------------------------------------ revisited data
@dataclass
class RevisitedSet:
    root: Path
    name: str
    images: list[str]  # paths of the database images
    queries: list[str]  # paths of the query images
    gnd: list[dict]


def load_revisited(root: str | Path) -> RevisitedSet:
    """Read ``root/gnd_<name>.pkl`` and check it against ``root/jpg``; errors name the file."""
    root = Path(root)
    if not root.is_dir():
        raise RetrievalDataError(f"retrieval data set {root} is not a folder (expected gnd_<name>.pkl and jpg/)")
    found = sorted(root.glob("gnd_*.pkl"))
    if len(found) != 1:
        raise RetrievalDataError(
            f"{root} must hold exactly one gnd_<name>.pkl (revisited Oxford/Paris layout), found "
            + (", ".join(p.name for p in found) or "none")
        )
    path = found[0]
    try:
        with open(path, "rb") as handle:
            cfg = pickle.load(handle)
    except Exception as error:  # truncated file, not a pickle, permission denied
        raise RetrievalDataError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise RetrievalDataError(f"{path} must be a dict with imlist, qimlist and gnd")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise RetrievalDataError(f"{path}: {len(qimlist)} queries but {len(gnd)} gnd entries")
    for q, entry in enumerate(gnd):
        missing = {"easy", "hard", "junk"} - set(entry) if isinstance(entry, dict) else {"easy", "hard", "junk"}
        if missing:
            raise RetrievalDataError(f"{path}: gnd[{q}] lacks {', '.join(sorted(missing))}")
        for key in ("easy", "hard", "junk"):
            index = np.asarray(entry[key], dtype=np.int64)
            if index.size and (index.min() < 0 or index.max() >= len(imlist)):
                raise RetrievalDataError(f"{path}: gnd[{q}]['{key}'] indexes outside imlist ({len(imlist)} images)")
        if "bbx" in entry and entry["bbx"] is not None and len(entry["bbx"]) != 4:
            raise RetrievalDataError(f"{path}: gnd[{q}]['bbx'] must be 4 numbers (x1, y1, x2, y2)")
    images = [str(root / "jpg" / f"{name}.jpg") for name in imlist]
    queries = [str(root / "jpg" / f"{name}.jpg") for name in qimlist]
    return RevisitedSet(root, path.stem[len("gnd_"):], images, queries, gnd)


def crop_queries(data: RevisitedSet, folder: Path) -> list[str]:
    """Each query cropped to its ground-truth box, saved as PNG under ``folder`` (once);
    the crops' paths. A query without a box is an error naming it."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    crops = []
    for q, (path, entry) in enumerate(zip(data.queries, data.gnd)):
        box = entry.get("bbx")
        if box is None or len(box) != 4:
            raise RetrievalDataError(f"gnd_{data.name}.pkl: query {q} ({path}) has no bbx to crop to")
        box = tuple(int(round(float(v))) for v in box)
        # The box is in the name: a changed ground truth makes a new crop, not a stale hit.
        target = folder / f"{q:05d}_{Path(path).stem}_{'_'.join(map(str, box))}.png"
        if not target.exists():
            with Image.open(path) as image:
                crop = image.convert("RGB").crop(box)
            partial = target.with_name(target.name + ".partial")
            crop.save(partial, format="PNG")
            partial.replace(target)  # a crash leaves no half-written crop under the final name
        crops.append(str(target))
    return crops


def thumbnail_transform(imsize: int) -> Callable:
    """Shrink to fit ``imsize x imsize`` keeping the aspect (never enlarge), normalise."""
    from PIL import Image
    from torchvision import transforms as T

    from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD

    def shrink(image):
        image = image.copy()
        image.thumbnail((imsize, imsize), Image.LANCZOS)
        return image

    return T.Compose([T.Lambda(shrink), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def revisited_evaluate(query_features: torch.Tensor, image_features: torch.Tensor, gnd: Sequence[dict]) -> dict:
    """Cosine ranking of the database for each query, scored by :func:`revisited_map`."""
    queries = F.normalize(query_features.float(), dim=1)
    images = F.normalize(image_features.float(), dim=1)
    with _exact_fp32_matmul():
        similarity = queries @ images.T
    return revisited_map(similarity, gnd)


# ----------------------------------------------------------------------- class retrieval
@torch.no_grad()
def map_at_r(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    db_features: torch.Tensor,
    db_labels: torch.Tensor,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """MAP@R, R-precision and precision@1 in % of cosine retrieval by class.

    For a query of class ``c`` with ``R`` database images of class ``c``:
    ``MAP@R = (1/R) sum_{i<=R} P(i) rel(i)``, ``R-precision = (hits in top R) / R``.
    Queries whose class has no database image are left out (``num_queries`` says how many count).
    """
    device = torch.device(device) if device is not None else db_features.device
    bank = F.normalize(db_features.to(device, torch.float32), dim=1)
    bank_labels = db_labels.to(device)
    counts = torch.bincount(bank_labels, minlength=int(max(query_labels.max(), bank_labels.max())) + 1)
    max_r = int(counts.max())
    chunk = chunk_size or max(1, min(4096, CHUNK_BYTES // (4 * bank.shape[0])))
    totals = {"map@r": 0.0, "r_precision": 0.0, "precision@1": 0.0}
    counted = 0
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start : start + chunk].to(device, torch.float32), dim=1)
        labels = query_labels[start : start + chunk].to(device)
        r = counts[labels]
        keep = r > 0
        with _exact_fp32_matmul():
            sims = q @ bank.T
        top = sims.topk(min(max_r, bank.shape[0]), dim=1).indices
        rel = (bank_labels[top] == labels[:, None]).float()
        within = (torch.arange(rel.shape[1], device=device)[None, :] < r[:, None]).float()
        precision = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, device=device)[None, :]
        rr = r.clamp_min(1).float()
        totals["map@r"] += float(((precision * rel * within).sum(1) / rr)[keep].sum())
        totals["r_precision"] += float(((rel * within).sum(1) / rr)[keep].sum())
        totals["precision@1"] += float(rel[:, 0][keep].sum())
        counted += int(keep.sum())
    return {**{k: 100.0 * v / max(counted, 1) for k, v in totals.items()}, "num_queries": counted}
