"""Regularised linear CCA in closed form (ridge, whitening, SVD): the one solver of the project.

For centred views X [n, dx], Y [n, dy]::

    Cxx = X'X/(n-1) + rx I,   Cyy = Y'Y/(n-1) + ry I,   Cxy = X'Y/(n-1)
    T   = Cxx^-1/2 Cxy Cyy^-1/2 = U diag(rho) V'          (rho: the canonical correlations)
    A   = Cxx^-1/2 U[:, :k],   B = Cyy^-1/2 V[:, :k]      (projections: X A and Y B are
                                                            uncorrelated, unit variance, corr rho)

The ridge is relative: r times the mean eigenvalue of the covariance, so one grid serves features
of any scale. Embedding: x -> (x - mean_x) A diag(rho^p), L2-normalised; p > 0 weights each canonical
direction by how well it correlates (p = 0: plain CCA space). float64 throughout. Used by the
linear-CCA baseline (`dualencoder/baselines/cca.py`) and by the projection heads' initialisation
(`dualencoder/head_init.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _inverse_sqrt(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals = eigvals.clamp(min=0) + ridge * eigvals.clamp(min=0).mean()
    return (eigvecs * eigvals.rsqrt()) @ eigvecs.T


@dataclass
class CCAFit:
    """Means, projections and canonical correlations of one fitted CCA (all components, sorted)."""

    mean_x: torch.Tensor
    mean_y: torch.Tensor
    proj_x: torch.Tensor  # [dx, r]
    proj_y: torch.Tensor  # [dy, r]
    corrs: torch.Tensor  # [r], descending


def fit_cca(x: torch.Tensor, y: torch.Tensor, ridge_x: float = 1e-3, ridge_y: float | None = None) -> CCAFit:
    """Closed-form regularised CCA of paired rows ``x`` [n, dx], ``y`` [n, dy]; r = min(dx, dy) components."""
    ridge_y = ridge_x if ridge_y is None else ridge_y
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    n = x.shape[0] - 1
    wx = _inverse_sqrt(xc.T @ xc / n, ridge_x)
    wy = _inverse_sqrt(yc.T @ yc / n, ridge_y)
    u, s, vh = torch.linalg.svd(wx @ (xc.T @ yc / n) @ wy, full_matrices=False)
    return CCAFit(mean_x, mean_y, wx @ u, wy @ vh.T, s)


def project(fit: CCAFit, x: torch.Tensor, y: torch.Tensor, k: int, power: float = 0.0):
    """L2-normalised k-dim CCA embeddings of ``x`` and ``y`` (either may be None)."""
    scale = fit.corrs[:k].clamp(min=1e-12) ** power
    ex = None if x is None else F.normalize(((x.double() - fit.mean_x) @ fit.proj_x[:, :k]) * scale, dim=-1).float()
    ey = None if y is None else F.normalize(((y.double() - fit.mean_y) @ fit.proj_y[:, :k]) * scale, dim=-1).float()
    return ex, ey
