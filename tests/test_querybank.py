"""Specification of querybank normalisation (dualencoder.querybank) and the per-item score offsets under it."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dualencoder.metrics import retrieval_metrics, retrieval_ranks
from dualencoder.querybank import querybank_bias, querybank_metrics


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_the_offset_is_minus_a_scaled_logsumexp_over_the_whole_bank_however_it_is_chunked():
    torch.manual_seed(0)
    bank, gallery = F.normalize(torch.randn(37, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    expected = -torch.logsumexp(7.0 * bank @ gallery.T, dim=0) / 7.0
    torch.testing.assert_close(querybank_bias(bank, gallery, 7.0), expected)
    torch.testing.assert_close(querybank_bias(bank, gallery, 7.0, chunk_size=4), expected)
    # Inputs are normalised inside: scaling an embedding does not change its offset.
    torch.testing.assert_close(querybank_bias(3 * bank, 0.5 * gallery, 7.0, chunk_size=4), expected)


def test_a_large_beta_subtracts_each_items_best_bank_match():
    bank, gallery = unit([1.0, 0.0], [0.6, 0.8]), unit([1.0, 0.0], [0.0, 1.0])
    best = (bank @ gallery.T).max(dim=0).values
    torch.testing.assert_close(querybank_bias(bank, gallery, 1e4), -best, atol=1e-3, rtol=0)


def test_offsets_move_an_item_within_each_querys_ranking():
    images = unit([1.0, 0.0], [0.0, 1.0])
    texts = unit([0.9, 0.1], [0.1, 0.9])  # caption j belongs to image j: both ranks are 1
    t2i = torch.tensor([0, 1])
    assert retrieval_ranks(images, texts, t2i)[0].tolist() == [1, 1]
    # A large enough offset on caption 1 puts it first for image 0 as well: image 0's rank drops to 2.
    i2t, t2i_ranks = retrieval_ranks(images, texts, t2i, text_bias=torch.tensor([0.0, 1.0]))
    assert i2t.tolist() == [2, 1] and t2i_ranks.tolist() == [1, 1]
    i2t, t2i_ranks = retrieval_ranks(images, texts, t2i, image_bias=torch.tensor([1.0, 0.0]))
    assert i2t.tolist() == [1, 1] and t2i_ranks.tolist() == [1, 2]
    assert retrieval_metrics(images, texts, t2i, image_bias=torch.zeros(2), text_bias=torch.zeros(2)) == \
        retrieval_metrics(images, texts, t2i)


def test_offsets_of_the_wrong_length_or_not_finite_are_named():
    images, texts, t2i = unit([1.0, 0.0], [0.0, 1.0]), unit([1.0, 0.0], [0.0, 1.0]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"text_bias must have shape \[2\]"):
        retrieval_ranks(images, texts, t2i, text_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="image_bias has non-finite"):
        retrieval_ranks(images, texts, t2i, image_bias=torch.tensor([0.0, math.inf]))


def on_circle(*angles):
    angles = torch.tensor(angles)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_a_hub_caption_stops_winning_queries_that_are_not_its_own():
    """Caption 2 (image 0's second caption, at 0.9 rad) lies where most training images lie, so
    plain cosine ranks it above image 1's own caption (1.6 rad) for image 1 (1.2 rad). The bank of
    training images matches it strongly, so QB-Norm discounts it and image 1 finds its caption."""
    images = on_circle(0.0, 1.2, 2.4)
    texts = on_circle(0.05, 1.6, 0.9, 2.35)
    t2i = torch.tensor([0, 1, 0, 2])
    assert retrieval_ranks(images, texts, t2i)[0].tolist() == [1, 2, 1]
    crowded = torch.linspace(0.7, 1.1, 20).tolist()
    bank = SimpleNamespace(image_embeds=on_circle(*crowded, 0.0, 1.6, 2.4), text_embeds=texts)
    offsets = querybank_bias(bank.image_embeds, texts, 20.0)
    assert offsets.argmin() == 2  # the hub gets the largest discount
    split = SimpleNamespace(image_embeds=images, text_embeds=texts, text_to_image=t2i)
    assert retrieval_metrics(images, texts, t2i)["i2t_r1"] == pytest.approx(200 / 3)
    assert querybank_metrics(split, bank, beta=20.0)["i2t_r1"] == 100.0


def test_a_bad_beta_or_an_empty_bank_is_refused():
    gallery = unit([1.0, 0.0])
    with pytest.raises(ValueError, match="beta must be > 0"):
        querybank_bias(gallery, gallery, 0.0)
    with pytest.raises(ValueError, match="querybank is empty"):
        querybank_bias(torch.zeros(0, 2), gallery, 10.0)
    with pytest.raises(ValueError, match="share D"):
        querybank_bias(torch.zeros(3, 4), gallery, 10.0)
