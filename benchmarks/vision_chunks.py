#!/usr/bin/env python
"""Seconds per batch of the vision tower run whole or in chunks (`vision_chunk_size`), on this device.

The Flickr8k recipe runs EfficientNet-Lite0 in two parts: its frozen lower blocks once per image
(`vision_prefix`, inference) and its upper blocks every step (`vision_suffix`, forward and
backward, BatchNorm statistics frozen). On a CPU both are limited by memory traffic: a batch of
128 images at 288 px has activations far larger than the caches, while a chunk of 16 or 32 fits
better. The result is the same either way (`tests/test_modeling.py`), so this measures only speed.

    python -m benchmarks.vision_chunks --image_size 288 --chunks 0,16,32,64 --out benchmarks/results/vision_chunks_cpu.json
"""

from __future__ import annotations

import argparse
import time


import torch

from benchmarks.common import (
    add_threads_argument,
    command_line,
    device_info,
    fmt,
    markdown_table,
    median,
    parse_ints,
    pick_device,
    set_threads,
    synchronize,
    write_json,
)
from benchmarks.eval_speed import MODELS, build_model


def seconds_per_batch(run, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `run()` over `repeats` calls, after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def measure(model, args, device: torch.device) -> list[dict]:
    """One row per chunk size: the prefix (inference) and the suffix (forward + backward) per batch."""
    from dualencoder.trainable import train_mode

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    if args.channels_last:
        model.vision_model.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # not inference_mode: the suffix's backward needs a normal tensor
        model.eval()
        hidden = model.vision_prefix(pixels, args.depth)
    rows = []
    for chunk in args.chunks:
        model.config.vision_chunk_size = chunk or None

        def prefix():
            with torch.inference_mode():
                model.vision_prefix(pixels, args.depth)

        def suffix_step():
            model.zero_grad(set_to_none=True)
            model.vision_suffix(hidden, args.depth).float().square().sum().backward()

        model.eval()
        prefix_times = seconds_per_batch(prefix, device, args.warmup, args.repeats)
        train_mode(model, freeze_batchnorm=True)
        suffix_times = seconds_per_batch(suffix_step, device, args.warmup, args.repeats)
        rows.append({"chunk": chunk, "prefix_s": prefix_times, "suffix_train_s": suffix_times,
                     # 10 µs resolution, as benchmarks/throughput.py: a tiny test model's batch takes under a millisecond
                     "prefix_median_s": round(median(prefix_times), 5),
                     "suffix_train_median_s": round(median(suffix_times), 5)})
    return rows


def table(result: dict) -> str:
    whole = result["rows"][0]
    rows = []
    for row in result["rows"]:  # ratios of the unrounded medians
        rows.append([row["chunk"] or "whole batch",
                     fmt(row["prefix_median_s"], 2), f"{median(whole['prefix_s']) / median(row['prefix_s']):.2f}x",
                     fmt(row["suffix_train_median_s"], 2),
                     f"{median(whole['suffix_train_s']) / median(row['suffix_train_s']):.2f}x"])
    return markdown_table(["vision_chunk_size", "prefix s/batch", "vs whole", "suffix fwd+bwd s/batch", "vs whole"],
                          rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="offline", choices=MODELS,
                        help="offline (random weights if its packages are missing), random or tiny")
    parser.add_argument("--vision", default="offline:efficientnet-lite0",
                        help="the offline EfficientNet-Lite of --model offline (offline:efficientnet-lite0/1/2)")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch (the recipe's step)")
    parser.add_argument("--image_size", type=int, default=288)
    parser.add_argument("--depth", type=int, default=8, help="frozen blocks in the prefix (the recipe's top:8 of 16)")
    parser.add_argument("--chunks", type=parse_ints, default=[0, 16, 32, 64],
                        help="comma-separated chunk sizes; 0 runs the whole batch (listed first, the reference)")
    parser.add_argument("--no_channels_last", dest="channels_last", action="store_false",
                        help="keep NCHW (the recipe uses channels-last)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    add_threads_argument(parser)
    parser.add_argument("--out", default="benchmarks/results/vision_chunks_cpu.json")
    args = parser.parse_args(argv)
    if not args.chunks or args.chunks[0] != 0:
        args.chunks = [0] + [c for c in args.chunks if c]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = pick_device()
    model, _, _, described = build_model(args.model, [], vision=args.vision)
    model.to(device)
    result = {**device_info(device), "command": command_line(argv), "torch_threads": torch.get_num_threads(),
              "model": described, "batch_size": args.batch_size, "image_size": args.image_size, "depth": args.depth,
              "channels_last": args.channels_last, "rows": measure(model, args, device)}
    print(f"\n{described}: {args.batch_size} images at {args.image_size} px, prefix = the first {args.depth} blocks\n")
    print(table(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
