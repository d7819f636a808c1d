"""Negatives for the re-ranker: the dual encoder's own hardest mistakes, or random pairs (the ablation).

The re-ranker only ever sees the dual encoder's top-k, so it learns most from pairs the dual encoder
ranks high but wrongly: for each image, its highest-scoring captions of other images; for each caption,
its highest-scoring other images. The towers and heads are frozen, so the scores are computed once
(`mine_hard_negatives`, in row chunks: the full similarity matrix is never held); each epoch draws
afresh among the top `top_n` (`draw_negatives`), so a few false negatives (a caption of another image
that describes this one just as well) cannot dominate training. A caption of the same image is never a
negative.

On Flickr8k about a third of the mined captions describe the image about as well as its own captions do
(doc/RERANKER.md, "Hard negatives"), so `paraphrase_quantile` can drop them: a caption is not mined as a
negative of an image when it is at least as close to one of that image's captions (cosine of the dual
encoder's text embeddings) as the given quantile of the closeness of two captions of one image; the next
hardest ones take their places.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class HardNegatives:
    """`captions[i]`: caption indices of image i's top wrong captions; `images[j]`: caption j's top wrong images."""

    captions: torch.Tensor  # [Ni, top_n]
    images: torch.Tensor  # [Nt, top_n]
    paraphrase_share: float = 0.0  # share of the unfiltered top-n (both ways) that `paraphrase_quantile` dropped


# a dropped paraphrase still outranks a positive: it is mined only when fewer than top_n other candidates remain
_DROPPED = 1e4


def _top_wrong(queries: torch.Tensor, gallery: torch.Tensor, wrong: callable, paraphrase: callable | None,
               top_n: int, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Top-n wrong partners of every query, paraphrases last; and how many of the unfiltered top-n were paraphrases."""
    rows, dropped = [], 0
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ gallery.T
        scores.masked_fill_(~wrong(start, scores.shape[0]), float("-inf"))
        if paraphrase is not None:
            close = paraphrase(start, scores.shape[0])
            dropped += int(close.gather(1, scores.topk(top_n, dim=1).indices).sum())
            scores = torch.where(close, scores - _DROPPED, scores)
        rows.append(scores.topk(top_n, dim=1).indices)
    return torch.cat(rows), dropped


def _closest_own_caption(rows: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                         num_groups: int) -> torch.Tensor:
    """`[R, num_groups]`: for each row of `rows` (unit caption embeddings), its highest cosine to a caption of each
    group, `text_embeds` being those captions and `text_to_image` their groups.

    Used both ways: rows = every caption against the captions of a chunk of images (transposed: each of those
    images' closeness to every caption), and rows = a chunk of captions against every caption, grouped by image."""
    sims = rows @ text_embeds.T
    out = sims.new_full((rows.shape[0], num_groups), float("-inf"))
    return out.scatter_reduce_(1, text_to_image[None, :].expand_as(sims), sims, "amax")


def paraphrase_threshold(text_embeds: torch.Tensor, text_to_image: torch.Tensor, quantile: float,
                         chunk_size: int = 1024) -> float | None:
    """The `quantile` of the cosine similarities between two different captions of one image (None when no image
    has two captions: there is nothing to measure a paraphrase by). `text_embeds` are unit vectors."""
    text_to_image = text_to_image.long()
    values = []
    for start in range(0, text_embeds.shape[0], chunk_size):
        sims = text_embeds[start:start + chunk_size] @ text_embeds.T
        rows = torch.arange(start, start + sims.shape[0])
        same = (text_to_image[rows, None] == text_to_image[None, :]) & (rows[:, None] != torch.arange(sims.shape[1]))
        values.append(sims[same])
    values = torch.cat(values)
    if values.numel() == 0:
        return None
    return float(torch.quantile(values, quantile)) if values.numel() <= 2 ** 24 else float(
        values.sort().values[int(quantile * (values.numel() - 1))])


@torch.no_grad()
def mine_hard_negatives(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                        top_n: int = 16, chunk_size: int = 1024,
                        paraphrase_quantile: float | None = None) -> HardNegatives:
    """Each image's `top_n` highest-scoring captions of other images, and each caption's `top_n` other images.

    With `paraphrase_quantile` (in [0, 1]), a caption and an image are not mined as a negative pair when the
    caption is at least as close to one of the image's captions as that quantile of same-image caption pairs
    (`paraphrase_threshold`): they are likely a true match the data does not record. Such pairs are mined only
    where fewer than `top_n` others remain.
    """
    text_to_image = text_to_image.long()
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    captions_per_image = torch.bincount(text_to_image, minlength=num_images).max()
    if top_n > num_texts - captions_per_image or top_n > num_images - 1:
        raise ValueError(f"top_n={top_n} hard negatives asked for, but the split has only {num_images} images and "
                         f"{num_texts} captions: lower --negatives_top_n.")
    image_paraphrase = caption_paraphrase = None
    if paraphrase_quantile is not None:
        if not 0.0 <= paraphrase_quantile <= 1.0:
            raise ValueError(f"paraphrase_quantile={paraphrase_quantile}: expected a quantile in [0, 1].")
        unit = F.normalize(text_embeds.float(), dim=-1)
        threshold = paraphrase_threshold(unit, text_to_image, paraphrase_quantile, chunk_size)
        if threshold is None:
            logger.warning("paraphrase_quantile: every image has one caption, so no caption can be compared with "
                           "another of its image: the mined negatives are not filtered.")
        else:
            def image_close(start, n):  # [n images, Nt captions]
                own = ((text_to_image >= start) & (text_to_image < start + n)).nonzero().flatten()
                return _closest_own_caption(unit, unit[own], text_to_image[own] - start, n).T >= threshold

            def caption_close(start, n):  # [n captions, Ni images]
                return _closest_own_caption(unit[start:start + n], unit, text_to_image, num_images) >= threshold

            image_paraphrase, caption_paraphrase = image_close, caption_close

    captions, dropped_captions = _top_wrong(
        image_embeds.float(), text_embeds.float(),
        lambda start, n: text_to_image[None, :] != torch.arange(start, start + n)[:, None],
        image_paraphrase, top_n, chunk_size)
    images, dropped_images = _top_wrong(
        text_embeds.float(), image_embeds.float(),
        lambda start, n: torch.arange(num_images)[None, :] != text_to_image[start:start + n, None],
        caption_paraphrase, top_n, chunk_size)
    share = (dropped_captions + dropped_images) / (top_n * (num_images + num_texts))
    if image_paraphrase is not None:
        logger.info("paraphrase_quantile %g: %.1f %% of the mined top-%d were paraphrases of a positive, replaced by "
                    "the next hardest", paraphrase_quantile, 100 * share, top_n)
    return HardNegatives(captions, images, share)


def draw_negatives(positives: torch.Tensor, text_to_image: torch.Tensor, hard: HardNegatives | None,
                   generator: torch.Generator, hard_fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative caption for each positive's image and one negative image for each positive caption.

    `positives` are caption indices (the pair is the caption and its image). Each negative is drawn, with
    probability `hard_fraction`, uniformly among the mined top-n (`hard`), else uniformly among every caption
    of another image / every other image (all random without `hard`: the random-negatives ablation).
    Returns (negative caption per positive, negative image per positive).
    """
    n = positives.shape[0]
    pick = lambda table, rows: table[rows, torch.randint(table.shape[1], (n,), generator=generator)]
    return _mixed(_random_negatives(positives, text_to_image, generator), positives, text_to_image, hard, generator,
                  hard_fraction, (n,), pick)


def draw_groups(positives: torch.Tensor, text_to_image: torch.Tensor, hard: HardNegatives | None,
                generator: torch.Generator, size: int, hard_fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`size - 1` distinct negatives per positive, both ways, for the listwise objective: (captions `[n, size-1]`
    for each positive's image, images `[n, size-1]` for each positive caption).

    Each slot is, with probability `hard_fraction`, one of the mined top-n (distinct within a row), else random."""
    n = positives.shape[0]
    draws = [_random_negatives(positives, text_to_image, generator) for _ in range(size - 1)]
    random = torch.stack([c for c, _ in draws], 1), torch.stack([i for _, i in draws], 1)
    if hard is not None and hard_fraction > 0 and size - 1 > hard.captions.shape[1]:
        raise ValueError(f"groups of {size} need {size - 1} mined negatives per query; only the top "
                         f"{hard.captions.shape[1]} were mined: raise --negatives_top_n or lower --group_size.")

    def pick(table, rows):  # size-1 distinct columns of each row, in random order
        columns = torch.rand(n, table.shape[1], generator=generator).argsort(1)[:, :size - 1]
        return table[rows].gather(1, columns)

    return _mixed(random, positives, text_to_image, hard, generator, hard_fraction, (n, size - 1), pick)


def _mixed(random: tuple, positives, text_to_image, hard: HardNegatives | None, generator, hard_fraction: float,
           shape: tuple, pick) -> tuple[torch.Tensor, torch.Tensor]:
    """The random (captions, images) negatives with each slot of `shape` replaced, with probability `hard_fraction`,
    by `pick(mined table, rows)`: draw_negatives' and draw_groups' one mixing rule (the draws in the same order)."""
    captions, images = random
    if hard is None or hard_fraction <= 0:
        return captions, images
    use_hard = lambda: torch.rand(shape, generator=generator) < hard_fraction
    return (torch.where(use_hard(), pick(hard.captions, text_to_image[positives]), captions),
            torch.where(use_hard(), pick(hard.images, positives), images))


def _random_negatives(positives: torch.Tensor, text_to_image: torch.Tensor, generator: torch.Generator):
    images = text_to_image[positives]
    n = positives.shape[0]
    num_images, num_texts = int(text_to_image.max()) + 1, text_to_image.shape[0]
    other_images = (images + torch.randint(1, num_images, (n,), generator=generator)) % num_images
    captions = torch.randint(num_texts, (n,), generator=generator)
    clash = text_to_image[captions] == images
    while clash.any():  # a caption of the same image is not a negative: draw those again
        captions[clash] = torch.randint(num_texts, (int(clash.sum()),), generator=generator)
        clash = text_to_image[captions] == images
    return captions, other_images
