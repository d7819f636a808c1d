"""The frozen towers' token outputs of a split, computed once and cached (fp16), and batches of pairs from them.

The re-ranker reads what the dual encoder's towers output before pooling: the text tower's last hidden
states and the vision tower's last tokens (ViT: its tokens after the last block; a timm CNN: its last
block's feature map, flattened to height x width tokens). The towers never train here, so each image and
caption runs through them once: the re-ranker's training and re-ranking then only run the small model.

Both come from the towers' prefix entry points at full depth (`vision_prefix` / `text_prefix`), the same
code the training caches use, and are kept with `dualencoder.feature_store` (one file per split, keyed by
the model's weights and the split's images and captions). From the same token outputs the dual encoder's
own embeddings follow by running only the towers' tops (`pooled_from_prefix`, `pooled_from_text_prefix`)
and the heads, so the dual scores used for mining and model selection cost no extra tower pass (a second
one, over the mirror images, when the model averages an image with its mirror image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from backbones_dualencoder import tower_blocks
from data_scripts import ImageTransform, images_fingerprint
from data_scripts.collator import pad_token_states
from dualencoder.evaluation.embed import (EmbeddedSplit, embed_split, pooled_from_prefix, pooled_from_text_prefix,
                                          pooled_image_features, pooled_text_features, split_captions)
from dualencoder.feature_store import feature_file, load_or_compute, tower_fingerprint
from modeling_dualencoder import DualEncoderModel

TOKEN_DTYPE = torch.float16


@dataclass
class SplitTokens:
    """Token outputs of one split: image id -> the vision prefix at full depth; caption -> `[L, text_dim]`."""

    image_tokens: dict
    caption_tokens: dict

    def batch(self, image_ids: list, captions: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text states `[B, T, Dt]`, text mask `[B, T]`, vision tokens `[B, N, Dv]`) of B pairs, float32."""
        text, mask = pad_token_states([self.caption_tokens[c] for c in captions])
        vision = torch.stack([as_tokens(self.image_tokens[i]).float() for i in image_ids])
        return text, mask, vision

    @property
    def widths(self) -> dict:
        """The re-ranker config fields these tokens decide: text_dim, vision_dim, num_vision_tokens."""
        vision = as_tokens(next(iter(self.image_tokens.values())))
        text = next(iter(self.caption_tokens.values()))
        return {"text_dim": text.shape[-1], "vision_dim": vision.shape[-1], "num_vision_tokens": vision.shape[0]}


def as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """One image's vision prefix as `[N, D]` tokens: a CNN's `[C, H, W]` map becomes H*W tokens of width C."""
    return hidden.flatten(1).T if hidden.ndim == 3 else hidden


def full_depths(model: DualEncoderModel) -> tuple[int, int]:
    """The number of blocks of the vision and the text tower: the prefix depth that is the whole tower."""
    return len(tower_blocks(model.vision_model)), len(tower_blocks(model.text_model))


def split_features(model: DualEncoderModel, processor, view, *, max_length: int, batch_size: int = 32,
                   device=None, cache_dir=None, with_embeddings: bool = True, mirror_average: bool = True,
                   show_progress: bool = False) -> tuple[SplitTokens, Optional[EmbeddedSplit]]:
    """The split's token outputs and (with `with_embeddings`) its dual-encoder embeddings, cached in `cache_dir`.

    `view` is an image-view split (`image`, `image_id`, `captions`). The embeddings are the model's own,
    computed from the fp16 token outputs as the training's prefix caches do. When the model averages an image
    with its mirror image (`config.image_flip_average`), `mirror_average=False` skips that second vision pass
    and embeds the image alone: enough to mine negatives on the train split, at half its vision cost.
    """
    device = device or next(model.parameters()).device
    image_ids, captions, text_to_image = split_captions(view)
    transform = ImageTransform(processor.image_processor, train=False)
    depth_v, depth_t = full_depths(model)
    flip = model.config.image_flip_average
    common = dict(batch_size=batch_size, device=device, show_progress=show_progress)

    def prefix(pixels, mirrored=False):
        return model.vision_prefix(pixels.flip(-1) if mirrored else pixels, depth_v)

    def compute() -> dict:
        images = pooled_image_features(model, view, transform, encode=prefix, dtype=TOKEN_DTYPE,
                                       desc="vision tokens", **common)
        texts = pooled_text_features(model, captions, processor.tokenizer, max_length=max_length,
                                     prefix_depth=depth_t, dtype=TOKEN_DTYPE, desc="text tokens", **common)
        features = {"image_tokens": images, "caption_tokens": texts}
        if with_embeddings:
            mirrored = None
            if flip:  # the image's own tokens as its "mirror image": the average is then the image alone
                mirrored = images if not mirror_average else pooled_image_features(
                    model, view, transform, encode=lambda p: prefix(p, True), dtype=TOKEN_DTYPE,
                    desc="mirrored vision tokens", **common)
            with torch.no_grad():
                pooled_v = pooled_from_prefix(model, images, image_ids, depth_v, mirrored=mirrored, **common)
                pooled_t = pooled_from_text_prefix(model, texts, captions, depth_t, **common)
                embedded = embed_split(model, view, None, processor.tokenizer, vision_cache=pooled_v,
                                       text_cache=pooled_t, **common)
                features["image_embeds"], features["text_embeds"] = embedded.image_embeds, embedded.text_embeds
        return features

    key = tower_fingerprint(model, model.config.image_size, max_length, flip and mirror_average, with_embeddings,
                            image_ids, captions,
                            images_fingerprint([view]))
    features = load_or_compute(feature_file(cache_dir, "rerank-tokens", key), compute)
    tokens = SplitTokens(features["image_tokens"], features["caption_tokens"])
    embedded = None
    if with_embeddings:
        embedded = EmbeddedSplit(features["image_embeds"], features["text_embeds"], text_to_image, image_ids, captions)
    return tokens, embedded
