"""Sharded weights (FSDP2 through Accelerate): what changes when no process holds the whole model.

Under FSDP2 (`configs/accelerate/fsdp.yaml`) each process keeps a shard of every parameter, and a
module gathers its whole parameters only inside its own forward. The loop reads weights outside a
forward in three places: evaluation (`get_image_features`...), the best-model copy and the export.
They take the model from :class:`WholeModel`: without sharding, the unwrapped model itself (nothing
changes, nothing is copied); with sharding, a plain copy into which the whole weights are gathered,
every process taking part (so every process calls it at the same point), before the main process
writes anything. The copy costs one more model's memory per process: affordable while the weights fit
on one device, which the models trained here do; FSDP then saves the gradients' and optimiser state's
memory (doc/SCALING.md).

FSDP2 cannot shard a 0-dimensional parameter (the temperature and bias are): :func:`prepare_for_sharding`
holds them as 1-element vectors while the run is sharded; the whole copy keeps their own shape.

The other sharding schemes are refused at the start (:func:`sharding_problem`): FSDP1 wraps the model
in a module whose own parameters are flattened and sharded, which evaluation outside its forward
cannot read; DeepSpeed ZeRO-3 likewise. ZeRO-1/2 keep the weights whole and need nothing here.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from accelerate.utils import DistributedType


def is_sharded(accelerator) -> bool:
    """True when no process holds the whole model's weights (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def sharding_problem(accelerator) -> Optional[str]:
    """One line saying what to change when the launch shards weights in a way this loop cannot read, else None."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        return ("FSDP version 1 wraps the model so that evaluation and the best-model copy cannot read its weights; "
                "set `fsdp_version: 2` in the Accelerate config (configs/accelerate/fsdp.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            return ("DeepSpeed ZeRO-3 shards the weights, which evaluation and the best-model copy read whole; use "
                    "ZeRO stage 2 or FSDP2 (configs/accelerate/fsdp.yaml)")
    return None


def prepare_for_sharding(model: torch.nn.Module) -> list[str]:
    """Make every 0-dim parameter a 1-element vector (FSDP2 refuses scalars); call before the optimiser is made.

    Returns their names. Broadcasting keeps every use of them unchanged (`scale * similarities`).
    """
    names = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner = model.get_submodule(name.rpartition(".")[0])
            vector = torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
            setattr(owner, name.rpartition(".")[2], vector)
            names.append(name)
    return names


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: a sharded one (a DTensor) gathered from every process, which must all call this."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class WholeModel:
    """The model with every weight in place, for what reads weights outside a forward (see the module docstring).

    Build it before `accelerator.prepare` (and before `prepare_for_sharding`): under sharding it keeps a copy of
    the unprepared model, whose weights each call replaces with the gathered ones.
    """

    def __init__(self, accelerator, model: torch.nn.Module):
        self.accelerator = accelerator
        self.copy = copy.deepcopy(model) if is_sharded(accelerator) else None
        self.prepared = None

    def track(self, prepared: torch.nn.Module) -> None:
        """The model as `accelerator.prepare` returned it."""
        self.prepared = prepared

    def __call__(self) -> torch.nn.Module:
        """The unwrapped model, or under sharding the copy with the current weights: every process must call it."""
        if self.copy is None:
            return self.accelerator.unwrap_model(self.prepared)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every process gets the whole tensors (each evaluates, as without sharding)
        gathered = get_model_state_dict(self.prepared, options=StateDictOptions(full_state_dict=True))
        own = self.copy.state_dict()
        self.copy.load_state_dict({name: value.reshape(own[name].shape) for name, value in gathered.items()})
        # Buffers are not sharded, nor synchronised as DistributedDataParallel does: each process's BatchNorm
        # statistics come from its own batches. The main process's are taken, so every process evaluates the
        # same model (and agrees on which epoch is best) and the saved model is the one evaluated.
        for buffer in self.copy.buffers():
            torch.distributed.broadcast(buffer, src=0)
        return self.copy
