#!/usr/bin/env python
"""Querybank normalisation of a trained Flickr8k model across beta (the QB-Norm table of doc/FLICKR8K_RECIPE.md).

Embeds the training, validation and test splits with a trained `run_contrastive.py` model from its
cached vision prefixes (plain and mirrored, as written to --feature_cache_dir; the model's
`image_flip_average` is honoured), then prints the plain cosine metrics and the QB-Norm metrics
(`dualencoder.querybank`, the training split as the querybank) of validation and test for each
beta, so beta is chosen on validation and read on test. `run_contrastive.py --querybank_beta B`
reports the same numbers for one beta at the end of a run; `dualencoder.evaluation.evaluate_model
--querybank_split train` does it from pixels, without caches.

    python doc/experiments/querybank_sweep.py --run outputs/flickr8k_offline \\
        --prefix <cache>/vision-prefix-<key>.pt --mirrored <cache>/vision-prefix-mirrored-<key>.pt
"""

import json
import time
from pathlib import Path

import torch
from trained_run import load_trained_run, run_parser


def row(metrics: dict) -> str:
    return (f"{metrics['i2t_r1']:.1f} / {metrics['i2t_r5']:.1f} / {metrics['i2t_r10']:.1f} | "
            f"{metrics['t2i_r1']:.1f} / {metrics['t2i_r5']:.1f} / {metrics['t2i_r10']:.1f} | {metrics['rsum']:.1f}")


def main():
    from data_scripts import to_image_view
    from dualencoder.evaluation.embed import embed_split, pooled_from_prefix, pooled_text_features, split_captions
    from dualencoder.querybank import querybank_metrics

    parser = run_parser(__doc__)
    parser.add_argument("--prefix", required=True, help="the run's cached vision prefix (.pt)")
    parser.add_argument("--mirrored", required=True, help="the run's cached mirrored vision prefix (.pt), which "
                                                          "must hold the training images (flip_augment)")
    parser.add_argument("--betas", type=float, nargs="+", default=[3, 5, 7, 10, 14, 20, 30])
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    started = time.time()
    run = load_trained_run(args.run, args.config)
    model, views, data_args, tokenizer, depth = run.model, run.views, run.data_args, run.tokenizer, run.vision_depth
    views["train"] = to_image_view(run.train_pairs.remove_columns("image"))
    plain, mirrored = torch.load(args.prefix), torch.load(args.mirrored)
    embedded = {}
    for split in ("train", "validation", "test"):
        ids, captions, _ = split_captions(views[split])
        vision = pooled_from_prefix(model, plain, ids, depth, batch_size=32, device="cpu", mirrored=mirrored)
        text = pooled_text_features(model, captions, tokenizer, max_length=data_args.max_length, batch_size=256,
                                    device="cpu", desc=f"{split} captions")
        embedded[split] = embed_split(model, views[split], None, tokenizer, vision_cache=vision, text_cache=text,
                                      show_progress=False)
        print(f"embedded {split}: {len(ids)} images, {len(captions)} captions ({time.time() - started:.0f} s)",
              flush=True)
    results = {"plain": {split: embedded[split].metrics() for split in ("validation", "test")}, "querybank": {}}
    print("\n| scores | split | I→T R@1 / 5 / 10 | T→I R@1 / 5 / 10 | RSUM |\n| --- | --- | --- | --- | ---: |")
    for split in ("validation", "test"):
        print(f"| cosine | {split} | {row(results['plain'][split])} |")
    for beta in args.betas:
        results["querybank"][f"{beta:g}"] = {split: querybank_metrics(embedded[split], embedded["train"], beta)
                                             for split in ("validation", "test")}
        for split in ("validation", "test"):
            print(f"| QB-Norm beta {beta:g} | {split} | {row(results['querybank'][f'{beta:g}'][split])} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
