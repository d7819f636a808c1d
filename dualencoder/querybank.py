"""Querybank normalisation: retrieval scores that discount "hub" gallery items.

In a learned embedding space a few gallery items are close to many queries (a generic caption such
as "a dog runs through the grass", a busy photo) and sit near the top of rankings they do not
belong in. QB-Norm (Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR
2022) measures each gallery item's pull with a *querybank*, embeddings of queries that are not the
test queries (here: the training split), and scores a query q against gallery item g by an
inverted softmax over the bank b::

    score(q, g) = s(q, g) - (1 / beta) * log sum_b exp(beta * s(b, g))

The second term depends on g alone: it is a per-item offset computed once when the gallery is
indexed, so ranking a query costs nothing more than the plain cosine ranking. With the training
split as the bank nothing is taken from the test queries (not transductive). ``beta`` is an
inverse temperature chosen on the validation split; large values approach the plain ranking
minus each item's single best bank match, small ones subtract its mean similarity to the bank.

This changes the scoring rule, so the project reports it beside the plain cosine protocol of
:mod:`dualencoder.metrics`, never instead of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualencoder.metrics import retrieval_metrics

__all__ = ["querybank_bias", "querybank_metrics"]


@torch.no_grad()
def querybank_bias(bank_queries: torch.Tensor, gallery: torch.Tensor, beta: float, *,
                   chunk_size: int = 4096) -> torch.Tensor:
    """[G] offsets -(1/beta) * logsumexp_b(beta * s(b, g)) for each gallery row g.

    ``bank_queries`` [B, D] and ``gallery`` [G, D] are embeddings of the two modalities (image
    queries against caption gallery, or the reverse); both are L2-normalised here. The bank is
    scored in chunks of ``chunk_size`` rows with a running logsumexp, so memory is
    ``chunk_size x G`` whatever the bank's size.
    """
    if not beta > 0:
        raise ValueError(f"querybank beta must be > 0, got {beta}")
    if bank_queries.ndim != 2 or gallery.ndim != 2 or bank_queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"bank [B, D] and gallery [G, D] must share D, got {tuple(bank_queries.shape)} "
                         f"and {tuple(gallery.shape)}")
    if bank_queries.shape[0] == 0:
        raise ValueError("the querybank is empty")
    gallery = F.normalize(gallery.float(), dim=-1)
    log_norm = torch.full((gallery.shape[0],), float("-inf"), device=gallery.device)
    for start in range(0, bank_queries.shape[0], chunk_size):
        bank = F.normalize(bank_queries[start:start + chunk_size].to(gallery.device).float(), dim=-1)
        log_norm = torch.logaddexp(log_norm, torch.logsumexp(beta * bank @ gallery.T, dim=0))
    return -log_norm / beta


def querybank_metrics(split, bank, beta: float) -> dict:
    """Retrieval metrics of an embedded split (:class:`~dualencoder.evaluation.embed.EmbeddedSplit`)
    with QB-Norm scores, the querybank being another embedded split's images and captions.

    Image -> text ranks captions offset by how strongly the bank's *images* match them; text ->
    image ranks images offset by how strongly the bank's *captions* match them.
    """
    return retrieval_metrics(
        split.image_embeds, split.text_embeds, split.text_to_image,
        text_bias=querybank_bias(bank.image_embeds, split.text_embeds, beta),
        image_bias=querybank_bias(bank.text_embeds, split.image_embeds, beta),
    )
