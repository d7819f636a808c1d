"""A batch sampler whose batches never hold two captions of the same image.

In-batch contrastive losses treat every other row of a batch as a negative. With the pair view
and random batches, two captions of one image land in the same batch now and then and are
pushed apart as if unrelated. Passing ``image_ids`` to the loss masks that; this sampler
avoids it altogether, so every in-batch negative is a true negative.

Order: each image's pair indices are shuffled, then taken in rounds (round k holds the k-th
caption of every image, in a fresh random image order), so one image's captions are about a
round apart. Batches are filled greedily from that stream; a row whose image is already in the
current batch waits for the next batch. Everything is drawn from ``Random(f"{seed}:{epoch}")``,
so the batches are a function of (seed, epoch): call ``set_epoch`` each epoch to reshuffle.

With data-parallel training each process gets whole batches, so uniqueness holds per process;
across processes (when features are gathered) ``image_ids`` in the loss still guard.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch.utils.data import BatchSampler, Sampler


class UniqueImageBatchSampler(Sampler[list[int]]):
    """Batches of row indices with pairwise-distinct image ids. Use as ``DataLoader(batch_sampler=...)``.

    ``image_ids`` is the ``image_id`` of each row (a list, or a Dataset with that column).
    Batches are full except possibly the last (dropped with ``drop_last``); a batch can only be
    smaller if ``batch_size`` exceeds the number of distinct images left in the epoch.
    """

    def __init__(self, image_ids: Union[Sequence[str], Dataset], batch_size: int, *, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if isinstance(image_ids, Dataset):
            if "image_id" not in image_ids.column_names:
                raise ValueError(f"dataset has no 'image_id' column (has {image_ids.column_names})")
            image_ids = image_ids.with_format(None).select_columns(["image_id"]).to_dict()["image_id"]
        self.groups: dict[str, list[int]] = {}
        for index, image_id in enumerate(image_ids):
            self.groups.setdefault(image_id, []).append(index)
        self._image_of = {i: image_id for image_id, indices in self.groups.items() for i in indices}
        self.num_rows = len(image_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] = (-1, [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())

    def _batches(self) -> list[list[int]]:
        if self._cache[0] == self.epoch:
            return self._cache[1]
        rng = random.Random(f"{self.seed}:{self.epoch}")
        groups = [list(indices) for indices in self.groups.values()]
        for indices in groups:
            rng.shuffle(indices)
        stream: list[int] = []
        for k in range(max((len(g) for g in groups), default=0)):
            round_k = [g[k] for g in groups if len(g) > k]
            rng.shuffle(round_k)
            stream.extend(round_k)
        batches = self._fill(stream)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        self._cache = (self.epoch, batches)
        return batches

    def _fill(self, stream: list[int]) -> list[list[int]]:
        image_of = self._image_of
        queue = deque(stream)
        batches = []
        while queue:
            batch, seen, waiting = [], set(), []
            while queue and len(batch) < self.batch_size:
                index = queue.popleft()
                if image_of[index] in seen:
                    waiting.append(index)
                else:
                    batch.append(index)
                    seen.add(image_of[index])
            queue.extendleft(reversed(waiting))
            batches.append(batch)
        return batches


class ImageGroupBatchSampler(Sampler[list[int]]):
    """Batches of whole images: ``images_per_batch`` distinct images, each with all of its rows.

    The counterpart of :class:`UniqueImageBatchSampler` for multi-positive training: every caption
    of an image sits in the same batch, ``image_ids`` tell the loss they are all positives of the
    image, and a model fed cached image features embeds each image once (not once per caption).
    Image order is drawn from ``Random(f"{seed}:{epoch}")``; call ``set_epoch`` each epoch.

    Topic-aware batches (``topics``, ``topic_share``): in random batches of 128 of 6,000 images, few
    negatives resemble the positive, yet Recall@1 is lost to exactly those (another dog in the snow).
    With ``topics`` (image id -> topic, e.g. k-means clusters of caption embeddings,
    :func:`dualencoder.training.topics.image_topics`), a ``topic_share`` of each batch's images comes
    from a stream ordered by topic, so they share one or two topics; the rest are drawn at random, so
    the batch still holds easy negatives (TAS-Balanced, Hofstaetter et al. 2021, builds its batches
    from topic clusters the same way). Batch sizes, and each image's once-per-epoch, are as without.
    """

    def __init__(self, image_ids: Union[Sequence[str], Dataset], images_per_batch: int, *, seed: int = 0,
                 topics: Optional[Mapping[str, int]] = None, topic_share: float = 0.5):
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be positive, got {images_per_batch}")
        if not 0.0 <= topic_share <= 1.0:
            raise ValueError(f"topic_share is the share of each batch drawn by topic: between 0 and 1, got {topic_share}")
        if isinstance(image_ids, Dataset):
            image_ids = image_ids.with_format(None).select_columns(["image_id"]).to_dict()["image_id"]
        self.groups: dict[str, list[int]] = {}
        for index, image_id in enumerate(image_ids):
            self.groups.setdefault(image_id, []).append(index)
        if topics is not None:
            missing = [image_id for image_id in self.groups if image_id not in topics]
            if missing:
                raise ValueError(f"topics has no topic for {len(missing)} image(s), e.g. {missing[0]!r}")
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.topics, self.topic_share = topics, topic_share
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        images = list(self.groups)
        rng.shuffle(images)
        for batch in self._image_batches(images, rng):
            yield [index for image_id in batch for index in self.groups[image_id]]

    def __len__(self) -> int:
        return -(-len(self.groups) // self.images_per_batch)

    def _image_batches(self, images: list[str], rng: random.Random) -> list[list[str]]:
        size = self.images_per_batch
        if self.topics is None or self.topic_share == 0.0:
            return [images[start:start + size] for start in range(0, len(images), size)]
        sizes = [min(size, len(images) - start) for start in range(0, len(images), size)]
        by_topic = [round(self.topic_share * n) for n in sizes]
        pool, rest = images[:sum(by_topic)], iter(images[sum(by_topic):])
        order = sorted(set(self.topics[i] for i in pool))
        rng.shuffle(order)
        rank = {topic: r for r, topic in enumerate(order)}
        stream = iter(sorted(pool, key=lambda i: rank[self.topics[i]]))  # stable: shuffled within a topic
        return [[next(stream) for _ in range(t)] + [next(rest) for _ in range(n - t)] for n, t in zip(sizes, by_topic)]


class SeededBatchSampler(BatchSampler):
    """Random batches that are a function of (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed, self.epoch = num_rows, batch_size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for start in range(0, self.num_rows, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def __len__(self):
        return math.ceil(self.num_rows / self.batch_size)
