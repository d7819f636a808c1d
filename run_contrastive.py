#!/usr/bin/env python
"""Train a CLIP-style dual encoder with Accelerate, evaluate it by retrieval, save it for the Hub.

    accelerate launch run_contrastive.py --config configs/default.yaml [--option value ...]
    python run_contrastive.py --help

The script reads top to bottom like the algorithm: set up (options, model, data), evaluate the
untrained model, loop over epochs (step, log, checkpoint, validate, keep the best), then test
the best model and export it with its processor, metrics.json and a model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from data_scripts import (ContrastiveCollator, ImageGroupBatchSampler, ImageTransform, RandomFeatureCrop, RandomMirror,
                          TransformedRows, UniqueImageBatchSampler, build_pixel_store, images_fingerprint,
                          images_with_sided_captions, load_image_caption_dataset, to_image_view, undecoded_images)
from dualencoder.evaluation.embed import (EmbeddedSplit, embed_split, pooled_from_prefix, pooled_from_text_prefix, pooled_image_features,
                                          pooled_text_features, split_captions)
from dualencoder.head_init import cca_initialise_heads, cca_options
from dualencoder.metrics import format_metrics_table
from dualencoder.querybank import querybank_metrics
from dualencoder.processing import build_processor
from dualencoder.trainable import (format_parameter_report, frozen_prefix_depth, parameter_report, set_tower_trainable,
                                   tower_is_frozen, train_mode)
from dualencoder.training.arguments import parse_args
from dualencoder.training.checkpoints import (earlier_checkpoints, load_checkpoint, move_into, read_loop_state,
                                              recover_swap, resolve_resume, save_checkpoint, write_atomically)
from dualencoder.training.feature_cache import CachedFeatureTransform, load_or_compute, tower_fingerprint
from dualencoder.training.model_card import write_model_card
from dualencoder.training.optim import cosine_with_warmup, make_optimizer
from dualencoder.training.step import TrainingDiverged, TrainStep, compile_in_place  # noqa: F401  (TrainingDiverged: part of the API)
from dualencoder.training.topics import image_topics
from modeling_dualencoder import DualEncoderModel

logger = logging.getLogger("run_contrastive")
LOWER_IS_BETTER = ("_medr", "_meanr")


class SeededBatchSampler(BatchSampler):
    """Random batches that are a function of (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed, self.epoch = num_rows, batch_size, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for start in range(0, self.num_rows, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def __len__(self):
        return math.ceil(self.num_rows / self.batch_size)


# ---------------------------------------------------------------------------------------- set-up
# options that make a new model, and the config field a saved model (--model_name_or_path) keeps them in
NEW_MODEL_OPTIONS = {"loss": "loss_type", "loss_options": "loss_kwargs", "projection_dim": "projection_dim",
                     "projection_head": "projection_head", "projection_hidden_dim": "projection_hidden_dim",
                     "text_pooling": "text_pooling", "image_size": "image_size", "lora_rank": "lora_rank"}


def options_a_saved_model_ignores(model_args, config) -> list[str]:
    """The new-model options set (away from their defaults, by --config or the command line) to other values
    than the saved model has: a saved model keeps its own structure and loss, so they would do nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(model_args)}
    ignored = []
    for option, field in NEW_MODEL_OPTIONS.items():
        value = loss_options(model_args) if option == "loss_options" else getattr(model_args, option)
        default = {} if option == "loss_options" else defaults[option]
        if value != default and value != getattr(config, field, None):
            ignored.append(f"--{option} {value!r} (the model has {field}={getattr(config, field, None)!r})")
    return ignored


def build_model(model_args) -> DualEncoderModel:
    if model_args.model_name_or_path:
        model = DualEncoderModel.from_pretrained(model_args.model_name_or_path)
        ignored = options_a_saved_model_ignores(model_args, model.config)
        if ignored:
            raise SystemExit(f"error: --model_name_or_path {model_args.model_name_or_path} keeps the saved model's "
                             f"structure and loss, so these options would be ignored: {'; '.join(ignored)}. Drop "
                             "them, or build a new model from backbones (--vision_model / --text_model).")
    else:
        model = join_backbones(model_args)
    if model_args.image_flip_average is not None:
        model.config.image_flip_average = model_args.image_flip_average
    if model_args.vision_chunk_size is not None:
        model.config.vision_chunk_size = model_args.vision_chunk_size
    set_tower_trainable(model, "vision", model_args.vision_train)
    set_tower_trainable(model, "text", model_args.text_train)
    return model


def option_mapping(option: str, text: str) -> dict:
    """A YAML/JSON mapping option (`--loss_options`, `--head_init_options`) read as a dict, with errors naming it."""
    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise SystemExit(f"error: {option} must be a mapping, got {text!r}")
    glued = [key for key, value in mapping.items() if value is None and ":" in str(key)]
    if glued:  # YAML reads {margin:0.2} as the key 'margin:0.2' with no value
        raise SystemExit(f"error: {option} {text!r}: {glued[0]!r} needs a space after ':' "
                         f"(YAML), e.g. '{{{str(glued[0]).replace(':', ': ', 1)}}}'")
    return mapping


def loss_options(model_args) -> dict:
    """``--loss_options`` read as the keyword arguments of ``build_loss(model_args.loss, ...)``."""
    loss_kwargs = option_mapping("--loss_options", model_args.loss_options)
    if "codebook" in model_args.loss:
        loss_kwargs.setdefault("embed_dim", model_args.projection_dim)
    return loss_kwargs


def head_init_options(model_args) -> dict:
    """``--head_init_options`` over the defaults of ``--head_init`` (checked before any caching)."""
    try:
        return cca_options(option_mapping("--head_init_options", model_args.head_init_options))
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None


def new_model_fields(model_args) -> dict:
    """The DualEncoderConfig fields the options give a new model: heads, pooling, temperature, loss, LoRA, size."""
    scale, bias = model_args.logit_scale_init_value, model_args.logit_bias_init_value
    if "siglip" in model_args.loss and bias is None:  # SigLIP's initialisation: scale 10, bias -10
        scale, bias = math.log(10.0), -10.0
    fields = dict(
        projection_dim=model_args.projection_dim,
        projection_head=model_args.projection_head,
        projection_hidden_dim=model_args.projection_hidden_dim,
        projection_dropout=model_args.projection_dropout,
        text_pooling=model_args.text_pooling,
        logit_scale_init_value=scale,
        logit_bias_init_value=bias,
        loss_type=model_args.loss,
        loss_kwargs=loss_options(model_args),
        lora_rank=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        lora_towers=model_args.lora_towers if model_args.lora_rank else [],
        lora_vision_blocks=model_args.lora_vision_blocks,
        lora_text_blocks=model_args.lora_text_blocks,
    )
    if model_args.image_size:
        fields["image_size"] = model_args.image_size
    return fields


def join_backbones(model_args) -> DualEncoderModel:
    return DualEncoderModel.from_vision_text_pretrained(model_args.vision_model, model_args.text_model,
                                                        vision_weights=model_args.vision_weights,
                                                        **new_model_fields(model_args))


def load_data(data_args, seed: int):
    kwargs = {}
    if data_args.dataset == "synthetic":
        kwargs = dict(num_images=data_args.num_images, image_size=data_args.synthetic_image_size)
    else:
        kwargs = dict(on_bad_image=data_args.on_bad_image)
    pairs = load_image_caption_dataset(data_args.dataset, view="pairs", seed=seed, **kwargs)
    train = _first_images(pairs["train"], data_args.max_train_images)
    evals = {split: to_image_view(_first_images(pairs[split], data_args.max_eval_images))
             for split in ("validation", "test") if split in pairs}
    return train, evals


def _first_images(pairs, limit):
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


def make_train_loader(pairs, transform, collator, data_args, train_args, seed, epoch, topics=None):
    """The epoch's DataLoader; batches depend only on (seed, epoch, topics), so resume sees the same ones."""
    rows = TransformedRows(pairs, transform, select_captions(pairs, data_args.captions_per_image, seed, epoch))
    if data_args.batch_by_image:
        sampler = ImageGroupBatchSampler(rows.column("image_id"), train_args.per_device_train_batch_size, seed=seed,
                                         topics=topics, topic_share=data_args.topic_share)
    elif data_args.unique_image_batches:
        sampler = UniqueImageBatchSampler(rows.column("image_id"), train_args.per_device_train_batch_size, seed=seed)
    else:
        sampler = SeededBatchSampler(len(rows), train_args.per_device_train_batch_size, seed)
    sampler.set_epoch(epoch)
    # An own generator: creating the iterator must not draw from the global RNG, or a resumed run
    # (whose RNG state was restored before its iterator exists) would get other dropout masks.
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(rows, batch_sampler=sampler, collate_fn=collator, num_workers=data_args.dataloader_num_workers,
                      pin_memory=torch.cuda.is_available(), generator=generator)


def training_image_topics(train_pairs, text_features: dict, data_args, seed: int) -> dict:
    """image id -> topic for topic-aware batches, from the captions' pooled features under the text tower as loaded
    (see dualencoder/training/topics.py)."""
    started = time.time()
    topics = image_topics(list(train_pairs["image_id"]), list(train_pairs["caption"]), text_features,
                          data_args.topic_batches, seed=seed)
    sizes = sorted(Counter(topics.values()).values())
    logger.info("topic batches: %d images in %d topics (%d to %d images each; median %d), %.0f%% of each batch drawn "
                "by topic; k-means %.0f s", len(topics), data_args.topic_batches, sizes[0], sizes[-1],
                sizes[len(sizes) // 2], 100 * data_args.topic_share, time.time() - started)
    return topics


def initialise_heads_from_cca(model, train_pairs, image_features: dict, text_features: dict, options: dict) -> None:
    """--head_init cca: fit CCA on every training (image, caption) pair's pooled features and start the heads there."""
    started = time.time()
    images = torch.stack([image_features[i] for i in train_pairs["image_id"]]).float()
    texts = torch.stack([text_features[c] for c in train_pairs["caption"]]).float()
    fitted = cca_initialise_heads(model, images, texts, options)
    logger.info("head_init cca: %s; %.0f s", ", ".join(f"{k} {v}" for k, v in fitted.items()), time.time() - started)


def is_better(metric: str, value: float, best) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith(LOWER_IS_BETTER) else value > best


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    model_args, data_args, train_args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=train_args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(train_args.seed)
    stale = earlier_checkpoints(train_args.output_dir, train_args.resume_from_checkpoint, train_args.overwrite_output_dir)
    if stale and accelerator.is_main_process:
        logger.info("overwrite_output_dir: deleting %d checkpoints of an earlier run in %s", len(stale), train_args.output_dir)
        for path in stale:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    os.makedirs(train_args.output_dir, exist_ok=True)
    show = accelerator.is_local_main_process

    # --- model, processor, data
    model = build_model(model_args)
    cca_init = head_init_options(model_args) if model_args.head_init == "cca" else None  # a bad option fails now
    processor = build_processor(model.config)
    logger.info("parameters:\n%s", format_parameter_report(parameter_report(model)))
    train_pairs, eval_views = load_data(data_args, train_args.seed)
    eval_captions = {split: split_captions(view)[1] for split, view in eval_views.items()}  # flattened, in view order
    pixel_store = None
    if data_args.pixel_store_size:
        with accelerator.main_process_first():  # one process builds; the others find it finished
            pixel_store = build_pixel_store([train_pairs, *eval_views.values()], data_args.pixel_store_size,
                                            train_args.feature_cache_dir or train_args.output_dir, show_progress=show)
        logger.info("pixel store: %s", pixel_store)
        if data_args.pixel_store_size < model.config.image_size:
            logger.warning("pixel_store_size %d is below the model's input size %s: stored images are enlarged again "
                           "on the way in, blurrier than decoding the files.", data_args.pixel_store_size,
                           model.config.image_size)
        train_pairs = undecoded_images(train_pairs)  # the transforms read the store, by file path
        eval_views = {split: undecoded_images(view) for split, view in eval_views.items()}
    # the random resized crop is drawn per (seed, epoch, image), not from the global RNG: a resumed run, every
    # loader worker and every caption row of an image get the same crop (the cached-map crop below shares it)
    crop_draw = RandomFeatureCrop(train_args.seed) if data_args.augment else None
    train_transform = ImageTransform(processor.image_processor, train=True, augment=data_args.augment,
                                     pixel_store=pixel_store, crop_draw=crop_draw)
    eval_transform = ImageTransform(processor.image_processor, train=False, pixel_store=pixel_store)
    collator = ContrastiveCollator(processor.tokenizer, max_length=data_args.max_length)
    model.to(accelerator.device)
    if train_args.channels_last:  # convolutions then run in NHWC (caching included), whatever the input's layout
        model.vision_model.to(memory_format=torch.channels_last)

    # --- frozen-tower caches: a tower with nothing to train is run once, not every epoch
    caches = {"vision": None, "text": None, "vision_hidden": None, "mirrored": None, "text_hidden": None}
    forward_extras = {}  # e.g. which block the cached vision prefix ends at
    prefix_depth = frozen_prefix_depth(model, "vision") if train_args.cache_frozen_features else 0
    text_prefix_depth = frozen_prefix_depth(model, "text") if train_args.cache_frozen_features else 0
    cache_started = time.time()
    mirror = prefix_crop = None
    if data_args.flip_augment:
        sided = images_with_sided_captions(train_pairs["image_id"], train_pairs["caption"])
        mirror = RandomMirror(train_args.seed, never=sided)
        logger.info("flip_augment: half the training images are mirrored each epoch; %d of them never are (a caption "
                    "says left or right).", len(sided))
    if train_args.cache_frozen_features:
        batch = train_args.per_device_eval_batch_size
        train_images = to_image_view(train_pairs)
        every_image = [train_images] + list(eval_views.values())

        def every_image_features(views=every_image, **how):
            features = {}
            for view in views:
                features.update(pooled_image_features(model, view, eval_transform, batch_size=batch,
                                                      device=accelerator.device, show_progress=show, **how))
            return features

        def mirrored_features(file, encode, views, **how):
            """The same cache for the mirror images of `views` (flip_augment, image_flip_average)."""
            return load_or_compute(file, lambda: every_image_features(
                views, encode=lambda pixels: encode(pixels.flip(-1)), desc="cache mirrored", **how))

        # the images' files (path, size, mtime) or bytes: a replaced file is a new cache
        images_key = images_fingerprint(every_image) if train_args.feature_cache_dir else None

        def vision_cache_file(prefix: str, *extra, without_adapters=False):
            if not train_args.feature_cache_dir:
                return None
            ids = sorted(i for view in every_image for i in view["image_id"])
            key = tower_fingerprint(model.vision_model, model.config.image_size, model.config.image_mean,
                                    model.config.image_std, data_args.dataset, ids, images_key,
                                    data_args.pixel_store_size, *extra, without_adapters=without_adapters)
            return os.path.join(os.path.expanduser(train_args.feature_cache_dir), f"{prefix}-{key}.pt")

        if tower_is_frozen(model, "vision"):
            logger.info("vision tower is frozen with no adapters: caching its features (%s).",
                        "augment does not apply to pooled features" if data_args.augment else "no augmentation")
            # encode_vision averages over the mirror image when image_flip_average is set: part of the key
            flip_average = model.config.image_flip_average
            caches["vision"] = load_or_compute(vision_cache_file("vision", flip_average),
                                               lambda: every_image_features(desc="cache vision"))
            if mirror is not None:
                caches["mirrored"] = mirrored_features(vision_cache_file("vision-mirrored", flip_average),
                                                       model.encode_vision, [train_images])
        elif prefix_depth:
            logger.info("vision blocks below %d are frozen: caching their output (%s); each step runs only the "
                        "blocks above.", prefix_depth,
                        "augment: random resized crops of the cached maps" if data_args.augment else "no augmentation")
            prefix_crop = crop_draw  # None without augment
            caches["vision_hidden"] = load_or_compute(
                vision_cache_file("vision-prefix", prefix_depth, train_args.prefix_cache_dtype, without_adapters=True),
                lambda: every_image_features(encode=lambda pixels: model.vision_prefix(pixels, prefix_depth),
                                             dtype=getattr(torch, train_args.prefix_cache_dtype),
                                             desc="cache vision prefix"))
            forward_extras["vision_hidden_depth"] = prefix_depth
            # mirrored prefix: of the training images to augment, of the evaluation images to average over
            # (and of the training images when they are the querybank: its queries are embedded like the test's)
            bank_mirrored = model.config.image_flip_average and train_args.querybank_beta is not None
            mirrored_splits = (["train"] if mirror is not None or bank_mirrored else []) + (
                list(eval_views) if model.config.image_flip_average else [])
            mirrored_views = [train_images if split == "train" else eval_views[split] for split in mirrored_splits]
            if mirrored_views:
                caches["mirrored"] = mirrored_features(  # keyed by which splits it holds
                    vision_cache_file("vision-prefix-mirrored", prefix_depth, train_args.prefix_cache_dtype,
                                      mirrored_splits, without_adapters=True),
                    lambda pixels: model.vision_prefix(pixels, prefix_depth), mirrored_views,
                    dtype=getattr(torch, train_args.prefix_cache_dtype))
        if tower_is_frozen(model, "text"):
            logger.info("text tower is frozen with no adapters: caching its features.")
            caches["text"] = pooled_text_features(model, train_pairs["caption"], processor.tokenizer,
                                                 max_length=data_args.max_length, batch_size=batch,
                                                 device=accelerator.device, desc="cache text", show_progress=show)
        elif text_prefix_depth:
            logger.info("text layers below %d are frozen: caching each caption's token states there; each step runs "
                        "only the layers above.", text_prefix_depth)
            every_caption = list(train_pairs["caption"]) + [c for captions in eval_captions.values() for c in captions]
            caches["text_hidden"] = pooled_text_features(
                model, every_caption, processor.tokenizer, max_length=data_args.max_length, batch_size=batch,
                device=accelerator.device, desc="cache text prefix", show_progress=show, prefix_depth=text_prefix_depth,
                dtype=getattr(torch, train_args.prefix_cache_dtype))
            forward_extras["text_hidden_depth"] = text_prefix_depth
    def pooled_images(view) -> dict:
        """image id -> pooled vision features of an image view with the model as it is now: from the caches where there
        are any (the trained top of the tower rerun over the cached prefix), else from the whole tower."""
        if caches["vision_hidden"] is not None:
            return pooled_from_prefix(accelerator.unwrap_model(model), caches["vision_hidden"], view["image_id"],
                                      prefix_depth, batch_size=train_args.per_device_eval_batch_size,
                                      device=accelerator.device, mirrored=caches["mirrored"], show_progress=show)
        if caches["vision"] is not None:
            return caches["vision"]
        return pooled_image_features(accelerator.unwrap_model(model), view, eval_transform,
                                     batch_size=train_args.per_device_eval_batch_size, device=accelerator.device,
                                     show_progress=show)

    def pooled_texts(captions: list) -> dict:
        """caption -> pooled text features with the model as it is now (from the caches where there are any)."""
        if caches["text_hidden"] is not None:
            return pooled_from_text_prefix(accelerator.unwrap_model(model), caches["text_hidden"], captions,
                                           text_prefix_depth, batch_size=train_args.per_device_eval_batch_size,
                                           device=accelerator.device, show_progress=show)
        if caches["text"] is not None and all(caption in caches["text"] for caption in captions):
            return caches["text"]
        return pooled_text_features(accelerator.unwrap_model(model), captions, processor.tokenizer,
                                    max_length=data_args.max_length, batch_size=train_args.per_device_eval_batch_size,
                                    device=accelerator.device, show_progress=show)

    def embed(view, captions=None) -> EmbeddedSplit:
        """Embed an image view (an evaluation split, or the training images as the querybank) with the model as it is
        now; `captions` are its captions flattened in view order, when already known."""
        captions = split_captions(view)[1] if captions is None else captions
        return embed_split(accelerator.unwrap_model(model), view, None, processor.tokenizer,
                           batch_size=train_args.per_device_eval_batch_size, device=accelerator.device,
                           vision_cache=pooled_images(view), text_cache=pooled_texts(captions), show_progress=show)

    resume = resolve_resume(train_args.output_dir, train_args.resume_from_checkpoint)
    # A resumed run keeps the topics its batches were drawn from (k-means need not repeat itself), so they are
    # read from the checkpoint rather than computed again.
    topics = read_loop_state(resume).get("topics") if resume else None
    need_topics = data_args.topic_batches and topics is None
    need_cca = cca_init is not None and not resume  # a resumed run's heads come from its checkpoint
    # Both start from the training captions' pooled features under the text tower as loaded: computed once.
    train_text_features = pooled_texts(list(train_pairs["caption"])) if need_topics or need_cca else None
    if need_topics:
        topics = training_image_topics(train_pairs, train_text_features, data_args, train_args.seed)
    if need_cca:
        initialise_heads_from_cca(model, train_pairs, pooled_images(to_image_view(train_pairs)), train_text_features,
                                  cca_init)
    cache_seconds = time.time() - cache_started
    if caches["vision"] is not None or caches["vision_hidden"] is not None:
        train_pairs = train_pairs.remove_columns("image")  # never decode images we do not need
    train_rows_transform = CachedFeatureTransform(train_transform, caches["vision"], caches["text"], caches["vision_hidden"],
                                                  mirror, caches["mirrored"], caches["text_hidden"], prefix_crop)

    def evaluate(split: str) -> dict:
        return embed(eval_views[split], eval_captions[split]).metrics()

    # --- optimiser and schedule
    optimizer = make_optimizer(model, backbone_lr=train_args.learning_rate, vision_backbone_lr=train_args.vision_learning_rate,
                               lora_lr=train_args.lora_learning_rate,
                               head_lr=train_args.head_learning_rate, scale_lr=train_args.logit_scale_learning_rate,
                               weight_decay=train_args.weight_decay)
    steps_per_epoch = math.ceil(len(make_train_loader(train_pairs, train_rows_transform, collator, data_args, train_args,
                                                      train_args.seed, 0, topics))
                                / accelerator.num_processes / train_args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * train_args.num_train_epochs
    if train_args.max_steps:
        total_steps = min(total_steps, train_args.max_steps)
    # Accelerate steps a prepared scheduler once per process at each optimiser step (split_batches=False):
    # the schedule is laid out in process-steps, or N processes would finish it after 1/N of the training
    processes = accelerator.num_processes
    scheduler = cosine_with_warmup(optimizer, int(train_args.warmup_ratio * total_steps) * processes,
                                   total_steps * processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if train_args.torch_compile:  # in place: parameter names, checkpoints and save_pretrained stay as they are
        compiled = compile_in_place(accelerator.unwrap_model(model), train_args.torch_compile_scope,
                                    backend=train_args.torch_compile_backend, mode=train_args.torch_compile_mode)
        logger.info("torch.compile (%s, scope %s): %d modules", train_args.torch_compile_backend,
                    train_args.torch_compile_scope, len(compiled))
    loss_fn = accelerator.unwrap_model(model).loss_fn
    if accelerator.log_with:
        accelerator.init_trackers("run_contrastive", config={k: str(v) for a in (model_args, data_args, train_args)
                                                              for k, v in vars(a).items()})

    # --- resume
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None, "history": []}
    if resume:
        state = load_checkpoint(accelerator, resume)
        logger.info("resumed from %s at epoch %d, step %d", resume, state["epoch"], state["global_step"])
    if topics is not None:
        state["topics"] = topics
    if not resume and train_args.eval_before_training and "validation" in eval_views:
        before = evaluate("validation")
        state["before_training"] = before
        logger.info("validation before training:\n%s", format_metrics_table({"untrained": before}))

    # The loss is checked on the host every step on CPU, where that is free, and on a GPU at each
    # logging step and before anything is saved, so a step never waits for the GPU.
    hint = (f"Nothing was saved from that step on. Try a lower --learning_rate/--head_learning_rate, --max_grad_norm 1.0, "
            f"--mixed_precision bf16 instead of fp16, or resume from the last checkpoint in {train_args.output_dir}.")
    train_step = TrainStep(accelerator, model, optimizer, scheduler, max_grad_norm=train_args.max_grad_norm,
                           extras=forward_extras, after_optimizer_step=getattr(loss_fn, "after_optimizer_step", None),
                           check_every=1 if accelerator.device.type == "cpu" else 0,
                           diverged_hint=hint, global_step=state["global_step"])

    def checkpoint():
        train_step.check()
        state["train_seconds"] = training_seconds()
        save_checkpoint(accelerator, train_args.output_dir, state["global_step"], state, train_args.save_total_limit)

    # --- train
    metric = train_args.metric_for_best_model
    best_dir = os.path.join(train_args.output_dir, "best")
    if accelerator.is_main_process:
        recover_swap(best_dir)  # a crash mid-swap must not lose the best model so far
    earlier_seconds = state.get("train_seconds", 0.0)  # training time of the runs this one resumes
    started = time.time()

    def training_seconds() -> float:
        """This run's training time plus that of the runs it resumes (kept in each checkpoint's state)."""
        return earlier_seconds + time.time() - started

    progress = tqdm(total=total_steps, initial=state["global_step"], desc="train", disable=not show)
    done = state["global_step"] >= total_steps
    while not done and state["epoch"] < train_args.num_train_epochs:
        epoch = state["epoch"]
        for augmentation in (mirror, crop_draw):
            if augmentation is not None:
                augmentation.set_epoch(epoch)  # before the loader exists: its workers get a copy
        loader = accelerator.prepare(make_train_loader(train_pairs, train_rows_transform, collator, data_args, train_args,
                                                       train_args.seed, epoch, topics))
        # A prepared loader sets its sampler's epoch to its own count of iterations when iterated, 0 for this
        # new loader: without this every epoch would replay epoch 0's batches (on one process).
        loader.set_epoch(epoch)
        if state["step_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["step_in_epoch"] * train_args.gradient_accumulation_steps)
        train_mode(accelerator.unwrap_model(model), freeze_batchnorm=train_args.freeze_batchnorm)
        for batch in loader:
            loss = train_step(batch)
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            progress.update(1)
            if state["global_step"] % train_args.logging_steps == 0:
                train_step.check()
                record = {"step": state["global_step"], "epoch": epoch, "loss": loss.item(),
                          "logit_scale": accelerator.unwrap_model(model).get_logit_scale().item(),
                          "lr": scheduler.get_last_lr()[0]}
                state["history"].append(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", scale=f"{record['logit_scale']:.1f}")
                accelerator.log({"train/" + k: v for k, v in record.items() if k != "step"}, step=state["global_step"])
            if train_args.checkpointing_steps and state["global_step"] % train_args.checkpointing_steps == 0:
                checkpoint()
            if state["global_step"] >= total_steps:
                done = True
                break
        # --- end of epoch: validate, keep the best, checkpoint
        train_step.check()
        state["epoch"] = epoch + 1
        state["step_in_epoch"] = 0
        if "validation" in eval_views:
            results = evaluate("validation")
            results_record = {"step": state["global_step"], "epoch": epoch + 1, **results}
            state["history"].append(results_record)
            accelerator.log({"val/" + k: v for k, v in results.items()}, step=state["global_step"])
            logger.info("epoch %d validation: i2t R@1 %.1f R@5 %.1f | t2i R@1 %.1f R@5 %.1f | rsum %.1f",
                        epoch + 1, results["i2t_r1"], results["i2t_r5"], results["t2i_r1"], results["t2i_r5"], results["rsum"])
            if is_better(metric, results[metric], state["best_metric"]):
                state["best_metric"], state["best_epoch"] = results[metric], epoch + 1
                state["best_validation"] = results
                if accelerator.is_main_process:
                    write_atomically(best_dir, accelerator.unwrap_model(model).save_pretrained)
        checkpoint()
    progress.close()
    train_seconds = training_seconds()
    accelerator.wait_for_everyone()

    # --- test the best model and export it
    final = accelerator.unwrap_model(model)
    if os.path.isdir(best_dir):
        final.load_state_dict(DualEncoderModel.from_pretrained(best_dir).state_dict())
    metrics = {"before_training": state.get("before_training"), "validation": state.get("best_validation"),
               "best_epoch": state.get("best_epoch"), "train_seconds": round(train_seconds, 1),
               "cache_seconds": round(cache_seconds, 1),
               "global_step": state["global_step"], "resumed_from": resume or None}
    final_embeddings = {}  # split -> EmbeddedSplit of the final model, kept for the querybank scores below
    if "test" in eval_views:
        final_embeddings["test"] = embed(eval_views["test"], eval_captions["test"])
        metrics["test"] = final_embeddings["test"].metrics()
        if final.config.image_flip_average and caches["vision"] is None:  # what the test-time flip average adds
            # (a frozen tower's cached features already hold the average, so there it cannot be undone)
            final.config.image_flip_average = False
            metrics["test_without_flip_average"] = evaluate("test")
            final.config.image_flip_average = True
    if train_args.querybank_beta is not None and eval_views:
        started = time.time()
        bank_images = to_image_view(train_pairs)
        if train_args.querybank_max_images:
            bank_images = bank_images.select(range(min(train_args.querybank_max_images, len(bank_images))))
        bank = embed(bank_images)
        for split in eval_views:
            embedded = final_embeddings.get(split) or embed(eval_views[split], eval_captions[split])
            metrics[f"{split}_querybank"] = querybank_metrics(embedded, bank, train_args.querybank_beta)
        metrics["querybank"] = {"beta": train_args.querybank_beta, "bank": "train", "images": len(bank.image_ids),
                                "captions": len(bank.captions), "seconds": round(time.time() - started, 1)}
        logger.info("querybank (%d training images, %d captions, beta %g): embedded and scored in %.0f s",
                    len(bank.image_ids), len(bank.captions), train_args.querybank_beta, time.time() - started)
    if accelerator.is_main_process:
        export(final, processor, metrics, (model_args, data_args, train_args), state)
    accelerator.end_training()
    return metrics


def export(model, processor, metrics: dict, args: tuple, state: dict) -> None:
    """Save the final model (merged, so it loads without peft), processor, metrics, logs and card."""
    model_args, data_args, train_args = args
    out = train_args.output_dir
    staging = os.path.join(out, ".export.tmp")  # written whole, then moved in: a crash never leaves half a model
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    if model.config.lora_rank and train_args.save_adapters:
        outside = model.trained_outside_adapters()
        if outside:
            logger.warning("no adapters-only copy: %d trained parameters are not adapters or heads (e.g. %s); the "
                           "exported model holds everything.", len(outside), outside[0])
        else:
            model.save_adapters(os.path.join(staging, "adapters"))
    model.merge_adapters()
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    with open(os.path.join(staging, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    with open(os.path.join(staging, "log_history.json"), "w") as handle:
        json.dump(state["history"], handle, indent=2)
    write_model_card(staging, model_config=model.config, args=args, location=out, metrics={
        k: v for k, v in (("untrained (validation)", metrics.get("before_training")),
                          ("best (validation)", metrics.get("validation")), ("test", metrics.get("test")),
                          ("test, querybank-normalised", metrics.get("test_querybank"))) if v})
    move_into(staging, out, last="metrics.json")
    tables = {name: metrics[key] for name, key in (("untrained (val)", "before_training"), ("trained (val)", "validation"),
                                                   ("trained (test)", "test"),
                                                   ("test, no flip average", "test_without_flip_average"),
                                                   ("val, querybank", "validation_querybank"),
                                                   ("test, querybank", "test_querybank"))
              if metrics.get(key)}
    print("\n" + format_metrics_table(tables) + "\n", flush=True)
    logger.info("saved the model, processor, metrics.json and README.md in %s", out)
    if train_args.push_to_hub:
        repo = train_args.hub_model_id or os.path.basename(os.path.abspath(out))
        model.push_to_hub(repo)
        processor.push_to_hub(repo)


if __name__ == "__main__":
    main()
