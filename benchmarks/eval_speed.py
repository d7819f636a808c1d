#!/usr/bin/env python
"""Seconds to embed and rank Flickr8k's test split, and to rank a synthetic 100k-image index.

Stage 1 runs the evaluation code path every number of the project comes from
(dualencoder.evaluation.embed.embed_split, then dualencoder.metrics.retrieval_metrics) on the
Flickr8k test split (1,000 images, 5,000 captions) with a given model: the offline pair when its
PyPI packages are installed, a random-init one of the same architecture otherwise, or a saved
model directory. Stage 2 ranks random L2-normalised embeddings (100k images, 1 caption each by
default, D=512) with the chunked retrieval_metrics: the cost of a large index is matmul + ranking,
independent of the model.

    python -m benchmarks.eval_speed --batch_size 256 --precision bf16 --out benchmarks/results/eval_speed_h100.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


import torch

from benchmarks.common import (
    add_threads_argument,
    command_line,
    device_info,
    fmt,
    load_tokenizer,
    markdown_table,
    offline_pair_available,
    pick_device,
    set_threads,
    synchronize,
    timed,
    write_json,
)

DEFAULT_DATA = os.path.join("..", "shared", "data", "flickr8k")
MODELS = ("offline", "random", "tiny")


def build_model(name: str, captions: list[str], vision: str = "offline:efficientnet-lite0"):
    """(model, image processor, tokenizer, what was built) for `--model`; `vision` is the offline
    vision alias that `--model offline` pairs with MiniLM."""
    from transformers import BertConfig, VisionTextDualEncoderProcessor

    from benchmarks.throughput import minilm_like
    from dualencoder.processing import build_processor, image_processor_from_config
    from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

    torch.manual_seed(0)  # fresh projection heads: the same ones every run
    if name not in MODELS:  # a saved model directory
        model = DualEncoderModel.from_pretrained(name)
        processor = VisionTextDualEncoderProcessor.from_pretrained(name)
        return model, processor.image_processor, processor.tokenizer, name
    if name == "offline" and offline_pair_available():
        model = DualEncoderModel.from_vision_text_pretrained(vision, "offline:all-minilm-l6-v2")
        processor = build_processor(model.config)
        return model, processor.image_processor, processor.tokenizer, f"offline pair (pretrained weights: {vision})"
    tokenizer = load_tokenizer(captions)
    if name == "tiny":
        text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128)
        config = DualEncoderConfig(timm_model_name="test_efficientnet", text_config=text, image_size=32, projection_dim=16)
        described = "tiny random-init (timm test_efficientnet + 2-layer BERT)"
    else:
        text = minilm_like()
        text.vocab_size = max(text.vocab_size, len(tokenizer))
        config = DualEncoderConfig(timm_model_name="tf_efficientnet_lite0", text_config=text, image_size=224,
                                   image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
        described = "EfficientNet-Lite0 + MiniLM-L6 architecture, random weights (offline packages not installed)"
    model = DualEncoderModel(config)
    return model, image_processor_from_config(config), tokenizer, described


TIMED_METHODS = ("encode_vision", "encode_text", "project_image", "project_text")


def time_method(model, name: str, seconds: dict, device: torch.device) -> None:
    """Make `model.<name>` add its (synchronised) wall time to `seconds[name]`."""
    original = getattr(model, name)

    def wrapper(*args, **kwargs):
        with timed(seconds, name, device):
            return original(*args, **kwargs)

    setattr(model, name, wrapper)


def flickr_stage(args, device: torch.device) -> dict:
    """Load the split, embed its images and captions, rank: seconds for each."""
    from data_scripts import ImageTransform, build_pixel_store, load_image_caption_dataset, undecoded_images
    from dualencoder.evaluation.embed import embed_split

    seconds = {}
    with timed(seconds, "load"):
        kwargs = {"verify_images": False} if args.data != "synthetic" else {"num_images": 64, "image_size": 64}
        view = load_image_caption_dataset(args.data, view="images", **kwargs)[args.split]
        if args.max_images:
            view = view.select(range(min(args.max_images, len(view))))
    captions = [c for caps in view["captions"] for c in caps]
    with timed(seconds, "build model"):
        model, image_processor, tokenizer, described = build_model(args.model, captions)
        model.to(device)
    # the towers run over the split first (pooled features), then the heads project those: time all four
    for method in TIMED_METHODS:
        time_method(model, method, seconds, device)
    store, scratch = None, tempfile.mkdtemp(prefix="pixel_store_")
    try:
        if args.pixel_store_size:
            with timed(seconds, "pixel store build"):
                store = build_pixel_store([view], args.pixel_store_size, scratch, show_progress=False)
            view = undecoded_images(view)  # the transform reads the store, by file path
        autocast = torch.bfloat16 if args.precision == "bf16" else None
        with timed(seconds, "embed", device):
            embedded = embed_split(model, view, ImageTransform(image_processor, train=False, pixel_store=store),
                                   tokenizer, max_length=args.max_length, batch_size=args.batch_size, device=device,
                                   show_progress=False, autocast_dtype=autocast)
    finally:
        shutil.rmtree(scratch)
    with timed(seconds, "rank", device):
        metrics = embedded.metrics(chunk_size=args.chunk_size)
    return {"model": described, "images": len(view), "captions": len(captions), "distinct_captions": len(set(captions)),
            "pixel_store_size": args.pixel_store_size,
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "rsum": round(metrics["rsum"], 2), "i2t_r1": round(metrics["i2t_r1"], 2), "t2i_r1": round(metrics["t2i_r1"], 2)}


def index_stage(args, device: torch.device) -> dict:
    """Random normalised embeddings for `index_images` images x `captions_per_image`, ranked both ways."""
    from dualencoder.metrics import retrieval_metrics

    seconds = {}
    generator = torch.Generator(device=device).manual_seed(0)
    images, texts = args.index_images, args.index_images * args.captions_per_image
    with timed(seconds, "generate", device):
        image_embeds = torch.nn.functional.normalize(torch.randn(images, args.dim, device=device, generator=generator), dim=-1)
        text_embeds = torch.nn.functional.normalize(torch.randn(texts, args.dim, device=device, generator=generator), dim=-1)
        text_to_image = torch.arange(images, device=device).repeat_interleave(args.captions_per_image)
    with timed(seconds, "rank", device):
        metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, chunk_size=args.chunk_size, device=device)
    synchronize(device)
    return {"images": images, "captions": texts, "dim": args.dim, "chunk_size": args.chunk_size,
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "similarity_flops": 2 * 2 * images * texts * args.dim, "rsum": round(metrics["rsum"], 3)}


def table(result: dict) -> str:
    rows = []
    flickr = result.get("flickr")
    if flickr:
        s, n_img, n_cap = flickr["seconds"], flickr["images"], flickr["captions"]
        preprocessing = s["embed"] - sum(s.get(method, 0) for method in TIMED_METHODS)
        heads = s.get("project_image", 0) + s.get("project_text", 0)
        rows += [
            ["load split (rows; images decode lazily)", f"{n_img} images", fmt(s["load"], 2), ""],
            *([[f"build the pixel store ({flickr['pixel_store_size']} px; once, reused by later passes)",
                f"{n_img} images", fmt(s["pixel store build"], 2), ""]] if "pixel store build" in s else []),
            ["embed images + captions (embed_split)", f"{n_img} + {n_cap}", fmt(s["embed"], 2), fmt((n_img + n_cap) / s["embed"])],
            ["  of which image tower (encode_vision)", f"{n_img} images", fmt(s.get("encode_vision", 0), 2),
             fmt(n_img / max(s.get("encode_vision", 0), 1e-9))],
            ["  of which text tower (encode_text, once per distinct caption)", f"{flickr['distinct_captions']} captions",
             fmt(s.get("encode_text", 0), 2), fmt(flickr["distinct_captions"] / max(s.get("encode_text", 0), 1e-9))],
            ["  of which both projection heads", f"{n_img} + {n_cap}", fmt(heads, 3), ""],
            ["  of which decode, resize, tokenize, copies", "", fmt(preprocessing, 2), ""],
            ["rank (retrieval_metrics)", f"{n_img} x {n_cap}", fmt(s["rank"], 3), ""],
        ]
    index = result.get("index")
    if index:
        rows += [
            ["generate synthetic index (normalised randn)", f"{index['images']:,} + {index['captions']:,}",
             fmt(index["seconds"]["generate"], 2), ""],
            [f"rank synthetic index (chunk {index['chunk_size']})", f"{index['images']:,} x {index['captions']:,}",
             fmt(index["seconds"]["rank"], 2), f"{index['similarity_flops'] / index['seconds']['rank'] / 1e12:.3g} TFLOP/s"],
        ]
    return markdown_table(["stage", "items", "seconds", "items/s"], rows, right_from=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="a Flickr8k folder (any layout), or 'synthetic'")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_images", type=int, default=0, help="first N images of the split (0: all)")
    parser.add_argument("--model", default="offline",
                        help="offline (random weights if its packages are missing), random, tiny, or a saved model dir")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=1024, help="query rows scored at once by retrieval_metrics")
    parser.add_argument("--index_images", type=int, default=100_000, help="synthetic index size (0: skip)")
    parser.add_argument("--captions_per_image", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip_flickr", action="store_true")
    parser.add_argument("--pixel_store_size", type=int, default=0,
                        help="read the images from a pixel store of this shorter side, built first and timed apart "
                             "(data_scripts/pixel_store.py); 0: decode the image files")
    add_threads_argument(parser)
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device()
    result = {**device_info(device), "command": command_line(argv), "torch_threads": torch.get_num_threads(),
              "precision": args.precision, "batch_size": args.batch_size}
    if not args.skip_flickr:
        print("--- Flickr8k split: embed + rank", flush=True)
        result["flickr"] = {"data": args.data, "split": args.split, **flickr_stage(args, device)}
    if args.index_images:
        print(f"--- synthetic index: {args.index_images:,} images", flush=True)
        started = time.perf_counter()
        result["index"] = index_stage(args, device)
        print(f"    {time.perf_counter() - started:.1f} s", flush=True)
    print("\n" + table(result))
    if "flickr" in result:
        print(f"\nmodel: {result['flickr']['model']}; {args.precision}, batch {args.batch_size}; "
              f"RSUM {result['flickr']['rsum']} (a sanity check, not a result).")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
