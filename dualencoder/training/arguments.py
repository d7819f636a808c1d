"""Training options as dataclasses: readable from YAML, overridable on the command line.

`python run_contrastive.py --config configs/default.yaml --learning_rate 1e-4` reads the file,
then applies the command line. Unknown keys, in the file or on the command line, are an error
that names them; `--help` lists every option with its help text.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml
from transformers import HfArgumentParser

from data_scripts.synthetic import DEFAULT_JOB_IMAGE_SIZE, DEFAULT_JOB_NUM_IMAGES
from dualencoder.metrics import STANDARD_KS


@dataclass
class ModelArguments:
    vision_model: str = field(default="offline:efficientnet-lite0", metadata={"help": "Vision backbone: an HF id/path (e.g. google/vit-base-patch16-224-in21k), timm:<name>, or offline:efficientnet-lite0."})
    text_model: str = field(default="offline:all-minilm-l6-v2", metadata={"help": "Text backbone: an HF id/path (e.g. distilbert-base-uncased) or offline:all-minilm-l6-v2."})
    vision_weights: Optional[str] = field(default=None, metadata={"help": "Local state-dict file for a timm vision backbone."})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Start from a saved dual encoder directory instead of joining two backbones."})
    image_size: Optional[int] = field(default=None, metadata={"help": "Input resolution of the vision tower (default: the backbone's own, e.g. 224). Convolutional backbones run faster smaller."})
    projection_dim: int = field(default=512, metadata={"help": "Width of the shared embedding space."})
    projection_head: str = field(default="linear", metadata={"help": "Projection head: linear or mlp."})
    projection_hidden_dim: Optional[int] = field(default=None, metadata={"help": "Hidden width of the mlp head (default: the tower's width)."})
    projection_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the mlp head."})
    text_pooling: str = field(default="mean", metadata={"help": "Text pooling: mean, cls or pooler."})
    logit_scale_init_value: float = field(default=2.6592, metadata={"help": "Initial log of the logit scale (log(1/0.07) as CLIP)."})
    logit_bias_init_value: Optional[float] = field(default=None, metadata={"help": "Learn a logit bias starting here (SigLIP: -10)."})
    loss: str = field(default="clip", metadata={"help": "Loss: clip, ntxent, triplet, siglip, or a sum such as clip+triplet."})
    loss_options: str = field(default="{}", metadata={"help": "Options of the loss as a YAML/JSON mapping, e.g. '{margin: 0.1, triplet_weight: 0.5}' for clip+triplet (see dualencoder/losses.py)."})
    head_init: str = field(default="random", metadata={"help": "How the projection heads start: random, or cca (mlp heads only): exactly the linear CCA map of the training pairs' pooled features from the towers as loaded, the linear-cca baseline's map (dualencoder/head_init.py), so training starts from that floor instead of from chance. Costs one pass of each tower's trained top over the training split.", "choices": ["random", "cca"]})
    head_init_options: str = field(default="{}", metadata={"help": "head_init cca only, a YAML/JSON mapping: ridge (relative, default 10), dims (CCA directions kept, default 256; at most projection_hidden_dim/2), power (weight of each direction: its canonical correlation to this power, default 0)."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (0: no adapters)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_towers: list[str] = field(default_factory=lambda: ["text"], metadata={"help": "Towers that get LoRA adapters: vision and/or text."})
    lora_vision_blocks: Optional[int] = field(default=None, metadata={"help": "Adapters in the vision tower's last N blocks only (default: every block). The blocks below stay pretrained, so with vision_train frozen their output is cached once (the prefix cache), as for vision_train top:N."})
    lora_text_blocks: Optional[int] = field(default=None, metadata={"help": "Adapters in the text tower's last N layers only (default: every layer); with text_train frozen the layers below are cached once, as for text_train top:N."})
    image_flip_average: Optional[bool] = field(default=None, metadata={"help": "Embed each image, in evaluation and inference, as the mean of its own and its mirror image's features (test-time augmentation at twice the vision cost; saved in the model config). Default: the model's own setting (off for new models)."})
    vision_chunk_size: Optional[int] = field(default=None, metadata={"help": "Run the vision tower on chunks of this many images (same result, saved in the model config): on a 2-core CPU, chunks of 32 ran EfficientNet-Lite0's trained top 2.1x and its cached prefix 3.1x faster than batches of 128 (benchmarks/README.md, Vision chunks). Default: the model's own setting (off for new models)."})
    vision_train: str = field(default="full", metadata={"help": "What trains in the vision backbone besides adapters: full, frozen or top:N (last N blocks)."})
    text_train: str = field(default="full", metadata={"help": "What trains in the text backbone besides adapters: full, frozen or top:N."})


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={"help": "synthetic (embedded generator), a Flickr8k directory (official/Kaggle/Karpathy layouts) or a Hub dataset id."})
    num_images: int = field(default=DEFAULT_JOB_NUM_IMAGES, metadata={"help": "synthetic only: how many images to generate."})
    synthetic_image_size: int = field(default=DEFAULT_JOB_IMAGE_SIZE, metadata={"help": "synthetic only: generated image size (resized to the backbone's size)."})
    max_length: int = field(default=32, metadata={"help": "Tokens per caption after truncation."})
    augment: bool = field(default=False, metadata={"help": "Random resized crop on training images (see flip_augment for mirroring). With the vision prefix cache (vision_train: top:N) the cached maps are cropped and resized back instead (data_scripts/feature_crop.py); a fully frozen, pooled vision cache is not augmented."})
    flip_augment: bool = field(default=False, metadata={"help": "Mirror half the training images each epoch, never one whose captions say left or right. With cached vision features or prefix, the mirrored training images are cached too (twice the caching time)."})
    unique_image_batches: bool = field(default=True, metadata={"help": "Never put two captions of one image in a batch."})
    batch_by_image: bool = field(default=False, metadata={"help": "Batches of per_device_train_batch_size images, each with all its captions of the epoch (see captions_per_image) as positives of one another; cached image features are embedded once per image. Overrides unique_image_batches."})
    topic_batches: int = field(default=0, metadata={"help": "batch_by_image only: cluster the training images into this many topics (k-means of their captions' pretrained text embeddings) and draw topic_share of each batch from one or two topics, so in-batch negatives include look-alikes (dualencoder/training/topics.py). 0: random batches."})
    topic_share: float = field(default=0.5, metadata={"help": "With topic_batches: the share of each batch's images drawn by topic; the rest are random."})
    captions_per_image: int = field(default=0, metadata={"help": "Captions of each image used per epoch (0: all; 1: one, a different one each epoch)."})
    on_bad_image: str = field(default="error", metadata={"help": "A corrupt or missing image: error or skip (skips are counted and reported)."})
    max_train_images: Optional[int] = field(default=None, metadata={"help": "Use only the first N training images (quick runs)."})
    max_eval_images: Optional[int] = field(default=None, metadata={"help": "Use only the first N validation/test images."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    pixel_store_size: int = field(default=0, metadata={"help": "Decode every image file once, shrink it so its shorter side is this many pixels (never enlarged) and keep the uint8 pixels in one memory-mapped Arrow file, so training and evaluation read pixels instead of decoding JPEGs (data_scripts/pixel_store.py). Kept in feature_cache_dir (else output_dir) and reused while the files and size are unchanged. Use at least the model's input size. 0: off."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/default", metadata={"help": "Where checkpoints, the final model, metrics.json and the model card go."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs over the training pairs."})
    max_steps: int = field(default=0, metadata={"help": "Stop after this many optimiser steps (0: no limit)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pairs per process per step."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size when embedding for evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of backbone weights."})
    vision_learning_rate: Optional[float] = field(default=None, metadata={"help": "Learning rate of the vision backbone's weights, when it should differ from --learning_rate (e.g. top blocks of a small CNN)."})
    lora_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of LoRA adapters."})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the projection heads."})
    logit_scale_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the temperature (and logit bias)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not applied to norms, biases, scale)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up before the cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model for training with torch.compile (GPU; on CPU it rarely pays). On the H100, ViT-B/16 + DistilBERT bf16 went from 2,072 to 2,573 samples/s with the default scope, 2,812 with --torch_compile_mode reduce-overhead (benchmarks/README.md)."})
    torch_compile_scope: str = field(default="blocks", metadata={"help": "What to compile: blocks (each transformer layer / repeated block: compiles in seconds, measured fastest) or model (the whole forward: slower to compile, and slower on the H100 for ViT-B/16).", "choices": ["blocks", "model"]})
    torch_compile_mode: Optional[str] = field(default=None, metadata={"help": "torch.compile mode: reduce-overhead (CUDA graphs: fastest when batch shapes are fixed; each new text length records new graphs), max-autotune, or unset (default)."})
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend (as in transformers' TrainingArguments): inductor generates fused kernels; eager only traces (for debugging)."})
    channels_last: bool = field(default=False, metadata={"help": "Store a convolutional vision tower (timm) channels-last. On the H100 it doubled EfficientNet-Lite0 + MiniLM bf16 training (1,708 to 3,603 samples/s, benchmarks/README.md)."})
    seed: int = field(default=42, metadata={"help": "Seed of the model heads, data order and augmentation."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and temperature every N steps."})
    checkpointing_steps: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: at epoch ends only)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many checkpoints (oldest removed)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "latest, or a checkpoint directory, to continue a run exactly."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete the checkpoints an earlier run left in output_dir and start over. Without it, a new run (no resume_from_checkpoint) in an output_dir holding checkpoints is an error: its checkpoints would mix with the old run's, and 'latest' would pick the old one."})
    metric_for_best_model: str = field(default="rsum", metadata={"help": "Validation metric that picks the best model (higher is better for recalls/rsum, lower for *_medr/*_meanr)."})
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate the untrained (zero-shot) model first."})
    querybank_beta: Optional[float] = field(default=None, metadata={"help": "Also report validation and test retrieval with querybank normalisation (QB-Norm: each gallery item's score is offset by how strongly the training split's embeddings match it, an inverted softmax at this inverse temperature; dualencoder/querybank.py), beside the plain cosine metrics. Costs one embedding pass over the training split at the end. Unset: off."})
    querybank_max_images: int = field(default=0, metadata={"help": "With --querybank_beta: the first N training images (and their captions) form the querybank (0: all). A bigger bank normalises better and costs one embedding pass more."})
    freeze_batchnorm: bool = field(default=False, metadata={"help": "Keep every BatchNorm layer's running statistics (eval mode) while its weights train: steadier when fine-tuning a pretrained CNN on little data."})
    cache_frozen_features: bool = field(default=True, metadata={"help": "Compute a frozen, adapter-free tower's features once and reuse them; with vision_train/text_train top:N, cache the output of the frozen blocks/layers below (the prefix cache) and run only the top each step."})
    prefix_cache_dtype: str = field(default="float16", metadata={"help": "Storage type of the cached vision prefix and text prefix (token states below the trained layers): float16 halves memory (about 5e-4 relative error), float32 trains exactly as without the cache.", "choices": ["float16", "bfloat16", "float32"]})
    feature_cache_dir: Optional[str] = field(default="~/.cache/dualencoder/features", metadata={"help": "Where frozen vision features are kept between runs, keyed by a hash of the weights, preprocessing and images ('' to keep them in memory only)."})
    report_to: str = field(default="tensorboard", metadata={"help": "Trackers: tensorboard, wandb, all or none."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model to the Hub (needs the internet and a token)."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})
    save_adapters: bool = field(default=True, metadata={"help": "With LoRA, also save an adapters-only copy in output_dir/adapters."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)
# the keys of dualencoder.metrics.retrieval_metrics at its standard K, which validation reports
BEST_MODEL_METRICS = tuple(f"{direction}_{name}" for direction in ("i2t", "t2i")
                           for name in (*(f"r{k}" for k in STANDARD_KS), "medr", "meanr")) + ("rsum",)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "default.yaml")


def _known_fields() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}


def read_config_file(path: str) -> dict:
    """A YAML file of options; a key that is no option is an error naming it and the file."""
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} not found") from None
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path} must be a mapping of option: value")
    unknown = sorted(set(values) - _known_fields())
    if unknown:
        raise SystemExit(f"error: {path}: unknown option(s) {', '.join(unknown)}; see --help for the valid ones")
    return values


def parse_args(argv: Optional[list[str]] = None):
    """(model, data, train) options from `--config FILE` plus command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML file of options; command-line options override it (default: configs/default.yaml, "
                             "the embedded default job, so a bare `accelerate launch run_contrastive.py` runs it).")
    # the config file's values are the parser's defaults, so read --config first (either form: --config F, --config=F)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", default=DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    config_path = first.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**read_config_file(config_path))
    namespace = parser.parse_args(argv)  # argparse names unknown options itself
    values = vars(namespace)
    values.pop("config", None)
    for name in ("loss_options", "head_init_options"):
        if isinstance(values[name], dict):  # a mapping in the YAML file stays a mapping
            values[name] = yaml.safe_dump(values[name], default_flow_style=True).strip()
    model_args, data_args, train_args = (cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in ARGUMENT_CLASSES)
    if model_args.head_init == "cca" and model_args.projection_head != "mlp":
        parser.error("--head_init cca needs --projection_head mlp: the MLP's first-layer bias centres the features "
                     "(dualencoder/head_init.py)")
    if model_args.head_init != "random" and model_args.model_name_or_path:
        parser.error(f"--head_init {model_args.head_init} starts new heads; a model from --model_name_or_path keeps its "
                     f"trained ones (pass --head_init random, which also overrides a config file's head_init)")
    if train_args.logging_steps < 1:
        parser.error(f"--logging_steps {train_args.logging_steps}: log every N >= 1 steps")
    if train_args.metric_for_best_model not in BEST_MODEL_METRICS:  # before the first epoch, not after it
        parser.error(f"--metric_for_best_model {train_args.metric_for_best_model!r} is not a validation metric; "
                     f"choose one of {', '.join(BEST_MODEL_METRICS)}")
    if data_args.topic_batches and not data_args.batch_by_image:  # before an hour of caching, not after
        parser.error("--topic_batches draws whole images by topic: it needs --batch_by_image true")
    return model_args, data_args, train_args
