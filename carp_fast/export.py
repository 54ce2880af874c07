"""``python -m carp_fast.export --ckpt RUN_OR_FILE --out FILE [--which teacher|student] [--format pth|safetensors] [--overwrite]``

Writes the backbone of a carp_fast or published CARP checkpoint as a plain torchvision
state dict: the keys of ``torchvision.models.<arch>()`` without ``fc.*`` (CARP replaces
the classifier by identity), so

    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load(FILE), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

and timm's ResNets, which use the same names (``timm.create_model("resnet50",
num_classes=0)`` loads it strictly). ``.safetensors`` shares the weights without pickle;
its metadata records the architecture and where the weights came from. The file is
loaded back into torchvision before the command reports success. An existing FILE is
refused unless ``--overwrite`` is given; the bytes go to a uniquely named temporary file
beside it first, so FILE is always the old or the new file, whole.

Exit status: 0 written, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from carp_fast import checkpoint, ownership

FORMATS = ("pth", "safetensors")


def export_backbone(
    ckpt: str | Path,
    out: str | Path,
    which: str = "teacher",
    fmt: str | None = None,
    arch: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Write the ``which`` backbone of ``ckpt`` to ``out``; returns (path, arch).

    Raises :class:`checkpoint.CheckpointError` when the weights are not a torchvision
    ResNet of ``arch`` (default: the checkpoint's architecture, see :func:`checkpoint.weights_arch`),
    and :class:`~carp_fast.ownership.OwnershipError` when ``out`` exists and not ``overwrite``.
    """
    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "pth")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ownership.check_overwrite(out, overwrite)
    weights = checkpoint.read_weights(ckpt)
    arch = checkpoint.weights_arch(weights, which, arch)
    state = checkpoint.backbone_state_dict(weights, which)
    # Contiguous, standard-layout, independent tensors: safetensors refuses views and
    # shared storage, and channels-last weights would surprise other loaders.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    verify_torchvision(state, arch, f"{which} backbone", str(weights["source"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)  # created exclusively: no one else's file is written or removed
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(
                state,
                str(tmp),
                metadata={
                    "format": "carp_fast/backbone/1",
                    "arch": arch,
                    "which": which,
                    "source": str(weights["source"]),
                    "source_format": weights["format"],
                },
            )
        else:
            torch.save(state, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    # Read back what was written, the way a user will.
    verify_torchvision(load_exported(out), arch, "exported backbone", str(out))
    return out, arch


def load_exported(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def verify_torchvision(state: dict[str, torch.Tensor], arch: str, what: str, source: str = "") -> None:
    """Raise unless ``torchvision.models.<arch>()`` takes ``state`` with only fc missing."""
    import torchvision.models as tvm

    if not hasattr(tvm, arch):
        raise ValueError(f"unknown torchvision architecture {arch!r}")
    with torch.device("meta"):
        model = getattr(tvm, arch)(weights=None)
    model.fc = torch.nn.Identity()
    checkpoint.check_backbone(state, model, arch, what, source)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m carp_fast.export",
        description="Export a CARP backbone as torchvision/timm weights (.pth or .safetensors).",
    )
    parser.add_argument("--ckpt", required=True, help="run directory (uses last.pt), carp_fast or published CARP checkpoint")
    parser.add_argument("--out", required=True, help="file to write (.pth or .safetensors)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher", help="network to export (default teacher, the one evaluated in the paper)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from the --out suffix (.safetensors, else pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--arch", default=None, help="architecture to check against; default: the one the checkpoint names, else the one its shapes match, else resnet50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path, arch = export_backbone(args.ckpt, args.out, args.which, args.format, args.arch,
                                     overwrite=args.overwrite)
    except (checkpoint.CheckpointError, ValueError, ownership.OwnershipError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote the {args.which} {arch} backbone to {path}; load it with "
        f"torchvision.models.{arch}().load_state_dict(weights, strict=False) "
        f"(missing: fc.weight, fc.bias)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
