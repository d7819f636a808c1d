"""The whole-step CUDA graph's bookkeeping (dualencoder/training/graphed_step.py), on a CPU: static inputs, learning
rates as tensors the scheduler updates, the divergence flag on the device. Off CUDA the step runs the same body
eagerly on the static buffers, so a step that forgot to copy a batch in, or a learning rate frozen at its first
value, trains differently from TrainStep and fails here; the capture itself needs a GPU
(benchmarks/throughput.py --levers step-graph)."""

import pytest
import torch
from accelerate import Accelerator

from dualencoder.losses import build_loss
from dualencoder.training.graphed_step import GraphedTrainStep
from dualencoder.training.optim import cosine_with_warmup, make_optimizer
from dualencoder.training.step import TrainingDiverged, TrainStep
from modeling_dualencoder import DualEncoderModel
from tests.tiny import tiny_batch, tiny_vit_distilbert_config

CONFIG = tiny_vit_distilbert_config(projection_dim=8)


def trained(step_class, batches, **options):
    """The model's parameters after one step per batch, and the step object."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = DualEncoderModel(CONFIG).eval()  # eval: no dropout, so the two loops see the same numbers
    optimizer = make_optimizer(model, backbone_lr=1e-3, lora_lr=1e-3, head_lr=1e-2, scale_lr=1e-2, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, 1, len(batches))  # the learning rate changes every step
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = step_class(accelerator, model, build_loss("clip"), optimizer, scheduler, max_grad_norm=1.0, **options)
    for batch in batches:
        step(batch)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, step


def test_graphed_step_trains_exactly_as_the_plain_step():
    batches = [tiny_batch(CONFIG, 4, seq_len=5, seed=seed) for seed in range(4)]
    want, _ = trained(TrainStep, batches)
    got, step = trained(GraphedTrainStep, batches, warmup=2)  # 2 eager steps, then 2 through the "captured" path
    assert step.replay is not None and step.global_step == 4
    assert all(isinstance(group["lr"], torch.Tensor) for group in step.optimizer.param_groups)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_graphed_step_reports_the_step_whose_loss_was_not_finite():
    batches = [tiny_batch(CONFIG, 4, seq_len=5, seed=seed) for seed in range(3)]
    batches[2]["pixel_values"][0, 0, 0, 0] = float("nan")  # the third step, after capture
    _, step = trained(GraphedTrainStep, batches, warmup=1)
    with pytest.raises(TrainingDiverged, match="step 3"):
        step.check()


def test_graphed_step_refuses_a_batch_of_another_shape():
    _, step = trained(GraphedTrainStep, [tiny_batch(CONFIG, 4, seq_len=5)], warmup=1)
    with pytest.raises(ValueError, match="fixed shapes: input_ids"):
        step(tiny_batch(CONFIG, 4, seq_len=6))
