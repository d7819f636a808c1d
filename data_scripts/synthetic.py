"""The embedded default data set: synthetic shape scenes as a cached ``DatasetDict``.

Generation is deterministic (see :mod:`data_scripts.shapes`), so the cache is only a speed-up:
the set is stored once with ``save_to_disk`` under a folder keyed by every generator parameter
and :data:`GENERATOR_VERSION` (bump it whenever the drawing or the grammar changes), and later
loads memory-map it with ``load_from_disk``. Images are embedded as PNG bytes, so the cache is
self-contained. The image view is what is stored; the pair view is derived from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from datasets import DatasetDict, load_from_disk
from tqdm.auto import tqdm

from .report import LoadReport, logger
from .shapes import make_example
from .views import ImageRecord, check_view, convert_view, quiet_datasets, records_to_dataset

GENERATOR_VERSION = 1
SPLITS = ("train", "validation", "test")
DEFAULT_NUM_IMAGES = 4000
DEFAULT_IMAGE_SIZE = 224
# The embedded default job's set (run_contrastive.py's defaults, configs/default.yaml): what evaluation
# and `python -m data_scripts summary synthetic` assume when a run does not say.
DEFAULT_JOB_NUM_IMAGES = 1200
DEFAULT_JOB_IMAGE_SIZE = 128
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def default_cache_dir() -> Path:
    """``$DUALENCODER_CACHE`` or ``~/.cache/dualencoder``, plus ``synthetic/``."""
    base = os.environ.get("DUALENCODER_CACHE") or Path.home() / ".cache" / "dualencoder"
    return Path(base) / "synthetic"


def build_synthetic_dataset(
    num_images: int = DEFAULT_NUM_IMAGES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 42,
    *,
    view: str = "pairs",
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    use_cache: bool = True,
) -> DatasetDict:
    """Generate (or load from the cache) ``num_images`` captioned shape scenes in three splits.

    Images ``0..n_train-1`` are train, then validation, then test. Every image has 5 captions.
    The result carries a ``.load_report`` like the Flickr8k loader's.
    """
    check_view(view)
    if num_images < 3:
        raise ValueError(f"num_images must be at least 3 (one per split), got {num_images}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    params = {
        "version": GENERATOR_VERSION,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "split_fractions": [float(f) for f in split_fractions],
    }
    sizes = split_counts(num_images, split_fractions)
    if use_cache:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = folder / f"shapes-v{GENERATOR_VERSION}-{_key(params)}"
        if not (target / "dataset_dict.json").exists():
            images = _generate(params, sizes)
            with quiet_datasets():
                _save_atomically(images, target, params)
        images = load_from_disk(str(target))
        source = str(target)
    else:
        images, source = _generate(params, sizes), "synthetic (not cached)"
    with quiet_datasets():
        data = convert_view(images, view)
    report = LoadReport(source=source, layout="synthetic", found={"parameters": json.dumps(params)})
    report.counts = {s: {"images": len(images[s]), "pairs": 5 * len(images[s])} for s in SPLITS}
    data.load_report = report
    return data


def split_counts(num_images: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Images per split: at least one each, test takes the rounding remainder."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise ValueError(f"split_fractions must be three positive numbers, got {fractions}")
    total = sum(fractions)
    n_train = max(1, round(num_images * fractions[0] / total))
    n_val = max(1, round(num_images * fractions[1] / total))
    n_train = min(n_train, num_images - n_val - 1)
    return {"train": n_train, "validation": n_val, "test": num_images - n_train - n_val}


def _generate(params: dict, sizes: dict[str, int]) -> DatasetDict:
    seed, image_size = params["seed"], params["image_size"]
    records: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    bounds = _split_bounds(sizes)
    for index in tqdm(range(params["num_images"]), desc="Generating synthetic scenes", unit="img", leave=False):
        png, captions, _ = make_example(index, seed, image_size)
        image_id = f"shapes-{seed}-{index:06d}"
        split = next(s for s, (lo, hi) in bounds.items() if lo <= index < hi)
        records[split].append(ImageRecord(image_id, {"bytes": png, "path": f"{image_id}.png"}, captions))
    return DatasetDict({s: records_to_dataset(records[s], "images") for s in SPLITS})


def _split_bounds(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    bounds, start = {}, 0
    for split in SPLITS:
        bounds[split] = (start, start + sizes[split])
        start += sizes[split]
    return bounds


def _key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _save_atomically(data: DatasetDict, target: Path, params: dict) -> None:
    """Write to a temporary sibling folder, then rename: concurrent processes never see half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        data.save_to_disk(str(tmp))
        (tmp / "generator_params.json").write_text(json.dumps(params, indent=2, sort_keys=True))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race and wrote the same data
            if not (target / "dataset_dict.json").exists():
                raise
        else:
            logger.info("Cached synthetic data set in %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
