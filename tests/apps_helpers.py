"""Saved tiny models and small photo folders for the tests of `dualencoder.apps`."""

from pathlib import Path

import numpy as np
from PIL import Image

from dualencoder.processing import build_processor
from modeling_dualencoder import DualEncoderConfig
from tests.tiny import save_tiny_model_dir

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}


def save_tiny_app_model(path, **overrides) -> str:
    """A tiny model directory as a user has it: weights, config, code and the processor beside them."""
    save_tiny_model_dir(path, **overrides)
    build_processor(DualEncoderConfig.from_pretrained(path)).save_pretrained(path)
    return str(path)


def photo(colour: str, size=(40, 32), seed: int = 0) -> Image.Image:
    """A noisy image of one colour with a dark square, so that two photos are never identical."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    pixels[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = 20
    return Image.fromarray(pixels)


def write_photos(folder, names: dict) -> list[Path]:
    """Write {relative path: colour} under `folder` (format from the suffix); returns the paths."""
    paths = []
    for seed, (name, colour) in enumerate(names.items()):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(colour, seed=seed).save(path)
        paths.append(path)
    return paths
