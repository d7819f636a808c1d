"""Turning images and texts into embeddings with a saved model: PyTorch or its ONNX export.

Both encoders read only what a user has, the model directory: PyTorch through
`AutoModel.from_pretrained(dir, trust_remote_code=True)`, ONNX through the graphs that
`python -m dualencoder.apps.export` wrote under `dir/onnx/` (no torch needed to run them). Both
use the image processor and tokenizer saved beside the weights, return float32 NumPy arrays of
L2-normalised rows, and so are interchangeable: an index made with one is queried with the other.

A model is identified by `model_fingerprint(dir)`, a hash of its config and weight files: an index
and an ONNX export each record the fingerprint of the model that made them, and refuse another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

ONNX_SUBDIR = "onnx"
IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
EXPORT_RECORD = "export.json"
# Queries and prompts are short; training used 32 tokens. The tiny test towers have 64 positions.
MAX_TEXT_TOKENS = 64
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class Encoder(Protocol):
    """What the apps need from a model: normalised embeddings as float32 arrays."""

    backend: str

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def model_fingerprint(model_dir) -> str:
    """A short hash of a model directory's config.json and weight files (their names and bytes)."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise SystemExit(f"{model_dir}: no config.json, so no saved model there (pass the directory a run exported, "
                         "the one with config.json and model.safetensors)")
    files = [config] + sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_preprocessing(model_dir):
    """(image processor, tokenizer) saved beside the model, loaded without the model's config or code.

    `AutoProcessor`/`AutoTokenizer` read config.json, whose model type only the directory's own code
    defines, so they would ask to run that code; these classes are plain transformers ones, named in
    the saved files (what `build_processor(config).save_pretrained(dir)` wrote).
    """
    import transformers

    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
        tokenizer_class = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())["tokenizer_class"]
        tokenizer = getattr(transformers, tokenizer_class).from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise SystemExit(f"{model_dir}: no processor could be loaded ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); save one beside the model with "
                         "build_processor(model.config).save_pretrained(dir)") from exc
    return image_processor, tokenizer


def _tokenize(tokenizer, texts: Sequence[str], tensors: str) -> dict:
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors=tensors)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class TorchEncoder:
    """The saved model run by PyTorch (`AutoModel`, remote code from the directory)."""

    backend = "torch"

    def __init__(self, model_dir, device: str = "auto"):
        import torch
        from transformers import AutoModel

        from dualencoder.devices import pick_device

        self._torch = torch
        self.device = pick_device(device)
        self.model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True).to(self.device).eval()
        self.image_processor, self.tokenizer = load_preprocessing(model_dir)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with self._torch.inference_mode():
            return self.model.get_image_features(pixels.to(self.device)).float().cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        inputs = _tokenize(self.tokenizer, texts, "pt")
        with self._torch.inference_mode():
            embeds = self.model.get_text_features(**{k: v.to(self.device) for k, v in inputs.items()})
        return embeds.float().cpu().numpy()


class OnnxEncoder:
    """The ONNX export of a saved model (`dir/onnx/`), run by onnxruntime on the CPU; no torch involved."""

    backend = "onnx"

    def __init__(self, model_dir):
        import onnxruntime

        folder = Path(model_dir) / ONNX_SUBDIR
        record = folder / EXPORT_RECORD
        if not record.is_file():
            raise SystemExit(f"{folder}: no ONNX export there; make one with "
                             f"`python -m dualencoder.apps.export --model_dir {model_dir}`")
        exported = json.loads(record.read_text())["model_fingerprint"]
        if exported != model_fingerprint(model_dir):
            raise SystemExit(f"{folder} was exported from another version of the model in {model_dir} (its config or "
                             f"weights changed since); export it again with "
                             f"`python -m dualencoder.apps.export --model_dir {model_dir}`")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.image_session = onnxruntime.InferenceSession(str(folder / IMAGE_GRAPH), options,
                                                          providers=["CPUExecutionProvider"])
        self.text_session = onnxruntime.InferenceSession(str(folder / TEXT_GRAPH), options,
                                                         providers=["CPUExecutionProvider"])
        self.image_processor, self.tokenizer = load_preprocessing(model_dir)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=list(images), return_tensors="np")["pixel_values"]
        return self.image_session.run(None, {"pixel_values": pixels.astype(np.float32)})[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        inputs = _tokenize(self.tokenizer, texts, "np")
        return self.text_session.run(None, {k: v.astype(np.int64) for k, v in inputs.items()})[0]


def load_encoder(model_dir, backend: str = "torch", device: str = "auto") -> Encoder:
    """The encoder of `model_dir` for `backend` ("torch" or "onnx")."""
    if backend == "onnx":
        return OnnxEncoder(model_dir)
    if backend == "torch":
        return TorchEncoder(model_dir, device)
    raise SystemExit(f"--backend {backend}: expected torch or onnx")


def add_encoder_arguments(parser: argparse.ArgumentParser, model_required: bool = True, batches: bool = True) -> None:
    """--model_dir, --backend, --device (and --batch_size with `batches`): how an app command runs the model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_dir", required=model_required, default=None,
                       help="a saved model directory (a run's output_dir: config.json, model.safetensors, processor)"
                       + ("" if model_required else "; default: the one the index was made with"))
    group.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                       help="torch: the model itself; onnx: its export under MODEL_DIR/onnx "
                            "(python -m dualencoder.apps.export), no torch needed (default: torch)")
    group.add_argument("--device", default="auto", help="torch backend: auto | cpu | cuda | cuda:1 ...")
    if batches:
        group.add_argument("--batch_size", type=int, default=32, help="images embedded per batch (default: 32)")

