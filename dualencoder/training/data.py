"""The data a run trains and evaluates on: splits, image transforms, collator, and the epoch's loader.

`build_data` loads the rows (pair view for training, image view for evaluation), builds the pixel
store when asked and the transforms the backbones' processor implies; `make_train_loader` gives the
loader of one epoch, whose batches depend only on (seed, epoch, topics), so a resumed run sees the
same ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from data_scripts import (ContrastiveCollator, DatasetFormatError, ImageGroupBatchSampler, ImageTransform,
                          RandomFeatureCrop, RandomMirror, SeededBatchSampler, TransformedRows, UniqueImageBatchSampler,
                          build_pixel_store, build_stream, images_with_sided_captions, load_image_caption_dataset,
                          load_split_file, require_images, to_image_view, undecoded_images)
from dualencoder.evaluation.embed import split_captions

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What the loop and evaluation read: rows, transforms, the per-image augmentation draws and the collator."""

    train_pairs: object  # datasets.Dataset, pair view (None when the training pairs stream: see `stream`)
    eval_views: dict  # split -> datasets.Dataset, image view
    eval_captions: dict  # split -> every caption of the split, flattened in view order
    train_transform: ImageTransform
    eval_transform: ImageTransform
    collator: ContrastiveCollator
    mirror: Optional[RandomMirror] = None  # flip_augment: which images are mirrored in an epoch
    crop_draw: Optional[RandomFeatureCrop] = None  # augment: each image's crop in an epoch
    stream: object = None  # --streaming: this process's training stream (data_scripts.streaming)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's mirrors and crops (before the epoch's loader exists: its workers get a copy)."""
        for draw in (self.mirror, self.crop_draw):
            if draw is not None:
                draw.set_epoch(epoch)


def build_data(data_args, processor, *, seed: int, image_size: int, store_dir: str, main_process_first,
               show_progress: bool = True, rank: int = 0, world_size: int = 1) -> TrainingData:
    """Load the splits and build what turns their rows into tensors (see `TrainingData`); with `--streaming`, the
    training stream of process `rank` of `world_size` instead of the training pairs."""
    if data_args.streaming:
        train_pairs, eval_views = None, load_streamed_eval(data_args, seed)
    else:
        train_pairs, eval_views = load_data(data_args, seed)
    eval_captions = {split: split_captions(view)[1] for split, view in eval_views.items()}
    pixel_store = None
    if data_args.pixel_store_size:
        with main_process_first():  # one process builds; the others find it finished
            pixel_store = build_pixel_store([train_pairs, *views_read_while_training(eval_views).values()],
                                            data_args.pixel_store_size, store_dir, show_progress=show_progress)
        logger.info("pixel store: %s", pixel_store)
        if data_args.pixel_store_size < image_size:
            logger.warning("pixel_store_size %d is below the model's input size %s: stored images are enlarged again "
                           "on the way in, blurrier than decoding the files.", data_args.pixel_store_size, image_size)
        train_pairs = undecoded_images(train_pairs)  # the transforms read the store, by file path
        eval_views = {split: undecoded_images(view) for split, view in eval_views.items()}
    # the random resized crop is drawn per (seed, epoch, image), not from the global RNG: a resumed run, every
    # loader worker and every caption row of an image get the same crop (the cached-map crop shares it)
    crop_draw = RandomFeatureCrop(seed) if data_args.augment else None
    mirror = None
    if data_args.flip_augment:
        sided = images_with_sided_captions(train_pairs["image_id"], train_pairs["caption"])
        mirror = RandomMirror(seed, never=sided)
        logger.info("flip_augment: half the training images are mirrored each epoch; %d of them never are (a caption "
                    "says left or right).", len(sided))
    train_transform = ImageTransform(processor.image_processor, train=True, augment=data_args.augment,
                                     pixel_store=pixel_store, crop_draw=crop_draw)
    stream = None
    if data_args.streaming:
        try:
            stream = build_stream(data_args.dataset, rank=rank, world_size=world_size, seed=seed,
                                  on_bad_image=data_args.on_bad_image, image_column=data_args.image_column,
                                  caption_column=data_args.caption_column, train_file=data_args.train_file,
                                  dataset_config_name=data_args.dataset_config_name)
        except FileNotFoundError as error:  # no shard matches: one line naming the pattern
            raise DatasetFormatError(f"--dataset {error}") from None
        logger.info("streaming %s: %s; process %d of %d reads every %d-th shard. An image's captions are "
                    "consecutive rows, so they can share a batch (the loss counts them as positives of one another, "
                    "not negatives); unique_image_batches does not apply.", data_args.dataset, type(stream).__name__,
                    rank, world_size, world_size)
    return TrainingData(
        train_pairs=train_pairs, eval_views=eval_views, eval_captions=eval_captions, train_transform=train_transform,
        eval_transform=ImageTransform(processor.image_processor, train=False, pixel_store=pixel_store),
        collator=ContrastiveCollator(processor.tokenizer, max_length=data_args.max_length),
        mirror=mirror, crop_draw=crop_draw, stream=stream)


def views_read_while_training(eval_views: dict) -> dict:
    """The evaluation splits a run reads while it trains (validation, to choose the best epoch): what its pixel
    store and feature caches hold. The test split is read from its image files once, at the end
    (`run_contrastive.test_metrics`), so caching it would be work for nothing."""
    return {split: view for split, view in eval_views.items() if split != "test"}


def load_streamed_eval(data_args, seed: int) -> dict:
    """{split: image view} of a streamed run: `--validation_file` / `--test_file` loaded whole (a table, data files or
    shards), cut to `--max_eval_images`; none given, no evaluation (said in the log)."""
    files = {"validation": data_args.validation_file, "test": data_args.test_file}
    if not any(files.values()):
        logger.warning("streaming without --validation_file or --test_file: no validation (the model of the last "
                       "step is exported, not the best one) and no test metrics.")
    options = dict(on_bad_image=data_args.on_bad_image, seed=seed, image_column=data_args.image_column,
                   caption_column=data_args.caption_column, dataset_config_name=data_args.dataset_config_name)
    return {split: to_image_view(first_images(load_split_file(file, data_args.dataset, **options),
                                              data_args.max_eval_images))
            for split, file in files.items() if file}


def load_data(data_args, seed: int):
    """(training pairs, {split: image view}) of `--dataset` (or `--train_file` etc.), cut to `--max_train_images` /
    `--max_eval_images`."""
    files = dict(train_file=data_args.train_file, validation_file=data_args.validation_file,
                 test_file=data_args.test_file)
    # data files replace the default (embedded) set; with another --dataset they are that source's own files
    source = None if any(files.values()) and data_args.dataset == "synthetic" else data_args.dataset
    if source == "synthetic":
        kwargs = dict(num_images=data_args.num_images, image_size=data_args.synthetic_image_size)
    else:
        kwargs = dict(on_bad_image=data_args.on_bad_image, image_column=data_args.image_column,
                      caption_column=data_args.caption_column, dataset_config_name=data_args.dataset_config_name,
                      **files)
    pairs = load_image_caption_dataset(source, view="pairs", seed=seed, **kwargs)
    train = first_images(pairs["train"], data_args.max_train_images)
    evals = {split: to_image_view(first_images(pairs[split], data_args.max_eval_images))
             for split in ("validation", "test") if split in pairs}
    for split, view in evals.items():
        require_images(view, split, files.get(f"{split}_file") or source)
    return train, evals


def first_images(pairs, limit):
    """The rows of the first `limit` images (all rows when `limit` is 0 or None)."""
    if not limit:
        return pairs
    keep = set(list(dict.fromkeys(pairs["image_id"]))[:limit])
    return pairs.filter(lambda ids: [i in keep for i in ids], input_columns="image_id", batched=True)


def select_captions(pairs, per_image: int, seed: int, epoch: int):
    """Indices of the rows used this epoch: all, or `per_image` captions of each image, rotating by epoch."""
    if per_image <= 0:
        return list(range(len(pairs)))
    rows_of = {}
    for row, image_id in enumerate(pairs["image_id"]):
        rows_of.setdefault(image_id, []).append(row)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for rows in rows_of.values():
        order = torch.randperm(len(rows), generator=generator).tolist()
        chosen.extend(rows[order[(epoch * per_image + k) % len(rows)]] for k in range(min(per_image, len(rows))))
    return sorted(chosen)


def make_train_loader(pairs, transform, collator, data_args, batch_size: int, seed: int, epoch: int,
                      topics: Optional[dict] = None) -> DataLoader:
    """The epoch's DataLoader; batches depend only on (seed, epoch, topics), so resume sees the same ones."""
    rows = TransformedRows(pairs, transform, select_captions(pairs, data_args.captions_per_image, seed, epoch))
    if data_args.batch_by_image:
        sampler = ImageGroupBatchSampler(rows.column("image_id"), batch_size, seed=seed, topics=topics,
                                         topic_share=data_args.topic_share)
    elif data_args.unique_image_batches:
        sampler = UniqueImageBatchSampler(rows.column("image_id"), batch_size, seed=seed)
    else:
        sampler = SeededBatchSampler(len(rows), batch_size, seed)
    sampler.set_epoch(epoch)
    # An own generator: creating the iterator must not draw from the global RNG, or a resumed run
    # (whose RNG state was restored before its iterator exists) would get other dropout masks.
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(rows, batch_sampler=sampler, collate_fn=collator, num_workers=data_args.dataloader_num_workers,
                      pin_memory=torch.cuda.is_available(), generator=generator)
