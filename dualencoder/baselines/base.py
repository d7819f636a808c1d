"""What every baseline shares: the fit/embed contract, feature standardisation, the MLP training loop.

A baseline maps frozen image features ``[N, Dv]`` and text features ``[M, Dt]`` into one space
where cosine similarity ranks candidates::

    baseline.fit(train_images, train_texts, train_text_to_image, val=dev_split)
    metrics = evaluate(baseline, test_split)    # dualencoder.metrics.retrieval_metrics

``text_to_image[j]`` is the image of caption j (``None``: row j of each is a pair). ``val`` (a
:class:`~dualencoder.baselines.features.SplitFeatures`) selects the hyperparameter (k, ridge) or
the epoch by validation RSUM; without it the last setting is kept.

Pairing (the same for every trained baseline): an epoch visits every training image once, each
with one of its captions drawn at random, so a batch never holds two captions of one image (no
false negatives for the contrastive objectives) and over E epochs each caption is seen ~E/5 times.
Linear CCA, which has a closed form, uses every caption paired with its image (image features
repeated per caption).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dualencoder.metrics import retrieval_metrics

logger = logging.getLogger(__name__)


class Standardizer(nn.Module):
    """Per-dimension z-scoring with statistics of the training features (buffers, saved with the model)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Standardizer:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(dims: list[int], dropout: float = 0.0, activation=nn.ReLU) -> nn.Sequential:
    """Linear layers of widths ``dims`` with activation + dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [activation(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def as_pairs(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor | None) -> torch.Tensor:
    """Validate the inputs of ``fit`` and return ``text_to_image`` (identity when pairs are given)."""
    if text_to_image is None:
        if images.shape[0] != texts.shape[0]:
            raise ValueError(f"without text_to_image, images and texts must be pairs: {images.shape[0]} vs {texts.shape[0]}")
        return torch.arange(texts.shape[0])
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if text_to_image.shape != (texts.shape[0],) or int(text_to_image.max()) >= images.shape[0]:
        raise ValueError("text_to_image must give one valid image index per text")
    return text_to_image


class Baseline:
    """Contract: ``fit`` on frozen features, then ``embed_images`` / ``embed_texts`` (L2-normalised)."""

    name = "baseline"

    def __init__(self) -> None:
        self.selected: dict = {}  # what validation chose (k, ridge, epoch...) and its RSUM
        self.history: list[dict] = []  # one row per evaluated setting / epoch
        self.train_seconds: float = 0.0

    def fit(self, images, texts, text_to_image=None, *, val=None) -> Baseline:
        raise NotImplementedError

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def evaluate(baseline: Baseline, split) -> dict:
    """Retrieval metrics of a fitted baseline on a split (images against all of its captions)."""
    return retrieval_metrics(baseline.embed_images(split.images), baseline.embed_texts(split.texts),
                             split.text_to_image, device="cpu")


@dataclass
class TrainOptions:
    """Optimisation of the MLP baselines. Defaults are the Corr-AE seeds' (Adam 1e-3, wd 1e-5, batch 128, 40 epochs)."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 8  # stop after this many epochs without a better validation RSUM (0: never)
    seed: int = 0


class TooFewPairs(ValueError):
    """A baseline was given fewer training pairs than its statistics need (e.g. a CCA over more dimensions)."""


class TrainedBaseline(Baseline, nn.Module):
    """An ``nn.Module`` baseline trained by minibatch Adam, the epoch chosen by validation RSUM.

    Subclasses build their layers in ``build(image_dim, text_dim)`` and define
    ``loss(images, texts) -> scalar`` on standardised features and ``encode_images`` /
    ``encode_texts`` (standardised features -> unnormalised embeddings). ``min_pairs()`` is the fewest
    training images with a caption the method is defined for (a batch statistic needs two).
    """

    def min_pairs(self) -> int:
        return 2

    def __init__(self, options: TrainOptions | None = None) -> None:
        nn.Module.__init__(self)
        Baseline.__init__(self)
        self.options = options or TrainOptions()

    # -- subclass hooks
    def build(self, image_dim: int, text_dim: int) -> None:
        raise NotImplementedError

    def loss(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, texts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_epoch_end(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Called after each epoch with all standardised training pairs (DCCA refits its linear CCA here)."""

    # -- the contract
    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        return F.normalize(self.encode_images(self.image_norm(images.float())), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: torch.Tensor) -> torch.Tensor:
        self.eval()
        return F.normalize(self.encode_texts(self.text_norm(texts.float())), dim=-1)

    def fit(self, images, texts, text_to_image=None, *, val=None) -> TrainedBaseline:
        opts = self.options
        started = time.time()
        images, texts = images.float(), texts.float()
        text_to_image = as_pairs(images, texts, text_to_image)
        torch.manual_seed(opts.seed)
        generator = torch.Generator().manual_seed(opts.seed)
        self.image_norm = Standardizer(images.shape[1]).fit(images)
        self.text_norm = Standardizer(texts.shape[1]).fit(texts)
        self.build(images.shape[1], texts.shape[1])
        x_all, y_all = self.image_norm(images), self.text_norm(texts)
        captions_of = [[] for _ in range(images.shape[0])]
        for j, i in enumerate(text_to_image.tolist()):
            captions_of[i].append(j)
        has_caption = torch.tensor([i for i, caps in enumerate(captions_of) if caps])
        if len(has_caption) < self.min_pairs():
            raise TooFewPairs(f"{self.name} needs at least {self.min_pairs()} training images with a caption, got "
                              f"{len(has_caption)}; use a bigger training split")
        optimizer = torch.optim.Adam(self.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)

        best_rsum, best_state, stale = -1.0, None, 0
        for epoch in range(1, opts.epochs + 1):
            self.train()
            order = has_caption[torch.randperm(len(has_caption), generator=generator)]
            pick = torch.tensor([captions_of[i][int(torch.randint(len(captions_of[i]), (1,), generator=generator))]
                                 for i in order.tolist()])
            total, steps = 0.0, 0
            for start in range(0, len(order), opts.batch_size):
                rows = slice(start, start + opts.batch_size)
                if len(order[rows]) < 2:
                    continue
                loss = self.loss(x_all[order[rows]], y_all[pick[rows]])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            self.eval()
            with torch.no_grad():
                self.on_epoch_end(x_all[text_to_image], y_all)
            row = {"epoch": epoch, "loss": total / max(steps, 1)}
            if val is not None:
                row["val_rsum"] = evaluate(self, val)["rsum"]
                if row["val_rsum"] > best_rsum:
                    best_rsum, best_state, stale = row["val_rsum"], copy.deepcopy(self.state_dict()), 0
                    self.selected = {"epoch": epoch, "val_rsum": best_rsum}
                else:
                    stale += 1
            self.history.append(row)
            logger.info("%s epoch %d: %s", self.name, epoch, row)
            if val is not None and opts.patience and stale >= opts.patience:
                break
        if best_state is not None:
            self.load_state_dict(best_state)
        else:
            self.selected = {"epoch": len(self.history)}
        self.train_seconds = time.time() - started
        return self
