"""One entry point for every data source the toolkit knows.

``source`` is resolved in this order:

* ``"synthetic"``: the embedded shapes data set (no download; the default training data);
* ``"flickr8k"``: the shared copy at :func:`default_flickr8k_dir`;
* ``train_file`` (and ``validation_file`` / ``test_file``) given: CSV/JSON/JSONL tables of image path +
  caption (relative ``*_file`` paths are looked up in ``source`` when it is a folder); with a Hub id as
  ``source``, or files that are no such table (``big/*.parquet``), they are ``load_dataset``'s ``data_files``;
* a CSV/JSON/JSONL file: the training table (other splits carved from it);
* an existing directory, by what it holds: an ``imagefolder`` (``metadata.csv`` / ``.jsonl``), a data
  set saved with ``save_to_disk``, Flickr8k in the official, Kaggle or Karpathy layout, or data files
  in the Hub's repository layout (read by ``datasets.load_dataset``);
* something that looks like a path (starts with ``/``, ``.`` or ``~``): an error naming it;
* anything else: a Hugging Face Hub id passed to ``datasets.load_dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from datasets import DatasetDict, concatenate_datasets, load_from_disk

from .flickr8k import default_flickr8k_dir, load_flickr8k
from .hub import load_hub_dataset, normalise_hub_dataset
from .layout import detect_layout
from .report import DatasetFormatError
from .sources import TABLE_EXTENSIONS, find_metadata, is_table_file, load_tables
from .streaming import is_shard_pattern, load_shards
from .synthetic import build_synthetic_dataset
from .views import check_view, quiet_datasets, require_images

HUB_DATA_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def load_image_caption_dataset(
    source: Optional[str] = None,
    view: str = "pairs",
    *,
    on_bad_image: str = "error",
    verify_images: bool = True,
    seed: int = 42,
    cache_dir: Optional[str] = None,
    train_file: Optional[str] = None,
    validation_file: Optional[str] = None,
    test_file: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    **kwargs,
) -> DatasetDict:
    """Load ``source`` as a ``DatasetDict`` with train/validation/test splits in ``view``.

    ``view="pairs"``: one row per (image, caption) (``image``, ``image_id``, ``caption``,
    ``caption_index``), for training. ``view="images"``: one row per image (``image``,
    ``image_id``, ``captions``), for retrieval evaluation.

    ``on_bad_image`` ("error" | "skip") and ``verify_images`` apply to directories and tables; ``seed``
    picks the synthetic set and any seeded split; ``cache_dir`` is where the synthetic set or Hub
    downloads are cached. ``train_file`` / ``validation_file`` / ``test_file``, ``image_column`` and
    ``caption_column`` are those of transformers' ``run_clip.py`` (columns are guessed when unambiguous);
    ``dataset_config_name`` is a Hub data set's configuration (``load_dataset(source, name)``).
    ``kwargs`` go to the source: ``num_images``, ``image_size``, ``split_fractions``, ``use_cache`` for
    "synthetic"; ``split_sizes`` for data without split files; anything ``load_dataset`` accepts for a
    Hub id. Data too large for this (map-style) path streams instead: see :mod:`data_scripts.streaming`.

    The returned object carries ``.load_report`` (a :class:`LoadReport`: layout, files found,
    counts, everything skipped or noticed), which is also logged.
    """
    check_view(view)
    source = "" if source is None else str(source)
    columns = dict(image_column=image_column, caption_column=caption_column)
    tables = dict(columns, on_bad_image=on_bad_image, verify_images=verify_images, seed=seed, **kwargs)
    hub = dict(columns, seed=seed, cache_dir=cache_dir, name=dataset_config_name, **kwargs)
    split_files = {split: f for split, f in (("train", train_file), ("validation", validation_file),
                                             ("test", test_file)) if f}
    if split_files and "train" not in split_files:
        raise DatasetFormatError(f"got {', '.join(s + '_file' for s in split_files)} but no train_file")
    if is_shard_pattern(source) and not split_files:
        raise DatasetFormatError(f"{source}: webdataset shards are read as a stream (build_stream, run_contrastive.py "
                                 "--streaming true), not loaded whole; see doc/OWN_DATA.md")
    if source.lower() == "synthetic" and not split_files:
        data = build_synthetic_dataset(seed=seed, view=view, cache_dir=cache_dir, **kwargs)
        report = data.load_report
    elif split_files and _hub_data_files(source, split_files):
        data, report = load_hub_dataset(source or ".", view, data_files=split_files, **hub)
    elif split_files:
        base = Path(source).expanduser() if source else Path(".")
        files = {split: _table_path(f, base) for split, f in split_files.items()}
        data, report = load_tables(files, view, layout="files", **tables)
        for split, file in files.items():
            require_images(data[split], split, str(file))
    else:
        directory = _as_directory(source)
        if directory is None:
            data, report = load_hub_dataset(source, view, **hub)
        elif is_table_file(directory):
            data, report = load_tables({"train": directory}, view, layout="files", **tables)
        else:
            data, report = _load_directory(directory, view, tables, hub)
    data.load_report = report
    report.log()
    return data


def load_split_file(file: str, source: Optional[str] = None, *, on_bad_image: str = "error", seed: int = 42,
                    **options):
    """Every pair-view row of one data file, loaded whole: a streamed run's validation or test split.

    ``file`` is a CSV/JSON/JSONL table of image paths + captions, ``load_dataset`` data files (parquet...), or
    webdataset shards (a ``.tar``, glob or folder of them); a relative path is looked up in ``source`` when that
    is a folder. Nothing is carved from it: the rows a loader would have set aside as other splits are kept.
    ``options`` are :func:`load_image_caption_dataset`'s (``image_column``, ``caption_column``, ...).
    """
    base = Path(source).expanduser() if source and Path(source).expanduser().is_dir() else Path(".")
    if is_shard_pattern(str(base / file)) and not Path(file).is_absolute():
        file = str(base / file)
    if is_shard_pattern(file):
        return load_shards(file, on_bad_image=on_bad_image)
    splits = load_image_caption_dataset(str(base), train_file=file, on_bad_image=on_bad_image, seed=seed, **options)
    return concatenate_datasets([splits[name] for name in splits])


def _load_directory(directory: Path, view: str, tables: dict, hub: dict):
    """A local folder, by what it holds (see the module docstring for the order)."""
    metadata = find_metadata(directory)
    if metadata:
        return load_tables(metadata, view, layout="imagefolder", source=str(directory), **tables)
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        with quiet_datasets():
            raw = load_from_disk(str(directory))
        options = ("seed", "split_sizes", "image_column", "caption_column")
        return normalise_hub_dataset(raw, str(directory), view, **{k: v for k, v in hub.items() if k in options})
    try:
        detect_layout(directory)
    except DatasetFormatError as flickr_error:
        if not any(p.suffix.lower() in HUB_DATA_EXTENSIONS for p in _files_below(directory)):
            raise DatasetFormatError(
                f"{flickr_error}\nNor is it an imagefolder (images + metadata.csv or metadata.jsonl with "
                "file_name and text columns), a save_to_disk folder, or a folder of data files (parquet, csv, "
                "jsonl); for a CSV/JSON table of image paths and captions pass train_file"
            ) from None
        return load_hub_dataset(str(directory), view, **hub)
    flickr = {k: v for k, v in tables.items() if k not in ("image_column", "caption_column")}
    with quiet_datasets():
        return load_flickr8k(directory, view, **flickr)


def _files_below(directory: Path, depth: int = 2):
    """Files up to ``depth`` folder levels below ``directory`` (the Hub layout keeps data in ``data/``)."""
    for level in range(depth + 1):
        yield from (p for p in directory.glob("/".join(["*"] * (level + 1))) if p.is_file())


def _hub_data_files(source: str, split_files: dict[str, str]) -> bool:
    """Whether the ``*_file`` options are ``data_files`` for ``load_dataset``: of a Hub id, or files that are no
    CSV/JSON table of image paths (``data/train-*.parquet`` of a local repository-layout folder)."""
    if source and not Path(source).expanduser().exists() and not _looks_like_path(source):
        return True
    return any(not f.lower().endswith(TABLE_EXTENSIONS) for f in split_files.values())


def _table_path(file: str, base: Path) -> Path:
    path = Path(file).expanduser()
    if not path.is_absolute() and base.is_dir() and (base / path).exists():
        path = base / path
    if not path.is_file():
        raise DatasetFormatError(f"{file}: no such file (also looked in {base}). Pass a CSV, JSON or JSONL file "
                                 "of image path + caption")
    return path


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def hub_dataset_id(source: Optional[str]) -> Optional[str]:
    """``source`` when it names a Hub data set (the last case of the module docstring's order), else None: the
    synthetic set, the shared Flickr8k, local files and folders and shard patterns are no Hub ids, and a model card
    must not list them (a local path would also leak a folder name of the machine that trained)."""
    if not source or source.lower() in ("synthetic", "flickr8k") or is_shard_pattern(source):
        return None
    if Path(source).expanduser().exists() or _looks_like_path(source):
        return None
    return source


def _as_directory(source: str) -> Optional[Path]:
    if source.lower() == "flickr8k":
        return default_flickr8k_dir()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _looks_like_path(source):
        raise DatasetFormatError(
            f"{source}: no such directory. Pass a folder holding Flickr8k (official, Kaggle or Karpathy "
            "layout) or an imagefolder, a CSV/JSON table, 'synthetic', or a Hugging Face Hub id such as 'owner/name'"
        )
    return None
