"""Your own image-caption data: an ``imagefolder`` directory, or tables of image path + caption.

Two shapes people bring besides Flickr8k, both read here with the same rules:

* Hugging Face's ``imagefolder`` convention: images plus a ``metadata.csv`` / ``metadata.jsonl``
  whose ``file_name`` column names each image (relative to the metadata file) and whose other
  column holds its caption. The metadata may sit at the top (one split, the rest carved by the
  seeded split) or in ``train/``, ``validation/`` (or ``val/``, ``dev/``), ``test/`` sub-folders.
* CSV, JSON (a list of objects) or JSON Lines files of image path + caption, one per split
  (``train_file``, ``validation_file``, ``test_file``, as in transformers' ``run_clip.py``), image
  paths relative to the file that names them.

We read the tables ourselves (``csv`` / ``json``) rather than through ``load_dataset("imagefolder")``
because every bad row must be named by file and line and go through the ``on_bad_image`` policy:
datasets fails on the first missing file with a message that names neither. The result is built
from :class:`ImageRecord` s like Flickr8k's, so images stay files on disk (decoded lazily).

Several captions of one image (several rows naming one file, or a list in one cell: a JSON list,
or in CSV a cell holding a JSON list) become one image with several captions, so the pair view
gives them one ``image_id`` and ``caption_index`` 0, 1, ... exactly as Flickr8k's five.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from datasets import DatasetDict

from .captions import read_lines, read_text
from .flickr8k import DEFAULT_SPLIT_SIZES, SPLITS, carve_labels
from .images import check_images
from .report import DatasetFormatError, LoadReport, Problem, ProblemSink
from .views import ImageRecord, records_to_dataset

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.json")
TABLE_EXTENSIONS = (".csv", ".json", ".jsonl")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                 "dev": "validation", "test": "test"}
# auto-detected when exactly one of them is a column; otherwise the user names it
IMAGE_COLUMN_NAMES = ("file_name", "image", "image_path", "filepath", "filename", "img", "path")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "sentence", "sentences")


def find_metadata(root: Path) -> dict[str, Path]:
    """split -> metadata file of an ``imagefolder`` directory; empty when ``root`` is not one.

    Split folders (``train/metadata.csv``...) win over a metadata file at the top.
    """
    found: dict[str, Path] = {}
    for folder, split in SPLIT_FOLDERS.items():
        table = _metadata_in(root / folder)
        if table is not None and split not in found:
            found[split] = table
    top = _metadata_in(root)
    if not found and top is not None:
        found["train"] = top
    return found


def is_table_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TABLE_EXTENSIONS


def load_tables(
    files: dict[str, Path],
    view: str = "pairs",
    *,
    layout: str = "files",
    source: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    on_bad_image: str = "error",
    verify_images: bool = True,
    seed: int = 42,
    split_sizes: tuple[int, int] = DEFAULT_SPLIT_SIZES,
) -> tuple[DatasetDict, LoadReport]:
    """Load one table per split (``files``: split -> path; ``train`` required) as train/validation/test.

    Image ids are the image paths relative to the folder holding all the tables (``train/0001.png``),
    so two splits' ``0001.png`` stay two images. Missing splits are carved from train by image with
    the seeded split Flickr8k's Kaggle layout uses. ``verify_images`` decodes every image once.
    """
    if "train" not in files:
        raise DatasetFormatError(f"no training table among {sorted(files)}: pass train_file (a CSV, JSON or "
                                 "JSONL file of image path + caption)")
    # abspath, not resolve: an image folder that is a symbolic link keeps its name in the image ids
    root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in files.values()]))
    report = LoadReport(source=source or str(root), layout=layout,
                        found={f"{split} table": _rel(path, root) for split, path in files.items()})
    sink = ProblemSink(on_bad_image, report)
    records: dict[str, list[ImageRecord]] = {}
    split_of: dict[str, str] = {}
    for split, path in files.items():
        records[split] = []
        for record, where in _read_records(path, root, image_column, caption_column, sink).values():
            if record.image_id in split_of:
                sink(Problem(str(path), f"image '{record.image_id}' is also in the {split_of[record.image_id]} "
                             "table (one image in two splits leaks between training and evaluation)", where,
                             "Remove its rows from one of the two tables"))
                continue
            split_of[record.image_id] = split
            records[split].append(record)
    if verify_images:
        items = [(r.image_id, r.image) for recs in records.values() for r in recs]
        bad, report.duplicates = check_images(items, sink, desc=f"Checking {root.name or root}")
        records = {split: [r for r in recs if r.image_id not in bad] for split, recs in records.items()}
    missing = [s for s in SPLITS if s not in records]
    if missing:
        records = _carve(records, missing, seed, split_sizes, report)
    report.counts = {split: {"images": len(recs), "pairs": sum(len(r.captions) for r in recs)}
                     for split, recs in records.items()}
    if not records["train"]:
        raise DatasetFormatError(f"{files['train']}: no usable training rows ({len(report.skipped)} skipped); "
                                 f"see the load report:\n{report.summary()}")
    return DatasetDict({split: records_to_dataset(records[split], view) for split in SPLITS}), report


def pick_column(columns: list[str], chosen: Optional[str], candidates: tuple[str, ...], what: str,
                where: str) -> str:
    """The column holding ``what`` ("image" or "caption"): the one named, else the only candidate present."""
    option = f"{what}_column"
    if chosen:
        if chosen not in columns:
            raise DatasetFormatError(f"{where}: no column '{chosen}' ({option}); columns found: {columns}. "
                                     f"Pass {option} with one of them")
        return chosen
    present = [c for c in candidates if c in columns]
    if len(present) == 1:
        return present[0]
    if not present:
        raise DatasetFormatError(f"{where}: no {what} column (looked for {', '.join(candidates)}); columns found: "
                                 f"{columns}. Name it with {option}")
    raise DatasetFormatError(f"{where}: several columns could hold the {what}: {present}; choose one with {option}")


def caption_list(value) -> list[str]:
    """A caption cell as a list of captions: a string, a list, or (CSV) a string holding a JSON list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            value = parsed
    if isinstance(value, (list, tuple)):
        return [str(v).strip() if v is not None else "" for v in value]
    return ["" if value is None else str(value).strip()]


def _read_records(path: Path, root: Path, image_column, caption_column,
                  sink: ProblemSink) -> dict[str, tuple[ImageRecord, Optional[int]]]:
    """image id -> (record, first line naming it), rows of one image merged in table order."""
    columns, rows = _read_rows(path)
    image_col = pick_column(columns, image_column, IMAGE_COLUMN_NAMES, "image", str(path))
    caption_col = pick_column(columns, caption_column, CAPTION_COLUMN_NAMES, "caption", str(path))
    found: dict[str, tuple[ImageRecord, Optional[int]]] = {}
    missing_files: set[str] = set()
    for line, row in rows:
        if isinstance(row, Problem):
            sink(row)
            continue
        name = row.get(image_col)
        if not isinstance(name, str) or not name.strip():
            sink(Problem(str(path), f"no image path in column '{image_col}'", line, "Fill it in or delete the row"))
            continue
        file = Path(os.path.abspath(path.parent / name.strip()))
        image_id = _rel(file, root)
        if image_id in missing_files:
            continue  # told once per image
        if image_id not in found and not file.is_file():
            missing_files.add(image_id)
            sink(Problem(str(path), f"image '{name}' does not exist (looked at {file})", line,
                         "Fix the path (relative to the table's folder), restore the file, or delete its rows"))
            continue
        captions = caption_list(row.get(caption_col))
        if not any(captions):
            sink(Problem(str(path), f"empty caption for image '{name}' in column '{caption_col}'", line,
                         "Write the caption or delete the row"))
            continue
        if not all(captions):
            sink(Problem(str(path), f"{captions.count('')} empty caption(s) in the list for image '{name}'", line,
                         "Remove the empty entries"))
        record, _ = found.setdefault(image_id, (ImageRecord(image_id, str(file), []), line))
        record.captions.extend(c for c in captions if c)
    return found


def _read_rows(path: Path) -> tuple[list[str], Iterator[tuple[Optional[int], object]]]:
    """(column names, iterator of (line or None, row dict or Problem)) of a CSV, JSON or JSONL table."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        lines = read_lines(path)
        reader = csv.DictReader(lines)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        return columns, _csv_rows(path, reader, len(columns))
    if suffix == ".jsonl":
        objects = []
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                objects.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                objects.append((number, Problem(str(path), f"invalid JSON ({exc.msg})", number,
                                                "Fix or delete the line")))
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: expected a JSON list of objects (one per image or caption), got "
                                     f"{type(data).__name__}; JSON Lines (.jsonl) holds one object per line")
        objects = [(None, item) for item in data]
    else:
        raise DatasetFormatError(f"{path}: not a CSV, JSON or JSONL file (by its extension)")
    columns: list[str] = []
    rows = []
    for position, (number, item) in enumerate(objects):
        if not isinstance(item, (dict, Problem)):
            where = f"entry {position}: " if number is None else ""
            item = Problem(str(path), f"{where}expected an object, got {type(item).__name__}", number,
                           "Each row must be an object such as {\"file_name\": ..., \"text\": ...}")
        elif isinstance(item, dict):
            columns += [c for c in item if c not in columns]
        rows.append((number if number is not None else position, item))
    if not rows:
        raise DatasetFormatError(f"{path}: no rows")
    return columns, iter(rows)


def _csv_rows(path: Path, reader: csv.DictReader, width: int):
    for row in reader:
        if None in row:  # more cells than the header names
            yield reader.line_num, Problem(str(path), f"{width + len(row[None])} cells, but the header has {width} "
                                           "columns", reader.line_num, "Quote cells holding commas")
        elif any((value or "").strip() for value in row.values()):  # a short row: its missing cells are None
            yield reader.line_num, row


def _carve(records: dict[str, list[ImageRecord]], missing: list[str], seed: int, split_sizes,
           report: LoadReport) -> dict[str, list[ImageRecord]]:
    labels = carve_labels([r.image_id for r in records["train"]], missing, seed, split_sizes, report)
    carved = {split: [r for r, label in zip(records["train"], labels) if label == split]
              for split in ["train"] + missing}
    return {**records, **carved}


def _metadata_in(folder: Path) -> Optional[Path]:
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (``../`` for an image beside the tables' folder): stable across machines."""
    return Path(os.path.relpath(path, root)).as_posix()
