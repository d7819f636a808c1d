"""What the experiment scripts that re-score a trained Flickr8k run share: its arguments, data and model.

A trained `run_contrastive.py` directory plus the config it was trained with give the model, the
splits, and the depths of the cached vision and text prefixes the run used (read by setting the
towers' trainable parts as the config says; nothing trains here).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --run and --config, the scripts' own options to be added."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run_contrastive.py output directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "flickr8k_offline.yaml"),
                        help="the config the run was trained with (its data, max_length and trained parts)")
    return parser


@dataclass
class TrainedRun:
    model: object
    tokenizer: object
    train_pairs: object
    views: dict  # split name -> image view of the evaluation splits
    data_args: object
    vision_depth: int
    text_depth: int


def load_trained_run(run: str, config: str) -> TrainedRun:
    from dualencoder.processing import build_processor
    from dualencoder.trainable import frozen_prefix_depth, set_tower_trainable
    from dualencoder.training.arguments import parse_args
    from dualencoder.training.data import load_data
    from modeling_dualencoder import DualEncoderModel

    model_args, data_args, _ = parse_args(["--config", config])
    train_pairs, views = load_data(data_args, 42)
    model = DualEncoderModel.from_pretrained(run).eval()
    for tower, mode in (("vision", model_args.vision_train), ("text", model_args.text_train)):
        set_tower_trainable(model, tower, mode)  # only to read the prefix depths the run used
    return TrainedRun(model, build_processor(model.config).tokenizer, train_pairs, views, data_args,
                      frozen_prefix_depth(model, "vision"), frozen_prefix_depth(model, "text"))
