"""Streaming sources (data_scripts/streaming.py): webdataset shards and load_dataset(streaming=True) folders,
split across processes and loader workers so each sample is seen once per epoch, resumable, bad samples named."""

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from data_scripts import (ContrastiveCollator, DatasetFormatError, ImageTransform, load_image_caption_dataset,
                          write_shards)
from data_scripts.streaming import HubStream, WebDatasetStream, build_stream, expand_shards
from tests.test_data_sources import imagefolder


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 37 % 256, 80, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def captions_of(key: str) -> list[str]:
    return [f"shape {key} caption {k}" for k in range(1 + int(key[-1]) % 3)]  # 1 to 3 captions


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, i: int) -> list[tuple[str, bytes]]:
    """jpg + txt for one caption, jpg + json list for several (as img2dataset or a caption list)."""
    caps = captions_of(key)
    if len(caps) == 1:
        return [(f"{key}.png", png(i)), (f"{key}.txt", caps[0].encode())]
    return [(f"{key}.png", png(i)), (f"{key}.json", json.dumps({"captions": caps}).encode())]


def make_shards(folder: Path, n_shards: int = 6, per_shard: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        members = [m for i in range(per_shard) for m in sample_members(f"{s:03d}{i:03d}", s * per_shard + i)]
        paths.append(str(write_tar(folder / f"{s:06d}.tar", members)))
    return paths


def expected_pairs(n_shards: int = 6, per_shard: int = 3) -> Counter:
    keys = [f"{s:03d}{i:03d}" for s in range(n_shards) for i in range(per_shard)]
    return Counter((key, k) for key in keys for k in range(len(captions_of(key))))


def rows_to_batch(rows):
    return {"rows": rows}


def read_all(stream, workers: int = 0, batch_size: int = 2, stop_after: int = None):
    """(image_id, caption_index) of every row in loader order, and the stream after `update` per batch."""
    seen = []
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=stream.collate(rows_to_batch))
    for number, batch in enumerate(loader):
        if stop_after is not None and number == stop_after:
            break
        stream.update(batch.pop("stream_position"))
        seen += [(r["image_id"], r["caption_index"]) for r in batch["rows"]]
    return seen


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "shards")


def test_brace_and_glob_patterns_expand(shards, tmp_path):
    folder = tmp_path / "shards"
    assert expand_shards(str(folder / "{000000..000005}.tar")) == shards
    assert expand_shards(str(folder / "{000001,000003}.tar")) == [shards[1], shards[3]]
    assert expand_shards(str(folder / "*.tar")) == shards
    with pytest.raises(FileNotFoundError, match=r"no shard file matches"):
        expand_shards(str(folder / "{000007..000009}.tar"))


def test_rows_follow_the_pair_view_contract_with_captions_of_one_image_together(shards):
    rows = list(WebDatasetStream(shards))
    assert Counter((r["image_id"], r["caption_index"]) for r in rows) == expected_pairs()
    assert set(rows[0]) == {"image", "image_id", "caption", "caption_index", "stream_position"}
    assert Image.open(io.BytesIO(rows[0]["image"]["bytes"])).size == (16, 16)
    order = [r["image_id"] for r in rows]
    for key in set(order):  # one image's rows are consecutive, caption_index 0, 1, ...
        where = [i for i, k in enumerate(order) if k == key]
        assert where == list(range(where[0], where[0] + len(where)))
        assert [rows[i]["caption"] for i in where] == captions_of(key)


def test_shards_written_from_a_loaded_set_stream_the_same_rows(tmp_path):
    """The map-style pair view and the stream of its shards hold the same (image_id, caption, caption_index)
    rows and the same image bytes, so either feeds the same transform and collator."""
    pairs = load_image_caption_dataset(str(imagefolder(tmp_path / "mine")), verify_images=False)["train"]
    paths = write_shards(pairs, tmp_path / "shards", images_per_shard=2)
    assert len(paths) == (len(set(pairs["image_id"])) + 1) // 2
    streamed = list(build_stream(str(tmp_path / "shards" / "*.tar"), verify_images=False))
    key = lambda r: (r["image_id"], r["caption_index"])  # noqa: E731
    mapped = sorted(pairs.cast_column("image", ImageFeature(decode=False)), key=key)
    assert [(r["image_id"], r["caption"], r["caption_index"]) for r in sorted(streamed, key=key)] == \
        [(r["image_id"], r["caption"], r["caption_index"]) for r in mapped]
    assert streamed[0]["image"]["bytes"] == Path(next(r for r in mapped if r["image_id"] == streamed[0]["image_id"])
                                                 ["image"]["path"]).read_bytes()


def test_two_processes_with_two_workers_see_every_sample_exactly_once(shards):
    per_rank = [read_all(WebDatasetStream(shards, rank=rank, world_size=2, seed=3), workers=2) for rank in (0, 1)]
    assert Counter(per_rank[0] + per_rank[1]) == expected_pairs()
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])


def test_shard_order_is_seeded_per_epoch(shards):
    stream = WebDatasetStream(shards, seed=5)
    epoch0 = stream.shards_for(0, 1)
    assert WebDatasetStream(shards, seed=5).shards_for(0, 1) == epoch0  # same seed and epoch: same order
    stream.set_epoch(1)
    assert stream.shards_for(0, 1) != epoch0 and sorted(stream.shards_for(0, 1)) == sorted(shards)


def test_resume_continues_exactly_where_a_single_worker_stream_was(shards, caplog):
    full = read_all(WebDatasetStream(shards, seed=1))
    first = WebDatasetStream(shards, seed=1)
    head = read_all(first, stop_after=4)
    state = json.loads(json.dumps(first.state_dict()))  # it survives a JSON checkpoint
    assert state["positions"]["0"] == [1, 2]  # 8 rows: the first shard's 6 done, 2 into the second
    resumed = WebDatasetStream(shards, seed=1)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.INFO, logger="data_scripts"):
        assert head + read_all(resumed) == full
    assert "cannot seek, so the shard is read again from its start" in caplog.text


def test_resume_with_two_workers_sees_every_sample_once(shards):
    first = WebDatasetStream(shards, seed=1)
    head = read_all(first, workers=2, stop_after=3)
    resumed = WebDatasetStream(shards, seed=1)
    resumed.load_state_dict(first.state_dict())
    tail = read_all(resumed, workers=2)
    assert Counter(head + tail) == expected_pairs()
    with pytest.raises(ValueError, match="saved stream position is for 2 loader workers, this loader has 1"):
        other = WebDatasetStream(shards, seed=1)
        other.load_state_dict(first.state_dict())
        list(other)


def test_resume_refuses_another_world_size(shards):
    state = WebDatasetStream(shards, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2, this stream has world_size=1"):
        WebDatasetStream(shards).load_state_dict(state)


def test_transform_and_collator_of_the_map_style_path_apply(shards):
    from transformers import ViTImageProcessor

    from benchmarks.common import load_tokenizer

    transform = ImageTransform(ViTImageProcessor(size={"height": 16, "width": 16}), train=True)
    stream = WebDatasetStream(shards, transform=transform)
    collator = stream.collate(ContrastiveCollator(load_tokenizer(["shape caption"]), max_length=16))
    batch = next(iter(DataLoader(stream, batch_size=4, collate_fn=collator)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["input_ids"].shape[0] == 4 and batch["image_ids"].shape == (4,)
    assert batch["stream_position"] == (0, 1, 0, 4)


# ---- bad samples ------------------------------------------------------------------------------


@pytest.fixture
def bad_shards(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = [m for i in range(2) for m in sample_members(f"a{i:03d}", i)]
    no_caption = write_tar(folder / "0.tar", good[:2] + [("b000.png", png(9))] + good[2:])
    no_image = write_tar(folder / "1.tar", [("c000.txt", b"a caption of nothing")] + good)
    bad_image = write_tar(folder / "2.tar", [("d000.png", b"not an image"), ("d000.txt", b"x")] + good)
    truncated = folder / "3.tar"
    data = write_tar(folder / "whole.tar", good + [("e000.png", png(3) * 40), ("e000.txt", b"y")]).read_bytes()
    truncated.write_bytes(data[:data.index(b"e000.png") + 512 + 100])  # cut inside e000.png's data
    header = folder / "4.tar"
    data = bytearray(write_tar(header, good + [("f000.png", png(4)), ("f000.txt", b"z")]).read_bytes())
    offset = data.index(b"f000.png")
    data[offset + 148:offset + 156] = b"9999999\0"  # a wrong checksum in that member's header
    header.write_bytes(bytes(data))
    return {"no caption": (no_caption, r"member 'b000.png' has no caption"),
            "no image": (no_image, r"sample 'c000' has c000.txt but no image"),
            "bad image": (bad_image, r"member 'd000.png': cannot decode image"),
            "truncated": (truncated, r"corrupt tar after member '.*' \(ReadError"),
            "bad header": (header, r"corrupt tar: unreadable member header after member 'a001.json'")}


@pytest.mark.parametrize("case", ["no caption", "no image", "bad image", "truncated", "bad header"])
def test_a_bad_sample_is_named_by_shard_and_member(bad_shards, case):
    shard, message = bad_shards[case]
    with pytest.raises(DatasetFormatError, match=rf"{shard.name}: {message}.*on_bad_image='skip'"):
        list(WebDatasetStream([str(shard)]))


def test_bad_samples_are_skipped_with_a_count_and_the_good_ones_kept(bad_shards, caplog):
    shards = [str(shard) for shard, _ in bad_shards.values()]
    with caplog.at_level(logging.WARNING, logger="data_scripts"):
        rows = list(WebDatasetStream(shards, on_bad_image="skip"))
    ids = Counter(r["image_id"] for r in rows)
    assert not {"b000", "c000", "d000", "e000", "f000"} & set(ids)
    assert ids["a000"] == 5 and ids["a001"] == 10  # the good samples of all 5 shards (1 and 2 captions)
    for shard, message in bad_shards.values():
        assert f"{shard}: skipped 1 bad sample(s)" in caplog.text
        assert f"skipped: {shard}: " in caplog.text  # and the sample itself, named
    assert "skipped 5 bad sample(s)" not in caplog.text  # counted per shard, and running per worker
    assert "(5 in this loader worker so far)" in caplog.text


# ---- load_dataset(streaming=True) ---------------------------------------------------------------


def write_parquet_repo(root: Path, images: int = 12, files: int = 4) -> list[str]:
    """A repository-layout folder of `files` parquet files (image bytes, image_id, a list of 1 to 3 captions);
    returns the image ids, file after file."""
    keys = [f"img{i:02d}" for i in range(images)]
    table = {"image": [{"bytes": png(i), "path": None} for i in range(images)], "image_id": keys,
             "text": [captions_of(key[-1]) for key in keys]}
    ds = Dataset.from_dict(table).cast_column("image", ImageFeature())
    folder = root / "data"
    folder.mkdir(parents=True)
    for s in range(files):
        ds.shard(files, s, contiguous=True).to_parquet(str(folder / f"train-{s:05d}-of-{files:05d}.parquet"))
    return keys


def test_streaming_load_dataset_folder_split_across_processes_and_workers(tmp_path):
    keys = write_parquet_repo(tmp_path / "repo")
    expected = Counter((key, k) for key in keys for k in range(len(captions_of(key[-1]))))
    streams = [build_stream(str(tmp_path / "repo"), rank=rank, world_size=2, seed=0) for rank in (0, 1)]
    assert isinstance(streams[0], HubStream) and streams[0].caption_column == "text"
    per_rank = [read_all(stream, workers=2) for stream in streams]
    assert Counter(per_rank[0] + per_rank[1]) == expected and per_rank[0] and per_rank[1]

    first = build_stream(str(tmp_path / "repo"), seed=0)
    head = read_all(first, stop_after=3)
    resumed = build_stream(str(tmp_path / "repo"), seed=0)
    resumed.load_state_dict(first.state_dict())
    assert head + read_all(resumed) == read_all(build_stream(str(tmp_path / "repo"), seed=0))


def test_a_load_dataset_stream_reads_its_files_whole_one_after_another_in_a_seeded_order(tmp_path):
    """Every row once, each file's rows together and in the file's order (not interleaved across files, as
    datasets' shuffle does by default), the file order drawn per (seed, epoch); and no 5 s pause per pass."""
    import time

    keys = write_parquet_repo(tmp_path / "repo", images=16, files=4)
    files = [keys[f * 4:(f + 1) * 4] for f in range(4)]
    orders = []
    for epoch in range(3):
        stream = build_stream(str(tmp_path / "repo"), seed=0, epoch=epoch)
        started = time.perf_counter()
        ids = [row["image_id"] for row in stream]
        assert time.perf_counter() - started < 4  # datasets' interleaving reader sleeps 5 s at each pass's end
        images = list(dict.fromkeys(ids))  # an image's captions are consecutive rows
        assert len(ids) == sum(len(captions_of(key[-1])) for key in keys) and sorted(images) == keys
        runs = [images[f * 4:(f + 1) * 4] for f in range(4)]
        assert sorted(runs) == files  # whole files, each in its own row order
        orders.append([files.index(run) for run in runs])
    assert len({tuple(order) for order in orders}) > 1  # the file order changes with the epoch


def test_data_loading_benchmark_times_the_stream_beside_the_map_style_path(tmp_path):
    from benchmarks import data_loading
    from tests.test_data_flickr8k import make_official

    root = make_official(tmp_path / "flickr")
    result = data_loading.main(["--data", str(root), "--num_images", "8", "--batch_size", "4", "--workers", "0",
                                "--image_size", "16", "--streaming", "--shard_dir", str(tmp_path / "shards"),
                                "--images_per_shard", "3", "--out", str(tmp_path / "data.json")])
    assert [(row["input"], row["workers"]) for row in result["rows"]] == [
        ("map-style", 0), ("webdataset stream", 0), ("load_dataset stream (parquet)", 0)]
    assert all(row["images"] == 8 and row["batches"] == 2 and row["images_per_s"] > 0 for row in result["rows"])
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3  # and as many parquet files of the same images
    assert len(list((tmp_path / "shards" / "parquet").glob("*.parquet"))) == 3
