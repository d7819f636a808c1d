"""One entry point for every data source the toolkit knows.

``source`` is resolved in this order:

* ``"synthetic"``: the embedded shapes data set (no download; the default training data);
* ``"flickr8k"``: the shared copy at :func:`default_flickr8k_dir`;
* an existing directory: Flickr8k in the official, Kaggle or Karpathy layout (auto-detected);
* something that looks like a path (starts with ``/``, ``.`` or ``~``): an error naming it;
* anything else: a Hugging Face Hub id passed to ``datasets.load_dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from datasets import DatasetDict

from .flickr8k import default_flickr8k_dir, load_flickr8k
from .hub import load_hub_dataset
from .report import DatasetFormatError
from .synthetic import build_synthetic_dataset
from .views import check_view, quiet_datasets


def load_image_caption_dataset(
    source: str,
    view: str = "pairs",
    *,
    on_bad_image: str = "error",
    verify_images: bool = True,
    seed: int = 42,
    cache_dir: Optional[str] = None,
    **kwargs,
) -> DatasetDict:
    """Load ``source`` as a ``DatasetDict`` with train/validation/test splits in ``view``.

    ``view="pairs"``: one row per (image, caption) (``image``, ``image_id``, ``caption``,
    ``caption_index``), for training. ``view="images"``: one row per image (``image``,
    ``image_id``, ``captions``), for retrieval evaluation.

    ``on_bad_image`` ("error" | "skip") and ``verify_images`` apply to directories; ``seed`` picks
    the synthetic set and any seeded split; ``cache_dir`` is where the synthetic set or Hub
    downloads are cached. ``kwargs`` go to the source: ``num_images``, ``image_size``,
    ``split_fractions``, ``use_cache`` for "synthetic"; ``split_sizes`` for a directory without
    split files; anything ``load_dataset`` accepts for a Hub id.

    The returned object carries ``.load_report`` (a :class:`LoadReport`: layout, files found,
    counts, everything skipped or noticed), which is also logged.
    """
    check_view(view)
    source = str(source)
    if source.lower() == "synthetic":
        data = build_synthetic_dataset(seed=seed, view=view, cache_dir=cache_dir, **kwargs)
        report = data.load_report
    else:
        directory = _as_directory(source)
        if directory is not None:
            with quiet_datasets():
                data, report = load_flickr8k(directory, view, on_bad_image=on_bad_image,
                                             verify_images=verify_images, seed=seed, **kwargs)
        else:
            data, report = load_hub_dataset(source, view, seed=seed, cache_dir=cache_dir, **kwargs)
    data.load_report = report
    report.log()
    return data


def _as_directory(source: str) -> Optional[Path]:
    if source.lower() == "flickr8k":
        return default_flickr8k_dir()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        raise DatasetFormatError(
            f"{source}: no such directory. Pass a folder holding Flickr8k (official, Kaggle or Karpathy "
            "layout), 'synthetic', or a Hugging Face Hub id such as 'owner/name'"
        )
    return None
