"""Negatives for the re-ranker: the dual encoder's own hardest mistakes, or random pairs (the ablation).

The re-ranker only ever sees the dual encoder's top-k, so it learns most from pairs the dual encoder
ranks high but wrongly: for each image, its highest-scoring captions of other images; for each caption,
its highest-scoring other images. The towers and heads are frozen, so the scores are computed once
(`mine_hard_negatives`, in row chunks: the full similarity matrix is never held); each epoch draws
afresh among the top `top_n` (`draw_negatives`), so a few false negatives (a caption of another image
that describes this one just as well) cannot dominate training. A caption of the same image is never a
negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HardNegatives:
    """`captions[i]`: caption indices of image i's top wrong captions; `images[j]`: caption j's top wrong images."""

    captions: torch.Tensor  # [Ni, top_n]
    images: torch.Tensor  # [Nt, top_n]


def _top_wrong(queries: torch.Tensor, gallery: torch.Tensor, wrong: callable, top_n: int, chunk_size: int):
    rows = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start:start + chunk_size] @ gallery.T
        scores.masked_fill_(~wrong(start, scores.shape[0]), float("-inf"))
        rows.append(scores.topk(top_n, dim=1).indices)
    return torch.cat(rows)


@torch.no_grad()
def mine_hard_negatives(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
                        top_n: int = 16, chunk_size: int = 1024) -> HardNegatives:
    """Each image's `top_n` highest-scoring captions of other images, and each caption's `top_n` other images."""
    text_to_image = text_to_image.long()
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    captions_per_image = torch.bincount(text_to_image, minlength=num_images).max()
    if top_n > num_texts - captions_per_image or top_n > num_images - 1:
        raise ValueError(f"top_n={top_n} hard negatives asked for, but the split has only {num_images} images and "
                         f"{num_texts} captions: lower --negatives_top_n.")
    captions = _top_wrong(image_embeds.float(), text_embeds.float(),
                          lambda start, n: text_to_image[None, :] != torch.arange(start, start + n)[:, None],
                          top_n, chunk_size)
    images = _top_wrong(text_embeds.float(), image_embeds.float(),
                        lambda start, n: torch.arange(num_images)[None, :] != text_to_image[start:start + n, None],
                        top_n, chunk_size)
    return HardNegatives(captions, images)


def draw_negatives(positives: torch.Tensor, text_to_image: torch.Tensor, hard: HardNegatives | None,
                   generator: torch.Generator, hard_fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative caption for each positive's image and one negative image for each positive caption.

    `positives` are caption indices (the pair is the caption and its image). Each negative is drawn, with
    probability `hard_fraction`, uniformly among the mined top-n (`hard`), else uniformly among every caption
    of another image / every other image (all random without `hard`: the random-negatives ablation).
    Returns (negative caption per positive, negative image per positive).
    """
    captions, images = _random_negatives(positives, text_to_image, generator)
    if hard is None or hard_fraction <= 0:
        return captions, images
    n = positives.shape[0]
    pick = lambda table, rows: table[rows, torch.randint(table.shape[1], (n,), generator=generator)]
    use_hard = lambda: torch.rand(n, generator=generator) < hard_fraction
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
