"""Builds carp_fast and its fused-loss extension (carp_fast._C) from csrc/.

The CPU kernel is always built. The CUDA kernel is built whenever a CUDA toolkit and a
CUDA build of torch are present, GPU or not, so CI compiles it too. Knobs:
  CARP_FAST_CUDA_ARCH   target architectures, default "8.0;9.0" (TORCH_CUDA_ARCH_LIST wins)
  CARP_FAST_NO_CUDA=1   skip the CUDA kernel
  CARP_FAST_NO_EXT=1    build no extension at all (pure Python, reference loss only)
"""

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit root behind `nvcc` on PATH, seeing through wrapper scripts.

    torch guesses CUDA_HOME as the parent of nvcc's directory, which is wrong when nvcc
    is a wrapper (the link then fails on -lcudart), so read where the wrapper points.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        text = ""
    match = re.search(r"(/\S+?)/bin/nvcc\b", text) if text.startswith("#!") else None
    if match:
        return match.group(1)
    return str(real.parent.parent)


def _extensions():
    if os.environ.get("CARP_FAST_NO_EXT") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        home = _cuda_home_from_nvcc()
        if home and Path(home, "lib64").exists():
            os.environ["CUDA_HOME"] = home
    os.environ.setdefault(
        "TORCH_CUDA_ARCH_LIST", os.environ.get("CARP_FAST_CUDA_ARCH", "8.0;9.0")
    )
    import torch
    from torch.utils import cpp_extension

    cu_sources = sorted(glob.glob("csrc/*.cu"))
    want_cuda = (
        bool(cu_sources)
        and os.environ.get("CARP_FAST_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    # No -std here: torch's BuildExtension adds the standard its headers need (C++20 now).
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    if want_cuda:
        ext = cpp_extension.CUDAExtension(
            "carp_fast._C",
            cpp_sources + cu_sources,
            define_macros=[("CARP_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "carp_fast._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="carp_fast",
    version="0.1.0",
    description="Fast CARP self-supervised pretraining (NeurIPS 2023) for image encoders",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["carp_fast", "carp_fast.*"]),
    # The recipes, found by name (--cfg fast_400ep.yaml) from any working directory.
    package_data={"carp_fast": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pyyaml>=6",
        "pillow>=9",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    extras_require={
        # DALI and FFCV in the test extra so CI runs their tests (DALI's CPU-only pipelines);
        # Linux only. FFCV builds from source against the apt packages that
        # tools/install_system_deps.sh installs (it works with --no-build-isolation), and
        # brings opencv-python itself.
        "test": [
            "pytest>=7",
            # make test runs the suite on every core (pytest -n auto).
            "pytest-xdist>=3.2",
            "nvidia-dali-cuda120; platform_system == 'Linux'",
            "ffcv>=1.0; platform_system == 'Linux'",
            "numba>=0.57; platform_system == 'Linux'",
            "timm",
            # k-means scores and few-shot SVMs of carp_fast.eval (imported where used).
            "scikit-learn",
            # The nvjpeg backend's second decoder (tests run it next to torchvision's).
            "torchcodec",
            # tests/test_slice_kernels_emulated.py builds the CPU emulation of the CUDA kernels
            # with torch.utils.cpp_extension.load, which needs ninja.
            "ninja",
        ],
        "ffcv": ["ffcv>=1.0", "numba>=0.57", "opencv-python-headless"],
        "dali": ["nvidia-dali-cuda120"],
        "tensorboard": ["tensorboard"],
        "eval": ["scikit-learn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
