"""Which parameters train: freezing towers (whole or all but the top blocks) and a report.

LoRA adapters themselves are part of the model (see `DualEncoderConfig.lora_*`), because a
checkpoint with unmerged adapters must rebuild them on load; deciding what else trains is a
training choice and lives here.
"""

from __future__ import annotations

from torch import nn

TOWERS = ("vision", "text")


def _tower(model: nn.Module, tower: str) -> nn.Module:
    if tower not in TOWERS:
        raise ValueError(f"Unknown tower {tower!r}; expected one of {TOWERS}.")
    return model.vision_model if tower == "vision" else model.text_model


def _blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's sequence of repeated blocks, outermost first: timm `blocks`, HF `encoder.layer`."""
    base = tower.get_base_model() if hasattr(tower, "get_base_model") else tower
    for path in ("blocks", "encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            # timm EfficientNet groups blocks by stage: flatten the stages into one list.
            flat = []
            for block in module:
                flat.extend(block if isinstance(block, nn.Sequential) else [block])
            return flat
    raise ValueError(f"Cannot find the repeated blocks of {type(base).__name__} to unfreeze the top ones.")


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
    blocks = _blocks(module)
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


def tower_is_frozen(model: nn.Module, tower: str) -> bool:
    """True when no parameter of the tower trains (so its features can be cached)."""
    return not any(param.requires_grad for param in _tower(model, tower).parameters())


def train_mode(model: nn.Module) -> None:
    """`model.train()`, except that a frozen tower stays in eval mode.

    A frozen tower must compute what its cached features hold: with BatchNorm in train mode it
    would normalise with batch statistics and keep updating its running averages, so the
    "frozen" weights would drift and the un-cached path would differ from the cached one.
    """
    model.train()
    for tower in TOWERS:
        if tower_is_frozen(model, tower):
            _tower(model, tower).eval()


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
