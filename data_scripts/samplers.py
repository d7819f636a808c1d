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

import random
from collections import deque
from typing import Iterator, Sequence, Union

from datasets import Dataset
from torch.utils.data import Sampler


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
    """

    def __init__(self, image_ids: Union[Sequence[str], Dataset], images_per_batch: int, *, seed: int = 0):
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be positive, got {images_per_batch}")
        if isinstance(image_ids, Dataset):
            image_ids = image_ids.with_format(None).select_columns(["image_id"]).to_dict()["image_id"]
        self.groups: dict[str, list[int]] = {}
        for index, image_id in enumerate(image_ids):
            self.groups.setdefault(image_id, []).append(index)
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        groups = list(self.groups.values())
        random.Random(f"{self.seed}:{self.epoch}").shuffle(groups)
        for start in range(0, len(groups), self.images_per_batch):
            yield [index for group in groups[start:start + self.images_per_batch] for index in group]

    def __len__(self) -> int:
        return -(-len(self.groups) // self.images_per_batch)
