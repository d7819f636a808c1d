"""What the listwise re-ranker objective starts from: the dual encoder's own group accuracy and loss.

A probe, not a toolkit feature (doc/RERANKER.md, "Results on Flickr8k"). `--objective listwise` scores each group
(a positive and `group_size - 1` mined negatives per direction) by `itm + dual logit`; with the re-ranker's logit
at 0 that is the dual encoder alone. This computes that starting point on the same kind of groups (drawn with
`draw_groups` from the mined, paraphrase-filtered top-16), to compare with the training log's loss and group
accuracy: what the re-ranker adds is the difference.

    python doc/experiments/dual_group_accuracy.py --tokens outputs/rerank_cache/rerank-tokens-<train key>.pt \
        --model_dir outputs/flickr8k_offline
"""

import argparse

import torch
import torch.nn.functional as F

from dualencoder.baselines import load_features
from dualencoder.rerank.mining import draw_groups, mine_hard_negatives
from modeling_dualencoder import DualEncoderModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", required=True, help="the re-ranker's token cache file of the train split")
    parser.add_argument("--model_dir", required=True, help="the dual encoder (for its logit scale)")
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--positives", type=int, default=4000, help="random training captions, each two groups")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--top_n", type=int, default=16)
    parser.add_argument("--paraphrase_quantile", type=float, default=0.5)
    args = parser.parse_args()
    cached = torch.load(args.tokens, weights_only=True, mmap=True)
    images, texts = cached["image_embeds"].float(), cached["text_embeds"].float()
    text_to_image = load_features(args.data, ("train",), max_length=64, show_progress=False)["train"].text_to_image
    if texts.shape[0] != text_to_image.shape[0]:
        raise SystemExit(f"{args.tokens}: {texts.shape[0]} captions, the train split has {text_to_image.shape[0]}")
    scale = float(DualEncoderModel.from_pretrained(args.model_dir).get_logit_scale().detach())
    hard = mine_hard_negatives(images, texts, text_to_image, args.top_n, paraphrase_quantile=args.paraphrase_quantile)
    generator = torch.Generator().manual_seed(0)
    positives = torch.randperm(texts.shape[0], generator=generator)[:args.positives]
    captions, others = draw_groups(positives, text_to_image, hard, generator, args.group_size)
    own = images[text_to_image[positives]]
    positive = (own * texts[positives]).sum(-1, keepdim=True)
    groups = scale * torch.cat([torch.cat([positive, (own[:, None] * texts[captions]).sum(-1)], 1),
                                torch.cat([positive, (images[others] * texts[positives][:, None]).sum(-1)], 1)])
    loss = F.cross_entropy(groups, torch.zeros(groups.shape[0], dtype=torch.long))
    accuracy = (groups.argmax(1) == 0).float().mean()
    print(f"dual encoder alone (logit scale {scale:.2f}) on {groups.shape[0]} groups of {args.group_size} "
          f"(--paraphrase_quantile {args.paraphrase_quantile:g}): group accuracy {accuracy:.3f}, loss {loss:.4f}")


if __name__ == "__main__":
    main()
