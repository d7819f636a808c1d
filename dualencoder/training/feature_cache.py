"""One object owns every cached input of a run: what a frozen part of a tower would compute anyway.

When nothing in a tower trains, its pooled output for an (un-augmented) input never changes, so
computing it once and feeding `vision_pooled` / `text_pooled` to the model gives the same
embeddings at a fraction of the cost. When only the top blocks of a tower train, the same holds for
the output of the frozen blocks below them: the vision prefix (`vision_hidden`, one map per image)
and the text prefix (`text_hidden`, each caption's token states, stored unpadded). Mirrored copies
of the vision caches serve `flip_augment` (training) and `image_flip_average` (evaluation).

`FeatureCache.build` decides which caches a run can use, computes them (vision caches on disk, in the
project's one cache format and key scheme: `dualencoder.feature_store`), and then the loop and evaluation only ask it for inputs:
`train_transform` (the training rows' inputs), `forward_extras` (the depths the model needs),
`pooled_images` / `pooled_texts` / `embed` (evaluation with the model as it is now). Caches are dicts
keyed by image id (vision) and by caption (text), so they serve training and evaluation alike.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from data_scripts import images_fingerprint, to_image_view
from dualencoder.evaluation.embed import (EmbeddedSplit, embed_split, pooled_from_prefix, pooled_from_text_prefix,
                                          pooled_image_features, pooled_text_features, split_captions)
from dualencoder.feature_store import feature_file, load_or_compute, tower_fingerprint
from dualencoder.trainable import frozen_prefix_depth, tower_is_frozen

logger = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Every cached input of a run, and how to read the model's features through them.

    `vision` (image id -> pooled features of a frozen vision tower) or `vision_hidden` (image id ->
    the output of the vision tower's first `vision_depth` blocks) with `mirrored` (the same for the
    mirror images); `text` (caption -> pooled features of a frozen text tower) or `text_hidden`
    (caption -> token states after the first `text_depth` layers). An empty cache (`FeatureCache()`)
    caches nothing and reads every feature from the model.
    """

    vision: Optional[dict] = None
    vision_hidden: Optional[dict] = None
    mirrored: Optional[dict] = None
    text: Optional[dict] = None
    text_hidden: Optional[dict] = None
    vision_depth: int = 0
    text_depth: int = 0
    eval_transform: object = None  # turns an image into pixels, for what is not cached
    tokenizer: object = None
    max_length: int = 64
    batch_size: int = 128
    device: object = "cpu"
    show_progress: bool = True

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model, train_pairs, eval_views: dict, eval_captions: dict, *, eval_transform, tokenizer, max_length: int,
              batch_size: int, device, enabled: bool = True, cache_dir: Optional[str] = None, dataset_key="",
              pixel_store_size: int = 0, prefix_dtype: str = "float16", mirror=None, augment: bool = False,
              show_progress: bool = True, main_process_first=nullcontext) -> "FeatureCache":
        """The caches a run can use, computed (or read from `cache_dir`) now.

        A tower that is frozen with no adapters is cached whole (pooled features); one whose lower blocks are
        frozen (`top:N`, or adapters in the top blocks only) is cached up to them. `mirror` (flip_augment) and
        the model's `image_flip_average` add the mirror images' vision caches.
        """
        cache = cls(eval_transform=eval_transform, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                    device=device, show_progress=show_progress)
        if not enabled:
            return cache
        train_images = to_image_view(train_pairs)
        every_view = {"train": train_images, **eval_views}
        dtype = getattr(torch, prefix_dtype)
        # the images' files (path, size, mtime) or bytes: a replaced file is a new cache
        images_key = images_fingerprint(list(every_view.values())) if cache_dir else None
        image_ids = sorted(i for view in every_view.values() for i in view["image_id"])

        def file(kind: str, *extra, without_adapters: bool = False):
            """A vision cache's file, keyed by the tower's weights, preprocessing, images and `extra`."""
            if not cache_dir:
                return None
            return feature_file(cache_dir, kind, tower_fingerprint(
                model.vision_model, model.config.image_size, model.config.image_mean, model.config.image_std,
                dataset_key, image_ids, images_key, pixel_store_size, *extra, without_adapters=without_adapters))

        def stored(path, compute) -> dict:
            """The file's features; under several processes the main one computes and writes it, the others then
            read it (`main_process_first`): one computation, and no two processes writing one file."""
            if path is None:
                return compute()
            with main_process_first():
                return load_or_compute(path, compute)

        def images(splits, encode, desc: str, **how) -> dict:
            features = {}
            for split in splits:
                features.update(pooled_image_features(model, every_view[split], eval_transform, batch_size=batch_size,
                                                      device=device, show_progress=show_progress, encode=encode,
                                                      desc=desc, **how))
            return features

        def mirrored(splits, encode, kind: str, *extra, without_adapters: bool = False, **how) -> dict:
            return stored(file(kind, *extra, without_adapters=without_adapters), lambda: images(
                splits, lambda pixels: encode(pixels.flip(-1)), "cache mirrored", **how))

        vision_depth = frozen_prefix_depth(model, "vision")
        if tower_is_frozen(model, "vision"):
            logger.info("vision tower is frozen with no adapters: caching its features (%s).",
                        "augment does not apply to pooled features" if augment else "no augmentation")
            # encode_vision averages over the mirror image when image_flip_average is set: part of the key
            flip_average = model.config.image_flip_average
            cache.vision = stored(file("vision", flip_average),
                                  lambda: images(every_view, model.encode_vision, "cache vision"))
            if mirror is not None:
                cache.mirrored = mirrored(["train"], model.encode_vision, "vision-mirrored", flip_average)
        elif vision_depth:
            logger.info("vision blocks below %d are frozen: caching their output (%s); each step runs only the "
                        "blocks above.", vision_depth,
                        "augment: random resized crops of the cached maps" if augment else "no augmentation")
            cache.vision_depth = vision_depth

            def prefix(pixels):
                return model.vision_prefix(pixels, vision_depth)

            cache.vision_hidden = stored(
                file("vision-prefix", vision_depth, prefix_dtype, without_adapters=True),
                lambda: images(every_view, prefix, "cache vision prefix", dtype=dtype))
            # mirrored prefix: of the training images to augment, of the evaluation images to average over
            flip_average = model.config.image_flip_average
            splits = (["train"] if mirror is not None else []) + (
                list(eval_views) if flip_average else [])
            if splits:  # keyed by which splits it holds
                cache.mirrored = mirrored(splits, prefix, "vision-prefix-mirrored", vision_depth, prefix_dtype, splits,
                                          without_adapters=True, dtype=dtype)
        cache._build_text(model, train_pairs, eval_captions, dtype)
        return cache

    def _build_text(self, model, train_pairs, eval_captions: dict, dtype) -> None:
        text_depth = frozen_prefix_depth(model, "text")
        common = dict(max_length=self.max_length, batch_size=self.batch_size, device=self.device,
                      show_progress=self.show_progress)
        if tower_is_frozen(model, "text"):
            logger.info("text tower is frozen with no adapters: caching its features.")
            self.text = pooled_text_features(model, train_pairs["caption"], self.tokenizer, desc="cache text", **common)
        elif text_depth:
            logger.info("text layers below %d are frozen: caching each caption's token states there; each step runs "
                        "only the layers above.", text_depth)
            self.text_depth = text_depth
            every_caption = list(train_pairs["caption"]) + [c for captions in eval_captions.values() for c in captions]
            self.text_hidden = pooled_text_features(model, every_caption, self.tokenizer, desc="cache text prefix",
                                                    prefix_depth=text_depth, dtype=dtype, **common)

    # ------------------------------------------------------------------ what training asks for
    @property
    def replaces_images(self) -> bool:
        """Whether training reads no pixels (the images need not be decoded)."""
        return self.vision is not None or self.vision_hidden is not None

    @property
    def forward_extras(self) -> dict:
        """Keyword arguments every training forward needs besides the batch: which block each prefix ends at."""
        extras = {}
        if self.vision_hidden is not None:
            extras["vision_hidden_depth"] = self.vision_depth
        if self.text_hidden is not None:
            extras["text_hidden_depth"] = self.text_depth
        return extras

    def train_transform(self, image_transform, mirror=None, prefix_crop=None) -> "CachedFeatureTransform":
        """The training rows' transform: cached inputs where there are any, pixels from `image_transform` else."""
        return CachedFeatureTransform(image_transform, self.vision, self.text, self.vision_hidden, mirror,
                                      self.mirrored, self.text_hidden,
                                      prefix_crop if self.vision_hidden is not None else None)

    # ------------------------------------------------------------------ what evaluation asks for
    def pooled_images(self, model, view) -> dict:
        """image id -> pooled vision features of an image view with the model as it is now: from the caches where
        there are any (the trained top of the tower rerun over the cached prefix), else from the whole tower."""
        if self.vision_hidden is not None:
            return pooled_from_prefix(model, self.vision_hidden, view["image_id"], self.vision_depth,
                                      batch_size=self.batch_size, device=self.device, mirrored=self.mirrored,
                                      show_progress=self.show_progress)
        if self.vision is not None:
            return self.vision
        return pooled_image_features(model, view, self.eval_transform, batch_size=self.batch_size, device=self.device,
                                     show_progress=self.show_progress)

    def pooled_texts(self, model, captions: list) -> dict:
        """caption -> pooled text features with the model as it is now (from the caches where there are any)."""
        if self.text_hidden is not None:
            return pooled_from_text_prefix(model, self.text_hidden, captions, self.text_depth,
                                           batch_size=self.batch_size, device=self.device,
                                           show_progress=self.show_progress)
        if self.text is not None and all(caption in self.text for caption in captions):
            return self.text
        return pooled_text_features(model, captions, self.tokenizer, max_length=self.max_length,
                                    batch_size=self.batch_size, device=self.device, show_progress=self.show_progress)

    def embed(self, model, view, captions: Optional[list] = None) -> EmbeddedSplit:
        """Embed an image view (the validation split) with the model as it is now; `captions` are its captions
        flattened in view order, when already known."""
        captions = split_captions(view)[1] if captions is None else captions
        return embed_split(model, view, None, self.tokenizer, batch_size=self.batch_size, device=self.device,
                           vision_cache=self.pooled_images(model, view), text_cache=self.pooled_texts(model, captions),
                           show_progress=self.show_progress)


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
