#!/usr/bin/env python
"""Test-time multi-scale probe (doc/FLICKR8K_RECIPE.md, "Probes"): embed the validation and test
images at the training resolution, at a second one, and as the mean of the two pooled features.

The vision prefix of a `top:N` model is the pretrained lower blocks, which training never changes,
so the cached prefix of the same images at another `image_size` (another run's --feature_cache_dir)
serves any model trained with the same `vision_train`. Each scale uses its plain and mirrored prefix
(`image_flip_average`). Not a toolkit option: it measures whether one would pay.

    python doc/experiments/multiscale_probe.py --run outputs/flickr8k_offline \\
        --prefix <288 px cache>/vision-prefix-<key>.pt --mirrored <288 px cache>/vision-prefix-mirrored-<key>.pt \\
        --prefix2 <320 px cache>/vision-prefix-<key>.pt --mirrored2 <320 px cache>/vision-prefix-mirrored-<key>.pt
"""

import torch
from trained_run import load_trained_run, run_parser


def main():
    from dualencoder.evaluation.embed import embed_split, pooled_from_prefix, pooled_text_features, split_captions

    parser = run_parser(__doc__)
    for suffix, scale in (("", "the training resolution"), ("2", "the second resolution")):
        parser.add_argument(f"--prefix{suffix}", required=True, help=f"cached vision prefix at {scale} (.pt)")
        parser.add_argument(f"--mirrored{suffix}", required=True, help=f"cached mirrored prefix at {scale} (.pt)")
    args = parser.parse_args()
    run = load_trained_run(args.run, args.config)
    model, views, data_args, tokenizer, depth = run.model, run.views, run.data_args, run.tokenizer, run.vision_depth
    scales = {"training size": (args.prefix, args.mirrored), "second size": (args.prefix2, args.mirrored2)}
    scales = {name: [torch.load(path) for path in paths] for name, paths in scales.items()}
    for split in ("validation", "test"):
        ids, captions, _ = split_captions(views[split])
        pooled = {name: pooled_from_prefix(model, plain, ids, depth, batch_size=32, device="cpu", mirrored=mirrored)
                  for name, (plain, mirrored) in scales.items()}
        pooled["mean of both"] = {i: (pooled["training size"][i] + pooled["second size"][i]) / 2 for i in ids}
        text = pooled_text_features(model, captions, tokenizer, max_length=data_args.max_length, batch_size=256,
                                    device="cpu", show_progress=False)
        for name, vision in pooled.items():
            m = embed_split(model, views[split], None, tokenizer, vision_cache=vision, text_cache=text,
                            show_progress=False).metrics()
            print(f"{split}, {name}: I→T {m['i2t_r1']:.1f} / {m['i2t_r5']:.1f} / {m['i2t_r10']:.1f} | "
                  f"T→I {m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f} | RSUM {m['rsum']:.1f}", flush=True)


if __name__ == "__main__":
    main()
