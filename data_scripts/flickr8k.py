"""Flickr8k from a local directory, in any of the layouts people actually have.

1. Official distribution: ``Flicker8k_Dataset/`` (sic) + ``Flickr8k_text/Flickr8k.token.txt``
   and the split lists ``Flickr_8k.{train,dev,test}Images.txt`` (6000/1000/1000 images).
2. Kaggle: ``Images/`` + ``captions.txt`` (CSV ``image,caption``), no split files: we make a
   deterministic seeded 6000/1000/rest split *by image*, so one image's captions never straddle
   splits (that would leak test images into training).
3. Karpathy's ``dataset_flickr8k.json`` beside either of them: its splits take precedence (it is
   what most papers report on). With only an image folder and the JSON, its captions are used.

The returned splits refer to the image files by path (``datasets.Image`` decodes lazily), so
loading copies nothing. Image ids are the file names: stable across layouts and runs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Optional

from datasets import DatasetDict

from .captions import CaptionTable, parse_karpathy, parse_kaggle_captions, parse_split_file, parse_token_file
from .images import check_images
from .layout import SPLIT_FILES, Flickr8kLayout, detect_layout, list_image_files, missing_split_files
from .report import DatasetFormatError, LoadReport, Problem, ProblemSink
from .views import ImageRecord, records_to_dataset

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = (6000, 1000)  # train, validation; test gets the rest


def default_flickr8k_dir() -> Path:
    """Where the shared copy of Flickr8k lives: ``<repo>/../shared/data/flickr8k``."""
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data" / "flickr8k"


def load_flickr8k(
    root,
    view: str = "pairs",
    *,
    on_bad_image: str = "error",
    verify_images: bool = True,
    seed: int = 42,
    split_sizes: tuple[int, int] = DEFAULT_SPLIT_SIZES,
) -> tuple[DatasetDict, LoadReport]:
    """Load a Flickr8k directory (layout auto-detected) as train/validation/test splits.

    ``on_bad_image`` ("error" or "skip") governs every bad input: unreadable or missing images,
    malformed caption lines, split lists naming unknown images. ``verify_images`` decodes every
    used image once (a few seconds for 8k images) so corrupt files surface now, not mid-training.
    ``seed`` and ``split_sizes`` only matter when there are no split files.
    """
    layout = detect_layout(root)
    report = LoadReport(source=str(layout.root), layout=layout.kind, found=layout.found())
    sink = ProblemSink(on_bad_image, report)

    captions = _read_captions(layout, sink)
    assignment, line_of = _assign_splits(layout, captions, report, sink, seed, split_sizes)
    on_disk = list_image_files(layout.image_dir)
    _note_unused(layout, captions, assignment, on_disk, report)

    used = [name for name in captions if name in assignment]
    missing = [name for name in used if name not in on_disk]
    for name in missing:
        sink(Problem(str(layout.image_dir / name), "image is missing on disk"
                     + _named_in(layout, name, captions, line_of.get(name)),
                     hint="Restore the file, or remove its captions and split entries"))
    bad = set(missing)
    if verify_images:
        items = [(n, str(layout.image_dir / n)) for n in used if n not in bad]
        broken, report.duplicates = check_images(items, sink, desc=f"Checking {layout.image_dir.name}")
        bad |= broken
        for group in report.duplicates:
            where = ", ".join(f"{name} ({assignment[name]})" for name in group)
            report.notes.append(
                f"byte-identical images: {where}; kept as distinct image ids, so they are false negatives "
                "of each other in a batch or a retrieval split they share"
            )

    records: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    for name in used:
        if name in bad:
            continue
        entries = sorted(captions[name], key=lambda e: e[0])
        records[assignment[name]].append(
            ImageRecord(name, str(layout.image_dir / name), [caption for _, caption, _ in entries])
        )
    _note_caption_counts(records, report)
    splits = DatasetDict({split: records_to_dataset(records[split], view) for split in SPLITS})
    report.counts = {
        split: {"images": len(recs), "pairs": sum(len(r.captions) for r in recs)} for split, recs in records.items()
    }
    return splits, report


def _read_captions(layout: Flickr8kLayout, sink: ProblemSink) -> CaptionTable:
    if layout.kind == "official":
        return parse_token_file(layout.captions_file, sink)
    if layout.kind == "kaggle":
        return parse_kaggle_captions(layout.captions_file, sink)
    _, table = parse_karpathy(layout.karpathy_file)
    return table


def _assign_splits(layout, captions, report, sink, seed, split_sizes) -> tuple[dict[str, str], dict]:
    """image name -> split, and image name -> (split file name, line) for messages."""
    if layout.karpathy_file is not None:
        splits, _ = parse_karpathy(layout.karpathy_file)
        assignment = {}
        for name, split in splits.items():
            if name in captions:
                assignment[name] = split
            else:
                sink(Problem(str(layout.karpathy_file), f"names image '{name}', which has no captions in "
                             f"{layout.captions_file.name if layout.captions_file else 'the JSON'}",
                             hint="Remove the entry, or use a caption file that matches the JSON"))
        if layout.split_files:
            report.notes.append(f"{layout.karpathy_file.name} overrides the split lists "
                                f"{', '.join(p.name for p in layout.split_files.values())}")
        return assignment, {}

    missing = missing_split_files(layout)
    if layout.split_files and missing:
        raise DatasetFormatError(
            f"{layout.root}: found split list(s) {', '.join(p.name for p in layout.split_files.values())} but "
            f"missing {', '.join(missing)} (expected next to {layout.captions_file.name}). Restore them, "
            "or delete all split lists to get a seeded split"
        )
    if layout.split_files:
        assignment: dict[str, str] = {}
        line_of: dict[str, tuple[str, int]] = {}
        for split, path in layout.split_files.items():
            for name, number in parse_split_file(path, captions, sink):
                if name in assignment:
                    first = layout.split_files[assignment[name]].name
                    sink(Problem(str(path), f"image '{name}' is also in {first} (one image in two splits "
                                 "leaks between training and evaluation)", number,
                                 "Remove it from one of the two lists"))
                    continue
                assignment[name] = split
                line_of[name] = (path.name, number)
        for split, path in layout.split_files.items():
            if split not in assignment.values():
                raise DatasetFormatError(f"{path}: lists no image of the captions, so the {split} split would be "
                                         "empty. Restore the list, or delete all split lists to get a seeded split")
        return assignment, line_of

    if layout.kind == "official":
        report.missing += list(missing)
    report.notes.append(f"no split files: made a seeded split by image (seed={seed})")
    assignment = seeded_split(list(captions), seed, split_sizes, report)
    return assignment, {}


def seeded_split(names: list[str], seed: int, split_sizes: tuple[int, int],
                 report: Optional[LoadReport] = None) -> dict[str, str]:
    """Deterministic split of image names into train/validation/test (sizes train, val, rest).

    Each name gets a place in one order from a hash of (seed, name): test takes the first places,
    validation the next, train the rest. So the split depends only on the names and the seed (not
    on file order), and adding or removing an image moves at most one other image per boundary
    (a shuffle of the whole list would reshuffle everything: removing one image once moved 804 of
    1,091 test images into training). With too few images for ``split_sizes`` to leave a test split
    as large as the validation split (a subset or a test fixture), the 6:1:1 proportions are kept.
    """
    ordered = sorted(set(names), key=lambda name: hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest())
    n = len(ordered)
    n_train, n_val = split_sizes
    if n - n_train - n_val < n_val:
        n_train, n_val = round(n * 0.75), round(n * 0.125)
        if report is not None:
            report.notes.append(f"only {n} images: split 75/12.5/12.5% ({n_train}/{n_val}/{n - n_train - n_val}) "
                                f"instead of {split_sizes[0]}/{split_sizes[1]}/rest")
    n_test = n - n_train - n_val
    split_of = {}
    for i, name in enumerate(ordered):
        split_of[name] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return split_of


def carve_labels(names: list[str], missing: list[str], seed: int, split_sizes: tuple[int, int],
                 report: LoadReport) -> list[str]:
    """The split of each of train's image ``names`` when the ``missing`` evaluation split(s) are made from it.

    By image (every caption of an image goes with it), with :func:`seeded_split`; a split that exists
    keeps its own images, so train takes back the share the seeded split would have given it.
    """
    assignment = seeded_split(names, seed, split_sizes, report)
    labels = [assignment[name] for name in names]
    labels = [label if label == "train" or label in missing else "train" for label in labels]
    report.notes.append(f"made {', '.join(missing)} from train (seeded split by image, seed={seed})")
    return labels


def _note_unused(layout, captions, assignment, on_disk, report) -> None:
    """Report captions that no split uses and images that nothing describes (these drop nothing)."""
    unused = [name for name in captions if name not in assignment]
    unused_missing = [name for name in unused if name not in on_disk]
    for name in unused_missing:
        where = str(layout.captions_file or layout.karpathy_file)
        where += f", line {captions[name][0][2]}" if layout.captions_file else ""
        report.notes.append(
            f"{where}: image '{name}' is missing in {layout.image_dir.name}/ and in no split; "
            f"its {len(captions[name])} captions are skipped"
        )
    if len(unused) > len(unused_missing):
        report.notes.append(f"{len(unused) - len(unused_missing)} captioned images are in no split list; not loaded")
    uncaptioned = len(on_disk - set(captions))
    if uncaptioned:
        report.notes.append(f"{uncaptioned} files in {layout.image_dir.name}/ have no captions; not loaded")


def _named_in(layout, name, captions, split_line) -> str:
    where = f" (named in {Path(layout.captions_file or layout.karpathy_file).name}"
    where += f", line {captions[name][0][2]}" if layout.captions_file else ""
    if split_line is not None:
        where += f", and in {split_line[0]}, line {split_line[1]}"
    return where + ")"


def _note_caption_counts(records: dict[str, list[ImageRecord]], report: LoadReport) -> None:
    counts = Counter(len(r.captions) for recs in records.values() for r in recs)
    if len(counts) > 1:
        usual = counts.most_common(1)[0][0]
        odd = {k: v for k, v in counts.items() if k != usual}
        report.notes.append(
            f"most images have {usual} captions; " + ", ".join(f"{v} have {k}" for k, v in sorted(odd.items()))
        )


__all__ = ["carve_labels", "default_flickr8k_dir", "load_flickr8k", "seeded_split", "SPLIT_FILES"]
