"""Image-caption data for dual-encoder training: loaders, the synthetic default set, preprocessing.

Data code knows nothing of models: it yields rows of images and captions (see the column
contract in doc/ARCHITECTURE.md) and turns them into tensors given the backbones' processors.

    from data_scripts import load_image_caption_dataset, ImageTransform, ContrastiveCollator
    splits = load_image_caption_dataset("synthetic")   # or a Flickr8k dir, an imagefolder, a CSV, a Hub id
    train = splits["train"].with_transform(ImageTransform(image_processor, train=True))
    loader = DataLoader(train, batch_sampler=UniqueImageBatchSampler(splits["train"], 64),
                        collate_fn=ContrastiveCollator(tokenizer, max_length=64))

Data that does not fit streams instead (``build_stream``, data_scripts/streaming.py); doc/OWN_DATA.md
shows every source.
"""

from .collator import ContrastiveCollator, image_ids_to_tensor
from .feature_crop import RandomFeatureCrop
from .flickr8k import default_flickr8k_dir, load_flickr8k
from .images import images_fingerprint, undecoded_images
from .loading import load_image_caption_dataset, load_split_file
from .mirror import RandomMirror, images_with_sided_captions
from .pixel_store import PixelStore, build_pixel_store
from .preprocessing import ImageSpec, ImageTransform
from .rows import TransformedRows
from .report import DatasetFormatError, LoadReport, Problem
from .samplers import ImageGroupBatchSampler, SeededBatchSampler, UniqueImageBatchSampler
from .shard_writer import write_shards
from .streaming import HubStream, WebDatasetStream, build_stream, expand_shards, is_shard_pattern, load_shards
from .synthetic import build_synthetic_dataset
from .views import IMAGE_FEATURES, PAIR_FEATURES, convert_view, require_images, to_image_view, to_pair_view

__all__ = [
    "ContrastiveCollator",
    "DatasetFormatError",
    "IMAGE_FEATURES",
    "ImageSpec",
    "ImageTransform",
    "LoadReport",
    "PAIR_FEATURES",
    "Problem",
    "HubStream",
    "ImageGroupBatchSampler",
    "PixelStore",
    "RandomFeatureCrop",
    "RandomMirror",
    "require_images",
    "SeededBatchSampler",
    "TransformedRows",
    "UniqueImageBatchSampler",
    "WebDatasetStream",
    "build_pixel_store",
    "build_stream",
    "is_shard_pattern",
    "load_shards",
    "build_synthetic_dataset",
    "convert_view",
    "default_flickr8k_dir",
    "expand_shards",
    "image_ids_to_tensor",
    "images_fingerprint",
    "images_with_sided_captions",
    "load_flickr8k",
    "load_image_caption_dataset",
    "load_split_file",
    "to_image_view",
    "to_pair_view",
    "undecoded_images",
    "write_shards",
]
