"""Does a token-level (late-interaction) score add to the re-ranker? A probe, not a toolkit feature (doc/RERANKER.md).

The dual encoder pools each tower's tokens before its projection head. Applied to every token instead (a timm CNN's
map through its 1x1 head conv, then the visual head, per location; each caption token through the text head),
the same heads give token embeddings in the shared space, and a pair can be scored by text-to-image attention
over them (SCAN's t2i score: each caption token attends to the image locations with softmax(lambda x cosine); the
score is the mean over caption tokens of the cosine between the token and what it attended to). This probe:

1. scores the validation split's top-k both ways with those heads as they are (zero-shot);
2. trains copies of the two heads, lambda and a logit scale for `--minutes` with in-batch InfoNCE (a batch: distinct
   train images, one random caption each; every image-caption pair of the batch scored), towers frozen;
3. reports, on the whole validation split, the late-interaction score alone, blended with the dual encoder's logit,
   and (with `--reranker_dir`) added to the co-attention re-ranker's blend, weights from small grids.

It reads the re-ranker's token caches (`dualencoder.rerank.features.split_features`, cached in `--cache_dir`).

    OMP_NUM_THREADS=1 python doc/experiments/late_interaction_probe.py --model_dir outputs/flickr8k_offline \
        --reranker_dir outputs/flickr8k_offline_rerank_para_half --data ../shared/data/flickr8k \
        --cache_dir outputs/rerank_cache --minutes 20 --output_json outputs/late_interaction_probe.json
"""

import argparse
import copy
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from backbones_dualencoder import without_peft_wrapper
from data_scripts.collator import pad_token_states
from dualencoder.evaluation.common import data_options, load_model, load_split
from dualencoder.rerank.features import split_features
from dualencoder.rerank.model import load_reranker
from dualencoder.rerank.rerank import TopK, rerank_top_k, reranked_metrics


class LateInteraction(nn.Module):
    """Copies of the dual encoder's heads applied per token, and the t2i attention score of pairs."""

    def __init__(self, model):
        super().__init__()
        tower = without_peft_wrapper(model.vision_model)
        if not hasattr(tower, "conv_head"):
            raise SystemExit("this probe reads a timm CNN's feature map (conv_head); the model's vision tower has none")
        self.vision_map = nn.Sequential(copy.deepcopy(tower.conv_head), copy.deepcopy(tower.bn2)).eval()
        self.vision_map.requires_grad_(False)
        self.vision_head, self.text_head = copy.deepcopy(model.visual_projection), copy.deepcopy(model.text_projection)
        self.log_lambda = nn.Parameter(torch.tensor(math.log(10.0)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(float(model.get_logit_scale().detach()))))

    @torch.no_grad()
    def location_features(self, maps: list) -> torch.Tensor:
        """`[B, N, 1280]` per-location features of B cached `[C, H, W]` maps (frozen: computed once per image)."""
        return torch.cat([self.vision_map(torch.stack(maps[s:s + 100]).float()).flatten(2).transpose(1, 2)
                          for s in range(0, len(maps), 100)])

    def embed_locations(self, locations: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_head(locations.float()), dim=-1)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text.float()), dim=-1)

    def score(self, sim: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """t2i score from token-location cosines `sim [..., T, N]`, the locations' Gram matrices `[..., N, N]`.

        The attended vector a = sum_j p_j r_j never needs forming: w.a = sum_j p_j sim_j, |a|^2 = p^T G p."""
        p = (self.log_lambda.exp() * sim).softmax(-1)
        cosine = (p * sim).sum(-1) / (p @ gram).mul(p).sum(-1).clamp_min(1e-6).sqrt()
        mask = mask.to(cosine.dtype)
        return (cosine * mask).sum(-1) / mask.sum(-1)

    def all_pairs(self, r: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[Bi, Bt]` scores of every image (locations `r [Bi, N, D]`) with every caption (`w [Bt, T, D]`)."""
        sim = torch.einsum("atd,bnd->batn", w, r)
        return self.score(sim, (r @ r.transpose(1, 2))[:, None], mask[None])

    def pairs(self, r: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[P]` scores of P given pairs."""
        return self.score(w @ r.transpose(1, 2), r @ r.transpose(1, 2), mask)


def train(probe: LateInteraction, tokens, embedded, *, minutes: float, batch_size: int, learning_rate: float) -> list:
    locations = probe.location_features([tokens.image_tokens[i] for i in embedded.image_ids]).half()
    captions_of = [[] for _ in embedded.image_ids]
    for caption, image in enumerate(embedded.text_to_image.tolist()):
        captions_of[image].append(caption)
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    deadline, log = time.monotonic() + 60 * minutes, []
    while time.monotonic() < deadline:
        order, losses, start = torch.randperm(len(embedded.image_ids), generator=generator), [], time.perf_counter()
        for first in range(0, len(order) - batch_size + 1, batch_size):
            if time.monotonic() > deadline:
                break
            images = order[first:first + batch_size].tolist()
            captions = [own[int(torch.randint(len(own), (), generator=generator))]
                        for own in (captions_of[i] for i in images)]
            text, mask = pad_token_states([tokens.caption_tokens[embedded.captions[c]] for c in captions])
            logits = probe.log_scale.exp() * probe.all_pairs(probe.embed_locations(locations[images]),
                                                             probe.embed_text(text), mask)
            labels = torch.arange(len(images))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        log.append({"epoch": len(log) + 1, "steps": len(losses), "loss": sum(losses) / max(len(losses), 1),
                    "seconds": time.perf_counter() - start})
        print(f"epoch {log[-1]['epoch']}: {log[-1]['steps']} steps, loss {log[-1]['loss']:.4f}", flush=True)
    return log


@torch.no_grad()
def top_k_scores(probe: LateInteraction, tokens, embedded, top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's logits of each image's top-k captions and each caption's top-k images."""
    locations = probe.embed_locations(probe.location_features([tokens.image_tokens[i] for i in embedded.image_ids]))

    def score(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(images))
        for s in range(0, len(images), 512):
            chunk = captions[s:s + 512].tolist()
            text, mask = pad_token_states([tokens.caption_tokens[embedded.captions[c]] for c in chunk])
            out[s:s + 512] = probe.pairs(locations[images[s:s + 512]], probe.embed_text(text), mask)
        return probe.log_scale.exp() * out

    k = top.k
    return (score(torch.arange(len(embedded.image_ids)).repeat_interleave(k), top.captions.flatten()).view(-1, k),
            score(top.images.flatten(), torch.arange(len(embedded.captions)).repeat_interleave(k)).view(-1, k))


def blends(top: TopK, text_to_image, dense: tuple, base_weights, dense_weights) -> list:
    """(RSUM, I->T R@1, T->I R@1, dual weight, late-interaction weight) of each blend, best first."""
    rows = []
    for dual_weight, weight in itertools.product(base_weights, dense_weights):
        blended = TopK(top.k, top.dual, top.captions, top.caption_logits + weight * dense[0], top.images,
                       top.image_logits + weight * dense[1], top.seconds, top.pairs)
        m = reranked_metrics(blended, text_to_image, dual_weight)
        rows.append((round(m["rsum"], 2), round(m["i2t_r1"], 1), round(m["t2i_r1"], 1), dual_weight, weight))
    return sorted(rows, key=lambda row: (-row[0], row[3], row[4]))


def evaluate(probe, tokens, embedded, top_dual: TopK, top_rerank, reranker_weight) -> dict:
    dense = top_k_scores(probe, tokens, embedded, top_dual)
    alone = TopK(top_dual.k, top_dual.dual, top_dual.captions, dense[0], top_dual.images, dense[1], 0.0, 0)
    result = {"late_interaction_alone": reranked_metrics(alone, embedded.text_to_image, 0.0),
              "dual_plus_late_interaction": blends(top_dual, embedded.text_to_image, dense, (1.0,),
                                                   (0, 0.125, 0.25, 0.5, 1, 2))}
    if top_rerank is not None:  # the same top-k (the dual encoder's), so the same late-interaction scores
        result["reranker_blend_alone"] = reranked_metrics(top_rerank, embedded.text_to_image, reranker_weight)
        result["reranker_plus_late_interaction"] = blends(top_rerank, embedded.text_to_image, dense,
                                                          (0.5, 1, 2, 3, 4), (0, 0.25, 0.5, 1, 2))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="the dual encoder (a timm CNN vision tower)")
    parser.add_argument("--reranker_dir", default=None, help="an export with a co-attention re-ranker to add it to")
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--cache_dir", default="outputs/rerank_cache")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time of the heads (0: zero-shot only)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--top_k", type=int, default=16)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = load_model(args.model_dir, "cpu")
    options = data_options(args.model_dir, dataset=args.data)
    features = dict(max_length=options["max_length"], cache_dir=args.cache_dir)
    train_tokens, train_split = split_features(model, processor, load_split(**{**options, "split": "train"}),
                                               mirror_average=False, **features)
    tokens, embedded = split_features(model, processor, load_split(**{**options, "split": "validation"}), **features)
    scale = float(model.get_logit_scale().detach())
    dual = scale * embedded.image_embeds.float() @ embedded.text_embeds.float().T
    captions, images = dual.topk(args.top_k, dim=1).indices, dual.T.topk(args.top_k, dim=1).indices
    top_dual = TopK(args.top_k, dual, captions, torch.zeros(captions.shape), images, torch.zeros(images.shape), 0.0, 0)
    top_rerank, weight = None, None
    if args.reranker_dir:
        reranker = load_reranker(args.reranker_dir)
        top_rerank, weight = rerank_top_k(reranker, tokens, embedded, args.top_k, scale), reranker.config.dual_weight
    probe = LateInteraction(model)
    report = {"dual_encoder": embedded.metrics(), "options": vars(args),
              "zero_shot": evaluate(probe, tokens, embedded, top_dual, top_rerank, weight)}
    report["training"] = train(probe, train_tokens, train_split, minutes=args.minutes, batch_size=args.batch_size,
                               learning_rate=args.learning_rate) if args.minutes > 0 else []
    report["trained"] = evaluate(probe, tokens, embedded, top_dual, top_rerank, weight) if args.minutes > 0 else None
    for name in ("zero_shot", "trained"):
        result = report[name]
        if result is None:
            continue
        print(f"\n{name}: late interaction alone RSUM {result['late_interaction_alone']['rsum']:.1f} "
              f"(dual encoder {report['dual_encoder']['rsum']:.1f}); dual + late interaction, best "
              f"(RSUM, R@1 I->T, T->I, dual w, late w): {result['dual_plus_late_interaction'][0]}")
        if "reranker_plus_late_interaction" in result:
            print(f"  co-attention blend alone RSUM {result['reranker_blend_alone']['rsum']:.1f}; with late "
                  f"interaction, best: {result['reranker_plus_late_interaction'][0]}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
