"""Embed the images and captions of an image-view split, in batches, for retrieval evaluation.

One function serves training (validation every epoch, test at the end), the evaluation command
and the notebook, so every number in the project comes from the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from data_scripts.collator import pad_token_states
from dualencoder.metrics import retrieval_metrics


@dataclass
class EmbeddedSplit:
    """Embeddings of one split: `text_to_image[j]` is the row in `image_embeds` of caption j's image."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    text_to_image: torch.Tensor
    image_ids: list
    captions: list

    def metrics(self, chunk_size: int = 1024) -> dict:
        return retrieval_metrics(self.image_embeds, self.text_embeds, self.text_to_image, chunk_size=chunk_size)


def split_captions(images_view) -> tuple[list, list, torch.Tensor]:
    """(image ids, every caption flattened, text_to_image) of an image-view split."""
    meta = images_view.select_columns(["image_id", "captions"]).to_dict()
    captions = [c for caps in meta["captions"] for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(meta["captions"]) for _ in caps], dtype=torch.long)
    return meta["image_id"], captions, text_to_image


@torch.no_grad()
def pooled_image_features(model, images_view, image_transform, *, batch_size: int, device, desc="embed images",
                          show_progress=True, encode: Optional[Callable] = None, dtype=torch.float32) -> dict:
    """image id -> pooled vision backbone features (CPU, `dtype`), for every image of an image-view split.

    The one loop that runs the vision backbone over a split: evaluation projects these, the
    frozen-tower cache keeps them, the baselines fit on them. `encode` replaces
    `model.encode_vision` (e.g. `vision_prefix` at some depth, for the prefix cache).
    """
    encode = encode or model.encode_vision
    was_training = model.training
    model.eval()
    ids = images_view["image_id"]
    features = {}
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = images_view.select(range(start, min(start + batch_size, len(ids))))["image"]
        pixels = torch.stack([image_transform.pixels(image) for image in rows]).to(device)
        features.update(zip(ids[start:start + batch_size], encode(pixels).to(dtype).cpu()))
    model.train(was_training)
    return features


@torch.no_grad()
def pooled_from_prefix(model, hidden: dict, image_ids: list, depth: int, *, batch_size: int, device,
                       mirrored: Optional[dict] = None, desc: str = "embed images from the cached prefix",
                       show_progress: bool = False) -> dict:
    """image id -> pooled vision features, running only `vision_suffix` over cached prefix outputs.

    With `config.image_flip_average` the features are, as in `encode_vision`, the mean over the
    image and its mirror image, whose prefix `mirrored` holds.
    """
    was_training = model.training
    model.eval()

    def suffix(views: dict, label: str) -> torch.Tensor:
        return _project(lambda vision_hidden: model.vision_suffix(vision_hidden.float(), depth),
                        [views[i] for i in image_ids], batch_size, device, desc=label, show_progress=show_progress)

    if model.config.image_flip_average and mirrored is None:
        raise ValueError("config.image_flip_average needs the mirrored images' prefix (mirrored=...)")
    pooled = suffix(hidden, desc)
    if model.config.image_flip_average:
        pooled = (pooled + suffix(mirrored, f"{desc} (mirrored)")) / 2
    model.train(was_training)
    return dict(zip(image_ids, pooled))


@torch.no_grad()
def pooled_text_features(model, captions: list[str], tokenizer, *, max_length: int, batch_size: int, device,
                         desc="embed captions", show_progress=True, prefix_depth: Optional[int] = None,
                         dtype=torch.float32) -> dict:
    """caption -> pooled text backbone features (CPU, `dtype`); each distinct caption runs once.

    With `prefix_depth`, caption -> its token states after the text tower's first `prefix_depth`
    layers instead (`model.text_prefix`, trimmed to the caption's own tokens): the text prefix cache.
    Captions are batched by length, so a batch pads to about its own length rather than to the
    longest caption of a random draw.
    """
    was_training = model.training
    model.eval()
    unique = sorted(set(captions), key=lambda caption: (len(caption), caption))
    features = {}
    for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=not show_progress, leave=False):
        chunk = unique[start:start + batch_size]
        tokens = tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        if prefix_depth is None:
            features.update(zip(chunk, model.encode_text(input_ids, mask).to(dtype).cpu()))
        else:
            states = model.text_prefix(input_ids, mask, prefix_depth).to(dtype).cpu()
            features.update((c, h[:n].clone()) for c, h, n in zip(chunk, states, mask.sum(1).tolist()))
    model.train(was_training)
    return features


@torch.no_grad()
def pooled_from_text_prefix(model, hidden: dict, captions: list[str], depth: int, *, batch_size: int, device,
                            desc: str = "embed captions from the cached prefix", show_progress: bool = False) -> dict:
    """caption -> pooled text features, running only `text_suffix` over cached token states."""
    was_training = model.training
    model.eval()
    unique = sorted(set(captions), key=lambda caption: len(hidden[caption]))  # similar lengths pad little
    pooled = {}
    for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=not show_progress, leave=False):
        chunk = unique[start:start + batch_size]
        states, mask = pad_token_states([hidden[c] for c in chunk])
        pooled.update(zip(chunk, model.text_suffix(states.to(device), mask.to(device), depth).float().cpu()))
    model.train(was_training)
    return pooled


@torch.no_grad()
def embed_split(model, images_view, image_transform, tokenizer, *, max_length: int = 64, batch_size: int = 64,
                device: Optional[torch.device] = None, vision_cache: Optional[dict] = None,
                text_cache: Optional[dict] = None, show_progress: bool = True,
                autocast_dtype: Optional[torch.dtype] = None) -> EmbeddedSplit:
    """Embed every image and every caption of `images_view` (columns `image`, `image_id`, `captions`).

    `image_transform` turns one image into `[3, H, W]` pixels (e.g. `data_scripts.ImageTransform`
    with `train=False`); `vision_cache` maps image id -> pooled backbone features and, when given,
    replaces the vision backbone (frozen-tower cache); `text_cache` (caption -> pooled text
    features) likewise replaces the text backbone.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    image_ids, captions, text_to_image = split_captions(images_view)
    common = dict(batch_size=batch_size, device=device, show_progress=show_progress)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if vision_cache is None:
            vision_cache = pooled_image_features(model, images_view, image_transform, **common)
        if text_cache is None:
            text_cache = pooled_text_features(model, captions, tokenizer, max_length=max_length, **common)
        image_embeds = _project(model.project_image, [vision_cache[i] for i in image_ids], batch_size, device)
        text_embeds = _project(model.project_text, [text_cache[c] for c in captions], batch_size, device)
    model.train(was_training)
    return EmbeddedSplit(image_embeds, text_embeds, text_to_image, image_ids, captions)


def _project(get_features, pooled: list, batch_size: int, device, desc: Optional[str] = None,
             show_progress: bool = False) -> torch.Tensor:
    """Run `get_features` (a projection head, or a tower's top) over cached features in batches; float32 on CPU."""
    starts = tqdm(range(0, len(pooled), batch_size), desc=desc, disable=not show_progress, leave=False)
    chunks = [get_features(torch.stack(pooled[start:start + batch_size]).to(device)).float().cpu() for start in starts]
    return torch.cat(chunks)
