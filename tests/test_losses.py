"""Losses against values written out by hand (math / numpy loops), never against the code under test."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualencoder.losses import (
    LOSSES,
    ClipLoss,
    CombinedLoss,
    NTXentLoss,
    SigLipLoss,
    TripletLoss,
    build_loss,
)


def unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def scale(value):
    return torch.tensor(value, dtype=torch.float64)


# ---------------------------------------------------------------- independent numpy references


def np_log_softmax(row):
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def np_positives(ids, n):
    if ids is None:
        return [[i == j for j in range(n)] for i in range(n)]
    return [[ids[i] == ids[j] for j in range(n)] for i in range(n)]


def np_clip_row(logits_row, positives, rule="all"):
    """One row's InfoNCE term: KL to uniform over the positives ("all") or -log of their mass ("any")."""
    logp = np_log_softmax(logits_row)
    if rule == "any":
        return -math.log(sum(math.exp(logp[j]) for j in positives))
    return -np.mean([logp[j] for j in positives]) - math.log(len(positives))


def np_clip(x, y, t, ids=None, rule="all"):
    """Per row np_clip_row, averaged, both directions, halved."""
    n = len(x)
    pos = np_positives(ids, n)
    total = 0.0
    for sims in (t * x @ y.T, t * y @ x.T):
        for i in range(n):
            total += np_clip_row(sims[i], [j for j in range(n) if pos[i][j]], rule)
    return total / (2 * n)


def np_clip_any(x, y, t, ids):
    """Per row: -log of the softmax mass on the row's positives (MIL-NCE), both directions, halved."""
    return np_clip(x, y, t, ids, rule="any")


def np_ntxent(x, y, t, ids=None):
    n = len(x)
    z = np.concatenate([x, y])
    img_of = list(range(n)) * 2 if ids is None else list(ids) * 2
    total = 0.0
    for a in range(2 * n):
        partner = (a + n) % (2 * n)
        denom = 0.0
        for b in range(2 * n):
            if b == a:
                continue
            if b != partner and (img_of[b] == img_of[a] if ids is not None else False):
                continue
            denom += math.exp(t * z[a] @ z[b])
        total += -(t * z[a] @ z[partner] - math.log(denom))
    return total / (2 * n)


def np_triplet(x, y, margin, max_violation, ids=None):
    n = len(x)
    pos = np_positives(ids, n)
    total = 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            d = a[i] @ b[i]
            costs = [max(0.0, margin + a[i] @ b[j] - d) for j in range(n) if not pos[i][j]]
            costs = costs or [0.0]
            total += max(costs) if max_violation else sum(costs)
    return total / n


def np_triplet_any(x, y, margin, ids):
    """VSE++ measured from each row's best positive rather than its own pair."""
    n = len(x)
    pos = np_positives(ids, n)
    total = 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            d = max(a[i] @ b[j] for j in range(n) if pos[i][j])
            total += max([max(0.0, margin + a[i] @ b[j] - d) for j in range(n) if not pos[i][j]] or [0.0])
    return total / n


def np_siglip(x, y, t, bias, ids=None):
    n = len(x)
    pos = np_positives(ids, n)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if pos[i][j] else -1.0
            total += math.log1p(math.exp(-z * (t * x[i] @ y[j] + bias)))  # -log sigmoid(u) = log(1 + e^-u)
    return total / n


# ---------------------------------------------------------------- InfoNCE / CLIP


def test_clip_2x2_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # logits = 2 * x @ y.T = [[2, 1.2], [0, 1.6]]
    # image rows: -log softmax picks: log(1 + e^-0.8), log(1 + e^-1.6)
    # text rows (columns): [2, 0] -> log(1 + e^-2); [1.2, 1.6] -> log(1 + e^-0.4)
    expected = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6)) + math.log1p(math.exp(-2.0))
                + math.log1p(math.exp(-0.4))) / 4
    assert ClipLoss()(x, y, scale(2.0)).item() == pytest.approx(expected, abs=1e-12)


def test_clip_equals_standard_clip_without_or_with_distinct_ids():
    x, y, t = unit_rows(6, 5, 0), unit_rows(6, 5, 1), scale(7.0)
    logits = t * x @ y.T
    labels = torch.arange(6)
    standard = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss = ClipLoss()
    assert torch.allclose(loss(x, y, t), standard, atol=1e-12)
    assert torch.allclose(loss(x, y, t, image_ids=torch.tensor([5, 3, 9, 0, 1, 2])), standard, atol=1e-12)


def test_clip_multi_positive_matches_numpy():
    x, y, t = unit_rows(5, 4, 2), unit_rows(5, 4, 3), 4.0
    ids = [0, 0, 1, 2, 1]
    got = ClipLoss()(x, y, scale(t), image_ids=torch.tensor(ids)).item()
    assert got == pytest.approx(np_clip(x.numpy(), y.numpy(), t, ids), abs=1e-10)
    assert got != pytest.approx(np_clip(x.numpy(), y.numpy(), t, None), abs=1e-3)  # ids change the target


def test_clip_duplicate_image_is_not_a_negative():
    # Rows 0 and 1 show the same image (identical image embeddings), with two different captions.
    x = unit_rows(4, 6, 4)
    x[1] = x[0]
    y = unit_rows(4, 6, 5)
    t = scale(10.0)
    with_ids = ClipLoss()(x, y, t, image_ids=torch.tensor([7, 7, 8, 9]))
    as_negatives = ClipLoss()(x, y, t)
    assert with_ids < as_negatives


def test_clip_perfect_alignment_near_zero_even_with_duplicates():
    x = torch.eye(4, dtype=torch.float64)
    assert ClipLoss()(x, x.clone(), scale(100.0)).item() < 1e-10
    # Same image twice, both captions embedded on it: a tie the model cannot break.
    x = torch.eye(4, dtype=torch.float64)[[0, 0, 1, 2]]
    with_ids = ClipLoss()(x, x.clone(), scale(100.0), image_ids=torch.tensor([0, 0, 1, 2])).item()
    as_negatives = ClipLoss()(x, x.clone(), scale(100.0)).item()
    assert with_ids < 1e-10
    assert as_negatives == pytest.approx(math.log(2) / 2, abs=1e-6)  # 2 of 4 rows stuck at log 2


def test_clip_any_positive_is_mil_nce_and_equals_clip_with_one_positive_per_row():
    x, y, t = unit_rows(5, 4, 2), unit_rows(5, 4, 3), 4.0
    ids = [0, 0, 1, 2, 1]
    any_loss = ClipLoss(positives="any")
    got = any_loss(x, y, scale(t), image_ids=torch.tensor(ids)).item()
    assert got == pytest.approx(np_clip_any(x.numpy(), y.numpy(), t, ids), abs=1e-10)
    assert got != pytest.approx(np_clip(x.numpy(), y.numpy(), t, ids), abs=1e-3)
    distinct = torch.tensor([4, 3, 2, 1, 0])
    assert any_loss(x, y, scale(t), image_ids=distinct).item() == pytest.approx(
        ClipLoss()(x, y, scale(t), image_ids=distinct).item(), abs=1e-12)


def test_clip_any_positive_changes_only_image_to_text_when_images_are_repeated_per_caption():
    # batch_by_image's layout: each image's embedding repeated once per caption. Text rows' positives
    # are copies of one image, where "any" and "all" coincide; so the difference between the two
    # losses is the image→text direction's difference alone.
    images, y, t = unit_rows(3, 6, 8), unit_rows(6, 6, 9), 5.0
    ids = [0, 0, 1, 1, 2, 2]
    x = images[ids]
    xn, yn = x.numpy(), y.numpy()
    pos = np_positives(ids, 6)
    def t2i_row_terms(rule):
        return [np_clip_row(t * yn[i] @ xn.T, [j for j in range(6) if pos[i][j]], rule) for i in range(6)]
    assert t2i_row_terms("any") == pytest.approx(t2i_row_terms("all"), abs=1e-12)
    got_any = ClipLoss(positives="any")(x, y, scale(t), image_ids=torch.tensor(ids)).item()
    got_all = ClipLoss()(x, y, scale(t), image_ids=torch.tensor(ids)).item()
    assert got_any == pytest.approx(np_clip_any(xn, yn, t, ids), abs=1e-10)
    assert got_any < got_all  # -log(sum p) <= -mean(log p) - log n (Jensen), strictly unless tied


def test_triplet_any_positive_measures_from_the_best_positive():
    x, y = unit_rows(6, 4, 10), unit_rows(6, 4, 11)
    ids = [0, 0, 0, 1, 2, 2]
    got = TripletLoss(margin=0.3, positives="any")(x, y, image_ids=torch.tensor(ids)).item()
    assert got == pytest.approx(np_triplet_any(x.numpy(), y.numpy(), 0.3, ids), abs=1e-10)
    assert got < np_triplet(x.numpy(), y.numpy(), 0.3, True, ids)  # the best positive violates least


def test_positives_option_is_checked_and_reaches_both_terms_through_build_loss():
    for loss in (ClipLoss, TripletLoss):
        with pytest.raises(ValueError, match=f"{loss.__name__} positives.*'all'.*'any'"):
            loss(positives="some")
    combined = build_loss("clip+triplet", positives="any", margin=0.2)
    assert [term.positives for term in combined.losses] == ["any", "any"] and combined.losses[1].margin == 0.2


# ---------------------------------------------------------------- NT-Xent


def test_ntxent_2x2_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # z = [x0, x1, y0, y1]; dot products with t = 1:
    # x0: x1 0, y0 1 (pos), y1 0.6   x1: x0 0, y0 0, y1 0.8 (pos)
    # y0: x0 1 (pos), x1 0, y1 0.6   y1: x0 0.6, x1 0.8 (pos), y0 0.6
    e = math.exp
    rows = [
        -1.0 + math.log(e(0) + e(1) + e(0.6)),
        -0.8 + math.log(e(0) + e(0) + e(0.8)),
        -1.0 + math.log(e(1) + e(0) + e(0.6)),
        -0.8 + math.log(e(0.6) + e(0.8) + e(0.6)),
    ]
    assert NTXentLoss()(x, y, scale(1.0)).item() == pytest.approx(sum(rows) / 4, abs=1e-12)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 2]])
def test_ntxent_matches_numpy(ids):
    x, y, t = unit_rows(5, 4, 6), unit_rows(5, 4, 7), 3.0
    got = NTXentLoss()(x, y, scale(t), image_ids=None if ids is None else torch.tensor(ids)).item()
    assert got == pytest.approx(np_ntxent(x.numpy(), y.numpy(), t, ids), abs=1e-10)


# ---------------------------------------------------------------- triplet / VSE++


def test_triplet_2x2_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # s = [[1, 0.6], [0, 0.8]], margin 0.5
    # image 0: [0.5 + 0.6 - 1]+ = 0.1      image 1: [0.5 + 0 - 0.8]+ = 0
    # text 0:  [0.5 + 0 - 1]+ = 0          text 1:  [0.5 + 0.6 - 0.8]+ = 0.3
    expected = (0.1 + 0.0 + 0.0 + 0.3) / 2
    assert TripletLoss(margin=0.5)(x, y, scale(1.0)).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("ids", [None, [3, 3, 1, 2, 1, 0]])
def test_triplet_matches_numpy(max_violation, ids):
    x, y = unit_rows(6, 3, 8), unit_rows(6, 3, 9)
    loss = TripletLoss(margin=0.3, max_violation=max_violation)
    got = loss(x, y, scale(50.0), image_ids=None if ids is None else torch.tensor(ids)).item()
    assert got == pytest.approx(np_triplet(x.numpy(), y.numpy(), 0.3, max_violation, ids), abs=1e-10)


def test_triplet_ignores_scale():
    x, y = unit_rows(4, 3, 10), unit_rows(4, 3, 11)
    assert TripletLoss()(x, y, scale(1.0)) == TripletLoss()(x, y, scale(100.0))


# ---------------------------------------------------------------- SigLIP


def test_siglip_2x2_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # logits = 10 * s - 5 = [[5, 1], [-5, 3]]; positives on the diagonal
    # -log sigmoid(u) = log(1 + e^-u): diag u = 5, 3; off-diagonal u = -1, 5
    expected = (math.log1p(math.exp(-5)) + math.log1p(math.exp(1)) + math.log1p(math.exp(-5))
                + math.log1p(math.exp(-3))) / 2
    got = SigLipLoss()(x, y, scale(10.0), scale(-5.0))
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ids", [None, [1, 0, 1, 2]])
def test_siglip_matches_numpy(ids):
    x, y = unit_rows(4, 5, 12), unit_rows(4, 5, 13)
    got = SigLipLoss()(x, y, scale(10.0), scale(-3.0), None if ids is None else torch.tensor(ids)).item()
    assert got == pytest.approx(np_siglip(x.numpy(), y.numpy(), 10.0, -3.0, ids), abs=1e-10)


def test_siglip_requires_bias():
    x = unit_rows(2, 3, 0)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(x, x, scale(10.0))


# ---------------------------------------------------------------- gradients and options


@pytest.mark.parametrize("name", ["clip", "ntxent", "siglip"])
def test_gradients_reach_scale_and_bias(name):
    x = unit_rows(4, 3, 14).requires_grad_()
    y = unit_rows(4, 3, 15).requires_grad_()
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2])  # duplicates exercise the masked (-inf) paths too
    build_loss(name)(x, y, log_scale.exp(), bias, ids).backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0
    if name == "siglip":
        assert bias.grad is not None and bias.grad.abs() > 0
    for g in (x.grad, y.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_triplet_gradient_is_finite():
    x = unit_rows(4, 3, 16).requires_grad_()
    y = unit_rows(4, 3, 17).requires_grad_()
    TripletLoss(margin=1.0)(x, y, scale(1.0), image_ids=torch.tensor([0, 0, 0, 0])).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()  # all-positive rows: loss 0


@pytest.mark.parametrize("name", ["clip", "ntxent", "triplet", "siglip"])
def test_local_loss_is_a_no_op_in_one_process(name):
    x, y = unit_rows(5, 3, 18), unit_rows(5, 3, 19)
    ids = torch.tensor([0, 1, 1, 2, 3])
    args = (x, y, scale(5.0), scale(-1.0), ids)
    assert torch.allclose(build_loss(name, local_loss=True)(*args), build_loss(name)(*args), atol=1e-12)


def test_shape_checks():
    x = unit_rows(3, 2, 0)
    with pytest.raises(ValueError, match="shape"):
        ClipLoss()(x, x[:2], scale(1.0))
    with pytest.raises(ValueError, match="image_ids"):
        ClipLoss()(x, x, scale(1.0), image_ids=torch.tensor([0, 1]))


# ---------------------------------------------------------------- build_loss and combinations


def test_build_loss_names_and_aliases():
    assert set(LOSSES) == {"clip", "infonce", "ntxent", "triplet", "vsepp", "siglip", "codebook"}
    assert type(build_loss("clip")) is type(build_loss("InfoNCE")) is ClipLoss
    assert type(build_loss("vsepp")) is TripletLoss
    loss = build_loss("triplet", margin=0.1, max_violation=False, local_loss=True)
    assert (loss.margin, loss.max_violation, loss.local_loss) == (0.1, False, True)


def test_build_loss_errors():
    with pytest.raises(ValueError, match="clip.*siglip"):
        build_loss("cosine")
    with pytest.raises(ValueError, match="valid names"):
        build_loss("clip+hinge")
    with pytest.raises(TypeError, match="margin"):
        build_loss("clip", margin=0.2)  # an option no term takes is an error, not silently dropped


def test_clip_plus_triplet():
    x, y, t = unit_rows(5, 4, 20), unit_rows(5, 4, 21), scale(8.0)
    combined = build_loss("clip+triplet", triplet_weight=0.5, margin=0.3)
    assert isinstance(combined, CombinedLoss)
    expected = ClipLoss()(x, y, t) + 0.5 * TripletLoss(margin=0.3)(x, y, t)
    assert torch.allclose(combined(x, y, t), expected, atol=1e-12)
    manual = CombinedLoss([(ClipLoss(), 1.0), (TripletLoss(margin=0.3), 0.5)])
    assert torch.allclose(manual(x, y, t), expected, atol=1e-12)


@pytest.mark.parametrize("loss_type, options", [("clip", {}), ("clip", {"positives": "any"}), ("siglip", {})])
def test_under_cpu_bf16_autocast_a_multi_positive_loss_is_summed_in_float32(loss_type, options):
    from dualencoder.losses import build_loss

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(64, 32), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.5 * torch.randn(64, 32), dim=-1)
    ids = torch.arange(64) // 2  # two captions per image: the multi-positive path
    loss_fn, scale, bias = build_loss(loss_type, **options), torch.tensor(30.0), torch.tensor(-10.0)
    exact = loss_fn(images, texts, scale, logit_bias=bias, image_ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn(images, texts, scale, logit_bias=bias, image_ids=ids)
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - exact.item()) <= 0.01 * abs(exact.item())  # the similarity matmul is bf16; the rest not
