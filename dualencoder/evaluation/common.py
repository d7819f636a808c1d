"""What the evaluation commands share: loading a saved model or the untrained pair, a split, embedding it.

The evaluate, figures and report commands and the demo notebook all use these, so every number comes
from the same code path. A run's data options come from its `training_args.json` (written by
`run_contrastive.py` beside the model), never from the human-readable model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoProcessor

from backbones_dualencoder import OFFLINE_TEXT, OFFLINE_VISION
from data_scripts import DatasetFormatError, ImageTransform, load_image_caption_dataset, require_images
from data_scripts.synthetic import DEFAULT_JOB_IMAGE_SIZE, DEFAULT_JOB_NUM_IMAGES
from dualencoder.devices import pick_device
from dualencoder.errors import first_line
from dualencoder.evaluation.embed import EmbeddedSplit, embed_split
from dualencoder.metrics import similarity_gap
from dualencoder.processing import build_processor
from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

TRAINING_ARGS_FILE = "training_args.json"

logger = logging.getLogger(__name__)

# The training command's defaults (run_contrastive.py), used when the model dir does not say.
DEFAULT_NUM_IMAGES = DEFAULT_JOB_NUM_IMAGES  # the default job's synthetic set
DEFAULT_SYNTHETIC_IMAGE_SIZE = DEFAULT_JOB_IMAGE_SIZE
DEFAULT_MAX_LENGTH = 32
DEFAULT_SEED = 42
# Config fields that shape the projection heads: the untrained pair copies them from the trained model.
_HEAD_FIELDS = ("projection_dim", "projection_head", "projection_hidden_dim", "text_pooling", "vision_pooling")


# ----------------------------------------------------------------------------------------- models
def load_model(name_or_path: str, device: Optional[str] = None):
    """A saved model and its processor (a directory from `run_contrastive.py`, or a Hub id)."""
    model = DualEncoderModel.from_pretrained(name_or_path).to(pick_device(device)).eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def load_trained_config(model_dir: str) -> DualEncoderConfig:
    """The config of a saved model (a local directory or a Hub id), with an error that says what is wrong."""
    local = Path(model_dir)
    if local.exists() and not (local / "config.json").is_file():
        candidates = [*sorted((local / "checkpoints").glob("best*")), local / "best"]  # this layout, the one before
        best = next((path for path in candidates if path.is_dir()), None)
        hint = (f" (a run's exported model is its output_dir, or {best})" if best
                else " (a run writes it at the end: is the run finished?)")
        raise SystemExit(f"--model_dir {model_dir}: no config.json there, so it holds no saved model{hint}")
    try:
        return DualEncoderConfig.from_pretrained(model_dir)
    except OSError as exc:
        raise SystemExit(f"--model_dir {model_dir}: not a local model directory, and loading it as a Hub id failed "
                         f"({first_line(exc)})") from exc


def zero_shot_backbones(config=None, vision_model: Optional[str] = None, text_model: Optional[str] = None):
    """Backbones of the untrained baseline: the given ones, else the trained config's, else the offline pair."""
    vision = vision_model or getattr(config, "vision_model_name_or_path", None) or OFFLINE_VISION
    text = text_model or getattr(config, "text_model_name_or_path", None) or OFFLINE_TEXT
    return vision, text


def load_zero_shot(vision_model: str = OFFLINE_VISION, text_model: str = OFFLINE_TEXT, device: Optional[str] = None,
                   like=None, seed: int = 0):
    """The untrained joined model (pretrained backbones, fresh projection heads) and its processor.

    `like`: a trained model's config whose head shape (projection dim/kind, pooling), and input
    resolution when the vision backbone is the same, the baseline copies, so "before" and "after"
    differ only by training. `seed` fixes the random heads.
    """
    overrides = {name: getattr(like, name) for name in _HEAD_FIELDS if like is not None and hasattr(like, name)}
    if like is not None and getattr(like, "vision_model_name_or_path", None) == vision_model:
        overrides["image_size"] = like.image_size  # same backbone: same input resolution as the trained model
    torch.manual_seed(seed)
    model = DualEncoderModel.from_vision_text_pretrained(vision_model, text_model, **overrides)
    return model.to(pick_device(device)).eval(), build_processor(model.config)


# ------------------------------------------------------------------------------------------- data
def training_options(model_dir: Optional[str]) -> dict:
    """The options of the run that saved `model_dir`, from its `training_args.json` ({} when there is none).

    A run's best-model folders (`best-<step>`) and `checkpoint-<step>` folders have no file of their own: the run's,
    in its output_dir (`output_dir/checkpoints/`; one folder up in the old layout), is read for them.
    """
    if not model_dir:
        return {}
    path = Path(model_dir) / TRAINING_ARGS_FILE
    if not path.is_file() and re.fullmatch(r"best(-\d+)?|checkpoint-\d+", Path(model_dir).name):
        run = Path(model_dir).parent
        path = (run.parent if run.name == "checkpoints" else run) / TRAINING_ARGS_FILE
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("%s is unreadable (%s): the run's data options are unknown.", path, error)
        return {}
    return options if isinstance(options, dict) else {}


# the options of a run's own data files (run_clip.py's names): with the run's data set, they come from its run too
FILE_OPTIONS = ("train_file", "validation_file", "test_file", "image_column", "caption_column", "dataset_config_name")


def data_options(model_dir: Optional[str] = None, /, *, dataset: Optional[str] = None, split: str = "test",
                 max_images: Optional[int] = None, num_images: Optional[int] = None,
                 synthetic_image_size: Optional[int] = None, seed: Optional[int] = None,
                 max_length: Optional[int] = None, **given) -> dict:
    """The data options, the unset ones (None) filled from the run's training_args.json, then the training defaults.

    Unset, `dataset` is the run's: a model trained on a folder of tables is evaluated on that folder's test table
    (with the run's `train_file` ... `caption_column`), not on the synthetic set; without a run, "synthetic".
    For the synthetic set this matters too: image i is the same picture whatever `num_images` is, but
    the split boundaries move with it, so only the training run's `num_images` gives its test split.
    Takes the command's parsed arguments as `data_options(args.model_dir, **vars(args))`.
    """
    card = training_options(model_dir)
    dataset = dataset if dataset is not None else card.get("dataset") or "synthetic"
    same_data = card.get("dataset") == dataset

    def pick(value, name, default, needs_same_data=True):
        if value is not None:
            return value
        if name in card and (same_data or not needs_same_data):
            return card[name]
        return default

    if dataset == "synthetic" and num_images is None and not (same_data and "num_images" in card):
        logger.warning("%s records no num_images for the synthetic set (no training_args.json from its run), so "
                       "%d is assumed. The split boundaries move with num_images: if the model was trained with "
                       "another value, this split may hold its training images. Pass --num_images as in training.",
                       model_dir or "this evaluation", DEFAULT_NUM_IMAGES)
    return {
        "dataset": dataset,
        "split": split,
        "max_images": max_images,
        "num_images": pick(num_images, "num_images", DEFAULT_NUM_IMAGES),
        "synthetic_image_size": pick(synthetic_image_size, "synthetic_image_size", DEFAULT_SYNTHETIC_IMAGE_SIZE),
        "seed": pick(seed, "seed", DEFAULT_SEED, needs_same_data=False),
        "max_length": pick(max_length, "max_length", DEFAULT_MAX_LENGTH, needs_same_data=False),
        **{name: pick(given.get(name), name, None) for name in FILE_OPTIONS},
    }


def load_split(dataset: str = "synthetic", split: str = "test", max_images: Optional[int] = None, *,
               num_images: int = DEFAULT_NUM_IMAGES, synthetic_image_size: int = DEFAULT_SYNTHETIC_IMAGE_SIZE,
               seed: int = DEFAULT_SEED, **files):
    """One split in the image view (`image`, `image_id`, `captions`), cut to its first `max_images` images.

    `files` may hold the data-file options of `FILE_OPTIONS` (a run's tables and their columns); others are
    ignored, so `load_split(**data_options(...))` works."""
    kwargs = dict(num_images=num_images, image_size=synthetic_image_size) if dataset == "synthetic" else {}
    kwargs.update({name: files[name] for name in FILE_OPTIONS if files.get(name) is not None})
    where = files.get(f"{split}_file") or dataset
    try:  # every evaluation command: a bad file or an empty split is one line naming it, not a traceback
        splits = load_image_caption_dataset(dataset, view="images", seed=seed, **kwargs)
        if split not in splits:
            raise ValueError(f"{where} has no split {split!r}; it has {sorted(splits)}")
        view = require_images(splits[split], split, where)
    except DatasetFormatError as error:
        raise SystemExit(f"error: {error}") from None
    if max_images:
        view = view.select(range(min(max_images, len(view))))
    return view


class LazyImages(Sequence):
    """The images of a split as a sequence, decoded only when asked for (galleries and grids show a few)."""

    def __init__(self, view):
        self.view = view

    def __len__(self):
        return len(self.view)

    def __getitem__(self, index):
        return self.view[int(index)]["image"]


def embed(model, processor, view, *, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 32,
          show_progress: bool = True) -> EmbeddedSplit:
    """Embed a split's images and captions with `embed_split` (evaluation transform of the processor)."""
    transform = ImageTransform(processor.image_processor, train=False)
    return embed_split(model, view, transform, processor.tokenizer, max_length=max_length, batch_size=batch_size,
                       show_progress=show_progress)


def describe(embedded: EmbeddedSplit) -> dict:
    """Retrieval metrics and the similarity gap (mean aligned - mean misaligned cosine) of one embedding."""
    return {"metrics": embedded.metrics(),
            "similarity": similarity_gap(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image)}


# ---------------------------------------------------------------------------------------- command
def add_data_arguments(parser: argparse.ArgumentParser, max_images: Optional[int] = None) -> None:
    """Options shared by the evaluate, figures and report commands."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None,
                      help="'synthetic', a Flickr8k directory (official/Kaggle/Karpathy layout), a folder of your "
                           "images and captions (doc/OWN_DATA.md), or a Hub id (default: the data the model was "
                           "trained on, from its training_args.json; else 'synthetic')")
    for name in ("train_file", "validation_file", "test_file"):
        data.add_argument(f"--{name}", default=None,
                          help=f"with --dataset a folder: its {name.split('_')[0]} table, as in training (default: the "
                               "run's when --dataset is the run's)")
    data.add_argument("--image_column", default=None, help="the tables' image column (default: the run's, else guessed)")
    data.add_argument("--caption_column", default=None,
                      help="the tables' caption column (default: the run's, else guessed)")
    data.add_argument("--split", default="test", help="train | validation | test (default: test)")
    data.add_argument("--max_images", type=int, default=max_images,
                      help=f"evaluate the first N images of the split only (default: {max_images or 'all'})")
    data.add_argument("--num_images", type=int, default=None,
                      help="synthetic only: size of the generated set (default: the run's, else "
                           f"{DEFAULT_NUM_IMAGES}); it decides where the test split starts")
    data.add_argument("--synthetic_image_size", type=int, default=None,
                      help=f"synthetic only: image size (default: the run's, else {DEFAULT_SYNTHETIC_IMAGE_SIZE})")
    data.add_argument("--seed", type=int, default=None, help=f"data seed (default: the run's, else {DEFAULT_SEED})")
    data.add_argument("--max_length", type=int, default=None,
                      help=f"tokens per caption (default: the run's, else {DEFAULT_MAX_LENGTH})")
    run = parser.add_argument_group("compute")
    run.add_argument("--batch_size", type=int, default=32, help="images/captions embedded per batch")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")


def add_zero_shot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision_model", default=None,
                        help="untrained baseline's vision backbone (default: the model's, else offline:efficientnet-lite0)")
    parser.add_argument("--text_model", default=None,
                        help="untrained baseline's text backbone (default: the model's, else offline:all-minilm-l6-v2)")
