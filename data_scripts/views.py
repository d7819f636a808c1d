"""The two views of an image-caption data set, and conversions between them.

Training wants one row per (image, caption) pair so a batch is a list of positives; retrieval
evaluation wants one row per image with all its captions so each image is embedded once and
every caption knows its image. Column names are a shared contract (doc/ARCHITECTURE.md):

* pair view:  ``image`` (datasets.Image), ``image_id`` (str), ``caption`` (str), ``caption_index`` (int)
* image view: ``image`` (datasets.Image), ``image_id`` (str), ``captions`` (list of str)

Conversions never decode images: they only move Arrow rows around.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Union

import datasets
from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

from .report import DatasetFormatError

VIEWS = ("pairs", "images")

PAIR_FEATURES = Features(
    {
        "image": Image(),
        "image_id": Value("string"),
        "caption": Value("string"),
        "caption_index": Value("int32"),
    }
)
IMAGE_FEATURES = Features(
    {"image": Image(), "image_id": Value("string"), "captions": Sequence(Value("string"))}
)


@dataclass
class ImageRecord:
    """One image and its captions, before it becomes Arrow rows.

    ``image`` is a file path (decoded lazily from disk) or ``{"bytes": ..., "path": name}``
    (embedded, as the synthetic set does so that its cache is self-contained).
    """

    image_id: str
    image: Union[str, dict]
    captions: list[str]


def records_to_dataset(records: list[ImageRecord], view: str = "pairs") -> Dataset:
    """Build one split in the requested view from image records."""
    check_view(view)
    if view == "images":
        return Dataset.from_dict(
            {
                "image": [r.image for r in records],
                "image_id": [r.image_id for r in records],
                "captions": [list(r.captions) for r in records],
            },
            features=IMAGE_FEATURES,
        )
    columns: dict[str, list] = {"image": [], "image_id": [], "caption": [], "caption_index": []}
    for r in records:
        for k, caption in enumerate(r.captions):
            columns["image"].append(r.image)
            columns["image_id"].append(r.image_id)
            columns["caption"].append(caption)
            columns["caption_index"].append(k)
    return Dataset.from_dict(columns, features=PAIR_FEATURES)


def check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def to_image_view(pairs: Dataset) -> Dataset:
    """Group a pair-view split into one row per image with its captions in caption_index order.

    Images keep the order of their first pair. Extra columns (e.g. cached features) are taken
    from each image's first pair.
    """
    _require_columns(pairs, ("image_id", "caption", "caption_index"), "pair view")
    meta = pairs.select_columns(["image_id", "caption", "caption_index"]).to_dict()
    first_row: dict[str, int] = {}
    captions: dict[str, list[tuple[int, str]]] = {}
    for row, (image_id, caption, index) in enumerate(
        zip(meta["image_id"], meta["caption"], meta["caption_index"])
    ):
        if image_id not in first_row:
            first_row[image_id] = row
            captions[image_id] = []
        captions[image_id].append((index, caption))
    ordered = [[c for _, c in sorted(captions[i], key=lambda t: t[0])] for i in first_row]
    images = pairs.select(list(first_row.values())).remove_columns(["caption", "caption_index"])
    images = images.flatten_indices()
    return images.add_column("captions", ordered, feature=Sequence(Value("string")))


def require_images(split_data: Dataset, split: str, where: str) -> Dataset:
    """`split_data` unless it has no rows: then one error naming the split and where it came from.

    Every consumer of a split (training, each evaluation command) would otherwise fail later with a
    traceback (torch.cat of no batches)."""
    if len(split_data) == 0:
        raise DatasetFormatError(f"the {split} split ({where}) has no images left: its table has no rows, or every "
                                 "image was skipped as unreadable (listed above); add or replace them, or pass "
                                 "on_bad_image: error to stop at the first unreadable one")
    return split_data


def to_pair_view(images: Dataset) -> Dataset:
    """Expand an image-view split into one row per (image, caption) pair."""
    _require_columns(images, ("image_id", "captions"), "image view")
    all_captions = images.select_columns(["captions"]).to_dict()["captions"]
    rows = [i for i, caps in enumerate(all_captions) for _ in caps]
    pairs = images.select(rows).remove_columns(["captions"]).flatten_indices()
    pairs = pairs.add_column(
        "caption", [c for caps in all_captions for c in caps], feature=Value("string")
    )
    return pairs.add_column(
        "caption_index", [k for caps in all_captions for k in range(len(caps))], feature=Value("int32")
    )


def convert_view(data: Union[Dataset, DatasetDict], view: str):
    """Return ``data`` in ``view``, converting from the other view if needed."""
    check_view(view)
    if isinstance(data, DatasetDict):
        return DatasetDict({name: convert_view(split, view) for name, split in data.items()})
    is_pairs = "caption" in data.column_names
    if view == "pairs":
        return data if is_pairs else to_pair_view(data)
    return to_image_view(data) if is_pairs else data


def _require_columns(ds: Dataset, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"expected a {what} with columns {list(columns)}; missing {missing} "
            f"(has {ds.column_names})"
        )


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide datasets' own progress bars for quick internal steps (flattening, saving), then restore."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
