"""Image-caption data sets from the Hugging Face Hub, normalised to our columns and splits.

For users who are online: ``source`` is passed to ``datasets.load_dataset``. Hub copies of
Flickr8k and friends disagree on column names (``caption_0..caption_4``, ``captions``,
``sentences``, one ``caption`` per row...) and split names (``val``, ``dev``), so the result is
mapped onto the contract of doc/ARCHITECTURE.md, and missing validation/test splits are carved
out of train by image with the same seeded split the Kaggle layout uses. Nothing here is run
in the tests against the network; they pass a local data set through the same normalisation.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, DatasetDict, Image, Sequence, Value

from .flickr8k import DEFAULT_SPLIT_SIZES, carve_labels
from .report import DatasetFormatError, LoadReport
from .views import IMAGE_FEATURES, convert_view, quiet_datasets

SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                 "dev": "validation", "test": "test"}
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
# not a bare "id": in a data set of one caption per row it is often the caption's own id
ID_COLUMNS = ("image_id", "filename", "file_name", "image_name", "img_id", "imgid")
LIST_CAPTION_COLUMNS = ("captions", "sentences", "sentences_raw", "raw")
TEXT_CAPTION_COLUMNS = ("caption", "text", "sentence")


def load_hub_dataset(hub_id: str, view: str = "pairs", *, seed: int = 42, cache_dir: Optional[str] = None,
                     split_sizes: tuple[int, int] = DEFAULT_SPLIT_SIZES, image_column: Optional[str] = None,
                     caption_column: Optional[str] = None,
                     **load_kwargs) -> tuple[DatasetDict, LoadReport]:
    """``load_dataset(hub_id, **load_kwargs)``, then normalised columns and train/validation/test splits.

    ``hub_id`` may also be a local folder in the Hub's repository layout (data files such as
    ``data/train-*.parquet``, optionally a README declaring configs): the same code reads it.
    """
    try:
        raw = datasets.load_dataset(hub_id, cache_dir=cache_dir, **load_kwargs)
    except Exception as exc:  # offline, unknown id, gated...: say what was tried
        if Path(hub_id).expanduser().is_dir():  # a folder of data files that datasets could not read
            raise DatasetFormatError(
                f"{hub_id}: reading the folder's data files with datasets.load_dataset failed "
                f"({type(exc).__name__}: {exc}). See doc/OWN_DATA.md for the layouts it reads"
            ) from exc
        raise DatasetFormatError(
            f"'{hub_id}' is not a local directory, and loading it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {exc}). Pass an existing directory, 'synthetic', or a valid Hub id"
        ) from exc
    return normalise_hub_dataset(raw, hub_id, view, seed=seed, split_sizes=split_sizes,
                                 image_column=image_column, caption_column=caption_column)


def normalise_hub_dataset(raw, source: str, view: str = "pairs", *, seed: int = 42,
                          split_sizes: tuple[int, int] = DEFAULT_SPLIT_SIZES, image_column: Optional[str] = None,
                          caption_column: Optional[str] = None) -> tuple[DatasetDict, LoadReport]:
    """``raw`` (a Dataset or DatasetDict) with our columns and splits; ``image_column`` / ``caption_column``
    name the columns when guessing by name and type would not find them. An image column of path strings
    is read as image files, relative paths from ``source`` when it is a local folder."""
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    report = LoadReport(source=source, layout="hub")
    splits: dict[str, Dataset] = {}
    for name, split in raw.items():
        target = SPLIT_ALIASES.get(name.lower())
        if target is None or target in splits:
            report.notes.append(f"split '{name}' ignored")
            continue
        with quiet_datasets():
            split = _image_column_as_images(split, image_column, f"{source}[{name}]", source)
            splits[target] = _to_image_view(split, f"{source}[{name}]", name, image_column, caption_column)
        report.found[target] = name
    if "train" not in splits:
        raise DatasetFormatError(f"{source}: no train split (found {list(raw)}); pass split names that include 'train'")
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        report.missing += missing
        splits = _carve(splits, missing, seed, split_sizes, report)
    images = DatasetDict({s: splits[s] for s in ("train", "validation", "test")})
    report.counts = {s: {"images": len(d), "pairs": sum(len(c) for c in d["captions"])} for s, d in images.items()}
    with quiet_datasets():
        return convert_view(images, view), report


def _image_column_as_images(split: Dataset, image_column: Optional[str], where: str, source: str) -> Dataset:
    """A named image column of path strings (a CSV or JSON data set) cast to ``datasets.Image``."""
    if not image_column:
        return split
    _require_column(split, image_column, "image_column", where)
    if isinstance(split.features[image_column], Image):
        return split
    base = source if os.path.isdir(source) else ""
    split = split.map(lambda paths: {image_column: [os.path.join(base, p) if p else p for p in paths]},
                      input_columns=image_column, batched=True)
    return split.cast_column(image_column, Image())


def _require_column(split: Dataset, column: str, option: str, where: str) -> None:
    if column not in split.column_names:
        raise DatasetFormatError(f"{where}: no column '{column}' ({option}); columns found: {split.column_names}")


def _to_image_view(split: Dataset, where: str, split_name: str, image_column: Optional[str] = None,
                   caption_column: Optional[str] = None) -> Dataset:
    """One row per image with columns image / image_id / captions, whatever the Hub columns were."""
    columns = split.column_names
    image_col = next((c for c in ((image_column,) if image_column else IMAGE_COLUMNS)
                      if c in columns and isinstance(split.features[c], Image)), None)
    if image_col is None:
        raise DatasetFormatError(f"{where}: no image column (looked for an Image feature named one of "
                                 f"{(image_column,) if image_column else IMAGE_COLUMNS}; columns are {columns}); "
                                 "name it with image_column")
    numbered = sorted((c for c in columns if re.fullmatch(r"(caption|sentence)_?\d+", c)),
                      key=lambda c: int(re.search(r"\d+$", c).group()))
    # a caption column is read by its type, whatever its name: a list of captions, or one caption per row
    named = [c for c in LIST_CAPTION_COLUMNS + TEXT_CAPTION_COLUMNS if c in columns]
    if caption_column:
        _require_column(split, caption_column, "caption_column", where)
        numbered, named = [], [caption_column]
    list_col = next((c for c in named if _is_list(split.features[c])), None)
    text_col = next((c for c in named if not _is_list(split.features[c])), None)
    one_caption_per_row = not numbered and not list_col and text_col is not None
    ids = _image_ids(split, next((c for c in ID_COLUMNS if c in columns), None), image_col, split_name,
                     by_content=one_caption_per_row)

    if numbered:  # caption_0 .. caption_4: one row per image
        table = split.select_columns(numbered).to_dict()
        rows, captions = list(range(len(split))), [[c for c in caps if c] for caps in zip(*table.values())]
    elif list_col:  # a list of captions per image
        rows = list(range(len(split)))
        captions = [[_caption_text(c) for c in caps] for caps in split.select_columns([list_col]).to_dict()[list_col]]
    elif text_col:  # one caption per row: group the rows of each image
        first: dict[str, int] = {}
        grouped: dict[str, list[str]] = {}
        for row, (image_id, text) in enumerate(zip(ids, split.select_columns([text_col]).to_dict()[text_col])):
            first.setdefault(image_id, row)
            grouped.setdefault(image_id, []).append(_caption_text(text))
        rows, ids, captions = list(first.values()), list(first), [grouped[i] for i in first]
    else:
        raise DatasetFormatError(f"{where}: no caption column (looked for captions/sentences lists, "
                                 f"caption_0.., or caption/text; columns are {columns})")
    out = split.select(rows).select_columns([image_col]).flatten_indices()
    if image_col != "image":
        out = out.rename_column(image_col, "image")
    out = out.add_column("image_id", ids, feature=Value("string"))
    out = out.add_column("captions", captions, feature=Sequence(Value("string")))
    return out.cast(IMAGE_FEATURES)


def _image_ids(split: Dataset, id_col: Optional[str], image_col: str, split_name: str,
               by_content: bool = False) -> list[str]:
    """Stable ids: an id column, else the image file name, else (rows that must be grouped by image,
    `by_content`) a hash of the image's bytes, else the row number."""
    if id_col is not None:
        return [str(v) for v in split.select_columns([id_col]).to_dict()[id_col]]
    undecoded = split.select_columns([image_col]).cast_column(image_col, Image(decode=False)).to_dict()[image_col]
    paths = [(v or {}).get("path") for v in undecoded]
    if all(paths) and len(set(paths)) > 1:
        return [os.path.basename(p) for p in paths]
    if by_content and all((v or {}).get("bytes") for v in undecoded):
        # one caption per row and nothing naming the image: rows holding the same image bytes are one image
        return [f"{split_name}-{hashlib.blake2b(v['bytes'], digest_size=8).hexdigest()}" for v in undecoded]
    return [f"{split_name}-{row:06d}" for row in range(len(split))]


def _is_list(feature) -> bool:
    """A list-valued column (datasets' Sequence, List or a plain list feature)."""
    return isinstance(feature, (Sequence, list)) or type(feature).__name__ in ("List", "LargeList")


def _caption_text(value) -> str:
    if isinstance(value, dict):  # Karpathy-style {"raw": ..., "tokens": [...]}
        return str(value.get("raw") or " ".join(value.get("tokens", [])))
    return str(value)


def _carve(splits: dict[str, Dataset], missing: list[str], seed: int, split_sizes, report) -> dict[str, Dataset]:
    """Make the missing evaluation split(s) from train, by image, deterministically."""
    train = splits["train"]
    labels = carve_labels(list(train["image_id"]), missing, seed, split_sizes, report)
    with quiet_datasets():
        for split in ["train"] + missing:
            splits[split] = train.select([row for row, label in enumerate(labels) if label == split]).flatten_indices()
    return splits
