"""Finding and opening the image files of a folder."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(folder) -> list[Path]:
    """Image files under `folder`, recursively, by suffix (case-insensitive), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not a directory of images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_rgb(path) -> Image.Image:
    """The image at `path` as RGB; raises `OSError` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise OSError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from exc


def open_all(paths) -> tuple[list[Image.Image], list, list[str]]:
    """Open every path: (images, the paths that opened, one message per path that did not)."""
    images, opened, errors = [], [], []
    for path in paths:
        try:
            images.append(open_rgb(path))
            opened.append(path)
        except OSError as exc:
            errors.append(str(exc))
    return images, opened, errors
