"""Deep CCA (Andrew et al., 2013): MLP heads trained to maximise the total correlation of their outputs.

For head outputs H1 [B, k], H2 [B, k] of a minibatch (centred), with ridge r::

    S11 = H1'H1/(B-1) + r I,  S22 = H2'H2/(B-1) + r I,  S12 = H1'H2/(B-1)
    corr(H1, H2) = || S11^-1/2 S12 S22^-1/2 ||_*    (nuclear norm: the sum of all k canonical correlations)
    L = -corr(H1, H2)

computed in float64 (the gradient goes through the eigendecomposition and the SVD). The
covariances come from one minibatch, so DCCA wants large batches (512 here, not the 128 of the
other heads). As in the paper, after training (here after every epoch, so validation can pick the
epoch) a linear CCA is fitted on the heads' outputs over the training pairs; retrieval embeds
through heads + that CCA, each direction weighted by its canonical correlation (p = 1), cosine.
"""

from __future__ import annotations

import torch

from dualencoder.baselines.base import TrainedBaseline, TrainOptions, mlp
from dualencoder.cca import fit_cca


def _inverse_sqrt(cov: torch.Tensor) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return (eigvecs * eigvals.clamp(min=1e-9).rsqrt()) @ eigvecs.T


def total_correlation(h1: torch.Tensor, h2: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Sum of the canonical correlations of two views [B, k] (differentiable, float64)."""
    h1, h2 = h1.double(), h2.double()
    h1, h2 = h1 - h1.mean(0), h2 - h2.mean(0)
    n = h1.shape[0] - 1
    eye1 = torch.eye(h1.shape[1], dtype=h1.dtype, device=h1.device)
    eye2 = torch.eye(h2.shape[1], dtype=h2.dtype, device=h2.device)
    s11 = h1.T @ h1 / n + ridge * eye1
    s22 = h2.T @ h2 / n + ridge * eye2
    t = _inverse_sqrt(s11) @ (h1.T @ h2 / n) @ _inverse_sqrt(s22)
    return torch.linalg.svdvals(t).sum()


class DeepCCA(TrainedBaseline):
    """DCCA heads: image Dv -> 1024 -> k, text Dt -> 512 -> k (ReLU), then linear CCA on the outputs."""

    name = "deep-cca"

    def __init__(self, out_dim: int = 128, image_hidden: int = 1024, text_hidden: int = 512, dropout: float = 0.1,
                 ridge: float = 1e-3, cca_ridge: float = 1e-4, power: float = 1.0, max_cca_rows: int = 10000,
                 options: TrainOptions | None = None) -> None:
        super().__init__(options or TrainOptions(batch_size=512))
        self.out_dim, self.image_hidden, self.text_hidden, self.dropout = out_dim, image_hidden, text_hidden, dropout
        self.ridge, self.cca_ridge, self.power, self.max_cca_rows = ridge, cca_ridge, power, max_cca_rows

    def min_pairs(self) -> int:
        """A CCA of `out_dim` dimensions needs more pairs than dimensions (fewer: eigh fails, or every canonical
        correlation is 1 and the embedding means nothing)."""
        return self.out_dim + 1

    def build(self, image_dim: int, text_dim: int) -> None:
        self.image_head = mlp([image_dim, self.image_hidden, self.out_dim], self.dropout)
        self.text_head = mlp([text_dim, self.text_hidden, self.out_dim], self.dropout)
        k = self.out_dim
        # the linear CCA on top, refitted after every epoch (buffers: saved and restored with the best epoch)
        for side in ("x", "y"):
            self.register_buffer(f"cca_mean_{side}", torch.zeros(k, dtype=torch.float64))
            self.register_buffer(f"cca_proj_{side}", torch.eye(k, dtype=torch.float64))
        self.register_buffer("cca_corrs", torch.ones(k, dtype=torch.float64))

    def loss(self, images, texts):
        return -total_correlation(self.image_head(images), self.text_head(texts), self.ridge)

    def on_epoch_end(self, images, texts):
        step = max(1, images.shape[0] // self.max_cca_rows)
        fit = fit_cca(self.image_head(images[::step]), self.text_head(texts[::step]), self.cca_ridge)
        self.cca_mean_x.copy_(fit.mean_x), self.cca_mean_y.copy_(fit.mean_y)
        self.cca_proj_x.copy_(fit.proj_x), self.cca_proj_y.copy_(fit.proj_y), self.cca_corrs.copy_(fit.corrs)

    def _project(self, h, mean, proj):
        return ((h.double() - mean) @ proj * self.cca_corrs.clamp(min=1e-12) ** self.power).float()

    def encode_images(self, images):
        return self._project(self.image_head(images), self.cca_mean_x, self.cca_proj_x)

    def encode_texts(self, texts):
        return self._project(self.text_head(texts), self.cca_mean_y, self.cca_proj_y)
