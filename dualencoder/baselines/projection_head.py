"""Projection-only contrastive baseline: InfoNCE on frozen features through 2-layer MLP heads.

The simplest modern baseline, and the main model with both towers frozen and nothing else: the
same :class:`modeling_dualencoder.ProjectionHead` (Linear -> GELU -> Dropout -> Linear) on each
side, the same symmetric InfoNCE (:class:`dualencoder.losses.ClipLoss`) with a learnable
temperature initialised at 0.07 and clamped at 1/100, as CLIP does. No backbone tuning.

The loss is any of the main model's (``loss="clip+triplet"`` with ``loss_options``, through
:func:`dualencoder.losses.build_loss`) and the temperature may be held fixed, so the same heads on
the same frozen features isolate what a loss or a temperature does to the learned space
(:mod:`dualencoder.evaluation.graded_agreement`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dualencoder.baselines.base import TrainedBaseline, TrainOptions
from dualencoder.losses import build_loss
from modeling_dualencoder import ProjectionHead


class ContrastiveHeads(TrainedBaseline):
    """2-layer MLP heads (1024 hidden) into a ``projection_dim`` space, trained with InfoNCE.

    Defaults picked on Flickr8k dev RSUM among a few settings (batch 128/256/512, dropout 0.1/0.3/0.5,
    hidden width 1024 or the input width): batch 512, hidden 1024, dropout 0.3. ``hidden_dim=None``
    gives the main model's default (hidden width = input width).
    """

    name = "infonce-mlp-heads"

    def __init__(self, projection_dim: int = 512, hidden_dim: int | None = 1024, dropout: float = 0.3,
                 temperature: float = 0.07, options: TrainOptions | None = None, *, loss: str = "clip",
                 loss_options: dict | None = None, learn_temperature: bool = True) -> None:
        super().__init__(options or TrainOptions(batch_size=512))
        self.projection_dim, self.hidden_dim, self.dropout = projection_dim, hidden_dim, dropout
        self.temperature, self.learn_temperature = temperature, learn_temperature
        self.contrastive_loss = build_loss(loss, gather=False, **(loss_options or {}))

    def build(self, image_dim: int, text_dim: int) -> None:
        self.image_head = ProjectionHead(image_dim, self.projection_dim, "mlp", self.hidden_dim, self.dropout)
        self.text_head = ProjectionHead(text_dim, self.projection_dim, "mlp", self.hidden_dim, self.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / self.temperature)),
                                        requires_grad=self.learn_temperature)

    def encode_images(self, images):
        return self.image_head(images)

    def encode_texts(self, texts):
        return self.text_head(texts)

    def loss(self, images, texts):
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return self.contrastive_loss(F.normalize(self.image_head(images), dim=-1),
                                     F.normalize(self.text_head(texts), dim=-1), scale)
