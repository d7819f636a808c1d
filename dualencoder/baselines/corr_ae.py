"""Correspondence autoencoders (Feng et al., 2014): Corr-AE and the cross-modal autoencoder.

Two autoencoders, one per modality, whose latent codes z_x, z_y are pulled together::

    corr  (Corr-AE):        L = w_rec (|dec_x(z_x) - x|^2 + |dec_y(z_y) - y|^2) + w_align A(z_x, z_y)
    cross (Corr-Cross-AE):  L = w_rec (|dec_y(z_x) - y|^2 + |dec_x(z_y) - x|^2) + w_align A(z_x, z_y)

(cross: each latent decodes the *other* modality, so a code must carry what the two share.)
A is either ``"mse"`` (mean squared distance of the codes, the paper's correlation loss) or
``"contrastive"`` (symmetric InfoNCE on L2-normalised codes at a fixed temperature 0.07, via
:class:`dualencoder.losses.ClipLoss`). Retrieval: cosine similarity of the codes.

Sizes follow the seeds' defaults, adapted to the feature widths: image Dv -> 1024 -> 512,
text Dt -> 512 -> 512 (decoders mirror them), ReLU, dropout 0.3; inputs are z-scored with
training statistics, so reconstruction errors of both modalities are on one scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualencoder.baselines.base import TrainedBaseline, TrainOptions, mlp
from dualencoder.losses import ClipLoss

MODES = ("corr", "cross")
ALIGNS = ("mse", "contrastive")


class CorrAE(TrainedBaseline):
    """Correspondence autoencoder; ``mode`` "corr" or "cross", ``align`` "mse" or "contrastive"."""

    def __init__(self, mode: str = "corr", align: str = "mse", image_hidden: int = 1024, text_hidden: int = 512,
                 latent_dim: int = 512, dropout: float = 0.3, recon_weight: float = 1.0, align_weight: float = 1.0,
                 temperature: float = 0.07, options: TrainOptions | None = None) -> None:
        if mode not in MODES or align not in ALIGNS:
            raise ValueError(f"mode must be one of {MODES} and align one of {ALIGNS}, got {mode!r}, {align!r}")
        super().__init__(options)
        self.mode, self.align = mode, align
        self.image_hidden, self.text_hidden, self.latent_dim, self.dropout = image_hidden, text_hidden, latent_dim, dropout
        self.recon_weight, self.align_weight, self.temperature = recon_weight, align_weight, temperature
        self.name = f"{'corr-ae' if mode == 'corr' else 'cross-ae'}-{align}"
        self.clip_loss = ClipLoss(gather=False)

    def build(self, image_dim: int, text_dim: int) -> None:
        self.image_encoder = mlp([image_dim, self.image_hidden, self.latent_dim], self.dropout)
        self.text_encoder = mlp([text_dim, self.text_hidden, self.latent_dim], self.dropout)
        # the decoder of a modality reads whichever latent is asked to reconstruct it
        self.image_decoder = mlp([self.latent_dim, self.image_hidden, image_dim], self.dropout)
        self.text_decoder = mlp([self.latent_dim, self.text_hidden, text_dim], self.dropout)

    def encode_images(self, images):
        return self.image_encoder(images)

    def encode_texts(self, texts):
        return self.text_encoder(texts)

    def loss(self, images, texts):
        z_x, z_y = self.image_encoder(images), self.text_encoder(texts)
        if self.mode == "corr":
            recon = F.mse_loss(self.image_decoder(z_x), images) + F.mse_loss(self.text_decoder(z_y), texts)
        else:
            recon = F.mse_loss(self.text_decoder(z_x), texts) + F.mse_loss(self.image_decoder(z_y), images)
        if self.align == "mse":
            align = (z_x - z_y).pow(2).sum(-1).mean() / self.latent_dim
        else:
            scale = torch.tensor(1.0 / self.temperature)
            align = self.clip_loss(F.normalize(z_x, dim=-1), F.normalize(z_y, dim=-1), scale)
        return self.recon_weight * recon + self.align_weight * align
