"""Re-rank the dual encoder's top-k in both directions with the co-attention re-ranker, and score the result.

Image -> text: each image's k highest-scoring captions are scored again by the re-ranker; text -> image:
each caption's k highest-scoring images. A pair both directions ask for is scored once. Candidates
outside the top-k keep the dual encoder's order, below every re-ranked one, so re-ranking only permutes
within the top-k: Recall@K for K >= k cannot change. The final score of a candidate is
`itm_logit + dual_weight * dual_logit` (the dual encoder's scaled similarity); the metrics come from the
project's ranks code (`dualencoder.metrics.ranks_from_similarity`) on a score matrix per direction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dualencoder.evaluation.embed import EmbeddedSplit
from dualencoder.metrics import metrics_from_ranks, ranks_from_similarity
from dualencoder.rerank.features import SplitTokens, split_features
from dualencoder.rerank.model import load_reranker, require_reranker

logger = logging.getLogger(__name__)

DUAL_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # the grid the training command picks dual_weight from


@dataclass
class TopK:
    """The re-ranker's logits of each query's top-k candidates, in both directions, and what scoring them cost."""

    k: int
    dual: torch.Tensor  # [Ni, Nt] the dual encoder's logits (scale x cosine)
    captions: torch.Tensor  # [Ni, k] each image's top-k caption indices
    caption_logits: torch.Tensor  # [Ni, k] re-ranker logits of those pairs
    images: torch.Tensor  # [Nt, k] each caption's top-k image indices
    image_logits: torch.Tensor  # [Nt, k]
    seconds: float
    pairs: int

    def first(self, k: int) -> "TopK":
        """The top-k' of this top-k (k' <= k): each query's k' best candidates are among its k, already scored.

        Its cost fields stay those of the pass that scored them, so `ms_per_query` is k' pairs at that throughput.
        """
        if k > self.k:
            raise ValueError(f"top-{k} is not part of a top-{self.k}")
        return TopK(k, self.dual, self.captions[:, :k], self.caption_logits[:, :k], self.images[:, :k],
                    self.image_logits[:, :k], self.seconds, self.pairs)

    @property
    def ms_per_query(self) -> float:
        """Time to score one query's k candidates at the measured throughput (pairs scored once in batches)."""
        return 1000.0 * self.seconds / max(self.pairs, 1) * self.k


@torch.no_grad()
def score_pairs(reranker, tokens: SplitTokens, image_ids: list, captions: list, images: torch.Tensor,
                texts: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Re-ranker logits of the pairs (image_ids[images[p]], captions[texts[p]]), in batches of similar caption length."""
    device = next(reranker.parameters()).device
    order = sorted(range(len(images)), key=lambda p: len(tokens.caption_tokens[captions[int(texts[p])]]))
    logits = torch.empty(len(images))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        text, mask, vision = tokens.batch([image_ids[int(images[p])] for p in rows],
                                          [captions[int(texts[p])] for p in rows])
        logits[rows] = reranker(text.to(device), mask.to(device), vision.to(device)).float().cpu()
    return logits


def rerank_top_k(reranker, tokens: SplitTokens, embedded: EmbeddedSplit, k: int, dual_scale: float,
                 batch_size: int = 64) -> TopK:
    """Score each image's top-k captions and each caption's top-k images (by the dual encoder) with the re-ranker."""
    was_training = reranker.training
    reranker.eval()
    dual = dual_scale * embedded.image_embeds.float() @ embedded.text_embeds.float().T
    k_texts, k_images = min(k, dual.shape[1]), min(k, dual.shape[0])
    captions = dual.topk(k_texts, dim=1).indices
    images = dual.T.topk(k_images, dim=1).indices
    num_texts = dual.shape[1]
    keys = torch.cat([(torch.arange(dual.shape[0])[:, None] * num_texts + captions).flatten(),
                      (images * num_texts + torch.arange(num_texts)[:, None]).flatten()])
    unique, where = keys.unique(return_inverse=True)
    start = time.perf_counter()
    logits = score_pairs(reranker, tokens, embedded.image_ids, embedded.captions, unique // num_texts,
                         unique % num_texts, batch_size)
    seconds = time.perf_counter() - start
    reranker.train(was_training)
    per_pair = logits[where]
    split = captions.numel()
    return TopK(k, dual, captions, per_pair[:split].view_as(captions), images, per_pair[split:].view_as(images),
                seconds, len(unique))


def _lift_top_k(dual: torch.Tensor, top: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Each row's dual scores with its top-k replaced by `scores`, shifted above every other candidate of the row."""
    out = dual.double().clone()
    lift = out.max(dim=1).values - scores.double().min(dim=1).values + 1.0
    return out.scatter_(1, top, scores.double() + lift[:, None])


def reranked_metrics(top: TopK, text_to_image: torch.Tensor, dual_weight: float = 0.0) -> dict:
    """Retrieval metrics (the project's keys, RSUM) after re-ranking, the final score being itm + dual_weight * dual."""
    caption_scores = top.caption_logits + dual_weight * top.dual.gather(1, top.captions)
    image_scores = top.image_logits + dual_weight * top.dual.T.gather(1, top.images)
    i2t, _ = ranks_from_similarity(_lift_top_k(top.dual, top.captions, caption_scores), text_to_image, which="i2t")
    _, t2i = ranks_from_similarity(_lift_top_k(top.dual.T, top.images, image_scores).T, text_to_image, which="t2i")
    return metrics_from_ranks(i2t, t2i)


def best_dual_weight(top: TopK, text_to_image: torch.Tensor, weights=DUAL_WEIGHTS) -> tuple[float, dict]:
    """The blend weight with the highest RSUM (the first of equals: the least dual encoder), and its metrics."""
    scored = [(w, reranked_metrics(top, text_to_image, w)) for w in weights]
    return max(scored, key=lambda item: (item[1]["rsum"], -item[0]))


def rerank_results(model, processor, model_dir, view, embedded: EmbeddedSplit, ks, *, max_length: int,
                   batch_size: int = 64, show_progress: bool = False) -> dict:
    """What the evaluate command reports for `--rerank_top_k`: per k, the re-ranked metrics and the cost.

    Only the largest k is scored: a smaller k's candidates are the first of each query's larger top-k.

    `embedded` is the evaluated split's dual-encoder embedding (the "without re-ranking" row), so the
    re-ranked rows differ from it only inside each query's top-k.
    """
    device = next(model.parameters()).device
    require_reranker(model_dir)
    reranker = load_reranker(model_dir, device)
    gain = reranker.config.validation_gain
    if gain is not None and gain <= 0:
        logger.warning("the re-ranker in %s did not beat the dual encoder alone on the validation images it was "
                       "selected on (RSUM %+.1f): its re-ranked rows may be worse than the model's own", model_dir, gain)
    tokens, _ = split_features(model, processor, view, max_length=max_length, batch_size=batch_size, device=device,
                               with_embeddings=False, show_progress=show_progress)
    weight, scale = reranker.config.dual_weight, float(model.get_logit_scale().detach())
    largest = rerank_top_k(reranker, tokens, embedded, max(ks), scale, batch_size)  # smaller ks are its first columns
    results = {}
    for k in ks:
        top = largest.first(k)
        results[str(k)] = {"metrics": reranked_metrics(top, embedded.text_to_image, weight), "dual_weight": weight,
                           "itm_only_metrics": reranked_metrics(top, embedded.text_to_image, 0.0),
                           "ms_per_query": top.ms_per_query, "scored_top_k": largest.k, "pairs_scored": top.pairs,
                           "seconds": top.seconds, "validation_gain": gain}
    return results


def pair_scores(model, processor, reranker, view, image_ids: list, captions: list, *, max_length: int,
                batch_size: int = 64, show_progress: bool = False) -> dict:
    """The re-ranker's scores of given (image id, caption) pairs of one split, e.g. people's judged pairs.

    ``match_probability`` is the ITM head's sigmoid; ``final`` the score re-ranking orders by,
    ``itm_logit + dual_weight * dual_logit``. Every image id and caption must be one of ``view``'s.
    """
    device = next(model.parameters()).device
    tokens, embedded = split_features(model, processor, view, max_length=max_length, batch_size=batch_size,
                                      device=device, show_progress=show_progress)
    image_row = {image_id: row for row, image_id in enumerate(embedded.image_ids)}
    caption_row = {caption: row for row, caption in enumerate(embedded.captions)}
    missing = sorted({i for i in image_ids if i not in image_row})
    missing += sorted({c for c in captions if c not in caption_row})
    if missing:
        raise ValueError(f"{len(missing)} image id(s) or caption(s) are not in the split, e.g. {missing[0]!r}")
    images = torch.tensor([image_row[i] for i in image_ids])
    texts = torch.tensor([caption_row[c] for c in captions])
    logits = score_pairs(reranker.eval(), tokens, embedded.image_ids, embedded.captions, images, texts, batch_size)
    cosines = (embedded.image_embeds[images] * embedded.text_embeds[texts]).sum(-1)
    dual = float(model.get_logit_scale().detach()) * cosines
    return {"match_probability": logits.sigmoid(), "final": logits + reranker.config.dual_weight * dual.float()}
