"""Tests for dualencoder/visualize.py: every plot writes a PNG of the expected size; the numbers
behind the plots (similarity gap, gallery hits) are checked on hand-built cases."""

import numpy as np
import torch
import pytest
from PIL import Image

from dualencoder.visualize import (
    image_grid,
    plot_embedding_projection,
    plot_image_to_text_gallery,
    plot_projection_before_after,
    plot_similarity_histogram,
    plot_text_to_image_gallery,
    plot_training_curves,
    project_2d,
    sample_similarities,
    top_k_hits,
)
from dualencoder.metrics import similarity_gap


def png_size(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def colour_images(n):
    return [Image.new("RGB", (40 + 7 * i, 30), color=(40 * i % 255, 90, 200 - 20 * i % 200)) for i in range(n)]


# ------------------------------------------------------------------------------------------
# projections
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projection_png(tmp_path, method):
    img = unit_rows(12, 16, 0)
    txt = img.repeat(2, axis=0) + 0.05 * unit_rows(24, 16, 1)
    out = plot_embedding_projection(img, txt, np.arange(24) // 2, tmp_path / f"{method}.png", method=method, n_lines=5)
    assert png_size(out) == (700, 600)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_tsne_handles_tiny_sets(n):
    # perplexity must stay below n_samples; default 30 would raise inside scikit-learn
    xy = project_2d(unit_rows(n, 8, 2), method="tsne")
    assert xy.shape == (n, 2) and np.isfinite(xy).all()


def test_projection_tiny_pairs_and_bad_method(tmp_path):
    out = plot_embedding_projection(unit_rows(1, 4, 0), unit_rows(1, 4, 1), [(0, 0)], tmp_path / "one.png")
    assert png_size(out) == (700, 600)
    with pytest.raises(ValueError, match="'tsne' or 'pca'"):
        project_2d(unit_rows(4, 3, 0), method="umap")
    with pytest.raises(ValueError, match="text index outside"):
        plot_embedding_projection(unit_rows(2, 4, 0), unit_rows(2, 4, 1), [(0, 5)], tmp_path / "bad.png")


def test_before_after_png(tmp_path):
    pairs = [(i, i) for i in range(8)]
    before = (unit_rows(8, 6, 0), unit_rows(8, 6, 1))
    after = (before[0], before[0] + 0.01)
    out = plot_projection_before_after(before, after, pairs, tmp_path / "ba.png", method="pca")
    assert png_size(out) == (1300, 600)


# ------------------------------------------------------------------------------------------
# galleries
# ------------------------------------------------------------------------------------------


def test_top_k_hits_marks_the_right_tiles():
    sim = np.array(
        [
            [0.1, 0.9, 0.3, 0.8],  # order 1, 3, 2, 0
            [0.5, 0.5, 0.7, 0.0],  # order 2, 0, 1 (tie kept in index order), 3
        ]
    )
    idx, hits = top_k_hits(sim, [3, {0, 1}], k=3)
    assert idx.tolist() == [[1, 3, 2], [2, 0, 1]]
    assert hits.tolist() == [[False, True, False], [False, True, True]]

    idx, hits = top_k_hits(sim, [0, [3]], k=10)  # k clamped; correct item may be last
    assert idx.shape == (2, 4) and hits[0].tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="one 'correct' entry per query"):
        top_k_hits(sim, [0], k=2)


def test_a_gallery_puts_a_tied_wrong_candidate_first_as_the_metrics_count_ties():
    from dualencoder.metrics import ranks_from_similarity

    sim = np.zeros((3, 3))  # every score tied: each correct item is ranked last by the metrics
    _, hits = top_k_hits(sim, [0, 1, 2], k=2)
    assert not hits.any()  # no green frame in the first 2: a miss at R@2
    ranks = ranks_from_similarity(torch.zeros(3, 3), [0, 1, 2])[0]
    assert (ranks > 2).all()
    _, hits = top_k_hits(np.array([[0.5, 0.5, 0.1]]), [0], k=1)  # the tie with 1 decides: a miss at R@1
    assert hits.tolist() == [[False]]


def test_text_to_image_gallery_png(tmp_path):
    images = colour_images(6)
    sim = np.random.default_rng(0).normal(size=(2, 6))
    queries = ["a dog runs on the grass", "two children play football in a park near a lake " * 2]
    out = plot_text_to_image_gallery(queries, sim, images, [0, 4], tmp_path / "t2i.png", k=5)
    assert png_size(out) == (int(2.0 * 6.5 * 100), 2 * 200)


def test_image_to_text_gallery_png(tmp_path):
    sim = np.random.default_rng(1).normal(size=(3, 9))
    captions = [f"caption number {j} describing something" for j in range(9)]
    correct = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]
    out = plot_image_to_text_gallery(colour_images(3), sim, captions, correct, tmp_path / "i2t.png")
    assert png_size(out) == (1100, 720)


# ------------------------------------------------------------------------------------------
# similarity gap and histogram
# ------------------------------------------------------------------------------------------


def test_similarity_gap_hand_built():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t2i = [0, 0, 1]
    # positives: t0.i0 = 1, t1.i0 = 0.6, t2.i1 = 1   -> mean 2.6 / 3
    # negatives: t0.i1 = 0, t1.i1 = 0.8, t2.i0 = 0   -> mean 0.8 / 3
    g = similarity_gap(images, texts, t2i)
    assert g["pos_mean"] == pytest.approx(2.6 / 3)
    assert g["neg_mean"] == pytest.approx(0.8 / 3)
    assert g["gap"] == pytest.approx(0.6)


def test_similarity_gap_matches_full_matrix():
    images, texts = unit_rows(7, 5, 0), unit_rows(20, 5, 1)
    t2i = np.arange(20) % 7
    sim = images.astype(np.float64) @ texts.T
    mask = np.zeros_like(sim, dtype=bool)
    mask[t2i, np.arange(20)] = True
    g = similarity_gap(images, texts, t2i)
    assert g["pos_mean"] == pytest.approx(sim[mask].mean())
    assert g["neg_mean"] == pytest.approx(sim[~mask].mean())
    with pytest.raises(ValueError, match="at least 2 images"):
        similarity_gap(images[:1], texts[:3], [0, 0, 0])


def test_sample_similarities_never_samples_a_positive():
    images, texts = unit_rows(3, 4, 0), unit_rows(6, 4, 1)
    t2i = np.arange(6) // 2
    pos, neg = sample_similarities(images, texts, t2i)  # small: all 12 negatives enumerated
    assert pos.shape == (6,) and neg.shape == (12,)
    # sampled path: with orthogonal images, a positive would have similarity 1, a negative 0
    images, texts = np.eye(4), np.eye(4).repeat(3, axis=0)
    pos, neg = sample_similarities(images, texts, np.arange(12) // 3, max_negatives=20, seed=3)
    assert neg.shape == (20,) and np.all(neg == 0.0) and np.all(pos == 1.0)


def test_histogram_from_matrix_and_from_pairs(tmp_path):
    sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.0, 0.7]])
    gap = plot_similarity_histogram(sim, tmp_path / "h1.png", text_to_image=[0, 0, 1])
    assert gap == pytest.approx(0.8 - (0.1 + 0.2 + 0.0) / 3)
    assert png_size(tmp_path / "h1.png") == (700, 450)

    gap = plot_similarity_histogram((np.array([0.5, 0.7]), np.array([0.1, 0.2, 0.3])), tmp_path / "h2.png")
    assert gap == pytest.approx(0.4)
    gap = plot_similarity_histogram(np.eye(3), tmp_path / "h3.png", title="square")
    assert gap == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs text_to_image"):
        plot_similarity_histogram(sim, tmp_path / "h4.png")


# ------------------------------------------------------------------------------------------
# training curves and grid
# ------------------------------------------------------------------------------------------


def test_training_curves_png(tmp_path):
    records = [{"step": s, "loss": 3.0 / (s + 1), "logit_scale": 14.3 + s, "lr": 1e-4} for s in range(20)]
    records += [
        {"step": 10, "epoch": 1, "i2t_r1": 10.0, "t2i_r1": 8.0, "i2t_r5": 30.0, "rsum": 100.0},
        {"step": 20, "epoch": 2, "i2t_r1": 20.0, "t2i_r1": 15.0, "i2t_r5": 45.0, "rsum": 180.0},
        {"step": 20, "note": "text values are ignored"},
    ]
    out = plot_training_curves(records, tmp_path / "curves.png")
    # panels: loss, logit scale, learning rate, recall, rsum -> 3 columns x 2 rows
    assert png_size(out) == (1500, 720)


def test_training_curves_missing_keys(tmp_path):
    out = plot_training_curves([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}], tmp_path / "c.png")
    assert png_size(out) == (500, 360)
    out = plot_training_curves([], tmp_path / "empty.png")  # nothing to plot: still a PNG
    assert png_size(out) == (500, 360)


def test_image_grid_png(tmp_path):
    arrays = [np.random.default_rng(0).random((20, 30, 3)), np.zeros((10, 10), dtype=np.uint8)]
    images = colour_images(3) + arrays
    out = image_grid(images, [f"label {i}" for i in range(5)], tmp_path / "sub" / "grid.png", ncols=3)
    assert png_size(out) == (750, 2 * 310)
    out = image_grid(images[:2], None, tmp_path / "grid2.png", ncols=4)
    assert png_size(out) == (500, 250)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        image_grid(images[:2], ["x"], tmp_path / "bad.png")
