"""Regularised linear CCA in closed form (ridge, whitening, SVD) and a retrieval baseline on it.

For centred views X [n, dx], Y [n, dy]::

    Cxx = X'X/(n-1) + rx I,   Cyy = Y'Y/(n-1) + ry I,   Cxy = X'Y/(n-1)
    T   = Cxx^-1/2 Cxy Cyy^-1/2 = U diag(rho) V'          (rho: the canonical correlations)
    A   = Cxx^-1/2 U[:, :k],   B = Cyy^-1/2 V[:, :k]      (projections: X A and Y B are
                                                            uncorrelated, unit variance, corr rho)

The ridge is relative: r times the mean eigenvalue of the covariance, so one grid serves features
of any scale. Retrieval embeds x -> (x - mean_x) A diag(rho^p), cosine similarity; p > 0 weights
each canonical direction by how well it correlates (p = 0: plain CCA space). One eigendecomposition
per ridge gives every k and p, so the validation grid costs seconds. float64 throughout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dualencoder.baselines.base import Baseline, as_pairs, evaluate


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


class LinearCCA(Baseline):
    """Linear CCA baseline: every caption paired with its image; ridge, k and p chosen on validation RSUM."""

    name = "linear-cca"

    def __init__(self, ridges=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), dims=(64, 128, 256, 384),
                 powers=(0.0, 1.0, 2.0)) -> None:
        super().__init__()
        self.ridges, self.dims, self.powers = tuple(ridges), tuple(dims), tuple(powers)
        self.fit_: CCAFit | None = None
        self.k, self.power = self.dims[-1], 0.0

    def fit(self, images, texts, text_to_image=None, *, val=None) -> LinearCCA:
        """Fit on every (image, caption) pair; without ``val`` use the middle ridge, the largest k, p = 0."""
        started = time.time()
        text_to_image = as_pairs(images, texts, text_to_image)
        x, y = images[text_to_image], texts
        max_k = min(x.shape[1], y.shape[1])
        dims = sorted({min(k, max_k) for k in self.dims})
        if val is None:
            grid = [(self.ridges[len(self.ridges) // 2], [dims[-1]], [self.powers[0]])]
        else:
            grid = [(ridge, dims, self.powers) for ridge in self.ridges]
        best = None
        for ridge, ks, powers in grid:
            fit = fit_cca(x, y, ridge)
            for k in ks:
                for power in powers:
                    self.fit_, self.k, self.power = fit, k, power
                    row = {"ridge": ridge, "k": k, "power": power}
                    if val is not None:
                        row["val_rsum"] = evaluate(self, val)["rsum"]
                    self.history.append(row)
                    if best is None or row.get("val_rsum", 0.0) > best[0].get("val_rsum", 0.0):
                        best = (row, fit)
        self.selected = best[0]
        self.fit_, self.k, self.power = best[1], best[0]["k"], best[0]["power"]
        self.train_seconds = time.time() - started
        return self

    def embed_images(self, images):
        return project(self.fit_, images, None, self.k, self.power)[0]

    def embed_texts(self, texts):
        return project(self.fit_, None, texts, self.k, self.power)[1]
