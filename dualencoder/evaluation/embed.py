"""Embed the images and captions of an image-view split, in batches, for retrieval evaluation.

One function serves training (validation every epoch, test at the end), the evaluation command
and the notebook, so every number in the project comes from the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

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


def _batches(items, batch_size):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


@torch.no_grad()
def embed_split(model, images_view, image_transform, tokenizer, *, max_length: int = 64, batch_size: int = 64,
                device: Optional[torch.device] = None, vision_cache: Optional[dict] = None,
                show_progress: bool = True, autocast_dtype: Optional[torch.dtype] = None) -> EmbeddedSplit:
    """Embed every image and every caption of `images_view` (columns `image`, `image_id`, `captions`).

    `image_transform` turns one image into `[3, H, W]` pixels (e.g. `data_scripts.ImageTransform`
    with `train=False`); `vision_cache` maps image id -> pooled backbone features and, when given,
    replaces the vision backbone (frozen-tower cache).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    meta = images_view.select_columns(["image_id", "captions"]).to_dict()
    image_ids, captions_per_image = meta["image_id"], meta["captions"]
    captions = [c for caps in captions_per_image for c in caps]
    text_to_image = torch.tensor([i for i, caps in enumerate(captions_per_image) for _ in caps], dtype=torch.long)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    image_chunks = []
    indices = list(range(len(image_ids)))
    for chunk in tqdm(list(_batches(indices, batch_size)), desc="embed images", disable=not show_progress, leave=False):
        with autocast:
            if vision_cache is not None:
                pooled = torch.stack([vision_cache[image_ids[i]] for i in chunk]).to(device)
                embeds = model.get_image_features(vision_pooled=pooled)
            else:
                rows = images_view.select(chunk)["image"]
                pixels = torch.stack([image_transform.pixels(image) for image in rows]).to(device)
                embeds = model.get_image_features(pixels)
        image_chunks.append(embeds.float().cpu())

    text_chunks = []
    for chunk in tqdm(list(_batches(captions, batch_size)), desc="embed captions", disable=not show_progress, leave=False):
        tokens = tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        with autocast:
            embeds = model.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        text_chunks.append(embeds.float().cpu())
    model.train(was_training)
    return EmbeddedSplit(torch.cat(image_chunks), torch.cat(text_chunks), text_to_image, image_ids, captions)
