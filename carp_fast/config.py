"""Typed configuration: a tree of dataclasses, YAML recipes and dotted CLI overrides.

Every field carries a docstring (the string literal under it); :func:`field_docs` reads
them back for ``--help`` and the README's config reference. Unknown keys and values of
the wrong type raise :class:`ConfigError` naming the key and the closest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# The recipes ship inside the package (package data), so a name resolves after any install.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an invalid value."""


@dataclass
class FFCVConfig:
    """``data.ffcv``: how the FFCV backend reads its .beton file."""

    os_cache: bool = True
    """Read the .beton through the OS page cache (false: FFCV's own process cache, for datasets larger than RAM, with quasi_random order)."""
    order: Literal["random", "quasi_random"] = "random"
    """Sample order; quasi_random reads in page-sized runs for datasets larger than RAM."""


@dataclass
class DALIConfig:
    """``data.dali``: the DALI backend's nvJPEG decoder."""

    hw_decoder_load: float = 0.65
    """Share of JPEG decoding sent to the hardware decoder (A100/H100), the rest to CUDA."""
    device_memory_padding: int = 211025920
    """Bytes of nvJPEG device memory pre-allocated to avoid regrowth."""
    host_memory_padding: int = 140544512
    """Bytes of nvJPEG pinned host memory pre-allocated to avoid regrowth."""

    def __post_init__(self) -> None:
        if not 0 <= self.hw_decoder_load <= 1:
            raise ConfigError("data.dali.hw_decoder_load must be in [0, 1]")
        _non_negative(self, "device_memory_padding")
        _non_negative(self, "host_memory_padding")


@dataclass
class NvjpegConfig:
    """``data.nvjpeg``: the nvjpeg backend's decoder and how far it decodes ahead."""

    decoder: Literal["auto", "torchvision", "torchcodec"] = "auto"
    """Decoding library: `auto` takes TorchCodec's decoders where TorchCodec is installed, else torchvision's (deprecated since torchvision 0.29, still shipped)."""
    ahead: int = 2
    """Batches decoded and cropped ahead of the one training, on a side CUDA stream (each holds its uint8 crops in device memory)."""

    def __post_init__(self) -> None:
        if self.ahead < 1:
            raise ConfigError(f"data.nvjpeg.ahead must be positive, got {self.ahead}")


@dataclass
class DataConfig:
    backend: Literal["torchvision", "ffcv", "dali", "nvjpeg", "synthetic"] = "torchvision"
    """Loader backend: `torchvision` (the published recipe on CPU workers), `ffcv`, `dali`, `nvjpeg` (JPEGs decoded and cropped on the training GPU with torchvision alone), or `synthetic` (one random batch on the device, for measuring compute alone)."""
    path: str = "data/demo/train"
    """Training data: an ImageFolder tree (torchvision, dali, nvjpeg), a folder of webdataset .tar shards with their DALI .idx files (dali, nvjpeg; make them with tools/make_webdataset_shards.py), or a .beton file (ffcv). Relative paths are taken from the working directory."""
    batch_size: int = 32
    """Images per process per step (before gradient accumulation)."""
    num_workers: int = 2
    """Loader worker processes (threads for FFCV and DALI) per training process."""
    pin_memory: bool = True
    """Pin host batches so the copy to the GPU overlaps compute (ignored on CPU)."""
    persistent_workers: bool = True
    """Keep loader workers alive across epochs."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (FFCV: batches prepared ahead in all)."""
    generate_demo: bool = False
    """Generate the embedded demo dataset where `path` (or its parent, when `path` names a train/ or val/ split) does not exist or is an empty folder; a demo dataset carp_fast wrote is used, or regenerated when an older version wrote it (only its own files are removed); an existing image folder at `path` is used as it is; anything else is refused (exit status 2) and left untouched."""
    ffcv: FFCVConfig = field(default_factory=lambda: FFCVConfig())
    """Settings of the FFCV backend."""
    dali: DALIConfig = field(default_factory=lambda: DALIConfig())
    """Settings of the DALI backend."""
    nvjpeg: NvjpegConfig = field(default_factory=lambda: NvjpegConfig())
    """Settings of the nvjpeg backend."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        _non_negative(self, "num_workers")
        _positive(self, "prefetch_factor")
        if not self.path:
            raise ConfigError("data.path must name the training data")
        if self.generate_demo and self.backend == "ffcv":
            raise ConfigError(
                "data.generate_demo writes an ImageFolder tree, but data.backend=ffcv reads a "
                ".beton file: set data.generate_demo=false and convert the images with "
                "tools/convert_imagenet_ffcv.py"
            )


@dataclass
class CropsConfig:
    global_number: int = 2
    """Global views per image (the teacher sees these)."""
    global_size: int = 224
    """Side of a global crop in pixels."""
    global_scale: tuple[float, float] = (0.2, 1.0)
    """Area fraction range of the source image kept by a global crop."""
    local_number: int = 6
    """Local views per image (student only); 0 disables multi-crop."""
    local_size: int = 96
    """Side of a local crop in pixels."""
    local_scale: tuple[float, float] = (0.05, 0.2)
    """Area fraction range of the source image kept by a local crop."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of every random-resized crop."""

    def __post_init__(self) -> None:
        if self.global_number < 1:
            raise ConfigError("crops.global_number must be at least 1")
        if self.global_number == 1 and self.local_number == 0:
            raise ConfigError(
                "crops: one global view and no local view leave no student/teacher pair i != j"
            )
        _non_negative(self, "local_number")
        _positive(self, "global_size")
        _positive(self, "local_size")
        for name in ("global_scale", "local_scale", "ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"crops.{name} must satisfy 0 < low <= high, got {(low, high)}")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise ConfigError(f"crops.{name} upper bound must be <= 1")


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """Backbone: any torchvision ResNet (resnet18 ... resnet152, resnext*, wide_resnet*)."""
    num_prototypes: int = 65536
    """K, the number of prototypes in the last layer of the head."""
    partition_size: int = 512
    """P, prototypes per random group; G = K // P groups per step."""
    hidden_dim: int = 2048
    """Width of the head's hidden layers."""
    bottleneck_dim: int = 256
    """Width of the head's output embedding, the input of the prototype layer."""
    head_layers: int = 3
    """Linear layers in the head MLP before the prototype layer."""
    norm_last_layer: bool = True
    """Freeze the prototype rows' norm at 1 (weight-norm gain not trained)."""
    zero_init_residual: bool = True
    """Zero-init the last BatchNorm of every residual branch."""
    sync_bn: Literal["all", "head", "none"] = "all"
    """SyncBatchNorm under multi-GPU DDP: everywhere (published), only in the head, or none. Ignored on CPU."""
    init_weights: Optional[str] = None
    """Warm start: a carp_fast or published CARP checkpoint whose student and teacher weights initialise this run (null: random init). Ignored when resuming."""

    def __post_init__(self) -> None:
        import torchvision.models as tvm

        resnets = sorted(
            name
            for name, fn in vars(tvm.resnet).items()
            if callable(fn) and name.islower() and not name.startswith("_")
            and name not in {"resnet"} and "resne" in name
        )
        if self.arch not in resnets:
            close = difflib.get_close_matches(self.arch, resnets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"model.arch {self.arch!r} is not a torchvision ResNet{hint}; "
                f"choose one of {', '.join(resnets)}"
            )
        _positive(self, "num_prototypes")
        _positive(self, "partition_size")
        if self.partition_size > self.num_prototypes:
            raise ConfigError(
                f"model.partition_size ({self.partition_size}) exceeds model.num_prototypes "
                f"({self.num_prototypes})"
            )
        _positive(self, "hidden_dim")
        _positive(self, "bottleneck_dim")
        _positive(self, "head_layers")


@dataclass
class OptimConfig:
    base_lr: float = 0.45
    """Learning rate per 256 images; the run uses base_lr * global_batch / 256 (linear scaling)."""
    min_lr: float = 0.0048
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 0.0
    """Epochs of linear warm-up from 0 to the peak learning rate."""
    weight_decay: float = 1e-6
    """Weight decay at the start (cosine schedule); never applied to 1-D parameters."""
    weight_decay_end: float = 1e-6
    """Weight decay at the end of training."""
    momentum: float = 0.9
    """LARS momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta of the layer-wise adaptation."""
    teacher_momentum: float = 0.99
    """EMA momentum of the teacher at step 0, raised to 1 on a per-step cosine."""

    def __post_init__(self) -> None:
        for name in ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end"):
            _non_negative(self, name)
        if not 0 <= self.momentum < 1:
            raise ConfigError("optim.momentum must be in [0, 1)")
        if not 0 <= self.teacher_momentum <= 1:
            raise ConfigError("optim.teacher_momentum must be in [0, 1]")
        _positive(self, "trust_coefficient")


@dataclass
class TrainConfig:
    epochs: int = 100
    """Training epochs; all schedules span exactly this many."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps without changing any schedule (null: run all epochs)."""
    seed: int = 0
    """Seed for initialisation, data order, augmentation and partition draws."""
    out_dir: str = "runs/carp"
    """Run directory: config.yaml, metrics.jsonl, checkpoints. A run started on a directory holding last.pt resumes from it. It must be new, empty or a carp_fast run directory; one trainer at a time holds it (a lock on out_dir/.carp_fast.lock: a second trainer exits with status 2)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; `auto` takes CUDA when present."""
    amp: Literal["off", "bf16", "fp16"] = "bf16"
    """Mixed precision on GPU: bf16 autocast, fp16 autocast with a GradScaler, or off. Always off on CPU. fp16 costs one host sync per step (the GradScaler reads its found-inf flag to decide whether to step and how to rescale); bf16 and off have none outside the log interval."""
    loss_impl: Literal["auto", "reference", "fused"] = "auto"
    """CARP loss implementation: fused kernel, plain-PyTorch reference, or auto (fused where built)."""
    accumulation_steps: int = 1
    """Batches accumulated per optimiser step; the global batch counts them."""
    compile: bool = False
    """torch.compile the backbone (static shapes, one graph per crop size). Costs minutes of compilation at start; on GPU the step gets much faster (1.54x measured at the published shape on an H200), so the fast_* configs turn it on."""
    log_every: int = 20
    """Optimiser steps between metric lines (the only host syncs of the loop)."""
    ckpt_every: int = 500
    """Optimiser steps between writes of last.pt (also written at every epoch end and at the end)."""
    keep_every: int = 0
    """Keep a numbered copy of the checkpoint every this many steps (0: none)."""
    keep_last: int = 3
    """Numbered copies to keep (the oldest are removed)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to out_dir/tb (needs the tensorboard package)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss is not finite on any rank is always dropped on every rank; then `stop` saves the last good state and exits (status 4), `skip` logs it and goes on."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display on rank 0: a bar when stdout is a terminal (auto), or plain lines."""
    run_dir_lock: Literal["flock", "off"] = "flock"
    """How out_dir is kept to one trainer. `flock`: an exclusive lock on out_dir/.carp_fast.lock, released when the process ends (SIGKILL included); where the filesystem has no working locks (NFS without lockd) the trainer refuses to start (exit status 2). `off`: no lock, for such filesystems only: you make sure that no second trainer writes there."""

    def __post_init__(self) -> None:
        _positive(self, "epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps must be a positive integer or null")
        _positive(self, "accumulation_steps")
        _positive(self, "log_every")
        _positive(self, "ckpt_every")
        _non_negative(self, "keep_every")
        _non_negative(self, "keep_last")
        if not self.out_dir:
            raise ConfigError("train.out_dir must name the run directory")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Where images come from and how they are loaded."""
    crops: CropsConfig = field(default_factory=CropsConfig)
    """The multi-crop views."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and CARP head."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """LARS, schedules and the teacher's EMA."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: length, precision, logging, checkpoints."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _positive(obj: Any, name: str) -> None:
    if getattr(obj, name) <= 0:
        raise ConfigError(f"{_section_of(obj)}.{name} must be positive, got {getattr(obj, name)}")


def _non_negative(obj: Any, name: str) -> None:
    if getattr(obj, name) < 0:
        raise ConfigError(
            f"{_section_of(obj)}.{name} must not be negative, got {getattr(obj, name)}"
        )


def _section_of(obj: Any, cls: type | None = None, prefix: str = "") -> str:
    """The dotted name of the config section ``obj`` is an instance of (``data.dali``)."""
    cls = cls or Config
    for section in dataclasses.fields(cls):
        hint = _type_hints(cls)[section.name]
        if not dataclasses.is_dataclass(hint):
            continue
        if hint is type(obj):
            return f"{prefix}{section.name}"
        found = _section_of(obj, hint, f"{prefix}{section.name}.")
        if found:
            return found
    return "" if prefix else type(obj).__name__


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field type ``hint``; return it in that type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(map(repr, args))}{hint_text}"
            )
        return value
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        # Variable length: list[X] or tuple[X, ...].
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return origin(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, names)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given when it exists, else the recipe of that name shipped in carp_fast/configs/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a recipe in {CONFIG_DIR}{hint}; "
        f"recipes: {', '.join(known)}"
    )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "a.c=[0.2,1.0]"]`` to a nested dict; values are read as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {key}: cannot read {raw!r} as YAML ({error})") from error
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return _build(Config, values, "")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (a path, or a recipe name in carp_fast/configs/), apply dotted overrides, validate.

    ``None`` starts from the defaults. Raises :class:`ConfigError` on any unknown key or
    invalid value, naming it.
    """
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        values = loaded or {}
    values = _merge(values, parse_overrides(overrides or []))
    return config_from_dict(values)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, docstring)`` for every leaf field, in order."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    rows = []
    hints = _type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, f"{prefix}{f.name}."))
        else:
            type_name = _type_name(hint)
            rows.append((f"{prefix}{f.name}", type_name, getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))
