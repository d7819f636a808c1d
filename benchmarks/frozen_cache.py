#!/usr/bin/env python
"""How much the frozen-tower feature cache saves: the same job with and without it.

The vision tower is frozen (no adapters); without the cache every step runs EfficientNet-Lite0
on decoded images, with it the features are computed once. Prints a table and writes JSON.

    python -m benchmarks.frozen_cache --epochs 2 --num_images 300 --out benchmarks/results/frozen_cache_cpu.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time


import torch

import run_contrastive


def run(cache: bool, args, workdir) -> dict:
    argv = ["--config", "configs/default.yaml", "--output_dir", os.path.join(workdir, f"cache-{cache}"),
            "--num_images", str(args.num_images), "--num_train_epochs", str(args.epochs), "--report_to", "none",
            "--eval_before_training", "false", "--cache_frozen_features", str(cache).lower(),
            "--feature_cache_dir", ""]  # measure building the cache, never reuse one from disk
    started = time.time()
    metrics = run_contrastive.main(argv)
    return {"cache": cache, "wall_seconds": round(time.time() - started, 1), "train_seconds": metrics["train_seconds"],
            "cache_seconds": metrics["cache_seconds"], "steps": metrics["global_step"],
            "test_rsum": round(metrics["test"]["rsum"], 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num_images", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/frozen_cache_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run(False, args, workdir), run(True, args, workdir)]
    without, with_cache = rows
    speedup = (without["train_seconds"] + without["cache_seconds"]) / (with_cache["train_seconds"] + with_cache["cache_seconds"])
    print("\n| frozen-tower cache | cache build s | train s | steps | test RSUM |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {'on' if row['cache'] else 'off'} | {row['cache_seconds']} | {row['train_seconds']} | {row['steps']} | {row['test_rsum']} |")
    print(f"\nspeed-up (cache build + training): {speedup:.2f}x")
    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.machine(), "epochs": args.epochs, "num_images": args.num_images, "rows": rows,
              "speedup": round(speedup, 2), "command": "python " + " ".join(sys.argv)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
