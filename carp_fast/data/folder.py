"""ImageFolder trees (``root/<class>/<image>``): listing with clear errors."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


class DataPathError(FileNotFoundError):
    """A data path that is missing, empty or not laid out as the backend expects."""


def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, class_index), ...], class_names)`` sorted by class then file name.

    Raises :class:`DataPathError` naming the path when it is missing, not a folder, has
    no class folders, or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise DataPathError(f"data path {root} does not exist")
    if not root.is_dir():
        raise DataPathError(f"data path {root} is not a folder (expected root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataPathError(f"data path {root} has no class folders (expected root/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append((str(path), index))
    if not samples:
        raise DataPathError(
            f"data path {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
            f"{len(classes)} class folders"
        )
    return samples, classes
