"""Which parameters train: freezing towers (whole or all but the top blocks) and a report.

LoRA adapters themselves are part of the model (see `DualEncoderConfig.lora_*`), because a
checkpoint with unmerged adapters must rebuild them on load; deciding what else trains is a
training choice and lives here.
"""

from __future__ import annotations

from torch import nn

from backbones_dualencoder import tower_blocks

TOWERS = ("vision", "text")


def _tower(model: nn.Module, tower: str) -> nn.Module:
    if tower not in TOWERS:
        raise ValueError(f"Unknown tower {tower!r}; expected one of {TOWERS}.")
    return model.vision_model if tower == "vision" else model.text_model


def set_tower_trainable(model: nn.Module, tower: str, mode: str) -> None:
    """Set what trains in one tower.

    Modes: `full` (every backbone weight), `frozen` (nothing; LoRA adapters, if any, still
    train), `top:N` (only the last N repeated blocks, plus the final norm/head layers after them).
    """
    module = _tower(model, tower)
    if mode == "full":
        for name, param in module.named_parameters():
            param.requires_grad = True
        return
    lora = [param for name, param in module.named_parameters() if "lora_" in name]
    for param in module.parameters():
        param.requires_grad = False
    for param in lora:
        param.requires_grad = True
    if mode == "frozen":
        return
    if not mode.startswith("top:"):
        raise ValueError(f"Unknown {tower} training mode {mode!r}; use 'full', 'frozen' or 'top:N'.")
    count = int(mode.split(":", 1)[1])
    blocks = tower_blocks(module)
    if not 0 < count <= len(blocks):
        raise ValueError(f"{tower} tower has {len(blocks)} blocks; cannot unfreeze the top {count}.")
    first = blocks[-count]
    seen_first = False
    # Everything registered after the first unfrozen block (later blocks, final conv/norm) trains.
    for module_ in module.modules():
        if module_ is first:
            seen_first = True
        if seen_first:
            for param in module_.parameters(recurse=False):
                param.requires_grad = True


def frozen_prefix_depth(model: nn.Module, tower: str) -> int:
    """How many leading blocks of a tower (with everything before them) have nothing to train.

    Their output is fixed, so it can be computed once per input (the prefix cache). 0 when the
    stem trains, or when the whole tower is frozen (cache its pooled output instead). LoRA adapters
    count as trained weights of the block they sit in: adapters in every block leave no prefix;
    adapters in the last N blocks only (`lora_vision_blocks` / `lora_text_blocks`) leave the rest.
    """
    module = _tower(model, tower)
    if tower_is_frozen(model, tower):
        return 0
    blocks = tower_blocks(module)
    first_block_params = {id(p) for p in blocks[0].parameters()}
    for param in module.parameters():  # registration order: the stem comes before block 0
        if id(param) in first_block_params:
            break
        if param.requires_grad:
            return 0
    depth = 0
    while depth < len(blocks) and not any(p.requires_grad for p in blocks[depth].parameters()):
        depth += 1
    return depth


def tower_is_frozen(model: nn.Module, tower: str) -> bool:
    """True when no parameter of the tower trains (so its features can be cached)."""
    return not any(param.requires_grad for param in _tower(model, tower).parameters())


def train_mode(model: nn.Module, freeze_batchnorm: bool = False) -> None:
    """`model.train()`, except that a frozen tower, and any BatchNorm with frozen weights, stay in eval mode.

    `freeze_batchnorm` keeps every BatchNorm in eval mode (its affine weights still train), so the
    pretrained running statistics are used and kept, as is usual when fine-tuning a CNN on little data.

    A frozen tower must compute what its cached features hold: with BatchNorm in train mode it
    would normalise with batch statistics and keep updating its running averages, so the
    "frozen" weights would drift and the un-cached path would differ from the cached one. For the
    same reason the frozen lower blocks (and embeddings) of a `top:N` tower stay in eval mode:
    they compute exactly what the prefix cache holds, without dropout.
    """
    model.train()
    for tower in TOWERS:
        if tower_is_frozen(model, tower):
            _tower(model, tower).eval()
        depth = frozen_prefix_depth(model, tower)
        if depth:  # frozen lower blocks compute fixed features, as their cached output does: no dropout
            module = _tower(model, tower)
            for block in tower_blocks(module)[:depth]:
                block.eval()
            if getattr(module, "embeddings", None) is not None:
                module.embeddings.eval()
    for module in model.modules():  # the frozen blocks of a `top:N` tower, too
        frozen = freeze_batchnorm or not any(p.requires_grad for p in module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
            module.eval()


def parameter_report(model: nn.Module) -> dict:
    """Trainable vs total parameters, overall and per part (vision, text, heads+scale)."""
    parts = {"vision": model.vision_model, "text": model.text_model}
    report = {}
    for part, module in parts.items():
        params = list(module.parameters())
        report[part] = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params),
        }
    tower_ids = {id(p) for module in parts.values() for p in module.parameters()}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    report["heads"] = {"trainable": sum(p.numel() for p in rest if p.requires_grad), "total": sum(p.numel() for p in rest)}
    report["all"] = {key: sum(report[part][key] for part in ("vision", "text", "heads")) for key in ("trainable", "total")}
    return report


def format_parameter_report(report: dict) -> str:
    """One line per part: `vision: 1,234 / 5,678 trainable (21.7%)`."""
    lines = []
    for part, counts in report.items():
        share = 100.0 * counts["trainable"] / max(counts["total"], 1)
        lines.append(f"{part:>6}: {counts['trainable']:,} / {counts['total']:,} trainable ({share:.2f}%)")
    return "\n".join(lines)
