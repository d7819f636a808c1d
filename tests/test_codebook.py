"""Codebook alignment: Sinkhorn balance, EMA math, learning on a toy problem, gradients, build_loss routing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualencoder.codebook import (
    CodebookLoss,
    EMATeacher,
    sinkhorn,
)
from dualencoder.losses import LOSSES, ClipLoss, CombinedLoss, build_loss

torch.set_num_threads(1)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_sinkhorn_rows_sum_to_one_and_prototypes_are_balanced():
    batch, k = 64, 8
    scores = unit(batch, 16) @ unit(k, 16, seed=1).T
    scores[:, 0] += 0.5  # a prototype every sample prefers: plain softmax piles the batch on it
    q = sinkhorn(scores, iterations=30, epsilon=0.05)
    assert q.shape == (batch, k) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(batch))
    torch.testing.assert_close(q.sum(0), torch.full((k,), batch / k), rtol=0.02, atol=0.0)
    # three iterations (the default) are already far more balanced than the softmax they start from
    softmax_spread = (scores / 0.05).softmax(-1).sum(0).std()
    assert sinkhorn(scores, iterations=3).sum(0).std() < 0.1 * softmax_spread


def test_ema_teacher_update_math():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = EMATeacher(student)
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, decay=0.9)
    for name, param in student.named_parameters():
        torch.testing.assert_close(teacher.module.get_parameter(name), 0.9 * before[name] + 0.1 * param)
        assert not teacher.module.get_parameter(name).requires_grad
    teacher.update(student, decay=0.0)  # decay 0: a copy of the student
    torch.testing.assert_close(teacher.module.weight, student.weight)
    with pytest.raises(ValueError):
        teacher.update(student, decay=1.5)


def aligned_features(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=gen) * 3
    image = torch.cat([z, torch.randn(n, 12, generator=gen)], 1) @ torch.randn(16, 16, generator=gen)
    text = torch.cat([z, torch.randn(n, 8, generator=gen)], 1) @ torch.randn(12, 12, generator=gen)
    return image, text


def test_codebook_loss_decreases_on_a_toy_problem():
    torch.manual_seed(0)
    image, text = aligned_features()
    image_head, text_head = nn.Linear(16, 8), nn.Linear(12, 8)
    loss_fn = CodebookLoss(embed_dim=8, num_prototypes=8, temperature=0.1)
    params = [*image_head.parameters(), *text_head.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def step():
        loss = loss_fn(F.normalize(image_head(image), dim=-1), F.normalize(text_head(text), dim=-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    first = step()
    for _ in range(300):
        last = step()
    assert last < first - 0.5, (first, last)
    # a pair now lands on the same prototype far more often than chance (1/8)
    with torch.no_grad():
        hit = (loss_fn.codebook(F.normalize(image_head(image), dim=-1)).argmax(1)
               == loss_fn.codebook(F.normalize(text_head(text), dim=-1)).argmax(1)).float().mean()
    assert hit > 0.5


def test_swapped_prediction_gradient_reaches_prototypes_and_both_embeddings():
    loss_fn = CodebookLoss(embed_dim=8, num_prototypes=6)
    image, text = unit(10, 8).requires_grad_(), unit(10, 8, seed=1).requires_grad_()
    loss_fn(image, text).backward()
    for grad in (loss_fn.prototypes.grad, image.grad, text.grad):
        assert grad is not None and grad.abs().sum() > 0
    assert [name for name, _ in loss_fn.named_parameters()] == ["codebook.prototypes"]


def test_build_loss_clip_plus_codebook_routes_options():
    assert LOSSES["codebook"] is CodebookLoss
    loss = build_loss("clip+codebook", codebook_weight=0.3, num_prototypes=12, embed_dim=8, temperature=0.2,
                      sinkhorn_iterations=5, teacher=True, ema_decay=0.9, gather=False)
    assert isinstance(loss, CombinedLoss) and loss.weights == [1.0, 0.3]
    clip, codebook = loss.losses
    assert isinstance(clip, ClipLoss) and isinstance(codebook, CodebookLoss)
    assert codebook.prototypes.shape == (12, 8)
    assert (codebook.temperature, codebook.sinkhorn_iterations, codebook.use_teacher, codebook.ema_decay) == (0.2, 5, True, 0.9)
    image, text, scale = unit(6, 8), unit(6, 8, seed=1), torch.tensor(10.0)
    torch.testing.assert_close(loss(image, text, scale), clip(image, text, scale) + 0.3 * codebook(image, text, scale))
    with pytest.raises(ValueError, match="embed_dim"):
        build_loss("clip+codebook")


class TinyModel(nn.Module):
    """What the teacher needs of a model: two projection heads and the loss as ``loss_fn``."""

    def __init__(self):
        super().__init__()
        self.visual_projection, self.text_projection = nn.Linear(16, 8), nn.Linear(12, 8)
        self.loss_fn = build_loss("clip+codebook", embed_dim=8, num_prototypes=8, teacher=True, ema_decay=0.5)

    def forward(self, image, text):
        x, y = F.normalize(self.visual_projection(image), dim=-1), F.normalize(self.text_projection(text), dim=-1)
        return self.loss_fn(x, y, torch.tensor(10.0))


def test_teacher_variant_follows_the_student_by_ema_and_stays_out_of_the_state_dict():
    torch.manual_seed(0)
    model = TinyModel()
    keys = set(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    image, text = aligned_features(32)
    codebook = model.loss_fn.losses[1]
    for step in range(3):
        loss = model(image, text)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 2:
            previous = codebook._teacher.module["image_head"].weight.clone()
        model.loss_fn.after_optimizer_step(model)  # CombinedLoss passes it on to the codebook term
    teacher = codebook._teacher.module
    assert set(teacher) == {"codebook", "image_head", "text_head"}
    torch.testing.assert_close(teacher["image_head"].weight, 0.5 * previous + 0.5 * model.visual_projection.weight)
    assert set(model.state_dict()) == keys  # the teacher is not saved ...
    assert all(not p.requires_grad for p in teacher.parameters())  # ... nor trained
    assert codebook._pooled["image"].shape == (32, 16)  # the hooks recorded the heads' inputs
    assert torch.isfinite(model(image, text))


def test_dual_encoder_trains_with_the_codebook_loss_applied_outside_the_model():
    """The loss lives beside the model (dualencoder.training.step.batch_loss): its prototypes train through the
    optimiser they are given to, its EMA teacher follows the model's heads, and the model holds none of it."""
    from dualencoder.training.step import batch_loss
    from modeling_dualencoder import DualEncoderModel
    from tests.tiny import tiny_batch, tiny_vit_distilbert_config

    torch.manual_seed(0)
    model = DualEncoderModel(tiny_vit_distilbert_config())
    loss_fn = build_loss("clip+codebook", embed_dim=16, num_prototypes=4, teacher=True, codebook_weight=0.5)
    batch = tiny_batch(model.config, 4)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    prototypes = loss_fn.losses[1].prototypes.detach().clone()
    for _ in range(2):
        loss = batch_loss(loss_fn, model(**batch))
        optimizer.zero_grad()
        loss.backward()
        assert loss_fn.losses[1].prototypes.grad is not None
        optimizer.step()
        loss_fn.after_optimizer_step(model)
    assert loss_fn.losses[1]._teacher is not None
    assert not torch.equal(loss_fn.losses[1].prototypes, prototypes)
    assert not any("codebook" in name or "prototypes" in name for name in model.state_dict())
