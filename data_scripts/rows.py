"""A torch map-style view of chosen rows of an HF dataset, with a batch transform applied on access.

`Dataset.with_transform` / `select` fingerprint their arguments by pickling them, transform
included; a transform that holds feature caches (hundreds of MB for Flickr8k's prefix caches)
then costs about a minute per call, i.e. per epoch. `TransformedRows` reads the rows a batch
needs as one Arrow slice (`dataset[indices]`) and applies the transform to that batch, which is
what `with_transform` does, without the fingerprinting.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch.utils.data import Dataset as TorchDataset


class TransformedRows(TorchDataset):
    """Rows `indices` (default: all) of `dataset`; item k is row `indices[k]` after `transform`."""

    def __init__(self, dataset, transform: Callable[[dict], dict], indices: Optional[Sequence[int]] = None):
        self.dataset = dataset
        self.transform = transform
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def column(self, name: str) -> list:
        """One raw column of the chosen rows, in order (e.g. `image_id` for a sampler)."""
        values = list(self.dataset[name])
        return [values[i] for i in self.indices]

    def __getitems__(self, positions: list[int]) -> list[dict]:
        batch = self.transform(self.dataset[[self.indices[p] for p in positions]])
        keys = list(batch)
        return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]
