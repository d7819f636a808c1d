"""The shared training step: one optimiser step per call, and a loss check that never makes the
host wait for the GPU, read every `check_every` calls and whenever the caller asks."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from dualencoder.training.optim import cosine_with_warmup
from dualencoder.training.step import TrainingDiverged, TrainStep


class Toy(torch.nn.Module):
    """A model with the DualEncoderModel calling convention: forward(**batch) -> outputs with embeddings."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, scale=1.0):
        return SimpleNamespace(image_embeds=self.weight * x, text_embeds=None, logit_scale=torch.tensor(scale),
                               logit_bias=None)


class ToyLoss(torch.nn.Module):
    """A loss with the dualencoder.losses calling convention, and the optional hook after each optimiser step."""

    def __init__(self, after_optimizer_step=None):
        super().__init__()
        if after_optimizer_step is not None:
            self.after_optimizer_step = after_optimizer_step

    def forward(self, image_embeds, text_embeds, logit_scale, logit_bias=None, image_ids=None):
        return image_embeds.sum() * logit_scale


def make_step(check_every=1, after_optimizer_step=None, **options):
    accelerator = Accelerator(cpu=True)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = cosine_with_warmup(optimizer, 0, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss = ToyLoss(after_optimizer_step)
    return model, TrainStep(accelerator, model, loss, optimizer, scheduler, check_every=check_every, **options)


def test_a_step_updates_the_weights_with_the_extras_and_returns_the_detached_loss():
    model, step = make_step(extras={"scale": 2.0}, max_grad_norm=0)
    loss = step({"x": torch.ones(3)})
    assert loss.item() == pytest.approx(6.0) and not loss.requires_grad
    assert torch.allclose(model.weight.detach(), torch.full((3,), 1 - 0.1 * 2.0))
    assert step.global_step == 1


def test_a_non_finite_loss_is_reported_at_the_next_check_naming_its_step():
    _, step = make_step(check_every=3, global_step=10)  # a resumed run: steps are counted from 10
    step({"x": torch.ones(3)})
    step({"x": torch.tensor([float("nan"), 1.0, 1.0])})  # step 12: not read on the host yet
    with pytest.raises(TrainingDiverged, match="step 12"):
        step({"x": torch.ones(3)})  # the third call reads the flag


def test_check_raises_on_demand_and_stays_quiet_when_all_losses_were_finite():
    _, step = make_step(check_every=0)  # 0: read only when check() is called
    step.check()  # nothing run yet
    step({"x": torch.ones(3)})
    step.check()
    step({"x": torch.tensor([float("inf"), 0.0, 0.0])})
    with pytest.raises(TrainingDiverged, match="step 2"):
        step.check()


def test_the_loss_hook_after_each_optimiser_step_runs_once_per_step_with_the_model():
    seen = []
    model, step = make_step(after_optimizer_step=lambda m: seen.append(m))
    for _ in range(3):
        step({"x": torch.ones(3)})
    assert len(seen) == 3 and seen[0] is model


def test_compiling_the_blocks_compiles_each_repeated_layer_and_keeps_the_outputs():
    from transformers import BertConfig, ViTConfig

    from dualencoder.training.step import compile_in_place
    from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

    config = DualEncoderConfig(
        vision_config=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8),
        text_config=BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64), image_size=32)
    torch.manual_seed(0)
    model = DualEncoderModel(config).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(0, 100, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    before = model(**batch, return_loss=True).loss
    compiled = compile_in_place(model, "blocks", backend="eager")
    assert len(compiled) == 4 and all(name.rsplit(".", 1)[1] in ("0", "1") for name in compiled)  # 2 ViT + 2 BERT layers
    torch.testing.assert_close(model(**batch, return_loss=True).loss, before)
    assert set(model.state_dict()) == set(DualEncoderModel(config).state_dict())  # names unchanged
    with pytest.raises(ValueError, match="blocks"):
        compile_in_place(model, "everything")


def test_the_temperature_is_capped_and_pulled_back_after_a_step_and_its_gradient_keeps_flowing():
    import math

    from dualencoder.losses import ClipLoss
    from modeling_dualencoder import DualEncoderModel
    from tests.tiny import tiny_batch, tiny_vit_distilbert_config

    accelerator = Accelerator(cpu=True)
    model = DualEncoderModel(tiny_vit_distilbert_config(logit_scale_max=20.0))
    optimizer = torch.optim.SGD([model.logit_scale], lr=0.0)  # the step itself moves nothing
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, cosine_with_warmup(optimizer, 0, 10))
    cap = math.log(20.0)
    with torch.no_grad():
        model.logit_scale.fill_(cap + 1.0)  # carried past the cap (e.g. by an Adam step)
    batch = tiny_batch(model.config, 4)
    assert model.get_logit_scale().item() == pytest.approx(20.0)  # read as the cap
    TrainStep(accelerator, model, ClipLoss(), optimizer, scheduler, max_grad_norm=0)(batch)
    assert model.logit_scale.item() == pytest.approx(cap)  # the parameter itself is back at the cap
    model(**batch, return_loss=True).loss.backward()
    assert model.logit_scale.grad.item() != 0.0  # and its gradient flows there (a plain clamp gives 0 at the cap)


@pytest.mark.parametrize("loss_type, bias", [("triplet", None), ("clip", -10.0), ("siglip", -10.0)])
def test_every_trainable_parameter_gets_a_gradient_whatever_the_loss_ignores(loss_type, bias):
    """DistributedDataParallel fails when a trainable parameter gets no gradient: triplet ignores the
    temperature and CLIP the bias, so the step's loss keeps both in the graph (with a zero gradient)."""
    from dualencoder.losses import build_loss
    from dualencoder.training.step import batch_loss
    from modeling_dualencoder import DualEncoderModel
    from tests.tiny import tiny_batch, tiny_vit_distilbert_config

    model = DualEncoderModel(tiny_vit_distilbert_config(logit_bias_init_value=bias))
    batch_loss(build_loss(loss_type), model(**tiny_batch(model.config, 4))).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_with_gradient_accumulation_the_returned_loss_is_the_mean_of_the_steps_micro_batches():
    """The logged loss was the last micro-batch's alone: with 2 micro-batches of losses 3 and 6, it said 6."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = cosine_with_warmup(optimizer, 0, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = TrainStep(accelerator, model, ToyLoss(), optimizer, scheduler, max_grad_norm=0)
    losses = []
    for x in (1.0, 2.0, 3.0, 5.0):  # two optimiser steps; the weights move only after the second micro-batch
        losses.append(step({"x": torch.full((3,), x)}).item())
    assert step.global_step == 2
    first_step = 3.0 * (1.0 + 2.0) / 2
    assert losses[1] == pytest.approx(first_step)
    moved = 1 - 0.1 * (1.0 + 2.0) / 2  # each micro-batch's gradient is divided by 2 (Accelerate's accumulation)
    assert losses[3] == pytest.approx(3 * moved * (3.0 + 5.0) / 2)
