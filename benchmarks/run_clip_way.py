#!/usr/bin/env python
"""End to end, image files to trained model: HF's run_clip.py way against run_contrastive.py.

Both ways train the same shapes from random init (a ViT-B/16-shaped vision tower and a 6-layer
BERT, each read through its pooler, projected to 512: `--architecture vit-bert`; `vit-bert-tiny`
for a seconds-long CPU check) with the same tokenizer, batch size, precision, epochs and learning
rate, on the same Flickr8k images (a folder in the official layout, e.g. the 1,000 test images
that make_flickr_subset.sh copies, re-split by `--splits` as train_check.py does).

- `run_clip`: what transformers' examples/pytorch/contrastive-image-text/run_clip.py does,
  written from its documented behaviour: a CSV of image path + caption loaded with `datasets`;
  captions tokenized up front by `Dataset.map` (padding to `max_seq_length`); files that PIL
  cannot open filtered out; images read by `torchvision.io.read_image` and transformed on the
  fly (`set_transform`) by a TorchScript-ed Resize/CenterCrop/ConvertImageDtype/Normalize; a
  collate_fn that stacks the rows and asks for the loss; `VisionTextDualEncoderModel` trained by
  `Trainer` (`remove_unused_columns=False`, weight decay 0.1, no warm-up) with an evaluation
  loss each epoch.
- `run_contrastive`: `python run_contrastive.py --dataset <folder>` in a subprocess, on a random
  model saved by train_check.save_random_model (its own loader, collator, step and validation).

Reported per way: wall seconds of the whole process; training seconds per epoch INCLUDING data
loading (and each way's own end-of-epoch evaluation); and after each epoch the validation
retrieval metrics (run_contrastive's own; for the run_clip way the same `retrieval_metrics` over
the model's embeddings of the validation images and captions, computed outside the timed epoch),
so `--target_rsum` gives the training seconds each way took to reach a validation RSUM. Random
weights learn little in one epoch: the times are the result, the recalls a sanity check.

    python -m benchmarks.run_clip_way --data benchmarks/data/flickr8k_test --splits 800,100,100 \\
        --batch_size 256 --precision bf16 --epochs 1 --workers 8 --out $OUT/run_clip_way.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time


import torch

from benchmarks.common import command_line, device_info, fmt, markdown_table, pick_device, write_json
from benchmarks.train_check import VIT_BERT, captions_of, resplit_flickr, save_random_model, vit_bert_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAYS = ("run_clip", "run_contrastive")


# ---------------------------------------------------------------------------------------- data
def flickr_pairs(folder: str, split: str) -> list[tuple[str, str]]:
    """(image path, caption) for every caption of the split's images: run_clip's one row per pair."""
    text = os.path.join(folder, "Flickr8k_text")
    with open(os.path.join(text, f"Flickr_8k.{split}Images.txt")) as handle:
        names = {line.strip() for line in handle if line.strip()}
    images = os.path.join(folder, "Flicker8k_Dataset")
    pairs = []
    with open(os.path.join(text, "Flickr8k.token.txt")) as handle:
        for line in handle:
            key, _, caption = line.rstrip("\n").partition("\t")
            name = key.split("#")[0]
            if name in names and caption:
                pairs.append((os.path.join(images, name), caption.strip()))
    return pairs


def write_csv(pairs: list[tuple[str, str]], path: str) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption"])
        writer.writerows(pairs)
    return path


class Transform(torch.nn.Module):
    """run_clip's image transform: a module of tensor ops, so it can be TorchScript-ed."""

    def __init__(self, image_size: int, mean, std):
        super().__init__()
        from torchvision.transforms import CenterCrop, ConvertImageDtype, InterpolationMode, Normalize, Resize

        self.transforms = torch.nn.Sequential(
            Resize([image_size], interpolation=InterpolationMode.BICUBIC, antialias=True),
            CenterCrop(image_size), ConvertImageDtype(torch.float), Normalize(mean, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.transforms(x)


def collate_fn(examples: list[dict]) -> dict:
    """run_clip's collate_fn: stack pixels, token ids and masks; ask the model for its loss."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
            "attention_mask": torch.tensor([e["attention_mask"] for e in examples], dtype=torch.long),
            "return_loss": True}


# ---------------------------------------------------------------------------------------- run_clip way
def retrieval_of(model, pairs: list[tuple[str, str]], tokenizer, transform, max_length: int, device, batch: int = 256):
    """Validation retrieval metrics of a VisionTextDualEncoderModel, as run_contrastive computes its own."""
    from torchvision.io import ImageReadMode, read_image

    from dualencoder.metrics import retrieval_metrics

    paths = list(dict.fromkeys(path for path, _ in pairs))
    index = {path: i for i, path in enumerate(paths)}
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        image_embeds = torch.cat([_tensor(model.get_image_features(pixel_values=torch.stack(
            [transform(read_image(p, mode=ImageReadMode.RGB)) for p in paths[i:i + batch]]).to(device)))
            for i in range(0, len(paths), batch)])
        text_embeds = []
        for i in range(0, len(pairs), batch):
            tokens = tokenizer([c for _, c in pairs[i:i + batch]], max_length=max_length, padding="max_length",
                               truncation=True, return_tensors="pt").to(device)
            text_embeds.append(_tensor(model.get_text_features(input_ids=tokens["input_ids"],
                                                               attention_mask=tokens["attention_mask"])))
    model.train()
    features = [torch.nn.functional.normalize(e, dim=-1) for e in (image_embeds, torch.cat(text_embeds))]
    return retrieval_metrics(*features, torch.tensor([index[path] for path, _ in pairs]))


def _tensor(output) -> torch.Tensor:
    """The projected embeddings, whether get_*_features returns them (transformers 4) or an output holding them."""
    return (output if torch.is_tensor(output) else output.pooler_output).float()


def run_clip_way(args, flickr: str, tokenizer_dir: str, workdir: str) -> dict:
    """Train VisionTextDualEncoderModel with Trainer the way run_clip.py does; time each epoch."""
    from datasets import load_dataset
    from PIL import Image
    from torchvision.io import ImageReadMode, read_image
    from transformers import (AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                              VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

    started = time.time()
    device = pick_device()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision, text = vit_bert_configs(args.architecture, len(tokenizer))
    torch.manual_seed(args.seed)
    model = VisionTextDualEncoderModel(config=VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=512))
    files = {split: write_csv(flickr_pairs(flickr, name), os.path.join(workdir, f"{split}.csv"))
             for split, name in (("train", "train"), ("validation", "dev"))}
    dataset = load_dataset("csv", data_files=files, cache_dir=os.path.join(workdir, "hf_datasets"))

    def tokenize_captions(examples):
        tokens = tokenizer(list(examples["caption"]), max_length=args.max_seq_length, padding="max_length",
                           truncation=True)
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def filter_corrupt_images(examples):
        keep = []
        for path in examples["image_path"]:
            try:
                Image.open(path)
                keep.append(True)
            except Exception:  # noqa: BLE001 - run_clip drops any file PIL cannot open
                keep.append(False)
        return keep

    workers = args.workers or None
    dataset = dataset.filter(filter_corrupt_images, batched=True, num_proc=workers)
    dataset = dataset.map(tokenize_captions, batched=True, remove_columns=["caption"], num_proc=workers)
    image_size = vision.image_size
    transform = torch.jit.script(Transform(image_size, [0.5] * 3, [0.5] * 3))  # ViTImageProcessor's mean/std

    def transform_images(examples):
        images = [read_image(path, mode=ImageReadMode.RGB) for path in examples["image_path"]]
        examples["pixel_values"] = [transform(image) for image in images]
        return examples

    train, validation = dataset["train"], dataset["validation"]
    train.set_transform(transform_images)
    validation.set_transform(transform_images)
    valid_pairs = flickr_pairs(flickr, "dev")
    setup_seconds = time.time() - started

    class EpochClock(TrainerCallback):
        """Training seconds at each epoch's end (its evaluation loss included) and validation retrieval, untimed."""

        def __init__(self):
            self.epochs, self.excluded, self.start = [], 0.0, None

        def on_train_begin(self, args_, state, control, **kwargs):
            self.start = time.time()

        def on_evaluate(self, args_, state, control, metrics=None, **kwargs):
            paused = time.time()
            record = {"epoch": round(state.epoch or 0), "train_seconds": round(paused - self.start - self.excluded, 2),
                      "eval_loss": metrics.get("eval_loss") if metrics else None}
            record["validation"] = retrieval_of(kwargs["model"], valid_pairs, tokenizer, transform,
                                                args.max_seq_length, device)
            self.epochs.append(record)
            self.excluded += time.time() - paused

    clock = EpochClock()
    training = TrainingArguments(
        output_dir=os.path.join(workdir, "run_clip"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0,
        weight_decay=0.1, num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        bf16=args.precision == "bf16", use_cpu=device.type == "cpu", torch_compile=args.torch_compile,
        remove_unused_columns=False, eval_strategy="epoch", save_strategy="no", report_to=[],
        dataloader_num_workers=args.workers, logging_steps=10, disable_tqdm=True, seed=args.seed)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=validation,
                      data_collator=collate_fn, callbacks=[clock])
    result = trainer.train()
    if args.max_steps and not clock.epochs:  # stopped inside the first epoch: evaluate once, as an epoch end would
        clock.on_evaluate(training, trainer.state, None, metrics=trainer.evaluate(), model=model)
    return {"way": "run_clip", "setup_seconds": round(setup_seconds, 2), "epochs": clock.epochs,
            "train_pairs": len(train), "global_step": trainer.state.global_step,
            "trainer_train_runtime_s": result.metrics.get("train_runtime"),
            "wall_seconds": round(time.time() - started, 2)}


# ---------------------------------------------------------------------------------------- ours
def run_contrastive_way(args, flickr: str, model_dir: str, run_args: list[str], workdir: str) -> dict:
    """`python run_contrastive.py --dataset <folder> ...` in a subprocess; its metrics and epoch log."""
    output_dir = os.path.join(workdir, "run_contrastive")
    command = [sys.executable, os.path.join(ROOT, "run_contrastive.py"), "--model_name_or_path", model_dir,
               "--dataset", flickr, "--output_dir", output_dir, "--report_to", "none", "--feature_cache_dir", "",
               *run_args]
    started = time.time()
    completed = subprocess.run(command, check=False, timeout=args.way_timeout)
    wall = time.time() - started
    if completed.returncode != 0:
        return {"way": "run_contrastive", "error": f"exit status {completed.returncode}", "command": command}
    with open(os.path.join(output_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(output_dir, "log_history.json")) as handle:
        history = json.load(handle)
    validations = [record for record in history if "rsum" in record]
    epochs = len(validations) or 1
    per_epoch = metrics["train_seconds"] / epochs  # run_contrastive times its whole training, epoch ends included
    return {"way": "run_contrastive", "command": command, "wall_seconds": round(wall, 2),
            "setup_seconds": round(wall - metrics["train_seconds"], 2), "global_step": metrics["global_step"],
            "epochs": [{"epoch": record["epoch"], "train_seconds": round(per_epoch * (i + 1), 2),
                        "validation": {k: v for k, v in record.items() if k not in ("step", "epoch")}}
                       for i, record in enumerate(validations)],
            "train_seconds": metrics["train_seconds"]}


def our_run_args(args) -> list[str]:
    """run_contrastive options matching the run_clip way's (shape, batch, precision, epochs, lr, workers)."""
    # the default job config trains LoRA on frozen towers with an MLP head: train everything, as run_clip does
    options = ["--vision_train", "full", "--text_train", "full", "--lora_rank", "0", "--projection_head", "linear",
               "--projection_dim", "512", "--loss", "clip",
               "--text_pooling", "pooler", "--image_size", str(VIT_BERT[args.architecture][1]),
               "--per_device_train_batch_size", str(args.batch_size),
               "--per_device_eval_batch_size", str(args.batch_size), "--num_train_epochs", str(args.epochs),
               "--learning_rate", str(args.learning_rate), "--weight_decay", "0.1", "--warmup_ratio", "0",
               "--mixed_precision", "bf16" if args.precision == "bf16" else "no", "--max_length", str(args.max_seq_length),
               "--dataloader_num_workers", str(args.workers), "--seed", str(args.seed), "--eval_before_training", "false"]
    if args.max_steps:
        options += ["--max_steps", str(args.max_steps)]
    if args.torch_compile:
        options += ["--torch_compile", "true"]
    return options + args.ours_extra


# ---------------------------------------------------------------------------------------- report
def time_to(way: dict, target_rsum) -> float | None:
    """Training seconds at the first epoch end whose validation RSUM reached the target (None: never)."""
    if target_rsum is None:
        return None
    for record in way.get("epochs", []):
        if record["validation"]["rsum"] >= target_rsum:
            return record["train_seconds"]
    return None


def print_table(ways: list[dict], target_rsum) -> None:
    rows = []
    for way in ways:
        if "error" in way:
            rows.append([way["way"], f"error: {way['error']}", "", "", "", "", "", ""])
            continue
        epochs = way["epochs"]
        per_epoch = epochs[-1]["train_seconds"] / len(epochs) if epochs else None
        last = epochs[-1]["validation"] if epochs else {}
        rows.append([way["way"], fmt(way["wall_seconds"]), fmt(way["setup_seconds"]), fmt(per_epoch),
                     fmt(way["global_step"]), fmt(last.get("rsum")), fmt(epochs[-1].get("eval_loss") if epochs else None, 3),
                     fmt(time_to(way, target_rsum))])
    print("\n" + markdown_table(["way", "wall s", "setup s", "train s / epoch (data loading incl.)", "steps",
                                 "val RSUM", "val loss", "s to RSUM " + (fmt(target_rsum) if target_rsum is not None else "(no --target_rsum)")], rows))


def parse_args(argv):
    argv = list(argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a Flickr8k folder in the official layout")
    parser.add_argument("--splits", default="800,100,100", help="train,dev,test sizes re-split from its test images")
    parser.add_argument("--architecture", default="vit-bert", choices=tuple(VIT_BERT))
    parser.add_argument("--tiny", action="store_true", help="= --architecture vit-bert-tiny (a CPU check in seconds)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=0, help="stop each way after this many steps (0: the epochs)")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="run_clip's README value, for both ways")
    parser.add_argument("--max_seq_length", type=int, default=32, help="caption tokens (run_clip pads every caption to it)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (and run_clip's map processes)")
    parser.add_argument("--torch_compile", action="store_true", help="both ways: torch.compile (Trainer: whole model)")
    parser.add_argument("--target_rsum", type=float, default=None, help="report the training seconds to this validation RSUM")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--way_timeout", type=float, default=None, help="seconds before the run_contrastive process is stopped")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/run_clip_way.json")
    args = parser.parse_args(ours)
    args.ours_extra = extra  # options after `--` go to run_contrastive.py only
    if args.tiny:
        args.architecture = "vit-bert-tiny"
    return args


def main(argv=None) -> dict:
    command = command_line(argv)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="run_clip_way_")
    flickr = resplit_flickr(args.data, [int(n) for n in args.splits.split(",")], workdir)
    run_args = our_run_args(args)
    from dualencoder.training.arguments import parse_args as run_contrastive_options

    model_args = run_contrastive_options(["--dataset", flickr, *run_args])[0]
    model_dir = save_random_model(args.architecture, captions_of(flickr), os.path.join(workdir, "model"), model_args)
    ways = []
    for way in args.ways.split(","):
        print(f"--- {way}", flush=True)
        if way == "run_clip":
            ways.append(run_clip_way(args, flickr, os.path.join(model_dir, "tokenizer"), workdir))
        elif way == "run_contrastive":
            ways.append(run_contrastive_way(args, flickr, model_dir, run_args, workdir))
        else:
            raise SystemExit(f"error: unknown way {way!r}; choose from {', '.join(WAYS)}")
        write_json(args.out, results(args, command, ways, partial=True), quiet=True)  # kept if a later way is stopped
    print_table(ways, args.target_rsum)
    result = results(args, command, ways)
    write_json(args.out, result)
    return result


def results(args, command: str, ways: list[dict], partial: bool = False) -> dict:
    return {**device_info(pick_device()), "command": command, "architecture": args.architecture,
            "batch_size": args.batch_size, "precision": args.precision, "epochs": args.epochs, "splits": args.splits,
            "target_rsum": args.target_rsum, "seconds_to_target": {w["way"]: time_to(w, args.target_rsum) for w in ways},
            "ways": ways, **({"partial": True} if partial else {})}


if __name__ == "__main__":
    main()
