#!/usr/bin/env python
"""Images per second of the input pipeline alone, to tell whether training is input-bound.

The training path without the model: load_image_caption_dataset (pair view) -> ImageTransform
(decode, random resized crop or resize, normalise) -> ContrastiveCollator (stack pixels, tokenize
captions) through a DataLoader with N worker processes and pinned memory (when CUDA is there),
for each N asked for. Compare the steady images/s with throughput.py's samples/s: below it, the
GPU waits for data and more workers (or the frozen-feature cache) are needed.

`--streaming` also times the streaming paths (data_scripts/streaming.py) on the same images: they are
written once as webdataset shards (a temporary folder, or `--shard_dir`) and read back through
WebDatasetStream, and written once as parquet files of image bytes + caption (as many files as shards, beside
them) and read back through `load_dataset(..., streaming=True)` (HubStream), each with the same transform and
collator; the table's "input" column tells them apart.

`--pixel_store 0,256` also times the pipeline reading pre-resized uint8 pixels from the pixel store
(data_scripts/pixel_store.py, run_contrastive.py --pixel_store_size) instead of decoding the JPEGs;
0 is decoding the files. The store's one-off build time is reported beside it.

    python -m benchmarks.data_loading --data ../shared/data/flickr8k --num_images 2048 --workers 0,2,4,8,12 \
        --out benchmarks/results/data_loading_h100.json
    python -m benchmarks.data_loading --data ../shared/data/flickr8k --num_images 512 --workers 0,2 --streaming \
        --out /tmp/data_loading_streaming.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    add_threads_argument,
    command_line,
    device_info,
    fmt,
    load_tokenizer,
    markdown_table,
    parse_ints,
    pick_device,
    set_threads,
    write_json,
)

DEFAULT_DATA = os.path.join("..", "shared", "data", "flickr8k")


def image_processor(image_size: int):
    """The processor the project derives for EfficientNet-Lite0 (bicubic resize, its mean/std)."""
    from transformers import BertConfig

    from dualencoder.processing import image_processor_from_config
    from modeling_dualencoder import DualEncoderConfig

    config = DualEncoderConfig(timm_model_name="tf_efficientnet_lite0", text_config=BertConfig(), image_size=image_size,
                               image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    return image_processor_from_config(config)


def load_rows(args):
    """One pair-view row (image, caption) for each of the first `num_images` images of the split(s)."""
    from datasets import concatenate_datasets

    from data_scripts import load_image_caption_dataset

    kwargs = {"verify_images": False}
    if args.data == "synthetic":
        kwargs = {"num_images": max(args.num_images * 2, 16), "image_size": args.synthetic_image_size}
    splits = load_image_caption_dataset(args.data, view="pairs", **kwargs)
    names = list(splits) if args.split == "all" else [args.split]
    pairs = concatenate_datasets([splits[name] for name in names if len(splits[name])])
    first_row = {}
    for row, image_id in enumerate(pairs["image_id"]):
        first_row.setdefault(image_id, row)
    distinct = list(first_row.values())
    if len(distinct) < args.num_images:  # a small copy (e.g. the 1,000-image subset): go round it again
        print(f"note: {args.data} ({args.split}) has {len(distinct)} images; each is read "
              f"{args.num_images / len(distinct):.1f} times to make {args.num_images}")
    return pairs.select([distinct[i % len(distinct)] for i in range(args.num_images)])


def warm_page_cache(rows) -> None:
    """Read every image file once, so no worker count is measured against a cold disk cache.

    Flickr8k (about 1 GB as distributed) stays in the page cache after the first epoch, so cached
    reads are what training sees.
    """
    from datasets import Image

    for image in rows.cast_column("image", Image(decode=False))["image"]:
        if image.get("path") and not image.get("bytes"):
            with open(image["path"], "rb") as handle:
                handle.read()


def measure(rows, transform, collator, workers: int, args, pin: bool, store_size: int = 0) -> dict:
    """One pass over `rows` (map-style): time to the first batch (worker start-up) and overall/steady images/s."""
    loader = DataLoader(rows.with_transform(transform), batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin, collate_fn=collator, prefetch_factor=args.prefetch_factor if workers else None)
    return {"input": "map-style", **time_loader(loader, workers, pin, store_size)}


def measure_stream(source: str, label: str, transform, collator, workers: int, args, pin: bool) -> dict:
    """One pass over a streaming `source` (shards, or a folder of parquet files) through the stream the training
    loop builds (`build_stream`, as run_contrastive.py --streaming)."""
    from data_scripts import build_stream

    stream = build_stream(source, transform=transform)
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=workers, pin_memory=pin,
                        collate_fn=stream.collate(collator), prefetch_factor=args.prefetch_factor if workers else None)
    return {"input": label, **time_loader(loader, workers, pin, 0)}


def write_parquet_files(rows, folder: str, files: int) -> str:
    """`rows` (pair view) as `files` parquet files of image bytes + caption: a local load_dataset streaming source."""
    from datasets import Dataset, Image

    from data_scripts import undecoded_images

    images = undecoded_images(rows)
    table = Dataset.from_dict({"image": [{"bytes": image["bytes"] or open(image["path"], "rb").read(), "path": None}
                                         for image in images["image"]], "caption": images["caption"]})
    table = table.cast_column("image", Image())
    os.makedirs(folder, exist_ok=True)
    for number in range(files):
        table.shard(files, number, contiguous=True).to_parquet(os.path.join(folder, f"train-{number:05d}.parquet"))
    return folder


def time_loader(loader, workers: int, pin: bool, store_size: int) -> dict:
    images, batches, first_images, first = 0, 0, 0, None
    started = time.perf_counter()
    for batch in loader:
        images += batch["pixel_values"].shape[0]
        batches += 1
        if first is None:
            first, first_images = time.perf_counter() - started, images
    total = time.perf_counter() - started
    steady = (images - first_images) / (total - first) if images > first_images else None
    return {"pixel_store": store_size, "workers": workers, "pin_memory": pin, "images": images, "batches": batches,
            "seconds": round(total, 3), "first_batch_s": round(first, 3),
            "images_per_s": round(images / total, 1), "steady_images_per_s": None if steady is None else round(steady, 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="a Flickr8k folder (any layout), or 'synthetic'")
    parser.add_argument("--split", default="all", help="train, validation, test, or all (every split together)")
    parser.add_argument("--num_images", type=int, default=1024,
                        help="images to load; more than the data has goes round it again (files stay in the page cache)")
    parser.add_argument("--workers", default="0,2,4,8", help="comma list of DataLoader worker counts")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224, help="the model's input size (EfficientNet-Lite0: 224)")
    parser.add_argument("--eval_transform", action="store_true", help="resize only, no random resized crop")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--prefetch_factor", type=int, default=2)
    parser.add_argument("--pin_memory", default="auto", choices=("auto", "on", "off"), help="auto: on when CUDA is there")
    parser.add_argument("--synthetic_image_size", type=int, default=224)
    parser.add_argument("--pixel_store", default="0",
                        help="comma list of pixel store sizes (shorter side, px) to time; 0: decode the image files")
    parser.add_argument("--store_dir", default=None, help="where pixel stores are built (default: a temporary folder)")
    parser.add_argument("--streaming", action="store_true",
                        help="also time the webdataset stream of the same images (shards written once)")
    parser.add_argument("--shard_dir", default=None,
                        help="where --streaming writes its shards (default: a temporary folder)")
    parser.add_argument("--images_per_shard", type=int, default=64)
    add_threads_argument(parser)
    parser.add_argument("--out", default="benchmarks/results/data_loading.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from data_scripts import ContrastiveCollator, ImageTransform, build_pixel_store, undecoded_images, write_shards

    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device()
    pin = args.pin_memory == "on" or (args.pin_memory == "auto" and device.type == "cuda")
    started = time.perf_counter()
    rows = load_rows(args)
    load_seconds = time.perf_counter() - started
    warm_page_cache(rows)
    collator = ContrastiveCollator(load_tokenizer(rows["caption"]), max_length=args.max_length)
    results, store_builds = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for store_size in parse_ints(args.pixel_store):
            store, timed_rows = None, rows
            if store_size:
                built = time.perf_counter()
                store = build_pixel_store([rows], store_size, args.store_dir or scratch)
                store_builds[store_size] = round(time.perf_counter() - built, 2)
                timed_rows = undecoded_images(rows)  # else datasets decodes each JPEG before the transform sees it
                print(f"--- pixel store at {store_size} px: {store_builds[store_size]} s to build ({store.file})")
            transform = ImageTransform(image_processor(args.image_size), train=not args.eval_transform,
                                       pixel_store=store)
            for workers in parse_ints(args.workers):
                print(f"--- pixel store {store_size or 'off'}, {workers} workers", flush=True)
                results.append(measure(timed_rows, transform, collator, workers, args, pin, store_size))
                print(f"    {results[-1]['images_per_s']} images/s", flush=True)
        if args.streaming:
            shards = write_shards(rows, args.shard_dir or os.path.join(scratch, "shards"), args.images_per_shard)
            transform = ImageTransform(image_processor(args.image_size), train=not args.eval_transform)
            for path in shards:  # the same warm page cache as the image files
                with open(path, "rb") as handle:
                    handle.read()
            parquet = write_parquet_files(rows, os.path.join(os.path.dirname(shards[0]), "parquet"), len(shards))
            for source, label in ((os.path.dirname(shards[0]), "webdataset stream"),
                                  (parquet, "load_dataset stream (parquet)")):
                for workers in parse_ints(args.workers):
                    print(f"--- {label} ({len(shards)} files), {workers} workers", flush=True)
                    results.append(measure_stream(source, label, transform, collator, workers, args, pin))
                    print(f"    {results[-1]['images_per_s']} images/s", flush=True)

    headers = ["input", "pixel store", "workers", "pin memory", "images", "batches", "seconds", "first batch s",
               "images/s", "steady images/s"]
    print("\n" + markdown_table(headers, [[r["input"], f"{r['pixel_store']} px" if r["pixel_store"] else "off",
                                           r["workers"],
                                           "on" if r["pin_memory"] else "off", r["images"], r["batches"],
                                           fmt(r["seconds"], 2), fmt(r["first_batch_s"], 2), fmt(r["images_per_s"]),
                                           fmt(r["steady_images_per_s"])] for r in results]))
    for size, seconds in store_builds.items():
        print(f"pixel store at {size} px: built in {seconds} s ({len(rows)} rows)")
    print(f"\ndata: {args.data} ({args.split}), {len(rows)} images, batch {args.batch_size}, "
          f"{'eval' if args.eval_transform else 'train'} transform to {args.image_size}px; loading the rows took "
          f"{load_seconds:.1f} s (not counted). 'steady' leaves out the first batch (worker start-up).")
    result = {**device_info(device), "command": command_line(argv), "data": args.data, "split": args.split,
              "num_images": len(rows), "batch_size": args.batch_size, "image_size": args.image_size,
              "transform": "eval" if args.eval_transform else "train", "load_seconds": round(load_seconds, 2),
              "torch_threads": torch.get_num_threads(), "pixel_store_build_seconds": store_builds, "rows": results}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
