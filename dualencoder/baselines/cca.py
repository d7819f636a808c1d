"""The linear-CCA retrieval baseline: CCA (`dualencoder/cca.py`) of frozen pooled features.

One eigendecomposition per ridge gives every k and p, so the validation grid costs seconds.
"""

from __future__ import annotations

import time

from dualencoder.baselines.base import Baseline, as_pairs, evaluate
from dualencoder.cca import CCAFit, fit_cca, project


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
