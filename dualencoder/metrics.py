"""Cross-modal retrieval metrics: ranks, Recall@K, median and mean rank, RSUM.

Protocol (the one used for Flickr8k/30k and COCO, where each image has several captions):

* image -> text: each image is a query against *all* captions; its rank is the rank of the
  best-ranked of its own captions (any of them counts as a hit).
* text -> image: each caption is a query against *all* images; its rank is the rank of its one
  image.

Tie rule: rank = 1 + the number of WRONG candidates whose score is >= the best correct
candidate's score. Ties therefore count against the model: a model that gives every pair the
same similarity gets the worst possible rank (R@1 = 0), not the best. Without this rule a
collapsed model (all embeddings identical) would report perfect recall.

Ranks start at 1. Recalls are percentages (floats), the median rank is ``float(np.median(ranks))``
(so it can be x.5 for an even number of queries; no flooring), the mean rank is the plain mean.

Embeddings are assumed L2-normalised, so a dot product is the similarity. Everything is
computed in float32 in row chunks: the full [Ni, Nt] similarity matrix is never materialised,
so 5k x 25k (Flickr/COCO test sets) or 100k-image sets fit in a few hundred MB.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from dualencoder.devices import pick_device

__all__ = [
    "retrieval_ranks",
    "ranks_from_similarity",
    "metrics_from_ranks",
    "retrieval_metrics",
    "format_metrics_table",
]

STANDARD_KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------
# input checking
# ---------------------------------------------------------------------------------------------


def _to_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _as_matrix(x, name: str, device: torch.device, keep_float64: bool = False) -> torch.Tensor:
    t = _to_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    dtype = torch.float64 if (keep_float64 and t.dtype == torch.float64) else torch.float32
    t = t.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        # NaN compares False with everything, which would silently give rank 1.
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _as_text_to_image(text_to_image, num_texts: int, num_images: int, device) -> torch.Tensor:
    t = _to_tensor(text_to_image)
    if t.ndim != 1 or t.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must be 1-D with one image index per text ({num_texts} texts), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {t.dtype}")
    t = t.to(torch.long).cpu()
    bad = ((t < 0) | (t >= num_images)).nonzero().flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"text_to_image[{j}] = {int(t[j])} is out of range: there are {num_images} images "
            f"(valid indices 0..{num_images - 1}); {bad.numel()} entries out of range in total"
        )
    counts = torch.bincount(t, minlength=num_images)
    orphans = (counts == 0).nonzero().flatten()
    if orphans.numel():
        shown = orphans[:10].tolist()
        raise ValueError(
            f"{orphans.numel()} image(s) have no text in text_to_image (first: {shown}); "
            "image->text rank is undefined for an image without a caption. "
            "Drop those images or their rows before evaluating."
        )
    return t.to(device)


def _as_bias(bias, name: str, n: int, device: torch.device) -> torch.Tensor | None:
    """A [n] float32 per-gallery-item score offset, or None when not given (plain scores, nothing added)."""
    if bias is None:
        return None
    b = _to_tensor(bias).to(device=device, dtype=torch.float32)
    if b.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one offset per gallery item), got {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError(f"{name} has non-finite values")
    return b


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


# ---------------------------------------------------------------------------------------------
# ranks on one block of the similarity matrix
# ---------------------------------------------------------------------------------------------


def _i2t_block_ranks(sim: torch.Tensor, start: int, text_to_image: torch.Tensor) -> torch.Tensor:
    """Ranks for image rows ``start .. start + len(sim)``; ``sim`` is their [c, Nt] block.

    The correct texts of each row are found through ``text_to_image`` and reduced with
    scatter ops, so no [c, Nt] correctness mask is built (the block is the big allocation).
    """
    c = sim.shape[0]
    local = text_to_image - start
    cols = ((local >= 0) & (local < c)).nonzero().flatten()
    rows = local[cols]
    vals = sim[rows, cols]
    best = torch.full((c,), -math.inf, dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, rows, vals, reduce="amax", include_self=True)
    n_at_least = (sim >= best[:, None]).sum(1)
    n_correct_at_least = torch.zeros(c, dtype=torch.long, device=sim.device)
    n_correct_at_least.scatter_add_(0, rows, (vals >= best[rows]).long())
    return 1 + n_at_least - n_correct_at_least


def _t2i_block_ranks(sim: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Ranks for text rows; ``sim`` is their [c, Ni] block, ``correct`` their image indices.

    Counting every image with score >= the correct one includes the correct image itself
    (values are finite), which is exactly ``1 + number of wrong images >= correct``.
    """
    target = sim.gather(1, correct[:, None])
    return (sim >= target).sum(1)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def retrieval_ranks(
    image_embeds,
    text_embeds,
    text_to_image,
    *,
    chunk_size: int = 1024,
    device=None,
    image_bias=None,
    text_bias=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of the correct item for every image query and every text query.

    Args:
        image_embeds: [Ni, D] L2-normalised image embeddings (torch tensor or numpy array, any
            dtype; computed in float32).
        text_embeds: [Nt, D] L2-normalised text embeddings.
        text_to_image: [Nt] integer index of each text's image in ``image_embeds``. Every image
            needs at least one text.
        chunk_size: number of query rows scored at once; memory is ``chunk_size x max(Ni, Nt)``
            floats instead of ``Ni x Nt``. Results do not depend on it.
        device: where to compute; ``None`` picks CUDA when available, else CPU.
        image_bias, text_bias: optional [Ni] / [Nt] offsets added to every score of that
            gallery item: text -> image ranks images by ``s_ij + image_bias[i]``, image -> text
            ranks captions by ``s_ij + text_bias[j]``. A per-item offset never changes which
            query ranks an item higher, only how items compete within one query's ranking
            (e.g. :mod:`dualencoder.querybank`'s hubness correction).

    Returns:
        ``(i2t_ranks, t2i_ranks)``: CPU LongTensors of shape [Ni] and [Nt], ranks starting at 1,
        ties counted against the model (see the module docstring).
    """
    chunk_size = _check_chunk_size(chunk_size)
    dev = pick_device(device)
    images = _as_matrix(image_embeds, "image_embeds", dev)
    texts = _as_matrix(text_embeds, "text_embeds", dev)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_embeds and text_embeds must have the same embedding size, got "
            f"{images.shape[1]} (image_embeds {tuple(images.shape)}) and {texts.shape[1]} "
            f"(text_embeds {tuple(texts.shape)})"
        )
    t2i = _as_text_to_image(text_to_image, texts.shape[0], images.shape[0], dev)
    image_offsets = _as_bias(image_bias, "image_bias", images.shape[0], dev)
    text_offsets = _as_bias(text_bias, "text_bias", texts.shape[0], dev)

    i2t_parts, t2i_parts = [], []
    for start in range(0, images.shape[0], chunk_size):
        block = images[start : start + chunk_size] @ texts.T
        if text_offsets is not None:
            block += text_offsets
        i2t_parts.append(_i2t_block_ranks(block, start, t2i).cpu())
        del block
    for start in range(0, texts.shape[0], chunk_size):
        block = texts[start : start + chunk_size] @ images.T
        if image_offsets is not None:
            block += image_offsets
        t2i_parts.append(_t2i_block_ranks(block, t2i[start : start + chunk_size]).cpu())
        del block
    return torch.cat(i2t_parts), torch.cat(t2i_parts)


def ranks_from_similarity(
    sim, text_to_image, *, chunk_size: int = 1024, which: str = "both"
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Same as :func:`retrieval_ranks` for a precomputed similarity matrix ``sim`` [Ni, Nt].

    Useful when scores do not come from dot products (re-rankers, tests with hand-built
    scores). ``sim`` stays on its device; float64 input is kept in float64 (down-casting could
    create ties the scorer did not produce), every other dtype is computed in float32.
    ``which`` ("i2t" or "t2i") computes one direction only and returns None for the other: a
    re-ranker's image-query and caption-query scores are two different matrices.
    """
    if which not in ("both", "i2t", "t2i"):
        raise ValueError(f"which={which!r}: expected 'both', 'i2t' or 't2i'")
    chunk_size = _check_chunk_size(chunk_size)
    s = _to_tensor(sim)
    s = _as_matrix(s, "sim", s.device, keep_float64=True)
    t2i = _as_text_to_image(text_to_image, s.shape[1], s.shape[0], s.device)
    i2t_ranks = t2i_ranks = None
    if which != "t2i":
        i2t_ranks = torch.cat([_i2t_block_ranks(s[start : start + chunk_size], start, t2i).cpu()
                               for start in range(0, s.shape[0], chunk_size)])
    if which != "i2t":
        t2i_ranks = torch.cat([_t2i_block_ranks(s[:, start : start + chunk_size].T, t2i[start : start + chunk_size]).cpu()
                               for start in range(0, s.shape[1], chunk_size)])
    return i2t_ranks, t2i_ranks


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {ks!r}")
    # R@1/5/10 are always reported: they are the shared contract and make up RSUM.
    return sorted(set(int(k) for k in ks) | set(STANDARD_KS))


def metrics_from_ranks(i2t_ranks, t2i_ranks, *, ks: Sequence[int] = STANDARD_KS) -> dict:
    """Turn rank vectors into the metrics dict (see :func:`retrieval_metrics` for the keys)."""
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        raw = _to_tensor(ranks).cpu().numpy().ravel()
        if raw.size == 0:
            raise ValueError(f"{direction} ranks are empty")
        if not np.all(raw == np.floor(raw)) or raw.min() < 1:
            raise ValueError(f"{direction} ranks must be whole numbers from 1 (1 = first), got e.g. "
                             f"{raw[(raw != np.floor(raw)) | (raw < 1)][:3].tolist()}; averaged tie ranks are not "
                             "supported: ties count against the model (the worst rank of the tie)")
        r = raw.astype(np.int64)
        for k in ks:
            out[f"{direction}_r{k}"] = float(100.0 * np.mean(r <= k))
        out[f"{direction}_medr"] = float(np.median(r))
        out[f"{direction}_meanr"] = float(np.mean(r))
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in STANDARD_KS))
    return out


def retrieval_metrics(
    image_embeds,
    text_embeds,
    text_to_image,
    *,
    ks: Sequence[int] = STANDARD_KS,
    chunk_size: int = 1024,
    device=None,
    image_bias=None,
    text_bias=None,
) -> dict:
    """Recall@K, median and mean rank in both directions, and RSUM.

    Returns a dict with keys ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10
    t2i_medr t2i_meanr rsum`` (all floats, recalls in percent). Extra values in ``ks`` add keys
    ``i2t_r{k}``/``t2i_r{k}``; R@1/5/10 are always present and ``rsum`` is always the standard
    sum of those six recalls, so it stays comparable with published numbers.

    See :func:`retrieval_ranks` for the arguments and the module docstring for the protocol.
    """
    ks = _check_ks(ks)
    i2t, t2i = retrieval_ranks(
        image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, device=device,
        image_bias=image_bias, text_bias=text_bias,
    )
    return metrics_from_ranks(i2t, t2i, ks=ks)


_RECALL_KEY = re.compile(r"^(i2t|t2i)_r(\d+)$")


def format_metrics_table(metrics: Mapping, *, precision: int = 1) -> str:
    """Markdown table of retrieval metrics, one row per run.

    ``metrics`` is either one metrics dict (as returned by :func:`retrieval_metrics`) or a
    mapping ``{run name: metrics dict}``. Columns: R@K (every K present in any run), MedR and
    MeanR for image->text then text->image, then RSUM. Missing values are shown as ``-``.
    """
    if not metrics:
        raise ValueError("format_metrics_table needs at least one metrics dict")
    if all(not isinstance(v, Mapping) for v in metrics.values()):
        runs = {"model": metrics}
    elif all(isinstance(v, Mapping) for v in metrics.values()):
        runs = dict(metrics)
    else:
        raise ValueError("pass either one metrics dict or a mapping of run name -> metrics dict")

    ks = sorted(
        {int(m.group(2)) for run in runs.values() for key in run if (m := _RECALL_KEY.match(key))}
        | set(STANDARD_KS)
    )
    columns: list[tuple[str, str]] = []
    for direction, label in (("i2t", "I→T"), ("t2i", "T→I")):
        columns += [(f"{direction}_r{k}", f"{label} R@{k}") for k in ks]
        columns += [(f"{direction}_medr", f"{label} MedR"), (f"{direction}_meanr", f"{label} MeanR")]
    columns.append(("rsum", "RSUM"))

    def cell(value) -> str:
        if value is None:
            return "-"
        try:
            return f"{float(value):.{precision}f}"
        except (TypeError, ValueError):
            return str(value)

    lines = [
        "| run | " + " | ".join(label for _, label in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | " + " | ".join(cell(run.get(key)) for key, _ in columns) + " |"
        )
    return "\n".join(lines)


def similarity_gap(image_embeds, text_embeds, text_to_image) -> dict:
    """Mean similarity of aligned pairs, of all misaligned pairs, and their difference.

    Exact and cheap for any size, without a similarity matrix or sampling: the sum of all
    Ni x Nt dot products is ``(sum of image rows) . (sum of text rows)``, and the negatives are
    that total minus the positives. A gap near 0 means the model does not separate matching from
    non-matching pairs, whatever the absolute similarities (which drift with the temperature).

    Returns ``{"pos_mean", "neg_mean", "gap"}`` as floats (gap = pos_mean - neg_mean).
    """
    img, txt, t2i = check_embeddings(image_embeds, text_embeds, text_to_image)
    pos = np.einsum("nd,nd->n", txt, img[t2i])
    total = float(img.sum(0) @ txt.sum(0))
    n_neg = len(img) * len(txt) - len(txt)
    pos_mean = float(pos.mean())
    neg_mean = (total - float(pos.sum())) / n_neg
    return {"pos_mean": pos_mean, "neg_mean": neg_mean, "gap": pos_mean - neg_mean}


def check_embeddings(image_embeds, text_embeds, text_to_image):
    """(images, texts, text_to_image) as float64/int64 arrays, after checking their shapes agree."""
    img = _as_float64(image_embeds)
    txt = _as_float64(text_embeds)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with the same D, got {img.shape} and {txt.shape}")
    if t2i.shape != (len(txt),):
        raise ValueError(f"text_to_image must have one entry per text ({len(txt)}), got shape {t2i.shape}")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= len(img)):
        raise ValueError(f"text_to_image holds indices outside 0..{len(img) - 1}")
    if len(img) < 2:
        raise ValueError("need at least 2 images: with one image there are no misaligned pairs")
    return img, txt, t2i


def _as_float64(x) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))
