"""``python -m carp_fast.eval.suite --ckpt RUN --spec datasets.yaml [--out DIR]``

Every evaluation protocol of the CARP paper on frozen features, over a list of data
sets, in one command: k-NN (:mod:`.knn`), linear probe on precomputed centre-crop
features (:mod:`.linear`), k-means (:mod:`.kmeans`), low-shot SVMs (:mod:`.fewshot`),
retrieval (:mod:`.retrieval`: revisited Oxford/Paris, or class-based mAP@R on an
ImageFolder) and Copydays copy detection (:mod:`.copydetection`). Each module's
docstring gives its protocol and the work it follows.

The spec (a YAML file, checked like the training config: typed fields, unknown keys
rejected) lists the data sets and, per data set, the protocols to run with their
settings; ``docs/eval_suite_example.yaml`` shows every key. Before any feature is
extracted the whole spec is checked: folders, ground-truth files and image lists are
read, every image's header is opened (``check_images``), and protocol requirements
(enough images per class for the largest shot count...) are tested, so a missing data
set, a wrong layout or an unreadable file ends the run at once with its name. (A file
whose header reads but whose pixels are truncated shows only when decoded: in a
retrieval or copy-detection set, whose ground truth indexes images by position, that
ends the run naming it; in an ImageFolder it is left out and listed, as k-NN does.)

Features are extracted once per (network, data set, image transform) and cached under
``cache_dir/view-<hash>/`` (``view.json`` there records the transform; a folder whose
``view.json`` says otherwise is refused, not overwritten). The trained network and,
with ``compare_random``, the same architecture at its random initialisation are run.

Output: ``OUT/suite.json`` (every number, settings, timings) and ``OUT/suite.md`` (one
table per protocol, methods as rows and data sets as columns, as in the paper's
tables). Files in ``OUT`` that this tool did not write are never overwritten.

Exit status: 0 done, 1 evaluation failed, 2 bad spec, checkpoint or data.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from carp_fast.config import ConfigError, _build, _unknown_key

log = logging.getLogger(__name__)

TOOL = "carp_fast.eval.suite"
MARKDOWN_MARK = f"<!-- written by {TOOL} -->"


class SuiteError(ValueError):
    """A spec, data set or output folder the suite cannot use; the message names it."""


# ---------------------------------------------------------------------------- the spec
@dataclass
class KnnSpec:
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    """Neighbour counts."""
    temperature: float = 0.07
    """Vote weight exp(similarity / T)."""

    def __post_init__(self) -> None:
        if not self.k or min(self.k) < 1 or self.temperature <= 0:
            raise ConfigError("knn: k must be positive integers and temperature positive")


@dataclass
class LinearSpec:
    epochs: int = 100
    """Probe epochs over the precomputed centre-crop features."""
    batch_size: int = 2048
    """Features per optimiser step."""
    optimizer: Literal["lars", "sgd"] = "lars"
    """LARS as the published probe, or SGD with momentum."""
    lr: Optional[float] = None
    """Peak learning rate (default: 1.0 for LARS, 0.1 per 256 for SGD)."""
    seed: int = 0
    """Seed of the probe's initialisation and batch order."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or (self.lr is not None and self.lr <= 0):
            raise ConfigError("linear: epochs, batch_size and lr must be positive")


@dataclass
class KMeansSpec:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """k-means++ seeds; the best objective is reported, every seed is kept."""
    iterations: int = 100
    """Lloyd iterations at most."""
    standardize: bool = True
    """Standardise with the fitting split's statistics first (CARP's released evaluation)."""
    fit_on: Literal["train", "val"] = "train"
    """Split the centroids are fitted on (CARP: train); val is always the one scored."""

    def __post_init__(self) -> None:
        if not self.seeds or self.iterations < 1:
            raise ConfigError("kmeans: needs at least one seed and a positive iteration count")


@dataclass
class FewShotSpec:
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Training images per class."""
    runs: int = 5
    """Random draws per shot count."""
    costs: list[float] = field(default_factory=lambda: [0.5])
    """SVM costs C."""
    seed: int = 0
    """Seed of the draws."""

    def __post_init__(self) -> None:
        if not self.shots or min(self.shots) < 1 or self.runs < 1 or not self.costs or min(self.costs) <= 0:
            raise ConfigError("fewshot: shots, runs and costs must be positive")


@dataclass
class RetrievalSpec:
    """ImageFolder: val queries against train by class (mAP@R); revisited: Easy/Medium/Hard."""


@dataclass
class CopyDetectionSpec:
    max_rank: int = 20
    """Results per query scored (the cited code searches the top 20)."""

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise ConfigError("copydetection: max_rank must be positive")


PROTOCOLS: dict[str, type] = {
    "knn": KnnSpec, "linear": LinearSpec, "kmeans": KMeansSpec, "fewshot": FewShotSpec,
    "retrieval": RetrievalSpec, "copydetection": CopyDetectionSpec,
}
PROTOCOLS_OF_KIND = {
    "imagefolder": ("knn", "linear", "kmeans", "fewshot", "retrieval"),
    "revisited": ("retrieval",),
    "copydays": ("copydetection",),
}
DEFAULT_SIZE = {"imagefolder": 224, "revisited": 224, "copydays": 320}


@dataclass
class DatasetSpec:
    name: str
    """Name in the tables."""
    kind: Literal["imagefolder", "revisited", "copydays"] = "imagefolder"
    """imagefolder: train/val class folders; revisited: gnd_<name>.pkl + jpg/; copydays: original/ + strong/."""
    train: Optional[str] = None
    """imagefolder: the labelled bank (k-NN bank, probe / SVM training, retrieval database)."""
    val: Optional[str] = None
    """imagefolder: the scored split."""
    path: Optional[str] = None
    """revisited, copydays: the data set folder."""
    distractors: Optional[str] = None
    """copydays: folder of distractor images added to the database."""
    whitening: Optional[str] = None
    """copydays: folder of images the whitening is learned on."""
    image_size: Optional[int] = None
    """imagefolder: centre crop (224); revisited: longest side (224); copydays: square side (320)."""
    multiscale: bool = True
    """revisited: average the features at scales 1, 1/sqrt(2), 1/2."""
    crop_queries: bool = False
    """revisited: crop each query to its gnd bbx first (the revisited toolkit; DINO does not)."""
    protocols: dict = field(default_factory=dict)
    """Protocol name -> its settings (empty for the defaults)."""

    def __post_init__(self) -> None:
        needed = ("train", "val") if self.kind == "imagefolder" else ("path",)
        for key in needed:
            if not getattr(self, key):
                raise ConfigError(f"dataset {self.name!r} ({self.kind}) needs {key}")
        if self.image_size is None:
            self.image_size = DEFAULT_SIZE[self.kind]
        if self.image_size <= 0:
            raise ConfigError(f"dataset {self.name!r}: image_size must be positive")
        if self.crop_queries and self.kind != "revisited":
            raise ConfigError(f"dataset {self.name!r}: crop_queries applies to revisited data sets only")


@dataclass
class SuiteSpec:
    datasets: list = field(default_factory=list)
    """The data sets, each a DatasetSpec mapping."""
    output: Optional[str] = None
    """Folder of suite.json and suite.md (default: eval_suite beside the checkpoint)."""
    cache_dir: Optional[str] = None
    """Feature cache root (default: OUT/feature_cache)."""
    which: Literal["teacher", "student"] = "teacher"
    """Network of the checkpoint to evaluate."""
    compare_random: bool = True
    """Also evaluate the architecture at the run's random initialisation."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    amp: Literal["off", "bf16"] = "off"
    """bf16 autocast for feature extraction on GPU."""
    batch_size: int = 128
    """Images per forward pass (revisited images go one at a time: their sizes differ)."""
    num_workers: int = 4
    """Decoding processes."""
    check_images: bool = True
    """Open every image's header before starting (names unreadable files up front)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("batch_size must be positive and num_workers not negative")


def parse_spec(values: Any, source: str = "spec") -> SuiteSpec:
    """A :class:`SuiteSpec` from the YAML mapping; errors name the key (as the train config)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    values = dict(values)
    raw_sets = values.pop("datasets", None)
    if not isinstance(raw_sets, list) or not raw_sets:
        raise ConfigError(f"{source}: 'datasets' must be a non-empty list")
    spec = _build(SuiteSpec, values, "")
    names = set()
    for i, raw in enumerate(raw_sets):
        prefix = f"datasets[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix[:-1]}: expected a mapping, got {raw!r}")
        raw = dict(raw)
        raw_protocols = raw.pop("protocols", None)
        if "name" not in raw:
            raise ConfigError(f"{prefix}name is required")
        dataset = _build(DatasetSpec, raw, prefix)
        if dataset.name in names:
            raise ConfigError(f"{prefix}name {dataset.name!r} is used twice")
        names.add(dataset.name)
        if not isinstance(raw_protocols, dict) or not raw_protocols:
            raise ConfigError(f"{prefix}protocols must map at least one of {', '.join(PROTOCOLS_OF_KIND[dataset.kind])} to its settings")
        allowed = PROTOCOLS_OF_KIND[dataset.kind]
        for name, settings in raw_protocols.items():
            if name not in PROTOCOLS:
                raise _unknown_key(f"{prefix}protocols.{name}", list(PROTOCOLS))
            if name not in allowed:
                raise ConfigError(f"{prefix}protocols.{name} does not apply to a {dataset.kind} data set (it takes {', '.join(allowed)})")
            if settings is not None and not isinstance(settings, dict):
                raise ConfigError(f"{prefix}protocols.{name}: expected a mapping of settings or nothing, got {settings!r}")
            dataset.protocols[name] = _build(PROTOCOLS[name], settings or {}, f"{prefix}protocols.{name}.")
        spec.datasets.append(dataset)
    return spec


def load_spec(path: str | Path) -> SuiteSpec:
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SuiteError(f"cannot read spec {path}: {error}") from error
    except yaml.YAMLError as error:
        raise SuiteError(f"spec {path} is not valid YAML: {error}") from error
    try:
        return parse_spec(values, str(path))
    except ConfigError as error:
        raise SuiteError(f"{path}: {error}") from error


# ------------------------------------------------------------------------- validation
@dataclass
class PreparedSet:
    """A data set read from disk and checked: what the protocols run on."""

    spec: DatasetSpec
    images: dict[str, list[tuple[str, int]]]  # role -> samples (train, val, db, queries...)
    num_classes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # gnd, positives


def check_readable(paths: list[str], what: str, progress: bool) -> None:
    """Open every image's header; SuiteError naming the first unreadable files."""
    from PIL import Image

    bad = []
    iterator = paths
    if progress and len(paths) > 2000:
        from tqdm import tqdm

        iterator = tqdm(paths, desc=f"checking {what}", unit="img", leave=False)
    for path in iterator:
        try:
            with Image.open(path) as image:
                image.size  # header only: decoding every pixel is the long computation
        except Exception as error:  # missing, permission denied, not an image
            bad.append(f"{path} ({type(error).__name__}: {error})")
            if len(bad) == 5:
                break
    if bad:
        raise SuiteError(f"{what}: unreadable image(s): " + "; ".join(bad))


def prepare_dataset(dataset: DatasetSpec, check_images: bool, progress: bool) -> PreparedSet:
    """Read the layout ``dataset.kind`` expects and check what its protocols need."""
    from carp_fast.data.folder import DataPathError
    from carp_fast.eval import copydetection, features, retrieval

    where = f"dataset {dataset.name!r}"
    try:
        if dataset.kind == "imagefolder":
            train, val = features.load_splits(dataset.train, dataset.val)
            prepared = PreparedSet(dataset, {"train": train.samples, "val": val.samples}, len(train.classes))
            counts = torch.bincount(torch.tensor([label for _, label in train.samples]), minlength=prepared.num_classes)
            if "fewshot" in dataset.protocols:
                most = max(dataset.protocols["fewshot"].shots)
                short = [(train.classes[c], int(n)) for c, n in enumerate(counts) if n < most]
                if short:
                    raise SuiteError(
                        f"{where}: {most}-shot needs {most} train images per class; "
                        + ", ".join(f"{dataset.train}/{name} has {n}" for name, n in short[:5])
                    )
            if "kmeans" in dataset.protocols:
                fit = dataset.protocols["kmeans"].fit_on
                if len(prepared.images[fit]) < prepared.num_classes:
                    raise SuiteError(f"{where}: k-means with k={prepared.num_classes} needs at least that many {fit} images")
        elif dataset.kind == "revisited":
            data = retrieval.load_revisited(dataset.path)
            if dataset.crop_queries:
                missing = [q for q, entry in enumerate(data.gnd) if entry.get("bbx") is None or len(entry["bbx"]) != 4]
                if missing:
                    raise SuiteError(f"{where}: crop_queries, but query {missing[0]} ({data.queries[missing[0]]}) has no bbx")
            prepared = PreparedSet(
                dataset, {"db": [(p, 0) for p in data.images], "queries": [(p, 0) for p in data.queries]},
                extra={"gnd": data.gnd, "gnd_name": data.name, "revisited": data},
            )
        else:
            data = copydetection.load_copydays(dataset.path, dataset.distractors, dataset.whitening)
            prepared = PreparedSet(
                dataset,
                {"db": [(p, 0) for p in data.originals + data.distractors], "queries": [(p, 0) for p in data.strong]},
                extra={"positives": data.positives, "num_distractors": len(data.distractors)},
            )
            if data.whitening:
                prepared.images["whitening"] = [(p, 0) for p in data.whitening]
    except (DataPathError, retrieval.RetrievalDataError) as error:
        raise SuiteError(f"{where}: {error}") from error
    for role, samples in prepared.images.items():
        missing = [path for path, _ in samples if not os.path.isfile(path)]
        if missing:
            raise SuiteError(f"{where}: {len(missing)} {role} image(s) missing, first {missing[0]}")
        if check_images:
            check_readable([path for path, _ in samples], f"{where} {role}", progress)
    return prepared


# ------------------------------------------------------------------ features and cache
def view_of(dataset: DatasetSpec) -> tuple[dict, Callable | None, tuple[float, ...], int | None]:
    """``(description, transform, scales, batch size)`` of the data set's image transform."""
    from carp_fast.eval import copydetection, retrieval

    if dataset.kind == "imagefolder":
        return {"transform": "resize-centre-crop", "size": dataset.image_size}, None, (1.0,), None
    if dataset.kind == "revisited":
        scales = retrieval.MULTISCALE if dataset.multiscale else (1.0,)
        return (
            {"transform": "thumbnail", "size": dataset.image_size, "scales": list(scales),
             "crop_queries": dataset.crop_queries},
            retrieval.thumbnail_transform(dataset.image_size), scales, 1,
        )
    return (
        {"transform": "square-resize", "size": dataset.image_size},
        copydetection.square_transform(dataset.image_size), (1.0,), None,
    )


def view_cache_dir(cache_root: Path, view: dict) -> Path:
    """``cache_root/view-<hash>``, signed by its ``view.json``; a foreign one is refused."""
    folder = cache_root / ("view-" + hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16])
    signature = folder / "view.json"
    mine = {"tool": TOOL, "view": view}
    if signature.exists():
        try:
            found = json.loads(signature.read_text())
        except (OSError, ValueError) as error:
            raise SuiteError(f"cannot read the cache signature {signature}: {error}") from error
        if found != mine:
            raise SuiteError(f"{folder} holds features of something else ({signature}); choose another cache_dir")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(signature, "x") as handle:  # "x": never replace a file that appeared meanwhile
        handle.write(json.dumps(mine, indent=1) + "\n")
    return folder


# ----------------------------------------------------------------------------- output
def write_owned(path: Path, text: str, mark: str) -> None:
    """Write ``text`` to ``path`` unless a file there lacks ``mark`` (then it is not ours)."""
    if path.exists():
        try:
            ours = mark in path.read_text()[:4096]
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise SuiteError(f"{path} exists and was not written by {TOOL}; not overwriting it (use another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict) -> str:
    return _fmt(entry["mean"]) + ("" if entry["ci95"] is None else f" ± {entry['ci95']:.1f}")


def table_cells(protocol: str, result: dict) -> list[tuple[str, str]]:
    """(column, cell) pairs of one protocol's result on one data set."""
    if protocol == "knn":
        return [(f"{k}-NN", _fmt(r["top1"])) for k, r in result["results"].items()]
    if protocol == "linear":
        return [("top-1", _fmt(result["top1"]))]
    if protocol == "kmeans":
        return [(m.upper(), _fmt(result[m])) for m in ("nmi", "ami", "ari")]
    if protocol == "fewshot":
        cells = []
        for shots, entry in result["shots"].items():
            best = entry["costs"][entry["best_cost"]]
            cells.append((f"k={shots} mAP", _interval(best["map"])))
        return cells
    if protocol == "retrieval":
        if "map@r" in result:
            return [("mAP@R", _fmt(result["map@r"])), ("R-P", _fmt(result["r_precision"])), ("P@1", _fmt(result["precision@1"]))]
        return [(f"{level[0].upper()} mAP", _fmt(result[level]["map"])) for level in ("easy", "medium", "hard")]
    if protocol == "copydetection":
        return [("strong mAP", _fmt(result["map"]))]
    raise KeyError(protocol)


TITLES = {
    "knn": "k-NN top-1 (%)",
    "linear": "Linear probe top-1 (%), precomputed centre-crop features",
    "kmeans": "k-means, k = number of classes (%)",
    "fewshot": "Low-shot linear SVMs, mAP (%), mean ± 95 % interval over draws",
    "retrieval": "Retrieval (%)",
    "copydetection": "Copy detection, Copydays strong (%)",
}


def markdown_report(report: dict) -> str:
    lines = [MARKDOWN_MARK, f"# Evaluation suite: {report['checkpoint']}", ""]
    for protocol in PROTOCOLS:
        columns: list[tuple[str, str]] = []  # (dataset, column)
        rows: dict[str, dict[tuple[str, str], str]] = {}
        for method, per_set in report["results"].items():
            for dataset, protocols in per_set.items():
                if protocol not in protocols:
                    continue
                for column, cell in table_cells(protocol, protocols[protocol]):
                    if (dataset, column) not in columns:
                        columns.append((dataset, column))
                    rows.setdefault(method, {})[(dataset, column)] = cell
        if not rows:
            continue
        lines += [f"## {TITLES[protocol]}", ""]
        lines.append("| Method | " + " | ".join(f"{d} {c}" for d, c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for method, cells in rows.items():
            lines.append(f"| {method} | " + " | ".join(cells.get(col, "") for col in columns) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ running
def run_protocols(
    prepared: PreparedSet, features: dict[str, Any], device: torch.device, out: Path,
    encoder_identity: dict, encoder_name: str, echo: Callable[[str], None],
) -> dict[str, dict]:
    """Every protocol of one data set on one network's features."""
    from carp_fast.eval import copydetection, fewshot, kmeans, knn, linear, retrieval

    spec = prepared.spec
    results: dict[str, dict] = {}
    for protocol, settings in spec.protocols.items():
        echo(f"  {encoder_name} / {spec.name} / {protocol}")
        started = time.perf_counter()
        if spec.kind == "imagefolder":
            train, val = features["train"], features["val"]
            if protocol == "knn":
                raw = knn.knn_classify(
                    train.features, train.labels, val.features, val.labels, prepared.num_classes,
                    settings.k, settings.temperature, device=device,
                )
                result = {"results": {str(k): v for k, v in raw.items()}, "temperature": settings.temperature}
            elif protocol == "linear":
                probe = linear.ProbeSettings(
                    epochs=settings.epochs, batch_size=settings.batch_size, optimizer=settings.optimizer,
                    lr=settings.lr or linear.default_lr(settings.optimizer, settings.batch_size), seed=settings.seed,
                )
                records = linear.train_probe(
                    linear.precomputed_epochs(train.features, train.labels, probe.batch_size, probe.seed, device),
                    val.features, val.labels, prepared.num_classes, train.features.shape[1], probe,
                    out / "linear" / spec.name / encoder_name, device,
                    identity={"encoder": encoder_identity, "dataset": spec.name, "features": "precomputed centre crops"},
                    echo=lambda line: log.info("%s", line),
                )
                last = records[-1]
                result = {"top1": last["top1"], "top5": last["top5"], "epochs": probe.epochs, "settings": dataclasses.asdict(probe)}
            elif protocol == "kmeans":
                fit = features[settings.fit_on]
                result = kmeans.kmeans_evaluate(
                    fit.features, val.features, val.labels, prepared.num_classes,
                    kmeans.KMeansSettings(settings.seeds, settings.iterations, settings.standardize), device,
                )
                result["fit_on"] = settings.fit_on
            elif protocol == "fewshot":
                result = fewshot.fewshot_evaluate(
                    train.features, train.labels, val.features, val.labels, prepared.num_classes,
                    fewshot.FewShotSettings(settings.shots, settings.runs, settings.costs, settings.seed),
                )
            else:  # retrieval by class
                result = retrieval.map_at_r(val.features, val.labels, train.features, train.labels, device=device)
        elif spec.kind == "revisited":
            result = retrieval.revisited_evaluate(features["queries"].features, features["db"].features, prepared.extra["gnd"])
            result["multiscale"], result["crop_queries"] = spec.multiscale, spec.crop_queries
        else:
            whitening = features.get("whitening")
            result = copydetection.copydetection_evaluate(
                features["queries"].features, features["db"].features, prepared.extra["positives"],
                whitening.features if whitening is not None else None, settings.max_rank,
            )
            result["num_distractors"] = prepared.extra["num_distractors"]
        result["seconds"] = round(time.perf_counter() - started, 2)
        results[protocol] = result
    return results


def run(args: argparse.Namespace) -> dict:
    from carp_fast.eval import features as feat
    from carp_fast.eval import retrieval

    echo = lambda line: print(line, flush=True)  # noqa: E731
    spec = load_spec(args.spec)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(PROTOCOLS)
        if unknown:
            raise SuiteError(f"--only names unknown protocol(s) {', '.join(sorted(unknown))} (valid: {', '.join(PROTOCOLS)})")
        for dataset in spec.datasets:
            dataset.protocols = {k: v for k, v in dataset.protocols.items() if k in wanted}
        spec.datasets = [d for d in spec.datasets if d.protocols]
        if not spec.datasets:
            raise SuiteError(f"no data set of {args.spec} runs any of {args.only}")
    compare_random = spec.compare_random and not args.no_random
    device = feat.resolve_device(spec.device)

    # Everything that can fail on bad input fails here, before any feature is computed.
    encoder, weights = feat.load_encoder(args.ckpt, spec.which)
    ckpt = Path(args.ckpt)
    out = Path(args.out or spec.output or ((ckpt if ckpt.is_dir() else ckpt.parent) / "eval_suite"))
    for name, mark in (("suite.json", f'"tool": "{TOOL}"'), ("suite.md", MARKDOWN_MARK)):
        path = out / name
        if path.exists() and mark not in path.read_text(errors="replace")[:4096]:
            raise SuiteError(f"{path} exists and was not written by {TOOL}; not overwriting it (use another --out)")
    echo(f"checking {len(spec.datasets)} data set(s) of {args.spec}")
    prepared_sets = [prepare_dataset(d, spec.check_images, not args.quiet) for d in spec.datasets]
    cache_root = Path(spec.cache_dir) if spec.cache_dir else out / "feature_cache"
    # Every cache folder is checked (a foreign one refused) before the first extraction.
    views = [view_of(prepared.spec) for prepared in prepared_sets]
    caches = [view_cache_dir(cache_root, view[0]) for view in views]

    encoders = [encoder]
    if compare_random:
        config = weights.get("config") or {}
        seed = config.get("train", {}).get("seed", 0)
        encoders.append(feat.random_encoder(encoder.identity["arch"], seed, feat._zero_init_residual(weights)))
    names = [f"CARP {spec.which}", "random init"][: len(encoders)]

    report: dict[str, Any] = {
        "tool": TOOL,
        "checkpoint": weights["source"],
        "which": spec.which,
        "arch": encoder.identity["arch"],
        "spec": str(args.spec),
        "device": str(device),
        "datasets": {},
        "results": {name: {} for name in names},
        "feature_seconds": {},
    }
    for number, (prepared, (view, transform, scales, batch), cache) in enumerate(zip(prepared_sets, views, caches), 1):
        dataset = prepared.spec
        echo(f"[{number}/{len(prepared_sets)}] {dataset.name} ({dataset.kind}): {', '.join(dataset.protocols)}")
        if dataset.kind == "revisited" and dataset.crop_queries:
            # Cropped after validation: the crops live in the (signed) view folder.
            crops = retrieval.crop_queries(prepared.extra["revisited"], cache / f"query_crops_{dataset.name}")
            prepared.images["queries"] = [(path, 0) for path in crops]
        started = time.perf_counter()
        per_encoder: list[dict[str, Any]] = [{} for _ in encoders]
        for role, samples in prepared.images.items():
            extracted = feat.cached_features(
                encoders, samples, cache_dir=cache, image_size=dataset.image_size, amp=spec.amp,
                batch_size=batch or spec.batch_size, num_workers=spec.num_workers, device=device,
                progress=not args.quiet, transform=transform, scales=scales,
            )
            for slot, features in enumerate(extracted):
                if features.skipped and dataset.kind != "imagefolder":
                    # Retrieval ground truth indexes images by position: none may be left out.
                    raise SuiteError(f"dataset {dataset.name!r}: unreadable {role} image {features.skipped[0][0]} ({features.skipped[0][1]})")
                per_encoder[slot][role] = features
        report["feature_seconds"][dataset.name] = round(time.perf_counter() - started, 2)
        report["datasets"][dataset.name] = {
            "kind": dataset.kind, "view": view, "num_classes": prepared.num_classes,
            **{f"num_{role}": len(samples) for role, samples in prepared.images.items()},
            "skipped": sorted({p for f in per_encoder[0].values() for p, _ in f.skipped}),
            "protocols": {k: dataclasses.asdict(v) for k, v in dataset.protocols.items()},
        }
        for name, enc, features in zip(names, encoders, per_encoder):
            report["results"][name][dataset.name] = run_protocols(
                prepared, features, device, out, enc.identity, "trained" if enc is encoder else "random_init", echo,
            )
    from carp_fast import profiling

    report.update(profiling.run_record(["-m", TOOL, *args.argv]))
    text = json.dumps(report, indent=1) + "\n"
    write_owned(out / "suite.json", text, f'"tool": "{TOOL}"')
    markdown = markdown_report(report)
    write_owned(out / "suite.md", markdown + "\n", MARKDOWN_MARK)
    if args.json:
        write_owned(Path(args.json), text, f'"tool": "{TOOL}"')
    echo("\n" + markdown)
    echo(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description="Every CARP evaluation protocol on frozen features, over the data sets of a spec.")
    parser.add_argument("--ckpt", required=True, help="run directory (uses last.pt), carp_fast or published CARP checkpoint, or exported backbone")
    parser.add_argument("--spec", required=True, help="YAML list of data sets and protocols (see docs/eval_suite_example.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the spec's output, else eval_suite beside the checkpoint)")
    parser.add_argument("--only", default=None, help="comma-separated protocols to run of those the spec lists")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init comparison the spec asks for")
    parser.add_argument("--json", default=None, help="also write the JSON report here (e.g. benchmarks/...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report's command line
    return args


def main(argv: list[str] | None = None) -> int:
    from carp_fast.eval import run_cli

    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
