"""Plots for judging an image-text dual encoder: projections, retrieval galleries, similarity
histograms, training curves, image grids.

Every function takes plain numpy arrays / lists / PIL images and writes a PNG; none knows about
models, data sets or training, so the evaluation code (or a notebook) decides what to plot.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly instead of through
``pyplot``: that renders headless (no display, no GPU), never switches the global backend of a
notebook that imports this module, and cannot leak open figures in a long evaluation loop.
Figures are saved at a fixed size (``figsize`` x ``dpi``, no tight bounding box) so the output
size is predictable.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dualencoder.metrics import check_embeddings

__all__ = [
    "project_2d",
    "plot_embedding_projection",
    "plot_projection_before_after",
    "top_k_hits",
    "plot_text_to_image_gallery",
    "plot_image_to_text_gallery",
    "sample_similarities",
    "plot_similarity_histogram",
    "plot_training_curves",
    "image_grid",
]

IMAGE_COLOR = "tab:blue"
TEXT_COLOR = "tab:orange"
HIT_COLOR = "tab:green"
MISS_COLOR = "tab:red"
CHECK, CROSS = "\u2713", "\u2717"  # present in DejaVu Sans, matplotlib's default font


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _as_numpy(x, dtype=np.float32) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=dtype)


def _new_figure(figsize, dpi):
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    return path


def _to_rgb_array(image, max_side: int = 256) -> np.ndarray:
    """PIL image or array -> small uint8 RGB array (thumbnails keep big galleries light)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    return np.asarray(image)


def _wrap(text: str, width: int, max_lines: int | None = None) -> str:
    lines = textwrap.wrap(str(text), width) or [""]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return "\n".join(lines)


def _pairs_array(pairs, num_images: int, num_texts: int) -> np.ndarray:
    """Accept ``[(image_idx, text_idx), ...]`` or a 1-D ``text_to_image`` array; return [P, 2]."""
    arr = np.asarray(pairs, dtype=np.int64)
    if arr.ndim == 1:  # text_to_image: text j belongs to image arr[j]
        if arr.shape[0] != num_texts:
            raise ValueError(
                f"a 1-D pairs array is read as text_to_image and needs {num_texts} entries, "
                f"got {arr.shape[0]}"
            )
        arr = np.stack([arr, np.arange(num_texts)], axis=1)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"pairs must be (image_index, text_index) tuples, got shape {arr.shape}")
    if (arr[:, 0] < 0).any() or (arr[:, 0] >= num_images).any():
        raise ValueError(f"pairs reference an image index outside 0..{num_images - 1}")
    if (arr[:, 1] < 0).any() or (arr[:, 1] >= num_texts).any():
        raise ValueError(f"pairs reference a text index outside 0..{num_texts - 1}")
    return arr


# ---------------------------------------------------------------------------------------------
# projections
# ---------------------------------------------------------------------------------------------


def project_2d(x, method: str = "tsne", seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """Project rows of ``x`` [N, D] to 2-D with t-SNE or PCA (scikit-learn).

    t-SNE requires ``perplexity < n_samples``; it is clamped to ``(N - 1) / 3`` (at least 1) so
    tiny sets (a smoke test, a 4-image demo) still plot. Degenerate sizes (N = 1, D = 1) give
    zero-padded coordinates instead of an error.
    """
    x = _as_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array [N, D], got shape {x.shape}")
    n, d = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    if n < 2:
        return out
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, n, d)
        out[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(x)
        return out
    if method == "tsne":
        from sklearn.manifold import TSNE

        perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
        perp = min(perp, n - 1 - 1e-3)
        init = "pca" if d >= 2 else "random"
        out[:] = TSNE(n_components=2, perplexity=perp, init=init, random_state=seed).fit_transform(x)
        return out
    raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")


def _project_pair(image_embeds, text_embeds, method, seed):
    """Project images and texts *jointly* so both modalities share one 2-D space."""
    img, txt = _as_numpy(image_embeds), _as_numpy(text_embeds)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"image_embeds and text_embeds must be [N, D] with the same D, got {img.shape} "
            f"and {txt.shape}"
        )
    xy = project_2d(np.concatenate([img, txt]), method=method, seed=seed)
    return xy[: len(img)], xy[len(img) :]


def _draw_projection(ax, img_xy, txt_xy, pairs, n_lines, seed, title):
    rng = np.random.default_rng(seed)
    if len(pairs) and n_lines > 0:
        chosen = pairs[rng.choice(len(pairs), size=min(n_lines, len(pairs)), replace=False)]
        for i, j in chosen:
            ax.plot(
                [img_xy[i, 0], txt_xy[j, 0]], [img_xy[i, 1], txt_xy[j, 1]],
                color="0.5", linewidth=0.6, alpha=0.6, zorder=1,
            )
    ax.scatter(img_xy[:, 0], img_xy[:, 1], s=14, c=IMAGE_COLOR, marker="o", label="image", zorder=2)
    ax.scatter(txt_xy[:, 0], txt_xy[:, 1], s=14, c=TEXT_COLOR, marker="^", label="text", zorder=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)


def plot_embedding_projection(
    image_embeds,
    text_embeds,
    pairs,
    path,
    method: str = "tsne",
    title: str | None = None,
    n_lines: int = 50,
    seed: int = 0,
    *,
    figsize=(7, 6),
    dpi: int = 100,
) -> Path:
    """2-D t-SNE/PCA of image and text embeddings together, coloured by modality.

    Grey lines join a random sample of ``n_lines`` matching pairs: short lines mean the towers
    put an image and its caption close together; two separate clouds mean the modality gap.
    ``pairs`` is a list of ``(image_index, text_index)`` or a 1-D ``text_to_image`` array.
    t-SNE is O(N^2): subsample a few thousand points before calling.
    """
    img_xy, txt_xy = _project_pair(image_embeds, text_embeds, method, seed)
    pairs = _pairs_array(pairs, len(img_xy), len(txt_xy))
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    _draw_projection(ax, img_xy, txt_xy, pairs, n_lines, seed, title or f"{method.upper()} of embeddings")
    fig.tight_layout()
    return _save(fig, path)


def plot_projection_before_after(
    before,
    after,
    pairs,
    path,
    method: str = "tsne",
    *,
    titles=("before training", "after training"),
    n_lines: int = 50,
    seed: int = 0,
    figsize=(13, 6),
    dpi: int = 100,
) -> Path:
    """Side-by-side projections of ``before=(image_embeds, text_embeds)`` and ``after=(...)``.

    Each panel is projected separately (the embedding spaces differ), with the same sample of
    pair lines in both, so the tightening of matching pairs is directly visible.
    """
    fig = _new_figure(figsize, dpi)
    for col, ((img, txt), title) in enumerate(zip((before, after), titles)):
        img_xy, txt_xy = _project_pair(img, txt, method, seed)
        p = _pairs_array(pairs, len(img_xy), len(txt_xy))
        ax = fig.add_subplot(1, 2, col + 1)
        _draw_projection(ax, img_xy, txt_xy, p, n_lines, seed, f"{title} ({method.upper()})")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# retrieval galleries
# ---------------------------------------------------------------------------------------------


def top_k_hits(sim, correct, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates per query and which of them are correct.

    Args:
        sim: [Nq, Nc] scores of each query against every candidate.
        correct: per query, the correct candidate index (int) or a set of them.
        k: number of candidates shown (clamped to Nc).

    Returns:
        ``(indices [Nq, k], hits bool [Nq, k])``. Among equal scores a wrong candidate comes before a
        correct one, as the metrics count ties against the model (so a row with no hit in its first k
        is exactly a miss at R@k); otherwise the lower index first, so the gallery is deterministic.
    """
    sim = _as_numpy(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be [num_queries, num_candidates], got shape {sim.shape}")
    if len(correct) != sim.shape[0]:
        raise ValueError(f"need one 'correct' entry per query: {len(correct)} for {sim.shape[0]} queries")
    k = min(k, sim.shape[1])
    sets = [{int(c)} if isinstance(c, (int, np.integer)) else {int(x) for x in c} for c in correct]
    is_correct = np.zeros(sim.shape, dtype=np.int8)
    for row, s in enumerate(sets):
        is_correct[row, list(s)] = 1
    # by score; among equal scores wrong candidates first (ties count against the model, as in the metrics)
    idx = np.lexsort((is_correct, -sim), axis=1)[:, :k]
    hits = np.take_along_axis(is_correct, idx, axis=1).astype(bool)
    return idx, hits


def _frame(ax, color, width=4):
    ax.add_patch(
        Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=color, linewidth=width, clip_on=False)
    )


def _gallery_hits(sim, correct, k, queries, query_name, correct_name, gallery, gallery_name):
    """Checked top-k of a gallery figure: (indices, hits, sim as numpy); errors name what does not fit."""
    if len(queries) != len(correct):
        raise ValueError(f"{len(queries)} {query_name} but {len(correct)} {correct_name}")
    idx, hits = top_k_hits(sim, correct, k)
    if idx.shape[1] and len(gallery) <= int(idx.max()):
        raise ValueError(f"sim has {np.asarray(sim).shape[1]} columns but only {len(gallery)} {gallery_name} were given")
    return idx, hits, _as_numpy(sim)


def plot_text_to_image_gallery(
    queries: Sequence[str],
    sim,
    images: Sequence,
    correct: Sequence[int],
    path,
    k: int = 5,
    *,
    tile_inches: float = 2.0,
    dpi: int = 100,
) -> Path:
    """For each caption query, its top-``k`` images; the correct image has a green frame and a check.

    ``sim`` is [Nq, Ni] (query captions x gallery images), ``images`` the Ni gallery images (PIL
    or arrays), ``correct[q]`` the index of query q's image. A row with no green frame is a miss
    at R@k, which is the point of the figure: it shows *what* the model confuses.
    """
    idx, hits, sim_np = _gallery_hits(sim, correct, k, queries, "queries", "correct indices", images, "images")
    nq, k = idx.shape
    fig = _new_figure((tile_inches * (k + 1.5), tile_inches * max(nq, 1)), dpi)
    grid = fig.add_gridspec(max(nq, 1), k + 1, width_ratios=[1.5] + [1] * k)
    for q in range(nq):
        ax = fig.add_subplot(grid[q, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, _wrap(queries[q], 28, 6), va="center", ha="left", fontsize=9, transform=ax.transAxes)
        if not hits[q].any():
            ax.text(0.0, 0.05, f"{CROSS} correct image not in top {k}", color=MISS_COLOR, fontsize=8,
                    transform=ax.transAxes)
        for r in range(k):
            ax = fig.add_subplot(grid[q, r + 1])
            ax.imshow(_to_rgb_array(images[idx[q, r]]))
            ax.set_xticks([])
            ax.set_yticks([])
            score = float(sim_np[q, idx[q, r]])
            mark = f"{CHECK} " if hits[q, r] else ""
            ax.set_title(f"{mark}#{r + 1}  {score:.2f}", fontsize=8, color=HIT_COLOR if hits[q, r] else "black")
            if hits[q, r]:
                _frame(ax, HIT_COLOR, 5)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_to_text_gallery(
    images_query: Sequence,
    sim,
    captions: Sequence[str],
    correct: Sequence[Iterable[int]],
    path,
    k: int = 5,
    *,
    dpi: int = 100,
) -> Path:
    """For each query image, its top-``k`` captions; correct ones in green with a check mark.

    ``sim`` is [Nq, Nt] (query images x captions), ``correct[q]`` the set of caption indices that
    describe query image q (several captions per image, any of them is a hit).
    """
    idx, hits, sim_np = _gallery_hits(sim, correct, k, images_query, "query images", "correct sets", captions,
                                      "captions")
    nq, k = idx.shape
    fig = _new_figure((11, 2.4 * max(nq, 1)), dpi)
    grid = fig.add_gridspec(max(nq, 1), 2, width_ratios=[1, 3.5])
    for q in range(nq):
        ax = fig.add_subplot(grid[q, 0])
        ax.imshow(_to_rgb_array(images_query[q]))
        ax.axis("off")
        if not hits[q].any():
            ax.set_title(f"{CROSS} no correct caption in top {k}", color=MISS_COLOR, fontsize=8)
        ax = fig.add_subplot(grid[q, 1])
        ax.axis("off")
        for r in range(k):
            hit = bool(hits[q, r])
            mark = CHECK if hit else CROSS
            line = f"{mark} #{r + 1} ({sim_np[q, idx[q, r]]:.2f}) " + _wrap(captions[idx[q, r]], 90, 1)
            ax.text(
                0.0, 1.0 - (r + 0.5) / k, line, va="center", ha="left", fontsize=9,
                color=HIT_COLOR if hit else "black", fontweight="bold" if hit else "normal",
                transform=ax.transAxes,
            )
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# similarity distributions
# ---------------------------------------------------------------------------------------------


def sample_similarities(
    image_embeds, text_embeds, text_to_image, *, max_negatives: int = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All positive similarities and up to ``max_negatives`` sampled negative ones.

    Negatives are uniform random (image, text) pairs that do not match, so a histogram of a
    25k x 5k set costs ``max_negatives`` dot products instead of 125M.
    """
    img, txt, t2i = check_embeddings(image_embeds, text_embeds, text_to_image)
    pos = np.einsum("nd,nd->n", txt, img[t2i])
    n_neg = len(img) * len(txt) - len(txt)
    rng = np.random.default_rng(seed)
    if n_neg <= max_negatives:
        mask = np.ones((len(img), len(txt)), dtype=bool)
        mask[t2i, np.arange(len(txt))] = False
        ii, jj = np.nonzero(mask)
    else:
        ii = rng.integers(0, len(img), size=max_negatives)
        jj = rng.integers(0, len(txt), size=max_negatives)
        clash = ii == t2i[jj]
        # resample the few matching draws onto a different image (shift by 1..Ni-1, wraps around)
        ii[clash] = (ii[clash] + rng.integers(1, len(img), size=int(clash.sum()))) % len(img)
    neg = np.einsum("nd,nd->n", img[ii], txt[jj])
    return pos.astype(np.float32), neg.astype(np.float32)


def plot_similarity_histogram(
    sims,
    path,
    *,
    text_to_image=None,
    bins: int = 50,
    title: str | None = None,
    figsize=(7, 4.5),
    dpi: int = 100,
) -> float:
    """Histogram of aligned vs misaligned similarities; returns the gap (mean pos - mean neg).

    ``sims`` is either a similarity matrix [Ni, Nt] (positives at ``[text_to_image[j], j]``;
    without ``text_to_image`` the matrix must be square and positives are the diagonal) or a
    pair ``(pos_sims, neg_sims)`` (e.g. from :func:`sample_similarities`). Both histograms are
    density-normalised because negatives outnumber positives by ~Ni to 1.
    """
    if isinstance(sims, tuple) and len(sims) == 2:
        pos, neg = (_as_numpy(s).ravel() for s in sims)
    else:
        sim = _as_numpy(sims)
        if sim.ndim != 2:
            raise ValueError(f"sims must be a [Ni, Nt] matrix or a (pos, neg) tuple, got shape {sim.shape}")
        if text_to_image is None:
            if sim.shape[0] != sim.shape[1]:
                raise ValueError(
                    f"a non-square similarity matrix {sim.shape} needs text_to_image to know the positives"
                )
            text_to_image = np.arange(sim.shape[1])
        t2i = np.asarray(text_to_image, dtype=np.int64)
        if t2i.shape != (sim.shape[1],) or (len(t2i) and (t2i.min() < 0 or t2i.max() >= sim.shape[0])):
            raise ValueError(f"text_to_image must be [{sim.shape[1]}] indices in 0..{sim.shape[0] - 1}")
        mask = np.zeros(sim.shape, dtype=bool)
        mask[t2i, np.arange(sim.shape[1])] = True
        pos, neg = sim[mask], sim[~mask]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one positive and one negative similarity")
    gap = float(pos.mean() - neg.mean())

    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    ax.hist(neg, bins=edges, density=True, alpha=0.55, color=MISS_COLOR, label=f"misaligned (n={neg.size})")
    ax.hist(pos, bins=edges, density=True, alpha=0.55, color=HIT_COLOR, label=f"aligned (n={pos.size})")
    ax.axvline(float(neg.mean()), color=MISS_COLOR, linestyle="--", linewidth=1)
    ax.axvline(float(pos.mean()), color=HIT_COLOR, linestyle="--", linewidth=1)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"{title + ': ' if title else ''}gap = {gap:.3f} (mean aligned - mean misaligned)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return gap


# ---------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------

_RECALL = re.compile(r"^(?:[a-z]+_)?(i2t|t2i)_r\d+$")
_PANELS = (
    ("loss", ("loss", "train_loss", "eval_loss", "val_loss", "validation_loss")),
    ("logit scale", ("logit_scale",)),
    ("temperature", ("temperature",)),
    ("learning rate", ("lr", "learning_rate")),
)


def plot_training_curves(
    log_records: Sequence[Mapping],
    path,
    *,
    dpi: int = 100,
) -> Path:
    """Training curves from a run's log records; missing keys are simply not plotted.

    Records are dicts such as ``{"step": 10, "loss": 2.3, "logit_scale": 14.3}`` and eval
    records ``{"step" or "epoch": ..., "i2t_r1": ..., "t2i_r1": ..., "rsum": ...}``. Panels
    (shown only when some record has the key): loss, logit scale, temperature, learning rate,
    recalls (any ``i2t_rK``/``t2i_rK``), RSUM. The x axis is ``step`` when a record has it, else
    ``epoch``, else the record's position. Watching the scale next to the loss shows whether a
    plateau is the temperature saturating (CLIP clamps exp(scale) at 100).
    """
    xs_by_key: dict[str, list[tuple[float, float]]] = {}
    x_names = set()
    for n, rec in enumerate(log_records):
        if "step" in rec and rec["step"] is not None:
            x, x_names_add = rec["step"], "step"
        elif "epoch" in rec and rec["epoch"] is not None:
            x, x_names_add = rec["epoch"], "epoch"
        else:
            x, x_names_add = n, "record"
        for key, value in rec.items():
            if key in ("step", "epoch") or isinstance(value, bool):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                xs_by_key.setdefault(key, []).append((float(x), v))
                x_names.add(x_names_add)
    xlabel = " / ".join(sorted(x_names)) or "step"

    panels = [(name, [k for k in keys if k in xs_by_key]) for name, keys in _PANELS]
    panels.append(("recall (%)", sorted(k for k in xs_by_key if _RECALL.match(k))))
    panels.append(("RSUM", [k for k in xs_by_key if k == "rsum" or k.endswith("_rsum")]))
    panels = [(name, keys) for name, keys in panels if keys]

    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = _new_figure((5 * ncols, 3.6 * nrows), dpi)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no plottable values in the log records", ha="center", va="center")
    for p, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, p + 1)
        for key in keys:
            pts = sorted(xs_by_key[key])
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o" if len(pts) < 30 else None,
                    markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or name in ("recall (%)",):
            ax.legend(fontsize=8)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# image grid
# ---------------------------------------------------------------------------------------------


def image_grid(
    images: Sequence,
    labels: Sequence[str] | None,
    path,
    ncols: int = 4,
    *,
    tile_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """Grid of images with an optional caption/label under each, for the qualitative report."""
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    extra = 0.6 if labels is not None else 0.0
    fig = _new_figure((tile_inches * ncols, (tile_inches + extra) * nrows), dpi)
    for n, image in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        ax.imshow(_to_rgb_array(image))
        ax.axis("off")
        if labels is not None:
            ax.set_title(_wrap(labels[n], int(tile_inches * 12), 3), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
