"""Your own data (doc/OWN_DATA.md): imagefolder directories, CSV/JSON/JSONL tables, local Hub-layout and
save_to_disk folders, and how each bad input is named and counted. Fixtures are a few 16x16 images."""

import csv
import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Image as ImageFeature
from PIL import Image

from data_scripts import DatasetFormatError, load_image_caption_dataset

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange", "pink", "grey", "brown", "cyan"]


def write_image(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (i * 20 % 256, 90, 255 - i * 15 % 256)).save(path)
    return path


def captions(i: int, n: int = 2) -> list[str]:
    return [f"a {COLOURS[i % len(COLOURS)]} square, caption {k} of image {i}" for k in range(n)]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def imagefolder(root: Path, n: int = 8) -> Path:
    """HF imagefolder: images + metadata.csv (file_name,text), two rows (captions) per image."""
    for i in range(n):
        write_image(root / "images" / f"{i:04d}.png", i)
    write_csv(root / "metadata.csv", ["file_name", "text"],
              [[f"images/{i:04d}.png", c] for i in range(n) for c in captions(i)])
    return root


def all_pairs(data: DatasetDict) -> list[tuple[str, str, int]]:
    return sorted((r["image_id"], r["caption"], r["caption_index"])
                  for split in data.values() for r in split.select_columns(["image_id", "caption", "caption_index"]))


# ---- imagefolder --------------------------------------------------------------------------------


def test_imagefolder_metadata_csv_groups_rows_of_one_image_and_carves_splits(tmp_path):
    root = imagefolder(tmp_path / "mine")
    data = load_image_caption_dataset(str(root), verify_images=True)
    assert set(data) == {"train", "validation", "test"}
    assert data.load_report.layout == "imagefolder"
    expected = sorted((f"images/{i:04d}.png", c, k) for i in range(8) for k, c in enumerate(captions(i)))
    assert all_pairs(data) == expected
    ids = {split: set(data[split]["image_id"]) for split in data}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])  # split by image
    assert ids["validation"] and ids["test"]
    row = data["train"][0]
    assert row["image"].size == (16, 16)
    images = load_image_caption_dataset(str(root), view="images", verify_images=False)
    first = images["train"][0]
    assert first["captions"] == captions(int(first["image_id"][7:11]))


def test_imagefolder_split_folders_and_jsonl_list_captions(tmp_path):
    root = tmp_path / "mine"
    for split, start in (("train", 0), ("val", 6), ("test", 8)):
        lines = []
        for i in range(start, start + (6 if split == "train" else 2)):
            write_image(root / split / "0.png" if i in (0, 6) else root / split / f"{i}.jpg", i)
            name = "0.png" if i in (0, 6) else f"{i}.jpg"
            lines.append(json.dumps({"file_name": name, "captions": captions(i, 3)}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    data = load_image_caption_dataset(str(root), view="images", verify_images=False)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    # ids are relative to the data set's root: train/0.png and val/0.png are two images
    assert "train/0.png" in data["train"]["image_id"] and "val/0.png" in data["validation"]["image_id"]
    assert data["validation"][0]["captions"] == captions(6, 3)
    pairs = load_image_caption_dataset(str(root), verify_images=False)["train"]
    rows = pairs.select_columns(["image_id", "caption_index"]).to_list()
    assert [r["caption_index"] for r in rows if r["image_id"] == "train/0.png"] == [0, 1, 2]


# ---- CSV / JSON tables --------------------------------------------------------------------------


def test_train_validation_test_files_with_named_columns(tmp_path):
    images = tmp_path / "pics"
    for i in range(8):
        write_image(images / f"p{i}.jpg", i)
    meta = tmp_path / "tables"
    meta.mkdir()
    header = ["id", "path", "description"]
    for name, rows in (("train.csv", range(0, 4)), ("val.csv", range(4, 6)), ("test.csv", range(6, 8))):
        write_csv(meta / name, header, [[f"row{i}", f"../pics/p{i}.jpg", c] for i in rows for c in captions(i, 1)])
    data = load_image_caption_dataset(str(meta), train_file="train.csv", validation_file="val.csv",
                                      test_file="test.csv", image_column="path", caption_column="description")
    assert [len(data[s]) for s in ("train", "validation", "test")] == [4, 2, 2]
    assert data["test"][0]["caption"] == captions(6, 1)[0] and data["test"][0]["image"].size == (16, 16)
    assert list(data["train"]["image_id"]) == [f"../pics/p{i}.jpg" for i in range(4)]  # relative to the tables


def test_a_json_file_as_source_with_list_captions(tmp_path):
    for i in range(8):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "data.json").write_text(json.dumps([{"image": f"{i}.png", "caption": captions(i)} for i in range(8)]))
    data = load_image_caption_dataset(str(tmp_path / "data.json"), view="images", verify_images=False)
    assert sum(len(d) for d in data.values()) == 8
    assert all(len(caps) == 2 for d in data.values() for caps in d["captions"])


def test_a_csv_cell_holding_a_json_list_is_several_captions(tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_csv(tmp_path / "t.csv", ["file_name", "text"], [["a.png", json.dumps(["one", "two"])]])
    data = load_image_caption_dataset(str(tmp_path / "t.csv"), verify_images=False)
    assert [(r["caption"], r["caption_index"]) for r in data["train"]] == [("one", 0), ("two", 1)]


def test_summary_command_takes_the_same_options(tmp_path, capsys):
    from data_scripts.summary import main

    root = imagefolder(tmp_path / "mine")
    assert main(["summary", str(root), "--caption_column", "text", "--image_column", "file_name"]) == 0
    assert "imagefolder" in capsys.readouterr().out
    assert main(["summary", str(root), "--caption_column", "caption_en"]) == 2
    assert "no column 'caption_en'" in capsys.readouterr().err


def test_missing_named_column_is_named_with_the_columns_found(tmp_path):
    root = imagefolder(tmp_path / "mine")
    with pytest.raises(DatasetFormatError, match=r"no column 'caption_en' \(caption_column\); columns found: "
                                                 r"\['file_name', 'text'\]"):
        load_image_caption_dataset(str(root), caption_column="caption_en")


def test_renamed_column_is_not_guessed_and_ambiguous_columns_are_refused(tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_csv(tmp_path / "renamed.csv", ["file_name", "alt_text"], [["a.png", "x"]])
    with pytest.raises(DatasetFormatError, match=r"renamed.csv: no caption column .*columns found: "
                                                 r"\['file_name', 'alt_text'\]. Name it with caption_column"):
        load_image_caption_dataset(str(tmp_path / "renamed.csv"))
    write_csv(tmp_path / "both.csv", ["file_name", "caption", "text"], [["a.png", "x", "y"]])
    with pytest.raises(DatasetFormatError, match=r"several columns could hold the caption: \['text', 'caption'\]"):
        load_image_caption_dataset(str(tmp_path / "both.csv"))


# ---- bad rows: named, and per on_bad_image raised or skipped with a count ------------------------


@pytest.fixture
def damaged(tmp_path):
    """An imagefolder with a missing file (line 4), an empty caption (line 5), a corrupt image, a row
    with too many cells (line 7)."""
    root = imagefolder(tmp_path / "mine", n=8)
    (root / "images" / "0003.png").write_bytes(b"not a png")
    rows = [[f"images/{i:04d}.png", c] for i in range(8) for c in captions(i)]
    rows.insert(2, ["images/gone.png", "a caption of nothing"])
    rows.insert(3, ["images/0001.png", "  "])
    rows.insert(5, ["images/0002.png", "one", "extra"])
    write_csv(root / "metadata.csv", ["file_name", "text"], rows)
    return root


@pytest.mark.parametrize("fragment", [
    r"metadata.csv, line 4: image 'images/gone.png' does not exist",
])
def test_bad_rows_raise_with_file_and_line(damaged, fragment):
    with pytest.raises(DatasetFormatError, match=fragment + r".*on_bad_image='skip'"):
        load_image_caption_dataset(str(damaged))


def test_bad_rows_are_skipped_counted_and_logged(damaged, caplog):
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        data = load_image_caption_dataset(str(damaged), on_bad_image="skip")
    skipped = [str(p) for p in data.load_report.skipped]
    assert len(skipped) == 4, skipped
    assert any("line 4: image 'images/gone.png' does not exist" in s for s in skipped)
    assert any("line 5: empty caption for image 'images/0001.png'" in s for s in skipped)
    assert any("line 7: 3 cells, but the header has 2 columns" in s for s in skipped)
    assert any("0003.png: cannot decode image" in s for s in skipped)
    assert "skipped 4 bad input(s)" in caplog.text
    ids = {i for d in data.values() for i in d["image_id"]}
    assert "images/0003.png" not in ids and len(ids) == 7  # the corrupt image goes, the other rows stay
    assert sum(len(d) for d in data.values()) == 14


@pytest.mark.parametrize("name, text, message", [
    ("t.csv", "file_name,text,source\na.png,a caption\na.png\n",  # a short row: told by what it lacks
     r"t.csv, line 3: empty caption for image 'a.png' in column 'text'"),
    ("t.csv", "image_path,caption\nnope.jpg,x\n", r"t.csv, line 2: image 'nope.jpg' does not exist"),
    ("t.jsonl", '{"file_name": "a.png", "text": "fine"}\n{"file_name": "a.png", "text"\n',
     r"t.jsonl, line 2: invalid JSON"),
])
def test_a_bad_row_of_a_table_is_named_by_file_and_line(tmp_path, name, text, message):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetFormatError, match=message):
        load_image_caption_dataset(str(tmp_path / name), verify_images=False)



def test_a_split_file_without_rows_is_refused_naming_the_file(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"p{i}.png", i)
    write_csv(tmp_path / "train.csv", ["file_name", "text"], [[f"p{i}.png", c] for i in range(4) for c in captions(i)])
    write_csv(tmp_path / "test.csv", ["file_name", "text"], [])
    with pytest.raises(DatasetFormatError, match=f"^the test split \\({tmp_path / 'test.csv'}\\) has no images left"):
        load_image_caption_dataset(str(tmp_path), train_file="train.csv", test_file="test.csv")
    # the same folder passed whole is read as data files by datasets; its failure names the folder, not "not a
    # local directory" as for a Hub id
    with pytest.raises(DatasetFormatError, match=f"^{tmp_path}: reading the folder's data files"):
        load_image_caption_dataset(str(tmp_path))

def test_an_unknown_directory_lists_every_layout_tried(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetFormatError, match=r"(?s)not a Flickr8k layout.*Nor is it an imagefolder"):
        load_image_caption_dataset(str(tmp_path))


# ---- Hub code paths, offline: save_to_disk and a repository-layout folder ---------------------


def _hub_rows(tmp_path: Path, n: int = 8) -> dict:
    paths = [str(write_image(tmp_path / "src" / f"{i}.png", i)) for i in range(n)]
    return {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths],
            "name": [f"{i}.png" for i in range(n)], "description": [captions(i) for i in range(n)]}


def test_save_to_disk_folder_with_named_columns(tmp_path):
    rows = _hub_rows(tmp_path)
    ds = Dataset.from_dict(rows).cast_column("image", ImageFeature())
    DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 8))}).save_to_disk(tmp_path / "saved")
    data = load_image_caption_dataset(str(tmp_path / "saved"), view="images", caption_column="description")
    assert [len(data[s]) for s in ("train", "validation", "test")] == [5, 1, 2]  # validation carved from train
    assert data["test"][0]["captions"] == captions(6)


def test_repository_layout_folder_with_configs_through_load_dataset(tmp_path):
    rows = _hub_rows(tmp_path)
    ds = Dataset.from_dict(rows).cast_column("image", ImageFeature())
    repo = tmp_path / "repo"
    (repo / "small").mkdir(parents=True)
    (repo / "big").mkdir()
    ds.select(range(4)).to_parquet(str(repo / "small" / "train-00000.parquet"))
    ds.to_parquet(str(repo / "big" / "train-00000.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n"
                                    "    path: small/*.parquet\n- config_name: big\n  data_files:\n"
                                    "  - split: train\n    path: big/*.parquet\n---\n")
    small = load_image_caption_dataset(str(repo), dataset_config_name="small", caption_column="description",
                                       image_column="image")
    big = load_image_caption_dataset(str(repo), dataset_config_name="big", caption_column="description")
    assert sum(len(d) for d in small.values()) == 4 * 2 and sum(len(d) for d in big.values()) == 8 * 2
    assert len({i for d in big.values() for i in d["image_id"]}) == 8  # two captions of each of 8 images
    with pytest.raises(DatasetFormatError, match=r"no column 'caption_en' \(caption_column\); columns found: "
                                                 r"\['image', 'name', 'description'\]"):
        load_image_caption_dataset(str(repo), dataset_config_name="small", caption_column="caption_en")
    # train_file / test_file that are no CSV/JSON tables are the folder's data_files, as for a Hub id
    files = load_image_caption_dataset(str(repo), train_file="big/*.parquet", test_file="small/*.parquet",
                                       caption_column="description", view="images")
    assert [len(files[s]) for s in ("train", "validation", "test")] == [7, 1, 4]


def test_shards_passed_to_the_map_style_loader_point_to_streaming(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"webdataset shards are read as a stream .*--streaming true"):
        load_image_caption_dataset(str(tmp_path / "shards" / "{000000..000009}.tar"))


@pytest.mark.parametrize("name, lines", [
    ("t.csv", [b"file_name,text", b"a.png,a plain caption", b"a.png,a caf\xe9 by the sea"]),
    ("t.jsonl", [b'{"file_name": "a.png", "text": "plain"}', b'{"file_name": "a.png", "text": "fine"}',
                 b'{"file_name": "a.png", "text": "caf\xe9"}']),
], ids=["csv", "jsonl"])
def test_caption_bytes_that_are_not_utf8_stop_the_load_naming_the_file_and_line(tmp_path, name, lines):
    """A Latin-1 'é' was decoded with replacement characters before: the run trained on 'caf\ufffd' silently."""
    write_image(tmp_path / "a.png", 0)
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetFormatError, match=rf"{name}, line 3: byte 0xe9 at column \d+ is not UTF-8; save the "
                                                 r"file as UTF-8"):
        load_image_caption_dataset(str(tmp_path / name), verify_images=False)


def test_a_tiny_image_is_kept_with_one_warning_naming_it_and_a_count(tmp_path, caplog):
    root = imagefolder(tmp_path / "mine", n=8)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "images" / "0002.png")
    Image.new("RGB", (40, 5), (0, 0, 255)).save(root / "images" / "0005.png")
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        data = load_image_caption_dataset(str(root))
    tiny = [record.getMessage() for record in caplog.records if "px (under 8 px on a side)" in record.getMessage()]
    assert len(tiny) == 2 and "0002.png is 1x1 px" in " ".join(tiny) and "0005.png is 40x5 px" in " ".join(tiny)
    assert "2 of 8 images are under 8 px on a side" in caplog.text
    assert len({i for d in data.values() for i in d["image_id"]}) == 8  # kept: a warning, not a skip
