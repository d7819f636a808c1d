"""Contrastive losses for image-text dual encoders.

Every loss is a small ``nn.Module`` with one contract (doc/ARCHITECTURE.md, "Losses")::

    loss(image_embeds, text_embeds, logit_scale, logit_bias=None, image_ids=None) -> scalar tensor

``image_embeds`` / ``text_embeds`` are this process's L2-normalised ``[B, D]`` rows, row i of each
being a positive pair. ``logit_scale`` is the *exponentiated* learnable scale (1 / temperature); the
model clamps it (at 100, as CLIP does), the losses use it as given. ``image_ids`` (``[B]`` ints)
marks rows showing the same image: such rows are positives of each other, never negatives — with
five captions per image, two captions of one image in a batch are not a mistake to punish.

Notation used in the docstrings: N items in the (global) batch, x_i image and y_j text embeddings,
s_ij = x_i . y_j, t = ``logit_scale``, b = ``logit_bias``, P(i) = the positives of row i (its own
pair plus every item with the same image id).

Options shared by all losses (keyword-only):

* ``gather`` — when torch.distributed runs with more than one process, score against the global
  batch (every process's embeddings) rather than only the local one. More negatives, same pairs.
* ``gather_with_grad`` — let gradients flow back through the gather to the process that produced
  each embedding. Needed for the DDP-averaged gradient to equal the single-process gradient on the
  global batch; see :mod:`dualencoder.distributed` for what ``False`` gives instead.
* ``local_loss`` — open_clip's option. Without it every process computes the whole N x N global
  loss (identical on every process, N^2 work each). With it a process computes only the rows of
  its own B items against all N columns (B x N work, B/N of the memory), and the loss it returns is
  its share; the mean over processes (what DDP's gradient averaging amounts to) is the global loss.
  With ``gather_with_grad=True`` both settings give the same, exact gradients; ``local_loss=True``
  is just cheaper. Each process's reported loss value differs, though: average it for logging.
* ``image_ids`` name the same image on every process (the collator's stable numbers of the image-id
  strings); gathered, equal ids are positives across processes too (see
  :func:`dualencoder.distributed.gather_features`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualencoder.distributed import gather_features, world_info

__all__ = [
    "ClipLoss",
    "NTXentLoss",
    "TripletLoss",
    "SigLipLoss",
    "CombinedLoss",
    "LOSSES",
    "build_loss",
]


@dataclass
class _Views:
    """What a loss scores: R rows (local or global) against the N global columns.

    ``targets[i]`` is the column of row i's own pair; ``same[i, j]`` is True when row i and column
    j show the same image (their own pair included); it is None when no ids were given, meaning
    "only the own pair".
    """

    image_rows: torch.Tensor
    text_rows: torch.Tensor
    image_cols: torch.Tensor
    text_cols: torch.Tensor
    targets: torch.Tensor
    same: torch.Tensor | None

    def same_or_pairs(self) -> torch.Tensor:
        """``same`` as a bool ``[R, N]`` mask, the one-per-row pair mask when no ids were given."""
        if self.same is not None:
            return self.same
        mask = torch.zeros(
            self.targets.shape[0], self.image_cols.shape[0], dtype=torch.bool, device=self.targets.device
        )
        return mask.scatter_(1, self.targets[:, None], True)


class _PairLoss(nn.Module):
    """Shared plumbing: validation, cross-process gathering, row/column views, positive masks."""

    def __init__(
        self,
        *,
        gather: bool = True,
        gather_with_grad: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        self.gather = gather
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def extra_repr(self) -> str:
        return (
            f"gather={self.gather}, gather_with_grad={self.gather_with_grad}, "
            f"local_loss={self.local_loss}"
        )

    def _views(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, image_ids: torch.Tensor | None
    ) -> _Views:
        if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"expected image and text embeddings of equal shape [B, D], got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        batch = image_embeds.shape[0]
        if image_ids is not None:
            image_ids = torch.as_tensor(image_ids, device=image_embeds.device)
            if image_ids.shape != (batch,):
                raise ValueError(f"image_ids must have shape [{batch}], got {tuple(image_ids.shape)}")

        rank, world_size = world_info()
        if self.gather and world_size > 1:
            all_image, all_text, all_ids = gather_features(
                image_embeds,
                text_embeds,
                image_ids,
                gather_with_grad=self.gather_with_grad,
            )
        else:
            rank, all_image, all_text, all_ids = 0, image_embeds, text_embeds, image_ids

        if self.local_loss:
            rows = slice(rank * batch, (rank + 1) * batch)
            # Take the rows from the gathered tensors, not the inputs: with gather_with_grad the
            # gathered copy is what routes every process's gradient share back to its owner.
            image_rows, text_rows = all_image[rows], all_text[rows]
            row_ids = None if all_ids is None else all_ids[rows]
            offset = rank * batch
        else:
            image_rows, text_rows, row_ids, offset = all_image, all_text, all_ids, 0

        targets = torch.arange(image_rows.shape[0], device=image_embeds.device) + offset
        same = None if all_ids is None else row_ids[:, None] == all_ids[None, :]
        return _Views(image_rows, text_rows, all_image, all_text, targets, same)


def _check_positives(positives: str, loss: str) -> str:
    if positives not in ("all", "any"):
        raise ValueError(f"{loss} positives must be 'all' (each positive) or 'any' (the best positive), got {positives!r}")
    return positives


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is in a narrower float (bf16/fp16 under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _multi_positive_nce(logits: torch.Tensor, targets: torch.Tensor, same: torch.Tensor | None,
                        positives: str = "all") -> torch.Tensor:
    """Mean over rows of a multi-positive InfoNCE term; ``positives`` says what a row must achieve.

    ``"all"``: KL(q_i || softmax(logits_i)), q_i uniform over the row's positives. With one
    positive per row this *is* cross-entropy (the entropy of a one-hot q is 0), so the fast exact
    path is taken. With several, cross-entropy against q is bounded below by log|P(i)| (the tied
    duplicates can never both get probability 1); subtracting that constant gives the same
    gradients and a loss that is 0 at perfect retrieval, comparable across batches.

    ``"any"``: -log sum_{j in P(i)} p_ij, the probability mass on the positives together
    (MIL-NCE). Already 0 at perfect retrieval; with one positive it is cross-entropy too.
    """
    if same is None:
        return F.cross_entropy(logits, targets)  # autocast runs cross_entropy in float32
    log_p = at_least_float32(logits).log_softmax(dim=-1)  # and this path likewise (CPU autocast keeps bf16 here)
    if positives == "any":
        return -log_p.masked_fill(~same, float("-inf")).logsumexp(dim=-1).mean()
    n_pos = same.sum(dim=-1).to(log_p.dtype)
    mean_log_p_pos = log_p.masked_fill(~same, 0.0).sum(dim=-1) / n_pos
    return (-mean_log_p_pos - n_pos.log()).mean()


class ClipLoss(_PairLoss):
    r"""Symmetric InfoNCE, the CLIP loss (the default).

    With l_ij = t * s_ij (image i against text j) and p_i = softmax_j(l_ij), each row's target
    distribution q_i is uniform over its positives, q_ij = 1/|P(i)| for j in P(i), 0 otherwise::

        L_i2t = mean_i KL(q_i || p_i) = mean_i [ -1/|P(i)| sum_{j in P(i)} log p_ij - log |P(i)| ]
        L     = (L_i2t + L_t2i) / 2          (L_t2i the same on l^T: texts against images)

    Without ids (or all distinct) P(i) = {i} and this is exactly CLIP's
    (CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2. Why a uniform soft target
    rather than masking duplicates out: it still tells the model that every caption of the image
    is right, while keeping the normaliser the full row, so no candidate escapes the softmax.
    The ``- log|P(i)|`` is a constant (KL rather than cross-entropy): gradients are unchanged, and a
    duplicated image no longer puts a floor of log 2 under the loss.

    ``positives="any"`` replaces each row's KL by MIL-NCE (Miech et al., 2020),
    ``-log sum_{j in P(i)} p_ij``: the row must put its probability on *some* positive, not spread
    it evenly over all of them. That is what image→text Recall@K counts (a hit when any of the
    image's captions ranks high). Where a row's positives are copies of one item (a caption's image
    repeated once per caption, as ``batch_by_image`` does) the two rules give the same loss, so in
    that layout "any" changes only the image→text direction.
    ``logit_bias`` is ignored.
    """

    def __init__(self, positives: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        self.positives = _check_positives(positives, "ClipLoss")

    def extra_repr(self) -> str:
        return f"positives={self.positives!r}, " + super().extra_repr()

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        v = self._views(image_embeds, text_embeds, image_ids)
        logits_per_image = logit_scale * v.image_rows @ v.text_cols.T
        if self.local_loss:
            logits_per_text = logit_scale * v.text_rows @ v.image_cols.T
        else:
            logits_per_text = logits_per_image.T
        # The id relation is symmetric, so text row i's positives are image row i's positives.
        return (
            _multi_positive_nce(logits_per_image, v.targets, v.same, self.positives)
            + _multi_positive_nce(logits_per_text, v.targets, v.same, self.positives)
        ) / 2


class NTXentLoss(_PairLoss):
    r"""NT-Xent (SimCLR) over the 2N items [images; texts]: intra- and cross-modal negatives.

    With z = [x_1..x_N, y_1..y_N] and l_ab = t * z_a . z_b, item a's positive is its pair
    a' (image i <-> text i) and its candidates are every other item but itself::

        L = mean_a -log( exp(l_aa') / sum_{b != a, b not same-image as a unless b = a'} exp(l_ab) )

    so without ids each denominator holds the positive and the 2N - 2 negatives of SimCLR. Items
    sharing a's image id (other captions of the same image, other copies of the image) are left
    out of the denominator: they are not negatives, and keeping the target single avoids deciding
    how much credit each would deserve. t = 1/tau, SimCLR's temperature. ``logit_bias`` is ignored.
    """

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        v = self._views(image_embeds, text_embeds, image_ids)
        n_cols = v.image_cols.shape[0]
        rows = torch.cat([v.image_rows, v.text_rows])
        cols = torch.cat([v.image_cols, v.text_cols])
        logits = logit_scale * rows @ cols.T  # [2R, 2N]
        targets = torch.cat([v.targets + n_cols, v.targets])  # image -> its text, text -> its image
        same = v.same_or_pairs().repeat(2, 2)  # same image, across and within modalities, self included
        positive = torch.zeros_like(same).scatter_(1, targets[:, None], True)
        logits = logits.masked_fill(same & ~positive, float("-inf"))
        return F.cross_entropy(logits, targets)


class TripletLoss(_PairLoss):
    r"""Triplet / VSE++ hinge loss on cosine similarities, both directions.

    With d_i = s_ii the pair's similarity and m the margin, for image row i (text rows alike on
    s^T)::

        h_i2t(i) = max_{j not in P(i)} [m + s_ij - d_i]_+     (max_violation=True: VSE++)
                 = sum_{j not in P(i)} [m + s_ij - d_i]_+     (max_violation=False: VSE0)
        L = mean_i ( h_i2t(i) + h_t2i(i) )

    VSE++ (Faghri et al.) sums over the batch; we average over rows so the loss does not grow with
    the batch size or the number of processes and can be weighted against InfoNCE. Positives P(i)
    (same image id) are never negatives. ``positives="any"`` measures the violation from the row's
    best positive, ``max_{p in P(i)} s_ip``, instead of its own pair's d_i: some positive, not each,
    must beat the negatives by the margin (as in :class:`ClipLoss`, this changes nothing for rows
    whose positives are copies of one item). The hardest negative gives a strong signal late in
    training but is noisy early, which is why it is usually added to InfoNCE (``"clip+triplet"``).
    ``logit_scale`` and ``logit_bias`` are ignored: the margin is in cosine units, and scaling the
    similarities would silently change it.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, positives: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = margin
        self.max_violation = max_violation
        self.positives = _check_positives(positives, "TripletLoss")

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, max_violation={self.max_violation}, positives={self.positives!r}, "
                + super().extra_repr())

    def _hinge(self, sims: torch.Tensor, targets: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        if self.positives == "any":
            positive_sim = sims.masked_fill(~same, float("-inf")).amax(dim=1, keepdim=True)
        else:
            positive_sim = sims.gather(1, targets[:, None])
        cost = (self.margin + sims - positive_sim).clamp(min=0).masked_fill(same, 0.0)
        return cost.amax(dim=1) if self.max_violation else cost.sum(dim=1)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        v = self._views(image_embeds, text_embeds, image_ids)
        same = v.same_or_pairs()
        sims_i2t = v.image_rows @ v.text_cols.T
        sims_t2i = v.text_rows @ v.image_cols.T if self.local_loss else sims_i2t.T
        return (self._hinge(sims_i2t, v.targets, same) + self._hinge(sims_t2i, v.targets, same)).mean()


class SigLipLoss(_PairLoss):
    r"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023) with its learnable bias.

    Every (image i, text j) pair is an independent binary decision, z_ij = +1 if j in P(i) (own
    pair or same image id), -1 otherwise::

        L = 1/N sum_i sum_j -log sigmoid( z_ij * (t * s_ij + b) )

    normalised by the batch size N (number of rows), as in the paper, not by N^2. No softmax, so
    no global normaliser: each pair's term is local, which is what makes it cheap to shard.
    ``logit_bias`` is required; the paper initialises it at -10 (and t at 10) so the many negative
    pairs do not dominate the first steps.
    """

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias, the model's learnable bias (SigLIP initialises it at -10)")
        v = self._views(image_embeds, text_embeds, image_ids)
        logits = at_least_float32(logit_scale * v.image_rows @ v.text_cols.T + logit_bias)  # N² terms summed in fp32
        signs = v.same_or_pairs().to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


class CombinedLoss(nn.Module):
    """A weighted sum of losses, e.g. InfoNCE plus a hard-negative triplet term.

    ``CombinedLoss([(ClipLoss(), 1.0), (TripletLoss(margin=0.2), 0.5)])``. Every term receives the
    same arguments and gathers on its own (simple, at the cost of one gather per term).
    """

    def __init__(self, terms: Sequence[tuple[nn.Module, float]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one (loss, weight) term")
        self.losses = nn.ModuleList(loss for loss, _ in terms)
        self.weights = [float(w) for _, w in terms]

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def after_optimizer_step(self, model: nn.Module | None = None) -> None:
        """Pass the training loop's after-step call on to every term that wants it (e.g. an EMA teacher)."""
        for loss in self.losses:
            if hasattr(loss, "after_optimizer_step"):
                loss.after_optimizer_step(model)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sum(
            weight * loss(image_embeds, text_embeds, logit_scale, logit_bias, image_ids)
            for loss, weight in zip(self.losses, self.weights)
        )


LOSSES: dict[str, type[nn.Module]] = {
    "clip": ClipLoss,
    "infonce": ClipLoss,
    "ntxent": NTXentLoss,
    "triplet": TripletLoss,
    "vsepp": TripletLoss,
    "siglip": SigLipLoss,
}


def _option_names(cls: type[nn.Module]) -> set[str]:
    """Named constructor options of a loss class, including the shared ones of ``_PairLoss``."""
    names = set()
    for klass in (cls, _PairLoss):
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != "self":
                names.add(param.name)
    return names


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name: one of ``LOSSES`` or several joined by ``+`` (a :class:`CombinedLoss`).

    Options go to every term whose constructor takes them (``gather``, ``local_loss``, ...
    to all; ``margin``, ``max_violation`` to the triplet term). In a combination each term's weight
    is ``<name>_weight`` (default 1.0)::

        build_loss("clip")
        build_loss("clip+triplet", triplet_weight=0.5, margin=0.1)

    Raises ``ValueError`` for an unknown name and ``TypeError`` for an option no term takes.
    """
    parts = [part.strip().lower() for part in name.split("+")]
    unknown = [part for part in parts if part not in LOSSES]
    if unknown:
        raise ValueError(
            f"unknown loss {unknown[0]!r} in {name!r}; valid names: {', '.join(LOSSES)} "
            "(or several joined by '+', e.g. 'clip+triplet')"
        )
    weights = [kwargs.pop(f"{part}_weight", 1.0) for part in parts] if len(parts) > 1 else [1.0]
    losses, used = [], set()
    for part in parts:
        cls = LOSSES[part]
        accepted = _option_names(cls)
        options = {key: value for key, value in kwargs.items() if key in accepted}
        used |= options.keys()
        losses.append(cls(**options))
    unused = sorted(kwargs.keys() - used)
    if unused:
        raise TypeError(f"build_loss({name!r}) got options no term accepts: {unused}")
    return losses[0] if len(losses) == 1 else CombinedLoss(list(zip(losses, weights)))

# The codebook alignment term (prototypes, Sinkhorn, EMA teacher) lives in its own module.
from dualencoder.codebook import CodebookLoss  # noqa: E402

LOSSES["codebook"] = CodebookLoss
