"""One optimiser step of the contrastive loop, shared by run_contrastive.py and the benchmarks.

A step is forward, the loss on the model's outputs, backward, gradient clipping, then the optimiser
and scheduler steps. The loss lives outside the model, as in open_clip: the model embeds, the loss
(`dualencoder.losses`) scores the embeddings, so a loss with parameters of its own (a codebook) is a
module the optimiser is given explicitly, and any loss trains any saved model. A step never
waits for the GPU. Reading a loss's value on the host (`loss.item()`, `if not torch.isfinite(loss)`)
blocks the host until the GPU has finished the forward pass, so the host cannot queue the next
kernels while the GPU works. Instead each step folds "was this loss finite?" into a flag that stays
on the device. The host reads the flag in `check()`: whenever the caller asks (before logging a loss,
before anything is saved), and every `check_every` calls if that is set. On CPU the read costs
nothing, so there the caller checks every step.
"""

from __future__ import annotations

from typing import Optional

import torch


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def batch_loss(loss_fn, outputs, image_ids=None) -> torch.Tensor:
    """`loss_fn` (a `dualencoder.losses` loss) on a `DualEncoderOutput`: its embeddings, temperature and bias.

    A loss may ignore the temperature (triplet) or the bias (CLIP). Both stay in the graph with a zero
    gradient: DistributedDataParallel fails on a trainable parameter that gets no gradient at all.
    """
    loss = loss_fn(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, logit_bias=outputs.logit_bias,
                   image_ids=image_ids)
    scalars = [t for t in (outputs.logit_scale, outputs.logit_bias) if t is not None and t.requires_grad]
    return loss + 0.0 * sum(t.sum() for t in scalars)


class TrainStep:
    """`step(batch)` runs one micro-batch and returns the mean loss of the optimiser step's micro-batches so far
    (detached, still on the device): at the call that steps the optimiser, the loss of that whole step, not of
    its last micro-batch.

    `loss_fn` scores the model's outputs (`batch_loss`); `extras` are keyword arguments every forward
    gets (e.g. which block a cached prefix ends at). After each real optimiser step the loss's own
    `after_optimizer_step(model)` runs, when it has one (e.g. an EMA teacher update).
    `diverged_hint` ends the error message raised when a loss was not finite. `global_step` is the
    number of optimiser steps already taken (a resumed run's), so errors name the run's own step.
    """

    def __init__(self, accelerator, model, loss_fn, optimizer, scheduler, *, max_grad_norm: float = 1.0,
                 extras: Optional[dict] = None, check_every: int = 0, diverged_hint: str = "", global_step: int = 0):
        self.accelerator, self.model, self.loss_fn = accelerator, model, loss_fn
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm, self.extras = max_grad_norm, dict(extras or {})
        self.after_optimizer_step = getattr(accelerator.unwrap_model(loss_fn), "after_optimizer_step", None)
        self.diverged_hint = diverged_hint
        self.check_every = check_every  # 0: only when the caller calls check()
        self.global_step = global_step  # optimiser steps taken
        self.calls = 0  # forward passes run by this object (micro-batches, with gradient accumulation)
        self._first_bad = None  # device tensor: the first optimiser step whose loss was not finite, or 0
        self._losses = []  # this optimiser step's micro-batch losses (on the device)

    def __call__(self, batch: dict) -> torch.Tensor:
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss = batch_loss(self.loss_fn, self.model(**batch, **self.extras), batch.get("image_ids"))
            self._note_finite(loss.detach(), self.global_step + 1)
            self._losses.append(loss.detach())
            step_loss = torch.stack(self._losses).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                self.global_step += 1
                self._losses = []
                unwrapped = accelerator.unwrap_model(self.model)
                if hasattr(unwrapped, "clamp_logit_scale_"):  # the temperature stays at or below its cap
                    unwrapped.clamp_logit_scale_()
                if self.after_optimizer_step is not None:
                    self.after_optimizer_step(unwrapped)
        self.calls += 1
        if self.check_every and self.calls % self.check_every == 0:
            self.check()
        return step_loss

    def parameters(self) -> list:
        """What the step trains: the model's parameters, then the loss's own (e.g. a codebook)."""
        return [*self.model.parameters(), *self.loss_fn.parameters()]

    def _note_finite(self, loss: torch.Tensor, step) -> None:
        """Remember `step` (an int, or a device tensor) on the device if this loss is the first that is not finite
        (no host sync). The flag is updated in place: a captured CUDA graph (`GraphedTrainStep`) that runs this
        keeps writing the tensor that `check` reads."""
        if self._first_bad is None:
            self._first_bad = torch.zeros((), dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_bad == 0)
        self._first_bad.copy_(torch.where(bad, step, self._first_bad))

    def check(self) -> None:
        """Raise TrainingDiverged if any loss so far was not finite (this waits for the GPU)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first:
            raise TrainingDiverged(f"the loss was not finite at step {first}. {self.diverged_hint}".strip())


COMPILE_SCOPES = ("model", "blocks")


def compile_in_place(model: torch.nn.Module, scope: str = "model", backend: str = "inductor",
                     mode: Optional[str] = None) -> list[str]:
    """torch.compile `model` in place; returns the names of the modules compiled.

    `model` compiles the whole forward (and, through AOTAutograd, its backward) as few graphs.
    `blocks` compiles each repeated block instead (each child of a ModuleList whose children are all
    of one class: transformer layers; timm's CNN stages are nn.Sequential and stay eager). Identical
    blocks share one compiled graph, so compiling takes seconds, and the glue between blocks (embeddings, pooling, heads, loss) stays
    eager. Compiling in place (`Module.compile`) keeps parameter names, so checkpoints and
    `save_pretrained` are unchanged. `mode` is torch.compile's (e.g. "reduce-overhead": CUDA graphs).
    """
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}: expected one of {', '.join(COMPILE_SCOPES)}")
    if scope == "model":
        model.compile(backend=backend, mode=mode)
        return [""]
    compiled = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            for index, block in enumerate(module):
                block.compile(backend=backend, mode=mode)
                compiled.append(f"{name}.{index}")
    return compiled
