"""Start the projection heads at the CCA solution of the pretrained towers' features.

Linear CCA on frozen pooled features is a strong floor on Flickr8k (doc/BASELINES.md); random heads
spend the first epochs of contrastive training finding a map of the same kind. `cca_initialise_heads`
fits CCA on the training pairs' pooled features and sets both heads so that, before any step, they
compute exactly that map: the image head sends ``x`` to ``diag(rho^p) A'(x - mean_x)`` and the text
head ``y`` to ``diag(rho^p) B'(y - mean_y)`` in the first k output dimensions (dualencoder/cca.py).

The heads must be MLPs (``projection_head: mlp``): their first layer's bias centres the features,
which a bias-free linear head cannot. An MLP ``W2 gelu(W1 x + b1)`` computes a linear map ``z = Mx + c``
exactly, because ``gelu(z) - gelu(-z) = z Phi(z) + z (1 - Phi(z)) = z``: hidden units ``[z; -z]`` and
``W2 = [I, -I]``. So CCA needs 2k hidden units; the remaining ones keep their random first layer and
start with zero output weights (like LoRA's B), as do the output dimensions beyond k, so training
grows the non-linear part from zero.
"""

from __future__ import annotations

import torch
from torch import nn

from dualencoder.cca import fit_cca

DEFAULT_CCA_OPTIONS = {"ridge": 10.0, "dims": 256, "power": 0.0}  # the linear-cca baseline's validation choice


@torch.no_grad()
def set_mlp_to_linear_map(head: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make the MLP projection head `head` compute ``weight @ x + bias`` in its first k outputs, 0 elsewhere.

    `weight` is [k, in_dim], `bias` [k]; the head needs at least 2k hidden units.
    """
    layers = [module for module in head.modules() if isinstance(module, nn.Linear)]
    if len(layers) != 2 or not any(isinstance(module, nn.GELU) for module in head.modules()):
        raise ValueError("CCA initialisation needs MLP projection heads (projection_head: mlp, a Linear-GELU-Linear "
                         "stack whose first bias centres the features); a linear head has no bias to centre with.")
    first, last = layers
    k = weight.shape[0]
    if 2 * k > first.out_features or k > last.out_features:
        raise ValueError(f"a {k}-dimensional CCA map needs projection_hidden_dim >= {2 * k} and projection_dim >= {k}; "
                         f"the head has {first.out_features} hidden units and {last.out_features} outputs.")
    first.weight[:k] = weight.to(first.weight.dtype)
    first.weight[k:2 * k] = -weight.to(first.weight.dtype)
    first.bias[:k] = bias.to(first.bias.dtype)
    first.bias[k:2 * k] = -bias.to(first.bias.dtype)
    last.weight.zero_()
    last.weight[:k, :k] = torch.eye(k)
    last.weight[:k, k:2 * k] = -torch.eye(k)
    if last.bias is not None:
        last.bias.zero_()


def cca_options(options: dict | None) -> dict:
    """`options` over DEFAULT_CCA_OPTIONS, with an error that names an unknown key."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_CCA_OPTIONS))
    if unknown:
        raise ValueError(f"head_init_options: unknown key(s) {', '.join(unknown)}; expected {', '.join(DEFAULT_CCA_OPTIONS)}")
    return {**DEFAULT_CCA_OPTIONS, **options}


@torch.no_grad()
def cca_initialise_heads(model: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor,
                         options: dict | None = None) -> dict:
    """Set `model`'s visual_projection and text_projection to the CCA map of paired pooled features.

    `image_features` [n, d_vision] and `text_features` [n, d_text] are row-aligned pairs (each caption
    with its image's features). `options`: ridge (relative, as the linear-cca baseline), dims (k, at
    most min(d_vision, d_text, projection_dim, projection_hidden_dim / 2)), power (each direction
    weighted by its canonical correlation to this power). Returns what was fitted, for the log.
    """
    options = cca_options(options)
    fit = fit_cca(image_features, text_features, options["ridge"])
    k = min(int(options["dims"]), fit.corrs.numel())
    for name in ("visual_projection", "text_projection"):  # both heads are checked before either is changed
        linears = [m for m in getattr(model, name).modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            raise ValueError(f"{name} is a single linear layer: CCA initialisation needs MLP heads "
                             "(projection_head: mlp)")
        if k > linears[0].out_features // 2 or k > model.config.projection_dim:
            raise ValueError(f"head_init_options dims={k}: at most {name}'s hidden width / 2 = "
                             f"{linears[0].out_features // 2} and projection_dim = {model.config.projection_dim}")
    scale = fit.corrs[:k].clamp(min=1e-12) ** options["power"]
    for head, proj, mean in ((model.visual_projection, fit.proj_x, fit.mean_x), (model.text_projection, fit.proj_y, fit.mean_y)):
        weight = (proj[:, :k] * scale).T  # [k, in_dim]
        set_mlp_to_linear_map(head, weight.float(), (-weight @ mean).float())
    return {**options, "dims": k, "pairs": image_features.shape[0],
            "top_correlations": [round(c, 3) for c in fit.corrs[:3].tolist()],
            "mean_correlation": round(fit.corrs[:k].mean().item(), 3)}
