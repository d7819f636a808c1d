"""Streaming image-caption data, for training sets that do not fit in memory or on local disk.

Two sources, one contract: a torch ``IterableDataset`` yielding the pair-view rows of
doc/ARCHITECTURE.md (``image``, ``image_id``, ``caption``, ``caption_index``; ``image`` is an
undecoded ``{"bytes", "path"}`` dict, which :class:`~data_scripts.preprocessing.ImageTransform`
decodes), or those rows after a ``transform``, so the map-style path's transform and collator apply
unchanged.

* :class:`WebDatasetStream`: webdataset shards (``.tar`` of ``KEY.jpg`` + ``KEY.txt`` / ``KEY.json``,
  what img2dataset writes), named by a glob or brace pattern (``shards/{000000..000009}.tar``). Read
  with the standard library's ``tarfile`` in stream mode: no dependency, and nothing but the shard
  being read is held.
* :class:`HubStream`: ``datasets.load_dataset(..., streaming=True)`` (a Hub id, or a local folder of
  parquet/csv/jsonl files), shards split by ``datasets.distributed.split_dataset_by_node`` across
  processes and by datasets itself across DataLoader workers.

Every sample is seen exactly once per epoch under N processes x W loader workers: the shard list is
put in a seeded order per (seed, epoch), process ``rank`` takes every ``world_size``-th shard of it
and loader worker ``w`` every W-th of those. All captions of one image are consecutive rows (an
image's json may hold a list of captions), so they share its ``image_id`` as positives of one
another. There is no shuffle buffer: make shards in random order (img2dataset does).

The position is resumable: each row carries ``stream_position`` = (loader worker, number of loader
workers, shards this worker has done, rows read into its current shard); :meth:`collate` moves the last row's into the batch, the training loop hands it
to :meth:`update`, and :meth:`state_dict` / :meth:`load_state_dict` save and restore it. A resumed
webdataset stream skips finished shards without opening them and re-reads the current one up to the
position (tar in stream mode cannot seek); a Hub stream cannot seek at all and re-reads its rows up
to the position (logged).

The training loop (one stream per process; not passed through ``accelerator.prepare``, whose own
sharding of iterable data sets would split the data a second time; no ``persistent_workers``, which
would keep epoch 0's shard order; an augmenting transform should draw its crops per (seed, epoch,
image) through ``crop_draw=RandomFeatureCrop(...)``, as the map-style path does, for an exact resume)::

    stream = build_stream(args.dataset, rank=accelerator.process_index, world_size=accelerator.num_processes,
                          seed=args.seed, transform=ImageTransform(image_processor, train=True))
    if resuming: stream.load_state_dict(saved["stream"])
    for epoch in range(start_epoch, epochs):
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=B, num_workers=W, collate_fn=stream.collate(collator))
        for batch in loader:
            stream.update(batch.pop("stream_position"))
            ...  # batch = send_to_device(batch, accelerator.device); step
            saved["stream"] = stream.state_dict()

Ranks may get different numbers of batches (shards differ in size): the loop must end an epoch for
all ranks when the first runs out (e.g. an all-reduced "done" flag), or DDP waits for ever.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import io
import json
import logging
import os
import random
import re
import tarfile
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

from .hub import ID_COLUMNS, IMAGE_COLUMNS, LIST_CAPTION_COLUMNS, TEXT_CAPTION_COLUMNS
from .images import check_image_bytes
from .report import LoadReport, Problem, ProblemSink
from .sources import caption_list, pick_column

logger = logging.getLogger("data_scripts")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
POSITION = "stream_position"


def expand_shards(pattern: str) -> list[str]:
    """Shard paths of a brace pattern (``{000000..000009}``, ``{a,b}``) and/or glob, sorted; error if none."""
    paths = sorted({p for expanded in _braces(pattern) for p in (glob.glob(expanded) or [expanded])
                    if os.path.isfile(p)})
    if not paths:
        raise FileNotFoundError(f"{pattern}: no shard file matches (brace ranges such as {{000000..000009}} "
                                "and globs such as shards/*.tar are expanded)")
    return paths


def _braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [p for choice in choices for p in _braces(head + choice + tail)]


class _Stream(IterableDataset):
    """The shared mechanics: which units (shards) this process and worker read, in which order, from where.

    A subclass gives ``_units()`` (every unit, e.g. all shard paths) and ``_rows(unit, sink)`` (its rows).
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1, seed: int = 42, epoch: int = 0,
                 transform: Optional[Callable[[dict], dict]] = None, on_bad_image: str = "error",
                 verify_images: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        ProblemSink(on_bad_image, LoadReport("", ""))  # checks the choice now, not in a worker
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.transform, self.on_bad_image, self.verify_images = transform, on_bad_image, verify_images
        self.positions: dict[int, tuple[int, int]] = {}  # worker -> (units done, rows into the next)
        self.num_workers: Optional[int] = None

    # ---- what the training loop calls ----
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (its own seeded shard order); a position saved in another epoch is dropped."""
        if epoch != self.epoch:
            self.epoch, self.positions = epoch, {}

    def collate(self, collator: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
        """``collator`` wrapped so the batch also holds ``stream_position`` (pass it to :meth:`update`)."""
        return _PositionCollator(collator)

    def update(self, position: tuple[int, int, int, int]) -> None:
        """Record that the rows up to ``position`` (from a batch's ``stream_position``) were consumed."""
        worker, workers, done, rows = (int(v) for v in position)
        self.num_workers = workers
        self.positions[worker] = (done, rows)

    def sources(self) -> list[str]:
        """Every unit this stream reads (shard paths, or the source's name), for a run's resume fingerprint."""
        return [str(unit) for unit in self._units()]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "positions": {str(w): list(p) for w, p in self.positions.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; it must come from the same rank, world size and seed (and, checked when
        iterating, the same number of loader workers), since those decide which shards are whose."""
        for key in ("rank", "world_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved stream position is for {key}={state[key]}, this stream has "
                                 f"{key}={getattr(self, key)}: resume with the same processes and seed")
        self.epoch, self.num_workers = state["epoch"], state["num_workers"]
        self.positions = {int(w): (int(p[0]), int(p[1])) for w, p in state["positions"].items()}

    # ---- iteration ----
    def shards_for(self, worker: int, num_workers: int) -> list:
        """The units worker ``worker`` of ``num_workers`` in this process reads this epoch, in order."""
        units = list(self._units())
        random.Random(f"{self.seed}:{self.epoch}").shuffle(units)
        return units[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.positions and self.num_workers not in (None, num_workers):
            raise ValueError(f"the saved stream position is for {self.num_workers} loader workers, this loader has "
                             f"{num_workers}: resume with the same dataloader_num_workers")
        done, skip = self.positions.get(worker, (0, 0))
        report = LoadReport(source=type(self).__name__, layout="stream")
        sink = _LoggingSink(self.on_bad_image, report)
        for index, unit in enumerate(self.shards_for(worker, num_workers)):
            if index < done:
                continue
            seen, skip, skipped = 0, (skip if index == done else 0), len(report.skipped)
            if skip:
                self._note_resume(unit, skip)
            for row in self._rows(unit, sink):
                seen += 1
                if seen <= skip:
                    continue
                row = self._transformed(row, unit, sink)
                if row is not None:
                    row[POSITION] = (worker, num_workers, index, seen)
                    yield row
            if len(report.skipped) > skipped:
                logger.warning("%s: skipped %d bad sample(s) (%d in this loader worker so far), each logged above",
                               unit, len(report.skipped) - skipped, len(report.skipped))

    def _transformed(self, row: dict, unit, sink: ProblemSink) -> Optional[dict]:
        if self.transform is None:
            return row
        try:
            out = self.transform({key: [value] for key, value in row.items()})
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for bytes that are no image
            sink(Problem(str(unit), f"sample '{row['image_id']}': cannot decode image ({type(exc).__name__}: {exc})",
                         hint="Replace or remove the sample"))
            return None
        return {key: values[0] for key, values in out.items()}

    def _note_resume(self, unit, rows: int) -> None:
        logger.info("%s: resuming %d rows into it; this source cannot seek, so they are read again and dropped",
                    unit, rows)

    def _units(self) -> list:
        raise NotImplementedError

    def _rows(self, unit, sink: ProblemSink) -> Iterator[dict]:
        raise NotImplementedError


class _LoggingSink(ProblemSink):
    """The ``on_bad_image`` policy, logging each skipped sample as it goes (a stream has no report at its end)."""

    def __call__(self, problem: Problem) -> None:
        super().__call__(problem)
        logger.warning("skipped: %s", problem)


class _PositionCollator:
    """A collator that also returns the last row's ``stream_position`` (a class, so workers can pickle it)."""

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collator([{k: v for k, v in row.items() if k != POSITION} for row in rows])
        batch[POSITION] = rows[-1][POSITION]
        return batch


class WebDatasetStream(_Stream):
    """Pair-view rows from webdataset shards: ``KEY.jpg`` (or png, webp...) + ``KEY.txt`` and/or ``KEY.json``.

    A json's ``captions`` (a list), ``caption`` or ``text`` field wins over the txt; each caption is one
    row, with ``image_id`` = the json's ``image_id`` when it has one (as :func:`write_shards` writes),
    else the sample's key (webdataset's ``__key__``, unique across shards as img2dataset writes them),
    and ``caption_index`` 0, 1, ... Bad samples (a jpg without caption, a
    caption without image, undecodable image bytes, a corrupt or truncated tar) are named by shard and
    member and raised or skipped with a count per ``on_bad_image``; the rest of a corrupt shard is
    unreadable and skipped. Without a ``transform``, ``verify_images`` decodes each image (at 1/8 size
    for JPEG) to catch bad ones; with one, the transform's decode does it.
    """

    def __init__(self, shards: list[str], **options):
        super().__init__(**options)
        if not shards:
            raise ValueError("no shards given")
        self.shards = list(shards)

    def _units(self) -> list[str]:
        return self.shards

    def _note_resume(self, unit, rows: int) -> None:
        logger.info("%s: resuming %d rows into this shard; tar in stream mode cannot seek, so the shard is read "
                    "again from its start up to there (earlier shards are not opened)", unit, rows)

    def _rows(self, shard: str, sink: ProblemSink) -> Iterator[dict]:
        for key, members in _tar_samples(shard, sink):
            yield from self._sample_rows(shard, key, members, sink)

    def _sample_rows(self, shard: str, key: str, members: dict[str, bytes], sink: ProblemSink) -> Iterator[dict]:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None:
            sink(Problem(shard, f"sample '{key}' has {', '.join(key + '.' + e for e in members)} but no image "
                         f"({'/'.join(IMAGE_EXTENSIONS)})", hint="Add the image or remove the sample's members"))
            return
        found = _member_captions(shard, key, members, sink)
        if found is None:
            return
        captions, image_id = found
        if not captions:
            sink(Problem(shard, f"member '{key}.{image_ext}' has no caption (no non-empty {key}.txt, nor a "
                         f"captions/caption/text field in {key}.json)", hint="Add its caption or remove the image"))
            return
        data = members[image_ext]
        if self.transform is None and self.verify_images:
            error = check_image_bytes(data)
            if error is not None:
                sink(Problem(shard, f"member '{key}.{image_ext}': {error}", hint="Replace or remove the sample"))
                return
        image = {"bytes": data, "path": f"{key}.{image_ext}"}
        for index, caption in enumerate(captions):
            yield {"image": image, "image_id": image_id, "caption": caption, "caption_index": index}


def _tar_samples(shard: str, sink: ProblemSink) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each run of consecutive members sharing a key, in tar order."""
    key, members, last = None, {}, None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or base.startswith("."):
                    sink(Problem(shard, f"member '{member.name}' has no extension, so no sample key and type",
                                 hint="Name members KEY.jpg, KEY.txt, KEY.json"))
                    continue
                sample = f"{folder}/{stem}" if folder else stem
                if sample != key and members:  # a new key: the previous sample is complete
                    yield key, members
                    members = {}
                key = sample
                members[ext.lower()] = tar.extractfile(member).read()
                last = member.name
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"after member '{last}'" if last else "at its start"
        sink(Problem(shard, f"corrupt tar {where} ({type(exc).__name__}: {exc}); the rest of the shard is skipped"
                     + (f", including the incomplete sample '{key}'" if members else ""),
                     hint="Re-create or re-download the shard"))
        return
    if members:
        yield key, members
    if shard.endswith(".tar"):
        _check_tar_end(shard, end, last, sink)


def _check_tar_end(shard: str, end: int, last: Optional[str], sink: ProblemSink) -> None:
    """tarfile stops without a word at a damaged header after the first; only zero padding may follow the end."""
    with open(shard, "rb") as handle:
        handle.seek(end)
        while True:
            block = handle.read(1 << 16)
            if not block:
                return
            if block.count(0) != len(block):
                sink(Problem(shard, f"corrupt tar: unreadable member header after member '{last}' (byte {end}); "
                             f"{os.path.getsize(shard) - end} bytes of the shard are skipped",
                             hint="Re-create or re-download the shard"))
                return


def _member_captions(shard: str, key: str, members: dict[str, bytes],
                     sink: ProblemSink) -> Optional[tuple[list[str], str]]:
    """The sample's captions (json's list or string, else the txt) and image id (json's, else the key),
    or None after reporting a bad json."""
    captions: list[str] = []
    image_id = key
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            sink(Problem(shard, f"member '{key}.json': invalid JSON ({exc})", hint="Fix or remove the sample"))
            return None
        field = next((f for f in ("captions", "caption", "text") if isinstance(meta, dict) and meta.get(f)), None)
        captions = caption_list(meta[field]) if field else []
        image_id = str(meta.get("image_id") or key) if isinstance(meta, dict) else key
    if not captions and "txt" in members:
        captions = [members["txt"].decode("utf-8", errors="replace").strip()]
    if captions and not all(captions):
        sink(Problem(shard, f"sample '{key}': {captions.count('')} empty caption(s)", hint="Remove the empty entries"))
    return [c for c in captions if c], image_id


class HubStream(_Stream):
    """Pair-view rows from a ``datasets`` ``IterableDataset`` (``load_dataset(..., streaming=True)``).

    Processes split it with ``split_dataset_by_node`` (by shard when their number divides evenly, else
    each process reads all and keeps every ``world_size``-th example); DataLoader workers are given
    shards by datasets itself. The shard order is seeded per (seed, epoch) by ``shuffle`` +
    ``set_epoch``. This source cannot seek: a resumed stream re-reads its rows up to the position
    (images are not decoded while skipping) and logs it.
    """

    def __init__(self, dataset, *, name: str, image_column: Optional[str] = None,
                 caption_column: Optional[str] = None, base_dir: str = "", **options):
        super().__init__(**options)
        from datasets import Image

        columns = list(dataset.column_names or next(iter(dataset)).keys())
        self.image_column = pick_column(columns, image_column, tuple(dict.fromkeys(IMAGE_COLUMNS + (
            "file_name", "image_path", "filepath"))), "image", name)
        self.caption_column = pick_column(columns, caption_column, tuple(dict.fromkeys(  # txt: webdataset repos
            TEXT_CAPTION_COLUMNS + LIST_CAPTION_COLUMNS + ("txt",))), "caption", name)
        self.id_column = next((c for c in ID_COLUMNS if c in columns and c != self.image_column), None)
        if isinstance((dataset.features or {}).get(self.image_column), Image):
            dataset = dataset.cast_column(self.image_column, Image(decode=False))
        self.dataset, self.name, self.base_dir = dataset, name, base_dir

    def _units(self) -> list[str]:
        return [self.name]

    def shards_for(self, worker: int, num_workers: int) -> list:
        return [self.name]  # one unit per worker: datasets hands each its shards

    def _rows(self, unit, sink: ProblemSink) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(shuffled_shards(self.dataset, self.seed), rank=self.rank,
                                        world_size=self.world_size)
        dataset.set_epoch(self.epoch)  # after the split, which returns a data set at epoch 0
        for example in dataset:
            image = _image_value(example[self.image_column], self.base_dir)
            image_id = self._image_id(example, image)
            captions = [c for c in caption_list(example[self.caption_column]) if c]
            if not captions or image is None:
                missing = "caption" if image is not None else "image"
                sink(Problem(self.name, f"sample '{image_id}': no {missing} in column "
                             f"'{self.caption_column if image is not None else self.image_column}'",
                             hint="Fill it in or remove the sample"))
                continue
            for index, caption in enumerate(captions):
                yield {"image": image, "image_id": image_id, "caption": caption, "caption_index": index}

    def _image_id(self, example: dict, image: Optional[dict]) -> str:
        if self.id_column is not None:
            return str(example[self.id_column])
        if image and image.get("path"):
            return os.path.basename(image["path"])
        data = (image or {}).get("bytes") or b""
        return hashlib.blake2b(data, digest_size=8).hexdigest()


def shuffled_shards(dataset, seed: int):
    """``dataset`` (a datasets ``IterableDataset``) with its shards in a seeded order, each read whole, in turn.

    ``shuffle(buffer_size=1)`` orders the shards. Since it gained ``max_buffer_input_shards`` (default 10),
    datasets also reads that many shards at once through a thread each, one row at a time, interleaving them,
    and sleeps 5 s (``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN``) at the end of every pass for the
    parquet readers' threads: on 400 Flickr8k rows in 8 parquet files a pass took 5.22 s, 0.05 s with one
    input shard (2026-12-04). One input shard at a time also keeps each shard's rows together, as webdataset
    shards are read, so a resumed position and the docs' "seeded shard order" mean the same for both sources.
    """
    if "max_buffer_input_shards" in inspect.signature(dataset.shuffle).parameters:
        return dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    return dataset.shuffle(seed=seed, buffer_size=1)  # older datasets: shard order only already


def _image_value(value: Any, base_dir: str) -> Optional[dict]:
    """An image cell as an undecoded ``{"bytes", "path"}`` dict (a path string is joined to ``base_dir``)."""
    if isinstance(value, str):
        return {"bytes": None, "path": os.path.join(base_dir, value)} if value else None
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return value
    if value is not None and hasattr(value, "save"):  # a decoded PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    return None


def load_shards(pattern: str, *, on_bad_image: str = "error", verify_images: bool = True):
    """Every pair-view row of a few shards as one map-style ``Dataset``: an evaluation split of a streamed run
    (retrieval ranks every image against every caption, so it needs them all at once). Bad samples are
    named and raised or skipped as in the stream."""
    from datasets import Dataset

    from .views import PAIR_FEATURES

    stream = WebDatasetStream(expand_shards(os.path.join(pattern, "*.tar") if os.path.isdir(pattern) else pattern),
                              on_bad_image=on_bad_image, verify_images=verify_images)
    rows = [{key: value for key, value in row.items() if key != POSITION} for row in stream]
    if not rows:
        raise ValueError(f"{pattern}: no sample in these shards")
    return Dataset.from_list(rows, features=PAIR_FEATURES)


def is_shard_pattern(source: str) -> bool:
    """True for a ``.tar`` path, glob or brace pattern (or a folder holding ``.tar`` shards)."""
    source = str(source)
    if os.path.isdir(source):
        return bool(glob.glob(os.path.join(source, "*.tar")))
    return bool(re.search(r"\.tar(\.gz)?$", source.split("::")[0]))


def build_stream(source: str, *, rank: int = 0, world_size: int = 1, seed: int = 42, epoch: int = 0,
                 transform: Optional[Callable[[dict], dict]] = None, on_bad_image: str = "error",
                 verify_images: bool = True, image_column: Optional[str] = None,
                 caption_column: Optional[str] = None, dataset_config_name: Optional[str] = None,
                 train_file: Optional[str] = None, split: str = "train",
                 cache_dir: Optional[str] = None) -> _Stream:
    """The training stream of ``source`` for process ``rank`` of ``world_size`` (see the module docstring).

    ``source``: webdataset shards (``shards/{000000..000009}.tar``, ``shards/*.tar``, or a folder of
    ``.tar`` files), else anything ``datasets.load_dataset(source, dataset_config_name, streaming=True)``
    reads: a Hub id, or a local folder of data files (``train_file`` becomes its ``data_files``).
    """
    options = dict(rank=rank, world_size=world_size, seed=seed, epoch=epoch, transform=transform,
                   on_bad_image=on_bad_image, verify_images=verify_images)
    source = str(source)
    if is_shard_pattern(source):
        pattern = os.path.join(source, "*.tar") if os.path.isdir(source) else source
        return WebDatasetStream(expand_shards(pattern), **options)
    import datasets

    data_files = {split: train_file} if train_file else None
    dataset = datasets.load_dataset(source, dataset_config_name, split=split, streaming=True,
                                    data_files=data_files, cache_dir=cache_dir)
    return HubStream(dataset, name=source, image_column=image_column, caption_column=caption_column,
                     base_dir=source if os.path.isdir(source) else "", **options)
