"""Baselines on frozen backbone features: linear and kernel CCA, Corr-AE / cross-modal AE, Deep CCA, InfoNCE heads.

Features are extracted once per data set and backbone pair and cached (:mod:`.features`); every
baseline fits on the training split, selects its hyperparameter or epoch on validation RSUM, and
is scored on the test split with :func:`dualencoder.metrics.retrieval_metrics` (:func:`.base.evaluate`).
``python -m dualencoder.baselines.compare`` runs them all and writes doc/BASELINES.md.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Baseline, TooFewPairs, TrainOptions, evaluate
from .cca import LinearCCA, fit_cca
from .corr_ae import CorrAE
from .dcca import DeepCCA, total_correlation
from .features import SplitFeatures, load_features
from .kernel_cca import KernelCCA
from .projection_head import ContrastiveHeads


def build_baseline(name: str, options: TrainOptions | None = None) -> Baseline:
    """A fresh baseline by name (one of :data:`BASELINES`) with its default sizes.

    ``options`` set the MLP baselines' training (epochs, patience, seed, ...); Deep CCA and the
    InfoNCE heads always train with batches of 512 (DCCA estimates covariances per batch, InfoNCE
    gains from the negatives: 512 beat 128 and 256 on dev RSUM).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
    return BASELINES[name](options or TrainOptions())


BASELINES = {
    "linear-cca": lambda options: LinearCCA(),
    "kernel-cca": lambda options: KernelCCA(seed=options.seed),
    "corr-ae-mse": lambda options: CorrAE("corr", "mse", options=options),
    "corr-ae-contrastive": lambda options: CorrAE("corr", "contrastive", options=options),
    "cross-ae-mse": lambda options: CorrAE("cross", "mse", options=options),
    "cross-ae-contrastive": lambda options: CorrAE("cross", "contrastive", options=options),
    "deep-cca": lambda options: DeepCCA(options=replace(options, batch_size=512)),
    "infonce-mlp-heads": lambda options: ContrastiveHeads(options=replace(options, batch_size=512)),
}

__all__ = [
    "BASELINES",
    "Baseline",
    "ContrastiveHeads",
    "CorrAE",
    "DeepCCA",
    "KernelCCA",
    "LinearCCA",
    "SplitFeatures",
    "TrainOptions",
    "build_baseline",
    "evaluate",
    "fit_cca",
    "load_features",
    "total_correlation",
]
