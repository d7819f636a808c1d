"""AdamW with one learning rate per kind of parameter, and a cosine schedule with warm-up."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model, *, backbone_lr: float, lora_lr: float, head_lr: float, scale_lr: float,
                     weight_decay: float, vision_backbone_lr: float | None = None, loss=None) -> list[dict]:
    """Split trainable parameters into backbone / LoRA / heads / temperature groups.

    The loss lives outside the model; its own parameters (a codebook's prototypes) join the heads.

    `vision_backbone_lr` (default: `backbone_lr`) gives the vision tower's own weights their own
    rate: the few top blocks of a small CNN tuned from a cache want a larger step than a
    pretrained text encoder fine-tuned as a whole. Norms, biases, the logit scale and bias get no
    weight decay (decaying the temperature would pull it towards 1, i.e. towards a very soft softmax).
    """
    groups = {}
    loss_parameters = [(f"loss_fn.{name}", param) for name, param in loss.named_parameters()] if loss is not None else []
    for name, param in [*model.named_parameters(), *loss_parameters]:
        if not param.requires_grad:
            continue
        if name.startswith(("logit_scale", "logit_bias")):
            kind, lr = "temperature", scale_lr
        elif "lora_" in name:
            kind, lr = "lora", lora_lr
        elif name.startswith(("visual_projection", "text_projection", "loss_fn")):
            kind, lr = "heads", head_lr
        elif name.startswith("vision_model") and vision_backbone_lr is not None:
            kind, lr = "vision_backbone", vision_backbone_lr
        else:
            kind, lr = "backbone", backbone_lr
        decay = 0.0 if (param.ndim < 2 or kind == "temperature") else weight_decay
        key = (kind, decay)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": decay, "name": f"{kind}{'' if decay else '_no_decay'}"})
        groups[key]["params"].append(param)
    return list(groups.values())


def make_optimizer(model, **group_options) -> torch.optim.AdamW:
    groups = parameter_groups(model, **group_options)
    # The fused kernel (CPU and CUDA) does the whole update in one pass; it needs float parameters.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up to each group's learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
