"""A plain (not editable) install finds its recipes by name from any working directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a source distribution of the package holds (the tests, tools and benchmarks are not
# part of it), copied so that the build writes nothing into the checkout.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "carp_fast", "csrc")


@pytest.mark.slow
def test_installed_package_resolves_recipes_from_another_folder(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = tmp_path / "venv"
    # System site packages give torch and the build tools without a network.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The extension is not what this test is about; skipping it keeps the build to seconds.
    env = dict(os.environ, CARP_FAST_NO_EXT="1")
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
         "--quiet", str(source)],
        env=env, capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import carp_fast; print(carp_fast.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout

    shown = subprocess.run(
        [str(python), "-m", "carp_fast.train", "--cfg", "fast_400ep.yaml", "--print-config"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert "num_prototypes: 65536" in shown.stdout
    assert "partition_size: 512" in shown.stdout
    # The recipe was found inside the installed package, not in the checkout.
    assert not (elsewhere / "runs").exists()
