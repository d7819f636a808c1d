"""Frozen pooled backbone features of a data split, extracted once and cached on disk.

Every baseline in this package works on the same frozen features: the vision tower's pooled
output of each image (EfficientNet-Lite0: 1280-d) and the text tower's mean-pooled output of each
caption (MiniLM: 384-d), both from :meth:`DualEncoderModel.encode_vision` / ``encode_text`` through
:mod:`dualencoder.evaluation.embed` (the loops the training caches use too). Extracting 8000 images and 40k captions takes minutes
on a CPU, fitting a baseline seconds, so features are computed once per (data, backbones,
preprocessing) and stored as ``~/.cache/dualencoder/features/baseline-<split>-<key>.pt``, in the
project's one cache format (:mod:`dualencoder.feature_store`): the split's arrays with its image ids and
captions in the arrays' row order.

A :class:`SplitFeatures` holds one split in retrieval layout: ``images [Ni, Dv]``, ``texts [Nt, Dt]``
and ``text_to_image [Nt]`` (the index of each caption's image), i.e. exactly what
:func:`dualencoder.metrics.retrieval_metrics` needs once both sides are embedded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
from dualencoder.feature_store import feature_file, load_or_compute

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def default_cache_root() -> Path:
    """``$DUALENCODER_FEATURE_CACHE`` or ``~/.cache/dualencoder/features``."""
    return Path(os.environ.get("DUALENCODER_FEATURE_CACHE", "~/.cache/dualencoder/features")).expanduser()


@dataclass
class SplitFeatures:
    """Frozen features of one split: images, captions, and which image each caption describes."""

    images: torch.Tensor  # [Ni, Dv] float32
    texts: torch.Tensor  # [Nt, Dt] float32
    text_to_image: torch.Tensor  # [Nt] long
    image_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long the extraction took (recorded in the cache file)

    def __post_init__(self) -> None:
        if self.texts.shape[0] != self.text_to_image.shape[0]:
            raise ValueError(f"{self.texts.shape[0]} texts but {self.text_to_image.shape[0]} text_to_image entries")
        if self.text_to_image.numel() and int(self.text_to_image.max()) >= self.images.shape[0]:
            raise ValueError("text_to_image points past the last image")

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs, one per caption: ``(image features repeated per caption, text features)``."""
        return self.images[self.text_to_image], self.texts

    def subset(self, num_images: int) -> SplitFeatures:
        """The first ``num_images`` images and their captions (for quick runs)."""
        keep = self.text_to_image < num_images
        return SplitFeatures(
            images=self.images[:num_images],
            texts=self.texts[keep],
            text_to_image=self.text_to_image[keep],
            image_ids=self.image_ids[:num_images],
            captions=[c for c, k in zip(self.captions, keep.tolist()) if k] if self.captions else [],
        )

    def to_dict(self) -> dict:
        """The split as the mapping `dualencoder.feature_store` keeps on disk."""
        return {"images": self.images.contiguous(), "texts": self.texts.contiguous(),
                "text_to_image": self.text_to_image.contiguous(), "image_ids": list(self.image_ids),
                "captions": list(self.captions), "seconds": float(self.seconds)}

    @classmethod
    def from_dict(cls, stored: dict) -> SplitFeatures:
        return cls(stored["images"], stored["texts"], stored["text_to_image"].long(), stored["image_ids"],
                   stored["captions"], stored["seconds"])


def split_file(cache_root, key: str, split: str) -> Path:
    """The cache file of one split's frozen features (`feature_key` names the data, backbones and preprocessing)."""
    return feature_file(cache_root, f"baseline-{split}", key)


def feature_key(data_dir, vision: str = OFFLINE_VISION, text: str = OFFLINE_TEXT, *, image_size: int | None = None,
                max_length: int = 64) -> str:
    """A readable, unique key for one (data, backbones, preprocessing) combination: from names, so a cached split
    is found without loading the model or the data."""
    spec = {"data": str(Path(data_dir).expanduser().resolve()), "vision": vision, "text": text,
            "image_size": image_size, "max_length": max_length, "text_pooling": "mean", "version": 1}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    vision_name, text_name = (name.split(":")[-1].split("/")[-1] for name in (vision, text))
    return f"{Path(data_dir).name}-{vision_name}-{text_name}-{image_size or 'native'}-{digest}"


def extract_split_features(model, processor, images_view, *, max_length: int = 64, batch_size: int = 32,
                           device="cpu", show_progress: bool = True) -> SplitFeatures:
    """Pooled frozen features of an image-view split (columns ``image``, ``image_id``, ``captions``)."""
    from data_scripts import ImageTransform
    from dualencoder.evaluation.embed import pooled_image_features, pooled_text_features, split_captions

    started = time.time()
    transform = ImageTransform(processor.image_processor, train=False)
    vision = pooled_image_features(model, images_view, transform, batch_size=batch_size, device=device,
                                   show_progress=show_progress)
    image_ids, captions, text_to_image = split_captions(images_view)
    text = pooled_text_features(model, captions, processor.tokenizer, max_length=max_length, batch_size=batch_size * 4,
                                device=device, show_progress=show_progress)
    return SplitFeatures(
        images=torch.stack([vision[i] for i in image_ids]).float(),
        texts=torch.stack([text[c] for c in captions]).float(),
        text_to_image=text_to_image,
        image_ids=image_ids,
        captions=captions,
        seconds=time.time() - started,
    )


def load_features(data_dir, splits=SPLITS, *, vision: str = OFFLINE_VISION, text: str = OFFLINE_TEXT,
                  image_size: int | None = None, max_length: int = 64, batch_size: int = 32,
                  cache_root=None, device="cpu", show_progress: bool = True) -> dict[str, SplitFeatures]:
    """Features of each split of ``data_dir``, extracted on first use and read from the cache after.

    ``image_size`` overrides the vision backbone's native input size (``None``: EfficientNet-Lite0's
    224 px). Extraction loads the data set and the backbones only for splits not yet cached.
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    key = feature_key(data_dir, vision, text, image_size=image_size, max_length=max_length)
    loaded = {}  # the model, processor and data, loaded once and only for a split that is not cached

    def extract(split: str) -> dict:
        if not loaded:
            from data_scripts import load_image_caption_dataset
            from dualencoder.processing import build_processor
            from modeling_dualencoder import DualEncoderModel

            overrides = {} if image_size is None else {"image_size": image_size}
            model = DualEncoderModel.from_vision_text_pretrained(vision, text, **overrides).to(device).eval()
            loaded.update(model=model, processor=build_processor(model.config),
                          data=load_image_caption_dataset(str(data_dir), view="images"))
        logger.info("extracting frozen features of %s/%s (%d images) into %s", data_dir, split,
                    len(loaded["data"][split]), split_file(root, key, split))
        features = extract_split_features(loaded["model"], loaded["processor"], loaded["data"][split],
                                          max_length=max_length, batch_size=batch_size, device=device,
                                          show_progress=show_progress)
        logger.info("%s: %d images, %d captions in %.0f s", split, features.images.shape[0],
                    features.texts.shape[0], features.seconds)
        return features.to_dict()

    out = {split: SplitFeatures.from_dict(load_or_compute(split_file(root, key, split),
                                                          lambda split=split: extract(split)))
           for split in splits}
    return {split: out[split] for split in splits}
