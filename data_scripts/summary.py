"""``python -m data_scripts summary SOURCE``: what a data set holds, before training on it.

Prints the load report (layout, files found and missing, anything skipped or noticed) and per
split: images, captions, captions per image, caption length in words, vocabulary size and a
few example captions. Every image is decoded once at load time to find corrupt files, as training
does (`--no-verify` skips that: quicker, and a corrupt file then surfaces later). The synthetic set is
the default job's (1,200 scenes at 128 px) unless `--num-images` / `--image-size` say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from typing import Optional

from datasets import Dataset, DatasetDict

from .loading import load_image_caption_dataset
from .synthetic import DEFAULT_JOB_IMAGE_SIZE, DEFAULT_JOB_NUM_IMAGES
from .report import DatasetFormatError, logger

EPILOG = """\
examples:
  python -m data_scripts summary synthetic
  python -m data_scripts summary synthetic --num-images 200 --image-size 64
  python -m data_scripts summary ../shared/data/flickr8k
  python -m data_scripts summary flickr8k --on-bad-image skip   # the shared copy
  python -m data_scripts summary /data/kaggle-flickr8k --no-verify
  python -m data_scripts summary owner/hub-dataset               # needs network

SOURCE may be 'synthetic', 'flickr8k' (the shared copy at ../shared/data/flickr8k), a directory in
the official Flickr8k layout (Flicker8k_Dataset/ + Flickr8k_text/), the Kaggle layout (Images/ +
captions.txt) or with Karpathy's dataset_flickr8k.json, or a Hugging Face Hub dataset id.
"""


SOURCE_OPTIONS = ("train_file", "validation_file", "test_file", "image_column", "caption_column",
                  "dataset_config_name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts",
        description="Data set tools for the dual-encoder toolkit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary = commands.add_parser(
        "summary",
        help="print splits, image/caption counts and caption length statistics of a data set",
        description="Load a data set the way training does and print what it holds.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    summary.add_argument("source", metavar="SOURCE", help="'synthetic', 'flickr8k', a directory, or a Hub id")
    summary.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                         help="stop at the first bad image or caption line (default), or skip and report them all")
    summary.add_argument("--no-verify", dest="verify_images", action="store_false",
                         help="do not decode every image at load time (faster; corrupt files surface later)")
    summary.add_argument("--seed", type=int, default=42, help="synthetic set / seeded split seed (default 42)")
    summary.add_argument("--num-images", type=int, default=None,
                         help=f"synthetic: number of images (default {DEFAULT_JOB_NUM_IMAGES}, the default job's)")
    summary.add_argument("--image-size", type=int, default=None,
                         help=f"synthetic: image side in pixels (default {DEFAULT_JOB_IMAGE_SIZE}, the default job's)")
    summary.add_argument("--cache-dir", default=None, help="synthetic / Hub cache folder")
    summary.add_argument("--examples", type=int, default=3, help="example captions to show per split (default 3)")
    for option in SOURCE_OPTIONS:  # as training takes them (doc/OWN_DATA.md)
        summary.add_argument(f"--{option}", default=None, help=f"{option} of load_image_caption_dataset")
    return parser


def caption_stats(images: Dataset) -> dict[str, float]:
    """Counts and caption-length statistics (words) of an image-view split."""
    all_captions = images.select_columns(["captions"]).to_dict()["captions"]
    per_image = [len(c) for c in all_captions]
    lengths = [len(text.split()) for caps in all_captions for text in caps]
    vocabulary = {w.lower().strip(".,;:!?\"'") for caps in all_captions for text in caps for w in text.split()}
    if not lengths:
        return {"images": len(per_image), "captions": 0}
    ordered = sorted(lengths)
    return {
        "images": len(per_image),
        "captions": len(lengths),
        "captions_per_image_min": min(per_image),
        "captions_per_image_max": max(per_image),
        "words_min": ordered[0],
        "words_mean": statistics.fmean(lengths),
        "words_median": statistics.median(lengths),
        "words_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "words_max": ordered[-1],
        "vocabulary": len(vocabulary - {""}),
    }


def format_summary(data: DatasetDict, examples: int = 3) -> str:
    lines = []
    report = getattr(data, "load_report", None)
    if report is not None:
        lines += [report.summary(), ""]
    header = (f"{'split':<11}{'images':>8}{'captions':>10}{'caps/img':>10}"
              "   words/caption min/mean/median/p95/max   vocab")
    lines += [header, "-" * len(header)]
    samples = []
    for name, split in data.items():
        s = caption_stats(split)
        if not s.get("captions"):
            lines.append(f"{name:<11}{s['images']:>8}{0:>10}")
            continue
        per_image = (f"{s['captions_per_image_min']}" if s["captions_per_image_min"] == s["captions_per_image_max"]
                     else f"{s['captions_per_image_min']}-{s['captions_per_image_max']}")
        words = (f"{s['words_min']}/{s['words_mean']:.1f}/{s['words_median']:g}/"
                 f"{s['words_p95']}/{s['words_max']}")
        lines.append(f"{name:<11}{s['images']:>8}{s['captions']:>10}{per_image:>10}   {words:<38}{s['vocabulary']:>6}")
        if examples > 0 and len(split):
            rows = split.select(range(min(examples, len(split)))).select_columns(["image_id", "captions"]).to_dict()
            samples += [f"  [{name}] {i}: {caps[0]!r}" for i, caps in zip(rows["image_id"], rows["captions"])]
    if samples:
        lines += ["", "example captions (first caption of the first images):"] + samples
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    extra = {}
    if args.source.lower() == "synthetic":
        extra = {"num_images": args.num_images or DEFAULT_JOB_NUM_IMAGES, "image_size": args.image_size or DEFAULT_JOB_IMAGE_SIZE}
    elif args.num_images is not None or args.image_size is not None:
        print("note: --num-images/--image-size only apply to 'synthetic'; ignored", file=sys.stderr)
    level = logger.level  # the report is printed below; do not log it twice (and leave the logger as it was:
    logger.setLevel(logging.ERROR)  # a test, a notebook or a training run in this process logs through it too)
    try:
        data = load_image_caption_dataset(args.source, "images", on_bad_image=args.on_bad_image,
                                          verify_images=args.verify_images, seed=args.seed,
                                          cache_dir=args.cache_dir, **extra,
                                          **{option: getattr(args, option) for option in SOURCE_OPTIONS})
    except DatasetFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        logger.setLevel(level)
    print(format_summary(data, args.examples))
    return 0
