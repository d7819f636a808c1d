r"""Codebook alignment: both modalities are assigned to one shared set of learnable prototypes.

A loss term for the main model (``build_loss("clip+codebook", ...)``), after SwAV's swapped
prediction (Caron et al., 2020) applied across modalities. With L2-normalised embeddings x_i
(image) and y_i (text), K prototypes c_k (unit-normalised in the forward pass), temperature tau::

    p_i^x = softmax_k(x_i . c_k / tau)          the image's predicted assignment (likewise p_i^y)
    q^x   = Sinkhorn(x . c^T)                   the image's *balanced* code, a target (no gradient)
    L     = -1/2B sum_i [ q_i^y . log p_i^x  +  q_i^x . log p_i^y ]

Each modality predicts the other's code ("swapped prediction"): a caption must land on the
prototypes its image lands on, and vice versa. Sinkhorn-Knopp (a few iterations, entropic
regularisation ``sinkhorn_epsilon``) spreads the batch evenly over the prototypes, which is what
stops the trivial solution of every item on one prototype. The term is cluster-level; add the
instance-level InfoNCE for retrieval: ``build_loss("clip+codebook", codebook_weight=0.5)`` is
``ClipLoss + 0.5 * CodebookLoss`` (a :class:`dualencoder.losses.CombinedLoss`).

Teacher-student variant (``teacher=True``): the targets q come from an exponential moving average
of the student (:class:`EMATeacher`), DINO/mean-teacher style, which makes them change slowly.
The teacher copies the prototypes and, when the model has them, its projection heads
(``visual_projection`` / ``text_projection``); forward hooks on the student heads record their
inputs (the pooled tower features), so the teacher re-embeds the same batch with its own heads.
Without heads (e.g. a loss used on bare embeddings) the teacher prototypes score the detached
student embeddings.

What the training loop must do (doc for run_contrastive.py):

* build it with the embedding width: ``build_loss("clip+codebook", embed_dim=config.projection_dim,
  ...)`` (the prototypes are created in ``__init__``; lazy parameters would miss the optimiser).
  In a config: ``loss_type: clip+codebook`` and ``loss_kwargs: {embed_dim: <projection_dim>, ...}``.
* the prototypes are ``nn.Parameter`` s of the loss, i.e. of ``model.loss_fn``, so they are saved
  with the model and land in the optimiser's heads group (names start with ``loss_fn``).
* after every real optimiser step (``accelerator.sync_gradients``) the training loop calls
  ``model.loss_fn.after_optimizer_step(unwrapped_model)`` (a ``CombinedLoss`` passes it on to its
  terms). Only the teacher variant needs it; without the call the teacher variant falls back to
  the student's own targets.
* the teacher is deliberately not a registered sub-module: not optimised, not in the state dict
  (so checkpoints keep the same keys); after a resume it restarts as a copy of the student.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualencoder.distributed import world_info

__all__ = ["CodebookLoss", "EMATeacher", "sinkhorn"]


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, distributed: bool = False) -> torch.Tensor:
    """Balanced soft assignments [B, K] from similarity scores [B, K] (Sinkhorn-Knopp, as in SwAV).

    Starts from exp(scores / epsilon) and alternately rescales so every prototype receives 1/K of
    the mass and every sample 1/B, ``iterations`` times. The result is scaled so each row (sample)
    sums to 1 exactly and each column (prototype) to about B/K. With ``distributed`` and several
    processes the prototype sums are all-reduced, so the balance is over the global batch.
    """
    world = world_info()[1] if distributed else 1
    shift = scores.detach().float().max()  # for stability only: Sinkhorn is invariant to a constant shift
    if world > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)  # the same shift on every process
    q = ((scores.float() - shift) / epsilon).exp().T  # [K, B]
    num_prototypes, batch = q.shape
    total_batch = batch * world
    total = q.sum()
    if world > 1:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(per_prototype)
        q /= per_prototype
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= total_batch
    return (q * total_batch).T


class EMATeacher:
    """An exponential-moving-average copy of a module: ``p_t <- d * p_t + (1 - d) * p_s``.

    Holds a deep copy (gradients off, eval mode). Not an ``nn.Module`` on purpose: kept as an
    attribute of a module it is neither registered, optimised nor saved. Buffers (e.g. batch-norm
    statistics) are copied from the student as they are.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        teacher_params = dict(self.module.named_parameters())
        for name, param in student.named_parameters():
            teacher_params[name].mul_(decay).add_(param.detach().to(teacher_params[name].dtype), alpha=1.0 - decay)
        teacher_buffers = dict(self.module.named_buffers())
        for name, buffer in student.named_buffers():
            teacher_buffers[name].copy_(buffer)

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


class _Codebook(nn.Module):
    """The K learnable prototypes [K, D], used unit-normalised."""

    def __init__(self, num_prototypes: int, embed_dim: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, embed_dim), dim=-1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each (normalised) embedding to each prototype: [B, K]."""
        return embeds @ F.normalize(self.prototypes, dim=-1).T.to(embeds.dtype)


def _run(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    param = next(head.parameters(), None)
    return head(features if param is None else features.to(param.dtype))


class CodebookLoss(nn.Module):
    """Swapped prediction of Sinkhorn-balanced prototype assignments across modalities.

    Options (keyword): ``embed_dim`` (required: the model's ``projection_dim``), ``num_prototypes``
    K (default 128; keep it within a few times the batch size, as each batch is balanced over all
    K), ``temperature`` tau of the predictions (0.1), ``sinkhorn_iterations`` (3),
    ``sinkhorn_epsilon`` (0.05), ``teacher`` (False: SwAV-style targets from the student itself),
    ``ema_decay`` (0.99, teacher variant). The weight against InfoNCE is build_loss's
    ``codebook_weight``. ``gather`` (default True): balance over the global batch when running
    distributed; ``gather_with_grad`` and ``local_loss`` are accepted for
    build_loss's shared options and have no effect (the term is per row; only Sinkhorn is global).
    ``logit_scale``, ``logit_bias`` and ``image_ids`` are not used.
    """

    def __init__(self, embed_dim: int | None = None, *, num_prototypes: int = 128, temperature: float = 0.1,
                 sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05, teacher: bool = False,
                 ema_decay: float = 0.99, gather: bool = True, gather_with_grad: bool = True,
                 local_loss: bool = False) -> None:
        super().__init__()
        if embed_dim is None:
            raise ValueError("CodebookLoss needs embed_dim, the model's projection_dim (e.g. "
                             "build_loss('clip+codebook', embed_dim=config.projection_dim))")
        if num_prototypes < 2 or temperature <= 0 or sinkhorn_epsilon <= 0 or sinkhorn_iterations < 1:
            raise ValueError("need num_prototypes >= 2, temperature > 0, sinkhorn_epsilon > 0, sinkhorn_iterations >= 1")
        self.embed_dim, self.num_prototypes = int(embed_dim), int(num_prototypes)
        self.temperature, self.sinkhorn_iterations, self.sinkhorn_epsilon = temperature, sinkhorn_iterations, sinkhorn_epsilon
        self.use_teacher, self.ema_decay, self.gather = teacher, ema_decay, gather
        self.codebook = _Codebook(self.num_prototypes, self.embed_dim)
        # Not registered (see EMATeacher): created from the student at the first optimiser step.
        self.__dict__["_teacher"] = None
        self.__dict__["_pooled"] = {}

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_prototypes={self.num_prototypes}, temperature={self.temperature}, "
                f"sinkhorn_iterations={self.sinkhorn_iterations}, sinkhorn_epsilon={self.sinkhorn_epsilon}, "
                f"teacher={self.use_teacher}, ema_decay={self.ema_decay}")

    @property
    def prototypes(self) -> nn.Parameter:
        return self.codebook.prototypes

    # ------------------------------------------------------------------ targets
    def _codes(self, scores: torch.Tensor) -> torch.Tensor:
        return sinkhorn(scores.detach(), self.sinkhorn_iterations, self.sinkhorn_epsilon, distributed=self.gather)

    @torch.no_grad()
    def _teacher_scores(self, image_embeds, text_embeds):
        """Teacher's [B, K] scores for both modalities, or None when there is no teacher yet."""
        teacher = self._teacher
        if teacher is None:
            return None
        parts = teacher.module
        image, text = image_embeds.detach(), text_embeds.detach()
        pooled = self._pooled
        if "image_head" in parts and pooled.get("image") is not None and pooled.get("text") is not None \
                and pooled["image"].shape[0] == image.shape[0] and pooled["text"].shape[0] == text.shape[0]:
            image = F.normalize(_run(parts["image_head"], pooled["image"]).to(image.dtype), dim=-1)
            text = F.normalize(_run(parts["text_head"], pooled["text"]).to(text.dtype), dim=-1)
        return parts["codebook"](image), parts["codebook"](text)

    # ------------------------------------------------------------------ loss
    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale=None, logit_bias=None,
                image_ids=None) -> torch.Tensor:
        if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape or image_embeds.shape[1] != self.embed_dim:
            raise ValueError(f"expected image and text embeddings of shape [B, {self.embed_dim}], got "
                             f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
        image_scores, text_scores = self.codebook(image_embeds), self.codebook(text_embeds)
        teacher_scores = self._teacher_scores(image_embeds, text_embeds) if self.use_teacher else None
        target_image, target_text = teacher_scores if teacher_scores is not None else (image_scores, text_scores)
        q_image, q_text = self._codes(target_image), self._codes(target_text)
        log_p_image = (image_scores / self.temperature).float().log_softmax(dim=-1)
        log_p_text = (text_scores / self.temperature).float().log_softmax(dim=-1)
        return -0.5 * ((q_text * log_p_image).sum(-1).mean() + (q_image * log_p_text).sum(-1).mean())

    # ------------------------------------------------------------------ teacher
    def after_optimizer_step(self, model: nn.Module | None = None) -> None:
        """EMA update of the teacher (teacher variant only); call after every optimiser step.

        ``model`` (unwrapped) lends its projection heads to the teacher the first time; without
        ``visual_projection`` / ``text_projection`` the teacher holds the prototypes only.
        """
        if not self.use_teacher:
            return
        if self._teacher is None:
            parts = nn.ModuleDict({"codebook": self.codebook})
            heads = (getattr(model, "visual_projection", None), getattr(model, "text_projection", None))
            with_heads = all(isinstance(head, nn.Module) for head in heads)
            if with_heads:
                parts["image_head"], parts["text_head"] = heads
            self.__dict__["_teacher"] = EMATeacher(parts)
            if with_heads:  # hooks after the copy, so the teacher's heads do not carry them
                self._record_inputs(heads[0], "image")
                self._record_inputs(heads[1], "text")
            self.__dict__["_student"] = parts  # the same modules, by reference: what the teacher follows
        else:
            self._teacher.update(self.__dict__["_student"], self.ema_decay)

    def _record_inputs(self, head: nn.Module, key: str) -> None:
        pooled = self._pooled

        def hook(module, args):
            pooled[key] = args[0].detach() if args else None

        head.register_forward_pre_hook(hook)
