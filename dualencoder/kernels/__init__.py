"""Speed levers that change how a model runs, not what it computes (up to rounding) nor its weights' names:
fused Triton kernels (`fuse.py`, kernels in `triton_fused.py`) and fp8 matmuls through torchao (`fp8.py`).
Each imports its optional dependency (triton, torchao) only when its lever is on."""

from __future__ import annotations


def apply_levers(model, fused_kernels: str = "off", fp8: bool = False) -> dict:
    """Apply the levers to a DualEncoderModel in place (after it is on its device), fused kernels first: the fp8
    conversion leaves the fused Linear + GELU layers alone. Returns what each lever changed, per tower."""
    changed = {}
    if fused_kernels != "off":
        from dualencoder.kernels.fuse import use_fused_kernels

        changed["fused_kernels"] = use_fused_kernels(model, fused_kernels)
    if fp8:
        from dualencoder.kernels.fp8 import use_fp8_matmuls

        changed["fp8"] = {tower: len(names) for tower, names in use_fp8_matmuls(model).items()}
    return changed
