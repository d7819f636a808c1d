"""Frozen-tower feature cache: run a frozen, adapter-free backbone once instead of every epoch.

When nothing in a tower trains, its pooled output for an (un-augmented) input never changes, so
computing it once and feeding `vision_pooled` / `text_pooled` to the model gives the same
embeddings at a fraction of the cost. When only the top blocks of the vision tower train, the
same holds for the output of the frozen blocks below them (`vision_hidden`, the prefix cache):
each step then runs only the trained top of the tower. The text tower has the same split
(`text_hidden`: each caption's token states below its trained layers, stored unpadded). Caches
are plain dicts keyed by image id (vision) and by caption (text), so they serve training and
evaluation alike.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

logger = logging.getLogger(__name__)


def tower_fingerprint(module: torch.nn.Module, *extra, without_adapters: bool = False) -> str:
    """A short hash of a tower's weights (and any extra settings, e.g. the input size).

    Cached features are only valid for exactly these weights and preprocessing; the hash makes
    a stale cache impossible to pick up. `without_adapters` hashes the pretrained weights under
    their plain names, leaving out LoRA adapters: right for a prefix cache, whose frozen blocks
    hold no adapters (see `frozen_prefix_depth`), so a run with adapters in the top blocks reuses
    the prefix that a run without them cached.
    """
    digest = hashlib.sha1(repr(extra).encode())
    for name, tensor in sorted(_named_weights(module, without_adapters)):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _named_weights(module: torch.nn.Module, without_adapters: bool):
    for name, tensor in module.state_dict().items():
        if without_adapters:
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor


def load_or_compute(path: str, compute) -> dict:
    """A feature dict from `path` if it exists, else `compute()` saved there (atomically)."""
    if path and os.path.isfile(path):
        logger.info("reusing cached features from %s", path)
        return torch.load(path, weights_only=True)
    features = compute()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # one per process: several may write the same cache at once
        torch.save(features, tmp)
        os.replace(tmp, path)
    return features


class CachedFeatureTransform:
    """The batch transform of the training rows (`data_scripts.TransformedRows`): attach cached
    features, drop what they replace.

    With a `mirror` (see `data_scripts.mirror.RandomMirror`) the images it picks are flipped:
    pixels directly, cached features by reading `mirrored_cache`, which holds the mirrored
    counterpart of whichever vision cache is in use (pooled or prefix) for the training images.
    With a `prefix_crop` (`data_scripts.RandomFeatureCrop`) each cached prefix map, mirrored or
    not, is replaced by a random resized window of itself: the image crop of a cached tower.
    """

    def __init__(self, image_transform, vision_cache=None, text_cache=None, vision_hidden_cache=None,
                 mirror=None, mirrored_cache=None, text_hidden_cache=None, prefix_crop=None):
        self.image_transform = image_transform
        self.vision_cache = vision_cache
        self.text_cache = text_cache
        self.vision_hidden_cache = vision_hidden_cache
        self.mirror = mirror
        self.mirrored_cache = mirrored_cache
        self.text_hidden_cache = text_hidden_cache
        self.prefix_crop = prefix_crop
        cached = vision_cache is not None or vision_hidden_cache is not None
        if mirror is not None and cached and mirrored_cache is None:
            raise ValueError("mirroring cached vision features needs the mirrored images' cache (mirrored_cache)")

    def _flipped(self, image_id: str) -> bool:
        return self.mirror is not None and self.mirror(image_id)

    def _cached(self, cache: dict, image_id: str):
        return self.mirrored_cache[image_id] if self._flipped(image_id) else cache[image_id]

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "image"}
        if self.vision_cache is not None:
            out["vision_pooled"] = [self._cached(self.vision_cache, i) for i in batch["image_id"]]
        elif self.vision_hidden_cache is not None:
            # once per image: with batch_by_image its caption rows share one (cropped) map
            maps = {i: self._cached(self.vision_hidden_cache, i) for i in dict.fromkeys(batch["image_id"])}
            if self.prefix_crop is not None:
                maps = {i: self.prefix_crop(features, i) for i, features in maps.items()}
            out["vision_hidden"] = [maps[i] for i in batch["image_id"]]
        else:
            out["pixel_values"] = [self.image_transform.pixels(image, image_id)  # the image's crop, if augmenting
                                   for image, image_id in zip(batch["image"], batch["image_id"])]
            if self.mirror is not None:
                out["pixel_values"] = [p.flip(-1) if self._flipped(i) else p
                                       for p, i in zip(out["pixel_values"], batch["image_id"])]
        if self.text_cache is not None:
            out["text_pooled"] = [self.text_cache[c] for c in batch["caption"]]
        elif self.text_hidden_cache is not None:
            out["text_hidden"] = [self.text_hidden_cache[c] for c in batch["caption"]]
        if self.text_cache is not None or self.text_hidden_cache is not None:
            del out["caption"]  # nothing to tokenize: the cached features replace the tokens
        return out
