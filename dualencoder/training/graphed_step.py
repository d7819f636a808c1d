"""The whole training step as one CUDA graph: forward, loss, backward, clipping and the optimiser's update.

Why: compiled blocks with CUDA graphs (`--compile blocks-graphs`) still leave the glue between blocks, the
loss, the gradient clipping and AdamW's update to be launched kernel by kernel from Python; on an H200 at
ViT-B/16 sizes the GPU then waits on the host between them. Capturing the whole step once and replaying it
launches everything with one call. The price: every step must have the same shapes (a fixed batch size and
text length: inputs are copied into static buffers) and nothing in the step may wait for the host.

What that asks of the parts (PyTorch's "whole network capture" recipe):
- a few eager steps first (on a side stream), so AdamW has its state and cuDNN/cuBLAS their workspaces;
- AdamW `capturable`, and each learning rate a device tensor that the scheduler updates in place between
  replays (a Python float would be baked into the graph);
- autocast without its weight-cast cache (`AutocastKwargs(cache_enabled=False)` on the Accelerator), as
  torch.cuda.make_graphed_callables requires;
- the divergence flag and the step counter it records kept on the device and updated in place.
Off CUDA there are no graphs: after the same warm-up the same body runs eagerly on the same static buffers,
so the bookkeeping (static inputs, learning-rate tensors, the flag) is tested on a CPU; the capture is not.
"""

from __future__ import annotations

import torch

from dualencoder.training.step import TrainStep, batch_loss


class GraphedTrainStep(TrainStep):
    """`step(batch)` as TrainStep's (no gradient accumulation, no loss `extras` nor `after_optimizer_step`), with
    the step captured as one CUDA graph after `warmup` eager steps. Returns the loss (a static device tensor
    that the next replay overwrites: clone it to keep it)."""

    def __init__(self, accelerator, model, loss_fn, optimizer, scheduler, *, max_grad_norm: float = 1.0,
                 warmup: int = 3, **kwargs):
        super().__init__(accelerator, model, loss_fn, optimizer, scheduler, max_grad_norm=max_grad_norm, **kwargs)
        if accelerator.gradient_accumulation_steps != 1 or self.extras or self.after_optimizer_step is not None:
            raise ValueError("a graphed step takes one batch per optimiser step, no forward extras and no loss with "
                             "an after-optimiser-step hook")
        handler = getattr(accelerator, "autocast_handler", None)
        if accelerator.device.type == "cuda" and accelerator.mixed_precision != "no" and (
                handler is None or handler.cache_enabled is not False):
            raise ValueError("capturing autocast needs Accelerator(kwargs_handlers=[AutocastKwargs(cache_enabled=False)])")
        self.warmup = warmup
        self.unwrapped = accelerator.unwrap_model(model)
        self.static_batch = None
        self.replay = None  # set once captured: runs the step's kernels again on the static buffers
        self.static_loss = None

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.static_batch is None:
            self._prepare(batch)
        for key, value in batch.items():
            if value.shape != self.static_batch[key].shape:
                raise ValueError(f"a graphed step needs fixed shapes: {key} is {tuple(value.shape)}, the graph's "
                                 f"{tuple(self.static_batch[key].shape)}")
            self.static_batch[key].copy_(value, non_blocking=True)
        if self.replay is None and self.calls >= self.warmup:
            self.replay = self._capture()
        loss = self._eager() if self.replay is None else self.replay()
        self.scheduler.step()
        self._learning_rates_to_tensors()  # a scheduler that wrote floats back: the graph reads the tensors
        self.global_step += 1
        self.calls += 1
        if self.check_every and self.calls % self.check_every == 0:
            self.check()
        return loss

    def _prepare(self, batch: dict) -> None:
        """Static input buffers, device-side flag and step counter, capturable AdamW with tensor learning rates."""
        device = self.accelerator.device
        self.static_batch = {key: value.detach().clone() for key, value in batch.items()}
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)
        self._device_step = torch.full((), self.global_step, dtype=torch.long, device=device)
        self._lr_tensors = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                            for group in self.optimizer.param_groups]
        self._learning_rates_to_tensors()
        if device.type == "cuda":
            for group in self.optimizer.param_groups:
                group["capturable"] = True

    def _learning_rates_to_tensors(self) -> None:
        for group, tensor in zip(self.optimizer.param_groups, self._lr_tensors):
            if group["lr"] is not tensor:
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor

    def _body(self) -> torch.Tensor:
        """Forward, loss, backward, clipping, update, temperature clamp: nothing that waits for the host."""
        loss = batch_loss(self.loss_fn, self.model(**self.static_batch), self.static_batch.get("image_ids"))
        self._device_step.add_(1)
        self._note_finite(loss.detach(), self._device_step)
        self.accelerator.backward(loss)
        if self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if hasattr(self.unwrapped, "clamp_logit_scale_"):
            self.unwrapped.clamp_logit_scale_()
        return loss.detach()

    def _eager(self) -> torch.Tensor:
        if self.accelerator.device.type != "cuda":
            loss = self._body()
        else:  # warm-up off the default stream, as capture wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._body()
            torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _capture(self):
        """A callable that runs the captured step: a CUDA graph's replay, or (off CUDA) the eager body."""
        if self.accelerator.device.type != "cuda":
            return self._eager
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward then writes fresh gradients each replay
        with torch.cuda.graph(graph):
            self.static_loss = self._body()

        def replay() -> torch.Tensor:
            graph.replay()
            return self.static_loss

        return replay
