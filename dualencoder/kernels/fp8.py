"""fp8 matmuls for the towers' Linear layers, through torchao's float8 training (`convert_to_float8_training`).

Why: an H200's fp8 tensor cores have twice the bf16 FLOP/s, and ViT-B/16 + a BERT-6 spend most of a step in
the Linear layers of their blocks. torchao swaps each chosen `nn.Linear` for a `Float8Linear` that scales
its input, weight and output gradient to float8 (dynamic, per tensor) for the three matmuls of a step and
keeps the weights in their own dtype, so the optimiser, checkpoints and parameter names are unchanged.
torchao's own advice is to pair it with torch.compile (the scaling is element-wise work that compile
fuses) and to leave small layers in bf16, where the casts cost more than the faster matmul saves.

Only the towers are converted; the projection heads, the poolers (one row per sample: a small matmul) and
layers that are not plain `nn.Linear` (LoRA's adapters, the fused `LinearBiasGelu`) stay as they are. On
a CPU torchao's emulation runs the same casts with float32 matmuls, which is how this is tested.
"""

from __future__ import annotations

from torch import nn

MIN_FEATURES = 256  # below this width a layer's matmul is too small for fp8 to pay (torchao's advice)
FP8_MULTIPLE = 16  # fp8 matmuls (torch._scaled_mm) need both dimensions divisible by 16
SKIPPED_NAMES = ("pooler",)


def fp8_worthy(module: nn.Module, name: str, min_features: int = MIN_FEATURES) -> bool:
    """Whether the layer `name` should run its matmuls in fp8: a plain nn.Linear, not a pooler, with both
    widths multiples of 16 and at least `min_features`."""
    if type(module) is not nn.Linear or any(part in SKIPPED_NAMES for part in name.split(".")):
        return False
    widths = (module.in_features, module.out_features)
    return all(width % FP8_MULTIPLE == 0 and width >= min_features for width in widths)


def use_fp8_matmuls(model: nn.Module, min_features: int = MIN_FEATURES, emulate: bool = None) -> dict:
    """Convert the fp8-worthy Linear layers of both towers (`vision_model`, `text_model`) in place; returns the
    converted layers' names per tower. `emulate` (default: when the model is not on a GPU) runs torchao's
    float32 emulation, for CPUs and tests."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ImportError("fp8 training needs torchao (pip install torchao; benchmarks/prepare_gpu_wheels.sh "
                          "carries a wheel to the GPU machine)") from error
    if emulate is None:
        emulate = next(model.parameters()).device.type != "cuda"
    config = Float8LinearConfig(emulate=emulate)
    converted = {}
    for tower in ("vision", "text"):
        module = getattr(model, f"{tower}_model")
        names = [name for name, child in module.named_modules() if fp8_worthy(child, name, min_features)]
        if names:
            chosen = set(names)
            convert_to_float8_training(module, module_filter_fn=lambda _, name: name in chosen, config=config)
        converted[tower] = names
    return converted
