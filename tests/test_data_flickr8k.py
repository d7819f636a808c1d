"""Flickr8k loaders on tiny generated fixtures (official, Kaggle, Karpathy layouts, broken inputs),
plus the real shared copy when it is present."""

import csv
from collections import Counter
import json
import logging
from pathlib import Path

import datasets
import pytest
from PIL import Image

from data_scripts import (
    DatasetFormatError,
    default_flickr8k_dir,
    load_flickr8k,
    load_image_caption_dataset,
)
from data_scripts.hub import normalise_hub_dataset

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange", "pink", "grey", "brown", "cyan"]


def _name(i: int) -> str:
    return f"{1000 + i}_abc{i:02d}.jpg"


def _write_jpeg(path: Path, i: int) -> None:
    Image.new("RGB", (8, 6), (i * 20 % 256, 100, 200 - i * 10 % 200)).save(path, format="JPEG")


def _captions(i: int) -> list[str]:
    return [f"a {COLOURS[i % len(COLOURS)]} thing number {i} caption {k} ." for k in range(5)]


def make_official(root: Path, n: int = 10, splits=(6, 2, 2)) -> Path:
    """Official layout: Flicker8k_Dataset/ + Flickr8k_text/ with token file and split lists."""
    images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
    images.mkdir(parents=True)
    text.mkdir()
    for i in range(n):
        _write_jpeg(images / _name(i), i)
    lines = [f"{_name(i)}#{k}\t{c}" for i in range(n) for k, c in enumerate(_captions(i))]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    start = 0
    split_files = ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt")
    for file, count in zip(split_files, splits):
        (text / file).write_text("".join(f"{_name(i)}\n" for i in range(start, start + count)))
        start += count
    return root


def make_kaggle(root: Path, n: int = 16) -> Path:
    """Kaggle layout: Images/ + captions.txt (CSV with header, a caption with a quoted comma)."""
    images = root / "Images"
    images.mkdir(parents=True)
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(n):
            _write_jpeg(images / _name(i), i)
            for k, c in enumerate(_captions(i)):
                writer.writerow([_name(i), c.replace("thing", "thing, sitting") if k == 0 else c])
    return root


def token_path(root: Path) -> Path:
    return root / "Flickr8k_text" / "Flickr8k.token.txt"


@pytest.fixture
def official(tmp_path):
    return make_official(tmp_path / "flickr")


# ---- official layout -------------------------------------------------------------------


def test_official_layout_pairs_and_images_views(official):
    splits, report = load_flickr8k(official)
    assert report.layout == "official"
    assert {s: len(d) for s, d in splits.items()} == {"train": 30, "validation": 10, "test": 10}
    train = splits["train"]
    assert train.column_names == ["image", "image_id", "caption", "caption_index"]
    assert isinstance(train.features["image"], datasets.Image)
    row = train[0]
    assert row["image_id"] == _name(0) and row["caption_index"] == 0 and row["caption"] == _captions(0)[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 6)

    images, _ = load_flickr8k(official, view="images")
    assert {s: len(d) for s, d in images.items()} == {"train": 6, "validation": 2, "test": 2}
    assert images["validation"][0]["captions"] == _captions(6)
    assert images["test"]["image_id"] == [_name(8), _name(9)]


def test_entry_point_dispatches_directories_and_attaches_report(official):
    data = load_image_caption_dataset(str(official), view="images")
    assert data.load_report.layout == "official"
    assert data.load_report.counts["train"] == {"images": 6, "pairs": 30}


def test_image_missing_on_disk_error_names_file_and_line(official):
    (official / "Flicker8k_Dataset" / _name(3)).unlink()
    with pytest.raises(DatasetFormatError) as err:
        load_flickr8k(official)
    message = str(err.value)
    assert _name(3) in message and "missing on disk" in message
    assert "Flickr8k.token.txt, line 16" in message and "Flickr_8k.trainImages.txt, line 4" in message
    assert "on_bad_image='skip'" in message

    splits, report = load_flickr8k(official, on_bad_image="skip")
    assert len(splits["train"]) == 25 and _name(3) not in splits["train"]["image_id"]
    assert len(report.skipped) == 1 and _name(3) in str(report.skipped[0])
    assert report.counts["train"] == {"images": 5, "pairs": 25}


def test_captions_for_missing_image_in_no_split_are_noted_not_fatal(official, caplog):
    # like the real '2258277193_586949ec62.jpg.1' line
    with open(token_path(official), "a") as f:
        f.write("9999_gone.jpg.1#0\tpeople waiting for the subway\n")
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        data = load_image_caption_dataset(str(official))
    assert len(data["train"]) == 30
    assert any("9999_gone.jpg.1" in note and "line 51" in note for note in data.load_report.notes)
    assert "9999_gone.jpg.1" in caplog.text


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("no tab here just text", "no TAB"),
        (f"{_name(1)}#5\t   ", "empty caption"),
        (f"{_name(1)}#x\tcap", "not an integer"),
    ],
)
def test_bad_caption_line_reported_with_line_number(official, bad_line, expected):
    lines = token_path(official).read_text().splitlines()
    lines.insert(2, bad_line)
    token_path(official).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"Flickr8k.token.txt, line 3: .*{expected}"):
        load_flickr8k(official)
    splits, report = load_flickr8k(official, on_bad_image="skip")
    assert len(splits["train"]) == 30
    assert [p.line for p in report.skipped] == [3]


def test_split_file_naming_unknown_image(official):
    split = official / "Flickr8k_text" / "Flickr_8k.devImages.txt"
    split.write_text(split.read_text() + "nope_123.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"Flickr_8k.devImages.txt, line 3: names image 'nope_123.jpg'"):
        load_flickr8k(official)
    splits, report = load_flickr8k(official, on_bad_image="skip")
    assert len(splits["validation"]) == 10 and len(report.skipped) == 1


def test_image_in_two_split_files_is_a_leak(official):
    test_split = official / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    test_split.write_text(test_split.read_text() + f"{_name(0)}\n")
    with pytest.raises(DatasetFormatError, match="also in Flickr_8k.trainImages.txt"):
        load_flickr8k(official)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_images(official, damage):
    path = official / "Flicker8k_Dataset" / _name(7)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a jpeg at all" * 10, "empty": b""}[damage])
    with pytest.raises(DatasetFormatError, match=rf"{_name(7)}: (cannot decode|file is empty)"):
        load_flickr8k(official)
    splits, report = load_flickr8k(official, on_bad_image="skip")
    assert len(splits["validation"]) == 5 and len(report.skipped) == 1
    # not verifying trusts the files (that is what the option is for)
    splits, report = load_flickr8k(official, verify_images=False)
    assert len(splits["validation"]) == 10 and not report.skipped


def test_other_image_modes_load(official):
    folder = official / "Flicker8k_Dataset"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(folder / _name(0), format="PNG")  # PNG named .jpg
    Image.new("L", (8, 8), 128).save(folder / _name(1), format="JPEG")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / _name(2), format="JPEG")
    Image.new("P", (8, 8), 3).save(folder / _name(3), format="PNG")
    splits, report = load_flickr8k(official)
    assert not report.skipped
    modes = {splits["train"][k * 5]["image"].mode for k in range(4)}
    assert modes == {"RGBA", "L", "CMYK", "P"}  # stored as is; ImageTransform converts to RGB


def test_duplicate_images_are_noted(official):
    folder = official / "Flicker8k_Dataset"
    (folder / _name(5)).write_bytes((folder / _name(4)).read_bytes())
    _, report = load_flickr8k(official)
    assert report.duplicates == [(_name(4), _name(5))]
    assert any("byte-identical" in n for n in report.notes)


def test_partial_split_files_error(official):
    (official / "Flickr8k_text" / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(DatasetFormatError, match="missing Flickr_8k.testImages.txt"):
        load_flickr8k(official)


def test_official_without_split_files_gets_seeded_split(official):
    for f in (official / "Flickr8k_text").glob("Flickr_8k.*"):
        f.unlink()
    splits, report = load_flickr8k(official)
    assert sum(len(d) for d in splits.values()) == 50
    assert "Flickr_8k.trainImages.txt" in report.missing


def test_archive_wrapped_layout_is_found(tmp_path):
    make_official(tmp_path / "Flickr8k_Dataset")  # the official zip unpacks one folder deeper
    (tmp_path / "Flickr8k_Dataset" / "Flickr8k_text").rename(tmp_path / "Flickr8k_text")
    splits, report = load_flickr8k(tmp_path)
    assert len(splits["train"]) == 30
    assert report.found["images"] == "Flickr8k_Dataset/Flicker8k_Dataset"


def test_directory_of_no_known_layout(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetFormatError) as err:
        load_flickr8k(tmp_path)
    message = str(err.value)
    assert "not a Flickr8k layout" in message and "Found: image folder Images/" in message
    assert "Flickr8k.token.txt" in message and "captions.txt" in message
    with pytest.raises(DatasetFormatError, match="no such directory"):
        load_image_caption_dataset(str(tmp_path / "nowhere"))


# ---- Kaggle layout ---------------------------------------------------------------------


def test_kaggle_layout_seeded_split_by_image(tmp_path):
    root = make_kaggle(tmp_path / "kaggle", n=16)
    a, report = load_flickr8k(root, view="images", seed=1)
    b, _ = load_flickr8k(root, view="images", seed=1)
    c, _ = load_flickr8k(root, view="images", seed=2)
    assert report.layout == "kaggle"
    assert [len(a[s]) for s in ("train", "validation", "test")] == [12, 2, 2]
    ids = {s: set(a[s]["image_id"]) for s in a}
    assert set.union(*ids.values()) == {_name(i) for i in range(16)}
    assert sum(len(v) for v in ids.values()) == 16  # no image in two splits
    assert all(len(caps) == 5 for caps in a["train"]["captions"])
    assert {s: a[s]["image_id"] for s in a} == {s: b[s]["image_id"] for s in b}
    assert {s: a[s]["image_id"] for s in a} != {s: c[s]["image_id"] for s in c}
    all_captions = [caps for s in a for caps in a[s]["captions"]]
    assert ["a red thing, sitting number 0 caption 0 ."] + _captions(0)[1:] in all_captions  # quoted comma kept
    pairs, _ = load_flickr8k(root, seed=1)
    assert len(pairs["train"]) == 60 and sorted(set(pairs["train"]["caption_index"])) == [0, 1, 2, 3, 4]


def test_kaggle_sizes_are_6000_1000_rest_for_full_sets():
    from data_scripts.flickr8k import seeded_split

    names = [f"{i}.jpg" for i in range(8091)]
    split = seeded_split(names, 42, (6000, 1000))
    counts = {s: list(split.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 6000, "validation": 1000, "test": 1091}
    assert seeded_split(list(reversed(names)), 42, (6000, 1000)) == split  # file order does not matter


def test_a_seeded_split_moves_at_most_one_image_per_boundary_when_an_image_is_added_or_removed():
    from data_scripts.flickr8k import seeded_split

    names = [f"{i}.jpg" for i in range(8091)]
    split = seeded_split(names, 42, (6000, 1000))
    for changed in (names[1:], names + ["new.jpg"]):  # an image removed (a bad file), or one added
        other = seeded_split(changed, 42, (6000, 1000))
        moved = [n for n in set(names) & set(changed) if split[n] != other[n]]
        assert len(moved) <= 2, len(moved)
    assert seeded_split(names, 7, (6000, 1000)) != split  # the seed does choose the split
    # no sliver of a test split: 7,001 images keep the 6:1:1 proportions, not 6000/1000/1
    counts = Counter(seeded_split(names[:7001], 42, (6000, 1000)).values())
    assert counts["test"] == counts["validation"] == 875


def test_kaggle_bad_rows(tmp_path):
    root = make_kaggle(tmp_path / "kaggle", n=8)
    with open(root / "captions.txt", "a") as f:
        f.write(f"{_name(2)},\n")  # empty caption, line 42
    with pytest.raises(DatasetFormatError, match=r"captions.txt, line 42: empty caption"):
        load_flickr8k(root)
    (root / "Images" / _name(5)).unlink()
    splits, report = load_flickr8k(root, on_bad_image="skip")
    assert sum(len(d) for d in splits.values()) == 35
    assert len(report.skipped) == 2 and "missing on disk" in str(report.skipped[1])


# ---- Karpathy split file ---------------------------------------------------------------


def _karpathy(n: int, split_of) -> dict:
    return {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": _name(i),
                "split": split_of(i),
                "sentences": [{"raw": c, "tokens": c.split()} for c in _captions(i)],
            }
            for i in range(n)
        ],
    }


def test_karpathy_file_takes_precedence_for_splits(official):
    split_of = lambda i: "test" if i < 3 else "val" if i < 5 else "restval" if i == 5 else "train"  # noqa: E731
    (official / "Flickr8k_text" / "dataset_flickr8k.json").write_text(json.dumps(_karpathy(10, split_of)))
    splits, report = load_flickr8k(official, view="images")
    assert splits["test"]["image_id"] == [_name(i) for i in range(3)]
    assert splits["validation"]["image_id"] == [_name(3), _name(4)]
    assert len(splits["train"]) == 5  # train + restval
    assert any("overrides the split lists" in n for n in report.notes)


def test_karpathy_json_with_image_folder_only(tmp_path):
    root = make_kaggle(tmp_path / "k", n=6)
    (root / "captions.txt").unlink()
    (root / "dataset_flickr8k.json").write_text(json.dumps(_karpathy(6, lambda i: ["train", "val", "test"][i % 3])))
    splits, report = load_flickr8k(root)
    assert report.layout == "karpathy"
    assert {s: len(d) for s, d in splits.items()} == {"train": 10, "validation": 10, "test": 10}
    (root / "dataset_flickr8k.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="dataset_flickr8k.json, line 1: invalid JSON"):
        load_flickr8k(root)


# ---- Hub normalisation (no network: a local data set through the same code) ----------


def test_hub_dataset_is_normalised(tmp_path, monkeypatch):
    image = Image.new("RGB", (4, 4), (0, 0, 255))
    columns = [f"caption_{k}" for k in range(5)]
    features = datasets.Features({"image": datasets.Image(), **{c: datasets.Value("string") for c in columns}})
    rows = lambda n: {"image": [image] * n, **{c: [f"img {c}"] * n for c in columns}}  # noqa: E731
    raw = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows(16), features=features),
        "val": datasets.Dataset.from_dict(rows(2), features=features),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: raw)
    data = load_image_caption_dataset("someone/flickr8k")
    assert data.load_report.layout == "hub" and data.load_report.missing == ["test"]
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].column_names == ["image", "image_id", "caption", "caption_index"]
    assert len(data["validation"]) == 10 and len(data["train"]) + len(data["test"]) == 80
    assert not set(data["train"]["image_id"]) & set(data["test"]["image_id"])

    pairs = datasets.Dataset.from_dict({"image": [image] * 4, "filename": ["a", "a", "b", "b"], "text": list("wxyz")},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "filename": datasets.Value("string"),
                                                                   "text": datasets.Value("string")}))
    images, _ = normalise_hub_dataset(datasets.DatasetDict({"train": pairs, "validation": pairs, "test": pairs}),
                                      "x", view="images")
    assert images["test"]["captions"] == [["w", "x"], ["y", "z"]]


def test_hub_failure_is_explained(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetFormatError, match="not a local directory.*ConnectionError"):
        load_image_caption_dataset("someone/flickr8k")


# ---- the real data ---------------------------------------------------------------------

REAL = default_flickr8k_dir()


@pytest.mark.skipif(not (REAL / "Flickr8k_text" / "Flickr8k.token.txt").exists(),
                    reason=f"real Flickr8k not found at {REAL} (expected ../shared/data/flickr8k next to the repo)")
def test_real_flickr8k_official_layout():
    pairs = load_image_caption_dataset(str(REAL))
    report = pairs.load_report
    assert report.layout == "official"
    assert report.counts == {
        "train": {"images": 6000, "pairs": 30000},
        "validation": {"images": 1000, "pairs": 5000},
        "test": {"images": 1000, "pairs": 5000},
    }
    assert {s: len(d) for s, d in pairs.items()} == {"train": 30000, "validation": 5000, "test": 5000}
    assert any("2258277193_586949ec62.jpg.1" in n for n in report.notes)
    assert ("2851198725_37b6027625.jpg", "3050606344_af711c726c.jpg") in [tuple(sorted(d)) for d in report.duplicates]
    assert pairs["test"][0]["image"].size == (224, 224)


def test_a_space_before_the_hash_still_names_the_image(official):
    lines = token_path(official).read_text().splitlines()
    lines[0] = lines[0].replace("#0\t", " #0\t", 1)  # '1000_abc00.jpg #0<TAB>...'
    token_path(official).write_text("\n".join(lines) + "\n")
    splits = load_image_caption_dataset(str(official), view="images")
    first = [row for row in splits["train"] if row["image_id"] == _name(0)][0]
    assert len(first["captions"]) == 5  # no phantom image '1000_abc00.jpg ' took one of them


def test_an_unclosed_quote_in_kaggle_captions_is_reported_with_its_line(tmp_path):
    root = make_kaggle(tmp_path / "kaggle", n=8)
    lines = (root / "captions.txt").read_text().splitlines()
    lines[3] = f'{_name(0)},"a caption whose quote never closes'
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.txt, line 4: a double quote opened on line 4 is never "
                                                 r"closed, so lines 4-\d+ read as one caption"):
        load_flickr8k(root)


def test_an_empty_split_list_is_an_error_naming_the_file(official):
    (official / "Flickr8k_text" / "Flickr_8k.testImages.txt").write_text("")
    with pytest.raises(DatasetFormatError, match=r"Flickr_8k.testImages.txt: lists no image.*test split would be "
                                                 "empty"):
        load_flickr8k(official)


def test_hub_caption_columns_are_read_by_their_type_and_unnamed_images_are_grouped_by_their_bytes():
    red, blue = (Image.new("RGB", (4, 4), colour) for colour in ("red", "blue"))
    splits = lambda d: datasets.DatasetDict({"train": d, "validation": d, "test": d})  # noqa: E731

    # a list-valued column named 'caption' (flickr30k style): a list per image, not its repr
    listed = datasets.Dataset.from_dict({"image": [red, blue], "caption": [["r0", "r1"], ["b0", "b1"]]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "caption": datasets.Sequence(datasets.Value("string"))}))
    images, _ = normalise_hub_dataset(splits(listed), "x", view="images")
    assert images["test"]["captions"] == [["r0", "r1"], ["b0", "b1"]]

    # a plain-string column named 'captions': one caption per row, not a list of characters; the images
    # are held as bytes with no name or id column, so rows with the same image are grouped by content
    rows = datasets.Dataset.from_dict({"image": [red, red, blue, blue], "captions": ["a dog", "a cat", "x", "y"],
                                       "id": [0, 1, 2, 3]},  # a per-caption id: not an image id
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "captions": datasets.Value("string"),
                                                                  "id": datasets.Value("int32")}))
    images, _ = normalise_hub_dataset(splits(rows), "x", view="images")
    assert images["test"]["captions"] == [["a dog", "a cat"], ["x", "y"]]
    assert len(set(images["test"]["image_id"])) == 2


def test_kaggle_captions_beside_the_official_split_lists_follow_the_lists(tmp_path):
    root = make_kaggle(tmp_path / "kaggle", n=16)
    text = root / "Flickr8k_text"
    text.mkdir()
    for file, names in (("Flickr_8k.trainImages.txt", range(0, 10)), ("Flickr_8k.devImages.txt", range(10, 13)),
                        ("Flickr_8k.testImages.txt", range(13, 16))):
        (text / file).write_text("".join(f"{_name(i)}\n" for i in names))
    splits, report = load_flickr8k(root, view="images")
    assert report.layout == "kaggle"
    assert sorted(splits["test"]["image_id"]) == [_name(i) for i in range(13, 16)]
    assert not any("seeded split" in note for note in report.notes)


def test_a_token_file_that_is_not_utf8_stops_the_load_naming_its_line(tmp_path):
    root = make_official(tmp_path / "f8k")
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token.read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b"thing", b"th\xefng")  # a Latin-1 byte, as an editor set to Latin-1 saves it
    token.write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetFormatError, match=rf"Flickr8k.token.txt, line 7: byte 0xef at column \d+ is not UTF-8"):
        load_flickr8k(str(root))
