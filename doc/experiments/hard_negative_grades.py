"""How much do the re-ranker's mined hard negatives look like positives? (doc/RERANKER.md, "Hard negatives")

A probe, not a toolkit feature. The re-ranker's hard negatives of a training image are the 16 captions of other
images that the dual encoder scores highest (`dualencoder.rerank.mining`). This grades them with the model-free
stand-in judge of `dualencoder.evaluation.graded_agreement` (TF-IDF agreement with the image's own captions) and
compares them with the image's first caption (held out against its other four) and with random captions.

    python doc/experiments/hard_negative_grades.py --tokens outputs/rerank_cache/rerank-tokens-<train key>.pt \
        --paraphrase_quantile 0.5 0.75

`--tokens` is the re-ranker's token cache of the train split (it holds the dual encoder's train embeddings, in
the split's caption order, which the frozen-feature cache of `dualencoder.baselines` shares).
"""

import argparse

import numpy as np
import torch

from dualencoder.baselines import load_features
from dualencoder.evaluation.graded_agreement import ReferenceAgreement
from dualencoder.rerank.mining import mine_hard_negatives


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", required=True, help="the re-ranker's token cache file of the train split")
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=1500, help="training images graded (a random sample)")
    parser.add_argument("--top_n", type=int, default=16)
    parser.add_argument("--paraphrase_quantile", type=float, nargs="*", default=[],
                        help="also grade the negatives mined with these --paraphrase_quantile filters")
    args = parser.parse_args()
    cached = torch.load(args.tokens, weights_only=True, mmap=True)
    train = load_features(args.data, ("train",), max_length=64, show_progress=False)["train"]
    captions, text_to_image = train.captions, train.text_to_image
    if cached["text_embeds"].shape[0] != len(captions):
        raise SystemExit(f"{args.tokens}: {cached['text_embeds'].shape[0]} captions, the train split has {len(captions)}")
    mine = lambda quantile: mine_hard_negatives(cached["image_embeds"].float(), cached["text_embeds"].float(),
                                                text_to_image, args.top_n, paraphrase_quantile=quantile)
    judge = ReferenceAgreement(captions)
    rng = np.random.default_rng(0)
    images = rng.choice(cached["image_embeds"].shape[0], args.images, replace=False)
    references = [[captions[j] for j in (text_to_image == i).nonzero().flatten().tolist()] for i in images]
    own = judge.pairs([refs[0] for refs in references], [refs[1:] for refs in references])
    repeated = [refs for refs in references for _ in range(args.top_n)]
    random = judge.pairs([captions[j] for j in rng.integers(len(captions), size=len(repeated))], repeated)
    median_own = np.median(own)
    print(f"{args.images} training images; stand-in grades (mean TF-IDF agreement with the image's captions):")
    print(f"  own first caption (held out against the other four): mean {own.mean():.3f}, median {median_own:.3f}")
    for quantile in [None, *args.paraphrase_quantile]:
        hard = mine(quantile)
        mined = judge.pairs([captions[j] for i in images for j in hard.captions[i].tolist()], repeated)
        name = "" if quantile is None else f", --paraphrase_quantile {quantile:g} ({100 * hard.paraphrase_share:.1f} % replaced)"
        print(f"  mined top-{args.top_n} captions of other images{name}: mean {mined.mean():.3f}, median "
              f"{np.median(mined):.3f}; {100 * (mined >= median_own).mean():.1f} % grade at least the own first "
              "captions' median")
    print(f"  random captions: mean {random.mean():.3f}; {100 * (random >= median_own).mean():.1f} % at least that median")

if __name__ == "__main__":
    main()
