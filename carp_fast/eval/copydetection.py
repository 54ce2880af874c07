"""Copy detection on Copydays (Douze et al. 2009), the protocol of DINO (Caron et al.
2021, ``eval_copy_detection.py``) that the CARP paper and its release follow.

Queries are the 229 images of the *strong* subset (print-and-scan, painting, heavy
crops...); the database is the 157 *original* images plus distractors (10k random
YFCC100M images in the cited work). A query's positives are the originals whose file
name starts with the same 4 characters (Copydays' image id: ``200000.jpg`` is the
original of ``200001.jpg``, ``200002.jpg``...). Every image is resized to a square
``imsize x imsize`` (320, bicubic) and ImageNet-normalised; backbone features are
optionally whitened, L2-normalised, and the database is ranked by cosine similarity.
Whitening (when a whitening folder is given; 20k other YFCC100M images in the cited
work): the whitening images' mean is subtracted from every feature, then PCA whitening
``diag(eigenvalue ** -0.5) V^T`` from their covariance (the cited code takes the
covariance of the uncentred features; we centre them, which is what PCA whitening
means; eigenvalues below 1e-5 of the largest are floored there, as the cited code).
Score: mean over queries of the trapezoid AP (:func:`retrieval.ap_from_ranks`) over the
top ``max_rank`` (20) results, as the cited code searches the top 20.

For a ResNet the feature is the pooled backbone output, as CARP's release (DINO's
GeM-pooled patch tokens concern ViTs).

Data layout: Copydays' own, ``DIR/original/*.jpg`` and ``DIR/strong/*.jpg``; distractor
and whitening images are flat folders of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from carp_fast.data.folder import IMAGE_EXTENSIONS
from carp_fast.eval.knn import _exact_fp32_matmul
from carp_fast.eval.retrieval import RetrievalDataError, ap_from_ranks

IMSIZE = 320
MAX_RANK = 20
ID_LENGTH = 4


@dataclass
class CopydaysSet:
    root: Path
    originals: list[str]
    strong: list[str]
    positives: list[list[int]]  # per strong query: indices into originals
    distractors: list[str]
    whitening: list[str]


def list_images(folder: Path, what: str) -> list[str]:
    """Sorted image files directly in ``folder``; error naming it when missing or empty."""
    if not folder.is_dir():
        raise RetrievalDataError(f"{what} folder {folder} does not exist")
    files = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise RetrievalDataError(f"{what} folder {folder} holds no image")
    return files


def load_copydays(root: str | Path, distractors: str | Path | None = None, whitening: str | Path | None = None) -> CopydaysSet:
    """Copydays' originals and strong queries with their positives; errors name the folder."""
    root = Path(root)
    originals = list_images(root / "original", "Copydays original")
    strong = list_images(root / "strong", "Copydays strong")
    ids = [Path(p).name[:ID_LENGTH] for p in originals]
    positives = []
    for query in strong:
        matches = [i for i, prefix in enumerate(ids) if prefix == Path(query).name[:ID_LENGTH]]
        if not matches:
            raise RetrievalDataError(
                f"strong query {query} has no original in {root / 'original'} "
                f"(originals and copies share the first {ID_LENGTH} characters of the file name)"
            )
        positives.append(matches)
    return CopydaysSet(
        root, originals, strong, positives,
        list_images(Path(distractors), "distractor") if distractors else [],
        list_images(Path(whitening), "whitening") if whitening else [],
    )


def square_transform(imsize: int = IMSIZE) -> Callable:
    from torchvision import transforms as T

    from carp_fast.data.recipe import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([
        T.Resize((imsize, imsize), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def learn_whitening(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, projection)`` with ``(x - mean) @ projection`` PCA-whitened (power 0.5)."""
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max()) * 1e-5)
    return mean.float(), (eigenvectors / eigenvalues.sqrt()[None, :]).float()


def copydetection_evaluate(
    query_features: torch.Tensor,
    database_features: torch.Tensor,
    positives: list[list[int]],
    whitening_features: torch.Tensor | None = None,
    max_rank: int = MAX_RANK,
) -> dict:
    """mAP in % of the strong queries against originals + distractors (originals first)."""
    queries, database = query_features.float(), database_features.float()
    if whitening_features is not None:
        mean, projection = learn_whitening(whitening_features)
        queries, database = (queries - mean) @ projection, (database - mean) @ projection
    queries, database = F.normalize(queries, dim=1), F.normalize(database, dim=1)
    with _exact_fp32_matmul():
        similarity = queries @ database.T
    top = similarity.topk(min(max_rank, database.shape[0]), dim=1).indices.tolist()
    aps = []
    for ranked, positive in zip(top, positives):
        wanted = set(positive)
        aps.append(ap_from_ranks([r for r, index in enumerate(ranked) if index in wanted], len(positive)))
    return {
        "map": 100.0 * sum(aps) / len(aps),
        "num_queries": len(aps),
        "num_database": int(database.shape[0]),
        "whitened": whitening_features is not None,
        "max_rank": max_rank,
    }
