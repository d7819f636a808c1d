#!/usr/bin/env python
"""Where to average the plain and mirrored image (row 13b of doc/FLICKR8K_RECIPE.md).

Embeds the Flickr8k test split with a trained `run_contrastive.py` model from its cached vision
prefixes (plain and mirrored, as written to --feature_cache_dir), three ways: one view, the mean
of the pooled features (what `image_flip_average` does) and the mean of the embeddings.

    python doc/experiments/flip_average_check.py --run outputs/flickr8k_offline \\
        --prefix <cache>/vision-prefix-<key>.pt --mirrored <cache>/vision-prefix-mirrored-<key>.pt
"""

import torch
import torch.nn.functional as F
from trained_run import load_trained_run, run_parser


def main():
    from dualencoder.evaluation.embed import pooled_from_text_prefix, pooled_text_features, split_captions
    from dualencoder.metrics import retrieval_metrics

    parser = run_parser(__doc__)
    parser.add_argument("--prefix", required=True, help="the run's cached vision prefix (.pt)")
    parser.add_argument("--mirrored", required=True, help="the run's cached mirrored vision prefix (.pt)")
    args = parser.parse_args()
    run = load_trained_run(args.run, args.config)
    model, views, data_args, tokenizer = run.model, run.views, run.data_args, run.tokenizer
    vision_depth, text_depth = run.vision_depth, run.text_depth
    plain, mirrored = torch.load(args.prefix), torch.load(args.mirrored)
    ids, captions, text_to_image = split_captions(views["test"])
    with torch.no_grad():
        pooled = [model.vision_suffix(torch.stack([cache[i] for i in ids]).float(), vision_depth)
                  for cache in (plain, mirrored)]
        states = pooled_text_features(model, captions, tokenizer, max_length=data_args.max_length, batch_size=256,
                                      device="cpu", prefix_depth=text_depth, show_progress=False)
        text_pooled = pooled_from_text_prefix(model, states, captions, text_depth, batch_size=256, device="cpu")
        texts = model.project_text(torch.stack([text_pooled[c] for c in captions]))
        one = model.project_image(pooled[0])
        ways = {"one view": one,
                "mean of pooled features": model.project_image((pooled[0] + pooled[1]) / 2),
                "mean of embeddings": F.normalize(one + model.project_image(pooled[1]), dim=-1)}
    for name, images in ways.items():
        r = retrieval_metrics(images, texts, text_to_image)
        print(f"{name}: i2t {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} "
              f"t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} rsum {r['rsum']:.1f}")


if __name__ == "__main__":
    main()
