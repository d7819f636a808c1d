"""Regularised kernel CCA with RBF kernels, made linear by a Nyström feature map.

Kernel CCA (Lai & Fyfe 2000; Bach & Jordan 2002) looks for f(x) = <a, phi(x)> and g(y) = <b, psi(y)>
of maximal correlation, phi and psi the feature maps of RBF kernels. Solved exactly it is an
n x n problem per view (30,000 training pairs: a 7 GB Gram matrix in float64). With an explicit
rank-m map instead (Nyström, Williams & Seeger 2001)::

    phi(x) = k(x, L) K_LL^-1/2        L: m landmarks drawn from the training rows
                                      k(x, l) = exp(-|x - l|^2 / (2 sigma^2))

phi(x)'phi(x') approximates k(x, x'), so kernel CCA becomes linear CCA on the m-dim mapped
features: the fit and its dev grid (ridge, output dims k, correlation power p) are
:class:`~dualencoder.baselines.cca.LinearCCA`'s, run on [n, m] inputs. Memory is O(n m + m^2),
never n^2, and the fitted state (landmarks and the m x m whitening) does not grow with n.

Inputs are z-scored with training statistics first, so no dimension dominates the distance, and
the width is relative: sigma = s * the median distance between landmarks (the "median
heuristic"), so one grid of s serves any feature scale, like LinearCCA's relative ridge. A very
wide kernel (s >> 1) is nearly linear: 1 - |x - x'|^2 / (2 sigma^2) spans the linear functions
(plus |x|^2), and kernel CCA then finds linear CCA's directions.
"""

from __future__ import annotations

import time

import torch

from dualencoder.baselines.base import Baseline, as_pairs
from dualencoder.baselines.cca import LinearCCA
from dualencoder.baselines.features import SplitFeatures


class NystroemRBF:
    """The rank-``m`` Nyström map of an RBF kernel on z-scored rows: ``x [n, d] -> [n, <= m]`` (float64).

    Landmarks are ``m`` training rows drawn at random (seeded); landmark-kernel eigenvalues below
    ``1e-10`` of the largest are dropped (a very wide kernel has few), so the output may be narrower.
    """

    def __init__(self, rank: int, width: float = 1.0, seed: int = 0, chunk_size: int = 4096) -> None:
        self.rank, self.width, self.seed, self.chunk_size = rank, width, seed, chunk_size

    def fit(self, x: torch.Tensor) -> NystroemRBF:
        x = x.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        z = (x - self.mean) / self.std
        generator = torch.Generator().manual_seed(self.seed)
        self.landmarks = z[torch.randperm(z.shape[0], generator=generator)[: self.rank]]
        distances = torch.cdist(self.landmarks, self.landmarks)
        off_diagonal = distances[~torch.eye(len(distances), dtype=torch.bool)]
        sigma = self.width * (off_diagonal.median() if off_diagonal.numel() else torch.tensor(1.0, dtype=z.dtype))
        self.gamma = float(1.0 / (2.0 * sigma.clamp(min=1e-12) ** 2))
        eigvals, eigvecs = torch.linalg.eigh(torch.exp(-self.gamma * distances**2))
        keep = eigvals > 1e-10 * eigvals.max()
        self.whiten = eigvecs[:, keep] * eigvals[keep].rsqrt()  # [m, m'], K_LL^-1/2 on its range
        return self

    @property
    def dim(self) -> int:
        return self.whiten.shape[1]

    def state_numel(self) -> int:
        """Numbers the fitted map stores: what the rank bounds (independent of the training rows)."""
        return sum(t.numel() for t in (self.mean, self.std, self.landmarks, self.whiten))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.double() - self.mean) / self.std
        return torch.cat([torch.exp(-self.gamma * torch.cdist(chunk, self.landmarks) ** 2) @ self.whiten
                          for chunk in z.split(self.chunk_size)]) if len(z) else z.new_zeros(0, self.dim)


class KernelCCA(Baseline):
    """Kernel CCA baseline: Nyström RBF maps of both views, then :class:`LinearCCA` on the mapped features.

    Dev RSUM chooses the relative width ``s`` (the same for both views), the rank ``m``, and,
    inside LinearCCA's grid, the ridge, k and p. Without ``val``: the middle width, the largest rank
    and LinearCCA's own defaults.
    """

    name = "kernel-cca"

    def __init__(self, widths=(0.5, 1.0, 2.0), ranks=(512, 1024, 2048), ridges=(0.1, 1.0, 10.0),
                 dims=(256, 512, 1024), powers=(0.0, 1.0, 2.0), seed: int = 0) -> None:
        super().__init__()
        self.widths, self.ranks = tuple(widths), tuple(ranks)
        self.ridges, self.dims, self.powers, self.seed = tuple(ridges), tuple(dims), tuple(powers), seed

    def fit(self, images, texts, text_to_image=None, *, val=None) -> KernelCCA:
        started = time.time()
        text_to_image = as_pairs(images, texts, text_to_image)
        if val is None:
            grid = [(self.widths[len(self.widths) // 2], max(self.ranks))]
        else:
            grid = [(width, rank) for rank in self.ranks for width in self.widths]
        best = None
        for width, rank in grid:
            image_map = NystroemRBF(rank, width, self.seed).fit(images)
            text_map = NystroemRBF(rank, width, self.seed + 1).fit(texts)
            mapped_val = None if val is None else SplitFeatures(image_map(val.images), text_map(val.texts),
                                                                val.text_to_image)
            linear = LinearCCA(self.ridges, self.dims, self.powers).fit(image_map(images), text_map(texts),
                                                                        text_to_image, val=mapped_val)
            self.history += [{"width": width, "rank": rank, **row} for row in linear.history]
            score = linear.selected.get("val_rsum", 0.0)
            if best is None or score > best[0]:
                best = (score, {"width": width, "rank": rank, **linear.selected}, image_map, text_map, linear)
        _, self.selected, self.image_map, self.text_map, self.linear = best
        self.train_seconds = time.time() - started
        return self

    def embed_images(self, images):
        return self.linear.embed_images(self.image_map(images))

    def embed_texts(self, texts):
        return self.linear.embed_texts(self.text_map(texts))
