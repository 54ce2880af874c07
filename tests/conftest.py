import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from carp_fast import fused_loss


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _small_thread_count():
    # Two cores here and in CI: keep torch from oversubscribing when tests spawn processes,
    # and share the cores among pytest-xdist's workers (make test runs one per core).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // workers))
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A generated ImageFolder (6 classes) with train/ and val/ splits of small JPEGs."""
    from carp_fast.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("data") / "tiny"
    return generate_demo_dataset(root, train_per_class=4, val_per_class=2, size=40, seed=0)


def tiny_overrides(data_path, out_dir, **extra):
    """Overrides that shrink the demo recipe to seconds on a CPU."""
    values = {
        "data.path": str(data_path),
        "data.generate_demo": False,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "crops.global_size": 32,
        "crops.local_number": 2,
        "crops.local_size": 16,
        "model.arch": "resnet18",
        "model.num_prototypes": 64,
        "model.partition_size": 16,
        "model.hidden_dim": 32,
        "model.bottleneck_dim": 16,
        "train.epochs": 2,
        "train.out_dir": str(out_dir),
        "train.loss_impl": "reference",
        "train.log_every": 1,
        "train.ckpt_every": 100,
        "train.progress": "lines",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={_yaml_value(v)}" for k, v in values.items()]


def _yaml_value(value):
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.fixture
def tiny_config(tiny_dataset, tmp_path):
    """Factory: ``tiny_config(**overrides)`` with keys like ``train__max_steps=3``."""
    from carp_fast.config import load_config

    def make(**extra):
        return load_config("demo_cpu.yaml", tiny_overrides(tiny_dataset / "train", tmp_path / "run", **extra))

    return make


needs_extension = pytest.mark.skipif(
    not fused_loss.is_available(), reason=f"fused loss not built: {fused_loss.unavailable_reason()}"
)

needs_ffcv = pytest.mark.skipif(
    importlib.util.find_spec("ffcv") is None,
    reason="FFCV is not installed (make install, or pip install ffcv numba after tools/install_system_deps.sh)",
)


ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


def load_tool(name: str, folder: Path = TOOLS):
    """<folder>/<name>.py (tools/ by default) as a module, loaded once per process.

    Registered by name, so that dataclasses and the pickling of work for worker
    processes find it; a second load would replace the functions already handed out.
    The tools import their siblings by name, as they do when run as scripts.
    """
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_converter():
    return load_tool("convert_imagenet_ffcv")
