"""Specification of the optimiser set-up: one learning rate per kind of parameter, the schedule."""

import pytest

from dualencoder.training.optim import cosine_with_warmup, make_optimizer, parameter_groups
from modeling_dualencoder import DualEncoderModel
from tests.tiny import tiny_timm_config

RATES = dict(backbone_lr=1e-5, lora_lr=1e-4, head_lr=1e-3, scale_lr=1e-2, weight_decay=0.1)


def _rate_of(groups, model):
    ids = {id(p): name for name, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_each_kind_of_parameter_gets_its_own_learning_rate_and_only_matrices_decay():
    model = DualEncoderModel(tiny_timm_config())
    rates = _rate_of(parameter_groups(model, **RATES), model)
    assert rates["logit_scale"] == (1e-2, 0.0)
    assert rates["visual_projection.net.0.weight"] == (1e-3, 0.1)
    assert rates["visual_projection.net.0.bias"] == (1e-3, 0.0)
    assert rates["vision_model.conv_head.weight"] == (1e-5, 0.1)
    assert rates["text_model.transformer.layer.0.attention.q_lin.weight"] == (1e-5, 0.1)
    assert len(rates) == sum(p.requires_grad for p in model.parameters())


def test_the_vision_backbone_can_have_its_own_rate_without_touching_the_text_tower():
    model = DualEncoderModel(tiny_timm_config())
    rates = _rate_of(parameter_groups(model, **RATES, vision_backbone_lr=3e-4), model)
    assert rates["vision_model.conv_head.weight"] == (3e-4, 0.1)
    assert rates["text_model.transformer.layer.0.attention.q_lin.weight"] == (1e-5, 0.1)


def test_frozen_parameters_are_left_out():
    model = DualEncoderModel(tiny_timm_config())
    for param in model.vision_model.parameters():
        param.requires_grad = False
    names = _rate_of(parameter_groups(model, **RATES), model)
    assert not any(name.startswith("vision_model") for name in names)


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    model = DualEncoderModel(tiny_timm_config())
    optimizer = make_optimizer(model, **RATES)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=4, total_steps=12)
    head = next(g for g in optimizer.param_groups if g["name"] == "heads")
    seen = []
    for _ in range(12):
        seen.append(head["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[4] == pytest.approx(1e-3) and seen[8] == pytest.approx(5e-4)
    assert head["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(seen[4:], seen[5:]))
