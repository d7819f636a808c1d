"""Finding which Flickr8k layout a directory holds, and saying what is missing.

Users have the data in one of a few shapes (see :mod:`data_scripts.flickr8k`), often one folder
deeper than expected because of how an archive was unpacked. Detection looks for the known file
and folder names at the top of the directory and up to two levels below it, and on failure
lists what it found and what it looked for, so the fix is obvious.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .images import IMAGE_EXTENSIONS
from .report import DatasetFormatError

OFFICIAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")  # the original is misspelled
KAGGLE_IMAGE_DIRS = ("Images", "images")
TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_CAPTIONS_FILE = "captions.txt"
KARPATHY_FILE = "dataset_flickr8k.json"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
MAX_DEPTH = 2


@dataclass
class Flickr8kLayout:
    """The files of one Flickr8k copy. ``kind`` is "official", "kaggle" or "karpathy"."""

    root: Path
    kind: str
    image_dir: Path
    captions_file: Optional[Path] = None
    split_files: dict[str, Path] = field(default_factory=dict)
    karpathy_file: Optional[Path] = None

    def found(self) -> dict[str, str]:
        """Name -> path of every file used, relative to the root, for the load report."""
        items = {"images": self.image_dir, "captions": self.captions_file, "karpathy splits": self.karpathy_file}
        items.update({f"{split} split": path for split, path in self.split_files.items()})
        return {name: _rel(path, self.root) for name, path in items.items() if path is not None}


def detect_layout(root: os.PathLike) -> Flickr8kLayout:
    """Work out which layout ``root`` holds; raise DatasetFormatError naming what is missing."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetFormatError(f"{root}: no such directory. Pass the folder that holds Flickr8k")
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: is a file, not a directory. Pass the folder that holds it")
    dirs, files = _scan(root)
    image_dir = _first(dirs, OFFICIAL_IMAGE_DIRS + KAGGLE_IMAGE_DIRS)
    token = _first(files, (TOKEN_FILE,))
    kaggle = _first(files, (KAGGLE_CAPTIONS_FILE,))
    karpathy = _first(files, (KARPATHY_FILE,))

    if image_dir is None or (token is None and kaggle is None and karpathy is None):
        raise DatasetFormatError(_none_found_message(root, image_dir, token, kaggle, karpathy))

    if token is not None:
        kind, captions = "official", token
        split_files = _split_files(token.parent, files)
    elif kaggle is not None:  # Kaggle's captions, perhaps beside the official split lists
        kind, captions, split_files = "kaggle", kaggle, _split_files(kaggle.parent, files)
    else:
        kind, captions, split_files = "karpathy", None, {}
    return Flickr8kLayout(root, kind, image_dir, captions, split_files, karpathy)


def missing_split_files(layout: Flickr8kLayout) -> list[str]:
    return [name for split, name in SPLIT_FILES.items() if split not in layout.split_files]


def list_image_files(image_dir: Path) -> set[str]:
    """File names of images in ``image_dir`` (one directory listing: fast even for 8k files)."""
    with os.scandir(image_dir) as it:
        return {e.name for e in it if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()}


def _scan(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Map names to paths of directories and files up to MAX_DEPTH levels below ``root``.

    Image folders are not descended into (they hold thousands of files and nothing else we need).
    """
    dirs: dict[str, list[Path]] = {}
    files: dict[str, list[Path]] = {}
    image_dir_names = set(OFFICIAL_IMAGE_DIRS + KAGGLE_IMAGE_DIRS)
    frontier = [root]
    for _ in range(MAX_DEPTH + 1):
        next_frontier = []
        for folder in frontier:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                if entry.is_dir():
                    dirs.setdefault(entry.name, []).append(path)
                    if entry.name not in image_dir_names or _has_subdir(path, image_dir_names):
                        next_frontier.append(path)
                else:
                    files.setdefault(entry.name, []).append(path)
        frontier = next_frontier
    return dirs, files


def _has_subdir(path: Path, names: set[str]) -> bool:
    """True for e.g. Flickr8k_Dataset/Flicker8k_Dataset/, which some archives produce."""
    return any((path / n).is_dir() for n in names)


def _first(found: dict[str, list[Path]], names: tuple[str, ...]) -> Optional[Path]:
    """The shallowest match for the first name in ``names`` that exists (ties: sorted order).

    A folder that holds no images but wraps another image folder is passed over for that one.
    """
    for name in names:
        for path in sorted(found.get(name, []), key=lambda p: (len(p.parts), str(p))):
            if path.is_dir() and _is_wrapper(path):
                continue
            return path
    return None


def _is_wrapper(path: Path) -> bool:
    image_dir_names = set(OFFICIAL_IMAGE_DIRS + KAGGLE_IMAGE_DIRS)
    if not _has_subdir(path, image_dir_names):
        return False
    with os.scandir(path) as it:
        return not any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in it)


def _split_files(text_dir: Path, files: dict[str, list[Path]]) -> dict[str, Path]:
    """Split lists next to the token file, else anywhere under the root."""
    found = {}
    for split, name in SPLIT_FILES.items():
        if (text_dir / name).is_file():
            found[split] = text_dir / name
        elif files.get(name):
            found[split] = files[name][0]
    return found


def _none_found_message(root, image_dir, token, kaggle, karpathy) -> str:
    found = []
    if image_dir is not None:
        found.append(f"image folder {_rel(image_dir, root)}/")
    found += [f"{_rel(p, root)}" for p in (token, kaggle, karpathy) if p is not None]
    missing = []
    if image_dir is None:
        missing.append(
            "an image folder named " + " or ".join(f"'{n}/'" for n in OFFICIAL_IMAGE_DIRS + KAGGLE_IMAGE_DIRS[:1])
        )
    if token is None and kaggle is None and karpathy is None:
        missing.append(
            f"a caption file: '{TOKEN_FILE}' (official, usually in Flickr8k_text/), "
            f"'{KAGGLE_CAPTIONS_FILE}' (Kaggle) or '{KARPATHY_FILE}' (Karpathy splits)"
        )
    return (
        f"{root}: not a Flickr8k layout (searched {MAX_DEPTH} folder levels deep). "
        f"Found: {', '.join(found) if found else 'none of the expected files'}. "
        f"Missing: {'; '.join(missing)}. Expected either the official distribution "
        f"(Flicker8k_Dataset/ + Flickr8k_text/{TOKEN_FILE} + split lists), the Kaggle layout "
        f"(Images/ + {KAGGLE_CAPTIONS_FILE}), or an image folder + {KARPATHY_FILE}."
    )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
