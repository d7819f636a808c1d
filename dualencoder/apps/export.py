"""Export both towers of a saved model to ONNX, so embedding needs no torch; checked against PyTorch.

    python -m dualencoder.apps.export --model_dir outputs/default
    python -m dualencoder.apps.index --backend onnx --model_dir outputs/default --images ~/Pictures --index_dir ...

Writes MODEL_DIR/onnx/ (or --output_dir):
- image_encoder.onnx: pixel_values [batch, 3, H, W] float32 -> image_embeds [batch, D]
- text_encoder.onnx: input_ids, attention_mask [batch, sequence] int64 -> text_embeds [batch, D]
with the projection heads and the L2 normalisation inside, batch and sequence axes dynamic; the
inputs are what the saved image processor and tokenizer make (`AutoProcessor.from_pretrained(MODEL_DIR)`, with
`return_tensors="np"`). Each graph is then run by onnxruntime on inputs of another batch size and
sequence length than the export's, and compared with PyTorch: the largest absolute difference
is printed and recorded in export.json, and above `--atol` the export fails (exit status 1) and
export.json is not written, so the `--backend onnx` commands refuse the graphs.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from dualencoder.apps.encoders import EXPORT_RECORD, IMAGE_GRAPH, ONNX_SUBDIR, TEXT_GRAPH, load_preprocessing, model_fingerprint

logger = logging.getLogger(__name__)
DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
# Texts of different lengths: the export traces one shape, the check runs others.
EXPORT_TEXTS = ["a photo of a dog.", "a red circle to the left of a small blue square"]
CHECK_TEXTS = ["a cat", "two people riding bicycles down a busy street in the rain at night", "a green star."]


class ImageTower(nn.Module):
    """pixel_values -> L2-normalised image embeddings (backbone, projection head, normalisation)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values)


class TextTower(nn.Module):
    """(input_ids, attention_mask) -> L2-normalised text embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids, attention_mask)


def _export(module: nn.Module, inputs: tuple, path: Path, input_names, output_name: str, dynamic: dict, opset: int):
    # The TorchScript exporter (dynamo=False) handles the towers' data-dependent Python (pooling, masks) by
    # tracing; the wrapper is put in eval mode because the exporter restores the wrapper's mode afterwards.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), input_names=list(input_names), output_names=[output_name],
                          dynamic_axes={**dynamic, output_name: {0: "batch"}}, opset_version=opset, dynamo=False)


def export_onnx(model_dir, output_dir=None, opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL) -> dict:
    """Write both graphs, check them against PyTorch; returns the record (max_abs_diff per tower)."""
    import onnxruntime
    from transformers import AutoModel

    fingerprint = model_fingerprint(model_dir)
    output_dir = Path(output_dir) if output_dir else Path(model_dir) / ONNX_SUBDIR
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / EXPORT_RECORD).unlink(missing_ok=True)  # no record until these graphs pass the check
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    model.config.vision_chunk_size = None  # chunking splits by batch size, which tracing would freeze
    image_processor, tokenizer = load_preprocessing(model_dir)

    def pixels(n: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]
        return image_processor(images=images, return_tensors="pt")["pixel_values"]

    def tokens(texts) -> tuple:
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    image_path, text_path = output_dir / IMAGE_GRAPH, output_dir / TEXT_GRAPH
    _export(ImageTower(model), (pixels(2, 0),), image_path, ["pixel_values"], "image_embeds",
            {"pixel_values": {0: "batch"}}, opset)
    _export(TextTower(model), tokens(EXPORT_TEXTS), text_path, ["input_ids", "attention_mask"], "text_embeds",
            {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}, opset)

    check_pixels, (check_ids, check_mask) = pixels(3, 1), tokens(CHECK_TEXTS)
    with torch.inference_mode():
        image_ref = model.get_image_features(check_pixels).numpy()
        text_ref = model.get_text_features(check_ids, check_mask).numpy()
    image_onnx = onnxruntime.InferenceSession(str(image_path), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": check_pixels.numpy()})[0]
    text_onnx = onnxruntime.InferenceSession(str(text_path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": check_ids.numpy(), "attention_mask": check_mask.numpy()})[0]
    diff = {"image": float(np.abs(image_onnx - image_ref).max()), "text": float(np.abs(text_onnx - text_ref).max())}
    record = {"model_fingerprint": fingerprint, "opset": opset, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "max_abs_diff": diff, "atol": atol,
              "graphs": {IMAGE_GRAPH: {"inputs": ["pixel_values"], "output": "image_embeds"},
                         TEXT_GRAPH: {"inputs": ["input_ids", "attention_mask"], "output": "text_embeds"}}}
    if max(diff.values()) > atol:
        raise SystemExit(f"{output_dir}: ONNX differs from PyTorch by up to {diff} (more than --atol {atol}); "
                         "the graphs are left there for inspection, unrecorded")
    (output_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualencoder.apps.export", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a saved model directory (config.json, weights, processor)")
    parser.add_argument("--output_dir", default=None, help="where the graphs go (default: MODEL_DIR/onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest accepted |ONNX - PyTorch| per embedding value (default: {DEFAULT_ATOL:g})")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    record = export_onnx(args.model_dir, args.output_dir, args.opset, args.atol)
    folder = args.output_dir or Path(args.model_dir) / ONNX_SUBDIR
    print(f"{folder}: {IMAGE_GRAPH}, {TEXT_GRAPH}; max |ONNX - PyTorch|: image {record['max_abs_diff']['image']:.2e}, "
          f"text {record['max_abs_diff']['text']:.2e} (atol {args.atol:g})")
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
