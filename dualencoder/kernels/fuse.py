"""Put the fused Triton kernels (`triton_fused.py`) into a model's towers, in place.

Three swaps, each keeping the parameters (the same tensors, under the same names), so checkpoints,
`save_pretrained` and the optimiser's parameter groups are untouched:

- every `nn.LayerNorm` -> `FusedLayerNorm` (one kernel each way);
- a Linear followed by an exact GELU inside one module (ViT's `ViTMLP.fc1`/`activation_fn`, BERT's
  `BertIntermediate.dense`/`intermediate_act_fn`, DistilBERT's `FFN.lin1`/`activation`) -> a bias-free
  matmul then one bias + GELU kernel (`LinearBiasGelu`); the activation becomes an `nn.Identity`;
- BERT-style output modules (`dense`, `dropout`, `LayerNorm`, called with the residual: `BertSelfOutput`,
  `BertOutput`, RoBERTa's and MiniLM's alike) -> `ResidualLayerNormOutput`, whose LayerNorm adds the residual
  inside its kernel.

ViT and DistilBERT add their residuals in the layer's own forward, which this does not rewrite: there the
add stays a separate kernel. Linear layers that LoRA wraps (peft) keep their own forward. timm towers keep
their modules (a timm ViT's norms are `nn.LayerNorm` and are swapped; its `Mlp` is not).
"""

from __future__ import annotations

import torch
from torch import nn

# (linear, activation) attribute pairs of one module whose forward is activation(linear(x))
LINEAR_THEN_ACTIVATION = (("fc1", "activation_fn"), ("dense", "intermediate_act_fn"), ("lin1", "activation"))
BACKENDS = ("off", "triton")


def _kernels():
    from dualencoder.kernels import triton_fused  # imports triton: only when a swapped module runs

    return triton_fused


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward is one Triton kernel (and one for the backward). Its output has the input's
    dtype; under autocast torch's returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels().layer_norm(x, self.weight, self.bias, self.eps)


class LinearBiasGelu(nn.Linear):
    """GELU(x @ W.T + b) as a bias-free matmul and one bias + GELU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels().bias_gelu(nn.functional.linear(x, self.weight), self.bias)


class ResidualLayerNormOutput(nn.Module):
    """LayerNorm(dropout(dense(hidden)) + residual), the add inside the LayerNorm's kernel. Holds the module it
    replaces' `dense`, `dropout` and `LayerNorm` under the same names."""

    def __init__(self, dense: nn.Linear, dropout: nn.Module, layer_norm: nn.LayerNorm):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = dense, dropout, layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        norm = self.LayerNorm
        return _kernels().layer_norm(self.dropout(self.dense(hidden_states)), norm.weight, norm.bias, norm.eps,
                                     residual=input_tensor)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` with `old`'s parameters (the same tensors), device and train/eval mode."""
    for name, parameter in old.named_parameters(recurse=False):
        setattr(new, name, parameter)
    return new.train(old.training)


def _fused_layer_norm(norm: nn.LayerNorm) -> FusedLayerNorm:
    new = FusedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False, device="meta")
    new.elementwise_affine = True  # built without parameters of its own; it takes `norm`'s
    return _adopt(new, norm)


def _linear_bias_gelu(linear: nn.Linear) -> LinearBiasGelu:
    new = LinearBiasGelu(linear.in_features, linear.out_features, bias=False, device="meta")
    return _adopt(new, linear)


def _is_exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() or transformers' "gelu" (GELUActivation), both erf-based; tanh approximations are not."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and not getattr(module, "use_gelu_python", False)


def _is_residual_output(module: nn.Module) -> bool:
    """A BERT-style output: dense -> dropout -> LayerNorm(+ residual), with exactly those children."""
    children = dict(module.named_children())
    return (set(children) == {"dense", "dropout", "LayerNorm"} and isinstance(children["dense"], nn.Linear)
            and isinstance(children["LayerNorm"], nn.LayerNorm) and children["LayerNorm"].elementwise_affine
            and children["LayerNorm"].bias is not None)


def fuse_module(root: nn.Module) -> dict:
    """Swap the fused modules into `root` (a tower) in place; returns how many of each were swapped."""
    counts = {"layer_norm": 0, "linear_bias_gelu": 0, "residual_layer_norm": 0}
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if _is_residual_output(child):
                setattr(parent, child_name, ResidualLayerNormOutput(child.dense, child.dropout, child.LayerNorm))
                counts["residual_layer_norm"] += 1
        for linear_name, act_name in LINEAR_THEN_ACTIVATION:
            linear, act = getattr(parent, linear_name, None), getattr(parent, act_name, None)
            if type(linear) is nn.Linear and linear.bias is not None and act is not None and _is_exact_gelu(act):
                setattr(parent, linear_name, _linear_bias_gelu(linear))
                setattr(parent, act_name, nn.Identity())
                counts["linear_bias_gelu"] += 1
    for parent in list(root.modules()):  # the outputs' norms too: their kernel is the same one
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and child.elementwise_affine and child.bias is not None:
                setattr(parent, child_name, _fused_layer_norm(child))
                counts["layer_norm"] += 1
    return counts


def use_fused_kernels(model: nn.Module, backend: str = "triton") -> dict:
    """Swap fused kernels into both towers of a DualEncoderModel (`vision_model`, `text_model`); the heads are
    Linear layers with no norm or GELU of a tower's shape and stay as they are. `backend`: `off` (nothing) or
    `triton`. Returns the swap counts per tower."""
    if backend not in BACKENDS:
        raise ValueError(f"fused kernels {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "off":
        return {}
    _kernels()  # fail here, naming triton, rather than at the first forward
    return {tower: fuse_module(getattr(model, f"{tower}_model")) for tower in ("vision", "text")}
