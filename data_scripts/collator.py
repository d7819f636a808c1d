"""Batching rows into model inputs: stacked pixels, dynamically padded tokens, image ids.

Padding happens per batch ("longest"), not to ``max_length``: Flickr8k captions average about
12 words, so padding every caption to the maximum would mostly feed pad tokens to the text tower.

``image_ids`` turns each ``image_id`` string into a stable 63-bit number (a hash of the string), so rows
holding two captions of one image get the same integer in every batch and on every process. Losses use it
to treat such rows as positives of each other instead of as (false) negatives, across processes too: under
several processes the global batch can hold one image's captions on two processes, and Accelerate's
`even_batches` pads a short last step with the epoch's first rows, so a pair may meet its own copy.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

CACHED_FEATURE_COLUMNS = ("vision_pooled", "text_pooled", "vision_hidden")


class ContrastiveCollator:
    """``collate_fn`` for a DataLoader over pair-view rows (after the image transform).

    Each row may hold ``pixel_values`` ([3, H, W] tensor), ``caption`` (str), ``image_id`` (str) and
    pre-computed ``vision_pooled`` / ``text_pooled`` features; the batch holds whichever of
    ``pixel_values`` [B, 3, H, W], ``input_ids`` / ``attention_mask`` [B, T], ``image_ids`` [B]
    (LongTensor), ``vision_pooled`` / ``text_pooled`` [B, D], ``vision_hidden`` (a cached vision
    prefix, any shape) and ``text_hidden`` (a cached text prefix ``[L_i, D]`` per row, padded here to
    ``[B, T, D]`` with its ``text_hidden_mask``) the rows provide. Rows without
    captions (an image-view batch for embedding images) give no token tensors.
    """

    def __init__(self, tokenizer: Any, max_length: int = 64, pad_to_multiple_of: Optional[int] = None):
        if getattr(tokenizer, "pad_token", "") is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no pad token, which dynamic padding needs: "
                "set tokenizer.pad_token (e.g. to tokenizer.eos_token) first"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, torch.Tensor] = {}
        if _present(rows, "pixel_values"):
            batch["pixel_values"] = torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows])
        elif "image" in rows[0]:
            raise ValueError(
                "rows carry a raw 'image' but no 'pixel_values': apply the image transform first, "
                "e.g. dataset.with_transform(ImageTransform(image_processor, train=True))"
            )
        if _present(rows, "caption"):
            tokens = self.tokenizer(
                [r["caption"] for r in rows],
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        if _present(rows, "image_id"):
            batch["image_ids"] = image_ids_to_tensor([r["image_id"] for r in rows])
        for column in CACHED_FEATURE_COLUMNS:
            if _present(rows, column):
                batch[column] = torch.stack([torch.as_tensor(r[column], dtype=torch.float32) for r in rows])
        if _present(rows, "text_hidden"):
            batch["text_hidden"], batch["text_hidden_mask"] = pad_token_states([r["text_hidden"] for r in rows])
        return batch


def pad_token_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.LongTensor]:
    """Per-caption token states ``[L_i, D]`` (a cached text prefix, stored unpadded) -> float32
    ``[B, max L_i, D]`` and the attention mask ``[B, max L_i]`` that marks the real tokens."""
    lengths = torch.tensor([len(s) for s in states])
    hidden = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(s, dtype=torch.float32) for s in states], batch_first=True)
    return hidden, (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).long()


def image_ids_to_tensor(image_ids: list[str]) -> torch.LongTensor:
    """Equal strings -> equal integers, the same in every batch and process (not Python's `hash`, which is salted
    per process); two distinct strings of a batch collide with odds of about B^2 / 2^64."""
    return torch.tensor([_stable_number(i) for i in image_ids], dtype=torch.long)


def _stable_number(image_id) -> int:
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _present(rows: list[dict], key: str) -> bool:
    """True when every row has ``key``; a column present in only some rows is an error."""
    count = sum(key in r for r in rows)
    if 0 < count < len(rows):
        missing = next(i for i, r in enumerate(rows) if key not in r)
        raise ValueError(f"column '{key}' is in some rows of the batch but not in row {missing}")
    return count == len(rows)
