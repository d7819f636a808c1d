"""Parsers for the Flickr8k caption and split files, each bad line reported with its number.

Every parser takes a ``report_problem`` callable that applies the on_bad_image policy (raise or
collect); a bad line is then left out. Structural failures that make the whole file unusable
(unreadable file, invalid JSON) always raise :class:`DatasetFormatError`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from .images import IMAGE_EXTENSIONS
from .report import DatasetFormatError, Problem

# image name -> list of (caption_index, caption, line number), in file order
CaptionTable = dict[str, list[tuple[int, str, int]]]
ReportFn = Callable[[Problem], None]


def read_text(path: Path) -> str:
    """A caption or table file's text, read as strict UTF-8 (a BOM is dropped).

    Bytes that are not UTF-8 (a Latin-1 or Windows-1252 file) stop the load naming the file, line and byte:
    decoded with replacement characters they would train silently on captions with '\ufffd' in them."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetFormatError(f"{path}, line {line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8; "
                                 f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_lines(path: Path) -> list[str]:
    """Lines of a text file (strict UTF-8, `read_text`), tolerant of a BOM and Windows line ends."""
    return read_text(path).splitlines()


def parse_token_file(path: Path, report_problem: ReportFn) -> CaptionTable:
    """Parse the official ``Flickr8k.token.txt``: ``<image>#<k> TAB <caption>`` per line."""
    table: CaptionTable = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            report_problem(
                Problem(str(path), f"no TAB between '<image>#<k>' and the caption in {line[:80]!r}", number,
                        "Each line must be '<image>#<k>', a TAB, then the caption; fix or delete it")
            )
            continue
        name, hash_sign, index_text = key.strip().rpartition("#")
        name = name.strip()  # 'b.jpg #0' names b.jpg, not 'b.jpg '
        if not hash_sign:
            name, index_text = key.strip(), ""
        caption = caption.strip()
        if not name:
            report_problem(Problem(str(path), f"no image name before the TAB in {line[:80]!r}", number,
                                   "Fix or delete the line"))
            continue
        if index_text and not index_text.isdigit():
            report_problem(Problem(str(path), f"caption number {index_text!r} after '#' is not an integer", number,
                                   "Use '<image>#<k>' with k = 0..4"))
            continue
        if not caption:
            report_problem(Problem(str(path), f"empty caption for image '{name}'", number,
                                   "Write the caption after the TAB or delete the line"))
            continue
        entries = table.setdefault(name, [])
        index = int(index_text) if index_text else len(entries)
        if any(k == index for k, _, _ in entries):
            report_problem(Problem(str(path), f"caption #{index} of image '{name}' appears twice", number,
                                   "Delete or renumber the duplicate line"))
            continue
        entries.append((index, caption, number))
    if not table:
        raise DatasetFormatError(f"{path}: no caption lines found (expected '<image>#<k> TAB <caption>')")
    return table


def parse_kaggle_captions(path: Path, report_problem: ReportFn) -> CaptionTable:
    """Parse Kaggle's ``captions.txt``: a CSV with header ``image,caption``.

    Captions holding commas are normally quoted; unquoted extra commas are joined back into the
    caption rather than rejected.
    """
    table: CaptionTable = {}
    lines = read_lines(path)
    reader = csv.reader(lines)
    last = 0
    for row in reader:
        number, first, last = reader.line_num, last + 1, reader.line_num
        if number > first:  # a quote left open swallows the lines after it into this row
            report_problem(Problem(str(path), f"a double quote opened on line {first} is never closed, so lines "
                                   f"{first}-{number} read as one caption", first,
                                   "Close the quote (or remove it) on that line"))
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        if number == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
            continue
        if len(row) < 2:
            report_problem(Problem(str(path), f"no comma between image name and caption in {','.join(row)[:80]!r}",
                                   number, "Each line must be 'image,caption'; fix or delete it"))
            continue
        name, caption = row[0].strip(), ",".join(row[1:]).strip()
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            report_problem(Problem(str(path), f"first column {name[:60]!r} is not an image file name", number,
                                   "Each line must be 'image,caption'; fix or delete it"))
            continue
        if not caption:
            report_problem(Problem(str(path), f"empty caption for image '{name}'", number,
                                   "Write the caption after the comma or delete the line"))
            continue
        entries = table.setdefault(name, [])
        entries.append((len(entries), caption, number))
    if not table:
        raise DatasetFormatError(f"{path}: no caption rows found (expected a CSV 'image,caption')")
    return table


def parse_split_file(path: Path, known: CaptionTable, report_problem: ReportFn) -> list[tuple[str, int]]:
    """Image names (with line numbers) of one split list, keeping only images that have captions."""
    names: list[tuple[str, int]] = []
    seen: set[str] = set()
    for number, line in enumerate(read_lines(path), start=1):
        name = line.strip()
        if not name:
            continue
        if name not in known:
            report_problem(Problem(str(path), f"names image '{name}', which has no captions in the caption file",
                                   number, "Remove the line, or add the image's captions"))
            continue
        if name in seen:
            continue  # a repeated line changes nothing; not worth a report
        seen.add(name)
        names.append((name, number))
    return names


def parse_karpathy(path: Path) -> tuple[dict[str, str], CaptionTable]:
    """Read Karpathy's ``dataset_flickr8k.json``: image -> split, and its captions.

    Karpathy's "restval" images are training images (as in his and open_clip's code).
    """
    try:
        data = json.loads(read_text(path))
        images = data["images"]
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg}); re-download it") from exc
    except (KeyError, TypeError) as exc:
        raise DatasetFormatError(f"{path}: expected a JSON object with an 'images' list") from exc
    split_names = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    splits: dict[str, str] = {}
    table: CaptionTable = {}
    for position, item in enumerate(images):
        try:
            name, split = item["filename"], item["split"]
            sentences = [s.get("raw") or " ".join(s.get("tokens", [])) for s in item.get("sentences", [])]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetFormatError(
                f"{path}: entry {position} of 'images' lacks 'filename'/'split'/'sentences' ({exc})"
            ) from exc
        if split not in split_names:
            raise DatasetFormatError(f"{path}: image '{name}' has unknown split {split!r} "
                                     f"(expected one of {sorted(split_names)})")
        splits[name] = split_names[split]
        table[name] = [(k, s.strip(), position + 1) for k, s in enumerate(sentences) if s and s.strip()]
    return splits, table
