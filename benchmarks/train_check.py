#!/usr/bin/env python
"""An end-to-end run_contrastive.py job on a machine that cannot reach the Hub (e.g. the GPU machine).

It saves a random-init model of the chosen architecture with a WordPiece tokenizer built from the
data's captions, then trains it with `run_contrastive.main`. Every option after `--` goes to
run_contrastive.py unchanged (e.g. `--mixed_precision bf16 --torch_compile true`). It checks that
the training path works where the tests cannot reach (CUDA, mixed precision, compilation):
several steps, a checkpoint, validation, the exported model. Random weights learn little in a few
epochs, so the recall it prints is a sanity check, not a result.

    python -m benchmarks.train_check --data benchmarks/data/flickr8k_test --splits 800,100,100 \\
        --out $OUT/train_check.json -- --mixed_precision bf16 --torch_compile true --channels_last true

`--splits` re-splits a Flickr8k folder's test images (e.g. the 1,000-image copy that
`make_flickr_subset.sh` makes) into train/dev/test lists in a work folder, beside a link to its
images. `--data synthetic` uses run_contrastive's embedded synthetic data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


from benchmarks.common import command_line, device_info, load_tokenizer, pick_device, write_json

ARCHITECTURES = ("offline", "tiny", "vit-bert", "vit-bert-tiny")
VIT_BERT = {"vit-bert": ("base", 224), "vit-bert-tiny": ("tiny", 32)}  # throughput.py's size, image size


def vit_bert_configs(architecture: str, vocab_size: int):
    """(ViTConfig, BertConfig) of a `vit-bert` architecture: ViT-B/16 + a 6-layer BERT at base (throughput.py's shapes)."""
    from benchmarks.throughput import bert_like, distilbert_config, vit_config

    size, image_size = VIT_BERT[architecture]
    text = bert_like(distilbert_config(size))
    text.vocab_size = vocab_size
    return vit_config(size, image_size), text


def resplit_flickr(source: str, sizes: list[int], workdir: str) -> str:
    """A Flickr8k folder in the official layout whose train/dev/test lists split `source`'s test list."""
    text = os.path.join(source, "Flickr8k_text")
    with open(os.path.join(text, "Flickr_8k.testImages.txt")) as handle:
        names = [line.strip() for line in handle if line.strip()]
    if sum(sizes) > len(names):
        raise SystemExit(f"error: --splits {sizes} asks for {sum(sizes)} images; {text} lists {len(names)} test images")
    target = os.path.join(workdir, "flickr8k")
    os.makedirs(os.path.join(target, "Flickr8k_text"), exist_ok=True)
    os.symlink(os.path.abspath(os.path.join(source, "Flicker8k_Dataset")), os.path.join(target, "Flicker8k_Dataset"))
    start = 0
    for split, size in zip(("train", "dev", "test"), sizes):
        with open(os.path.join(target, "Flickr8k_text", f"Flickr_8k.{split}Images.txt"), "w") as handle:
            handle.write("\n".join(names[start:start + size]) + "\n")
        start += size
    with open(os.path.join(text, "Flickr8k.token.txt")) as src, \
            open(os.path.join(target, "Flickr8k_text", "Flickr8k.token.txt"), "w") as dst:
        dst.write(src.read())
    return target


def captions_of(data: str) -> list[str]:
    if data == "synthetic":
        return ["a red circle above a blue square", "a green triangle left of a yellow star"]
    with open(os.path.join(data, "Flickr8k_text", "Flickr8k.token.txt")) as handle:
        return [line.split("\t", 1)[1].strip() for line in handle if "\t" in line]


def save_random_model(architecture: str, captions: list[str], path: str, model_args=None) -> str:
    """A random-init dual encoder + WordPiece tokenizer saved where run_contrastive can load both.

    `model_args` (run_contrastive's parsed model options) give the heads, pooling, loss and LoRA, so the
    saved model is the one the run's options describe (run_contrastive refuses options a saved model ignores).
    """
    from transformers import BertConfig

    from benchmarks.throughput import minilm_like
    from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

    tokenizer = load_tokenizer(captions)
    tokenizer_dir = os.path.join(path, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    if architecture == "offline":
        text = minilm_like()
        fields = dict(timm_model_name="tf_efficientnet_lite0", image_size=224,
                      image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    elif architecture in VIT_BERT:  # the stock VisionTextDualEncoderModel's shape: both towers read through poolers
        vision, text = vit_bert_configs(architecture, len(tokenizer))
        fields = dict(vision_config=vision.to_dict(), image_size=vision.image_size, vision_pooling="pooler")
    else:
        text = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        fields = dict(timm_model_name="test_efficientnet", image_size=32)
    text.vocab_size = len(tokenizer)
    if model_args is not None:
        from dualencoder.training.model_setup import new_model_fields

        fields.update(new_model_fields(model_args))  # the run's heads, pooling, loss, LoRA (and image size, if set)
    config = DualEncoderConfig(text_config=text, text_model_name_or_path=os.path.abspath(tokenizer_dir), **fields)
    DualEncoderModel(config).save_pretrained(path)
    return path


def main(argv=None) -> dict:
    command = command_line(argv)  # before argv is filled in: None means "this process's command line"
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a Flickr8k folder (official layout), or 'synthetic'")
    parser.add_argument("--splits", default="", help="train,dev,test sizes: re-split the folder's test images")
    parser.add_argument("--architecture", default="offline", choices=ARCHITECTURES,
                        help="offline: EfficientNet-Lite0 + MiniLM-L6 shapes; tiny: seconds-long CPU check; vit-bert: "
                             "ViT-B/16 + 6-layer BERT, read through poolers (pass --text_pooling pooler); vit-bert-tiny")
    parser.add_argument("--workdir", default=None, help="where the data lists, model and run go (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/train_check.json")
    args = parser.parse_args(ours)

    import run_contrastive

    workdir = args.workdir or tempfile.mkdtemp(prefix="train_check_")
    data = args.data
    if args.splits:
        data = resplit_flickr(args.data, [int(n) for n in args.splits.split(",")], workdir)
    dataset = ["--dataset", "synthetic"] if data == "synthetic" else ["--dataset", data]
    from dualencoder.training.arguments import parse_args

    model_args = parse_args([*dataset, *passed])[0]  # the run's model options (config file + command line)
    model_dir = save_random_model(args.architecture, captions_of(data), os.path.join(workdir, "model"), model_args)
    run_args = ["--model_name_or_path", model_dir, *dataset, "--output_dir", os.path.join(workdir, "run"),
                "--report_to", "none", "--feature_cache_dir", "", *passed]
    started = time.time()
    metrics = run_contrastive.main(run_args)
    seconds = time.time() - started
    result = {**device_info(pick_device()), "command": command, "run_contrastive_args": run_args,
              "architecture": args.architecture, "weights": "random", "seconds": round(seconds, 1),
              "global_step": metrics["global_step"], "train_seconds": metrics["train_seconds"],
              "validation": metrics.get("validation"), "test": metrics.get("test")}
    print(f"\n{metrics['global_step']} steps, {seconds:.1f} s in all ({metrics['train_seconds']} s training); "
          f"test RSUM {metrics['test']['rsum']:.1f} (random init: a sanity check, not a result)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
