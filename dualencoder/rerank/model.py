"""The co-attention re-ranker: two token streams that attend to each other, and an image-text matching head.

As in ViLBERT, each layer lets every text token query the image tokens and every image token query the
text tokens (cross-attention), then each stream attends to itself and runs a feed-forward block. The
inputs are the frozen towers' token outputs (text last hidden states with their mask; ViT patch tokens
or a CNN's last feature map flattened to tokens), each linearly projected to `hidden_size`; the head
reads both streams' masked means and returns one matching logit per pair.

It is a model of its own (`RerankerConfig` + `CoAttentionReranker`, a `PreTrainedModel`) saved in the
dual encoder's export folder under `reranker/` (`save_reranker` / `load_reranker`): the dual encoder's
files stay exactly as they were, so an export without a re-ranker loads as before, anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

RERANKER_FOLDER = "reranker"


class RerankerConfig(PretrainedConfig):
    r"""Configuration of a [`CoAttentionReranker`].

    Args:
        text_dim, vision_dim: widths of the towers' token outputs it reads.
        num_vision_tokens: how many vision tokens an image has (e.g. 81 for a 9x9 map): the length of the
            learned position embedding added to them (a CNN's flattened map has no positions of its own).
        hidden_size, num_layers, num_heads, intermediate_size, dropout: the co-attention stack.
        dual_weight: the final score is `itm_logit + dual_weight * dual_logit` (the dual encoder's scaled
            similarity); chosen on the validation split by the training command.
        rerank_top_k: the number of dual-encoder candidates it was selected with (a default for re-ranking).
        validation_gain: re-ranked RSUM minus the dual encoder's alone on the validation images the training
            command selected on (None: not trained by it). At most 0, re-ranking did not help there, and the
            commands that re-rank say so: training keeps its best epoch even then, as a user may still want it.
    """

    model_type = "coattention-reranker"

    def __init__(self, text_dim: int = 384, vision_dim: int = 320, num_vision_tokens: int = 81,
                 hidden_size: int = 256, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 512,
                 dropout: float = 0.1, dual_weight: float = 0.0, rerank_top_k: int = 16,
                 validation_gain: Optional[float] = None, **kwargs):
        self.text_dim = text_dim
        self.vision_dim = vision_dim
        self.num_vision_tokens = num_vision_tokens
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.dual_weight = dual_weight
        self.rerank_top_k = rerank_top_k
        self.validation_gain = validation_gain
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(f"RerankerConfig.hidden_size={hidden_size} must be a multiple of num_heads={num_heads}.")
        if num_layers < 1:
            raise ValueError(f"RerankerConfig.num_layers={num_layers}; expected at least 1 co-attention layer.")


class StreamBlock(nn.Module):
    """One stream's half of a co-attention layer (pre-norm): cross-attention to the other stream, self-attention, FFN."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        width, heads, drop = config.hidden_size, config.num_heads, config.dropout
        self.norm_query, self.norm_other = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, dropout=drop, batch_first=True)
        self.norm_self = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, dropout=drop, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, config.intermediate_size), nn.GELU(), nn.Dropout(drop),
                                 nn.Linear(config.intermediate_size, width))
        self.drop = nn.Dropout(drop)

    def forward(self, x, x_pad, other, other_pad):
        """`x_pad` / `other_pad` are True at padding: no query ever attends to a padding token."""
        query, keys = self.norm_query(x), self.norm_other(other)
        x = x + self.drop(self.cross(query, keys, keys, key_padding_mask=other_pad, need_weights=False)[0])
        h = self.norm_self(x)
        x = x + self.drop(self.self_attention(h, h, h, key_padding_mask=x_pad, need_weights=False)[0])
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class CoAttentionLayer(nn.Module):
    """Both streams read each other's input to the layer (ViLBERT's co-TRM followed by TRM)."""

    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.text, self.vision = StreamBlock(config), StreamBlock(config)

    def forward(self, text, text_pad, vision, vision_pad):
        return self.text(text, text_pad, vision, vision_pad), self.vision(vision, vision_pad, text, text_pad)


class CoAttentionReranker(PreTrainedModel):
    """Scores image-text pairs from the towers' token outputs: `forward(...)` -> one matching logit per pair."""

    config_class = RerankerConfig
    base_model_prefix = "reranker"

    def __init__(self, config: RerankerConfig):
        super().__init__(config)
        width = config.hidden_size
        self.text_in = nn.Sequential(nn.Linear(config.text_dim, width), nn.LayerNorm(width))
        self.vision_in = nn.Sequential(nn.Linear(config.vision_dim, width), nn.LayerNorm(width))
        self.vision_position = nn.Parameter(torch.zeros(config.num_vision_tokens, width))
        self.layers = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.num_layers))
        self.norm_text, self.norm_vision = nn.LayerNorm(width), nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, 1))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CoAttentionReranker):
            nn.init.normal_(module.vision_position, std=0.02)

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, vision_states: torch.Tensor,
                vision_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Matching logits `[B]` of B pairs.

        Args:
            text_states: `[B, T, text_dim]` the text tower's last hidden states; `text_mask` `[B, T]` (1 = token).
            vision_states: `[B, N, vision_dim]` the vision tower's tokens; `vision_mask` `[B, N]` (default: all real).
        """
        if vision_states.shape[1] != self.config.num_vision_tokens:
            raise ValueError(f"the re-ranker was built for {self.config.num_vision_tokens} vision tokens per image, "
                             f"got {vision_states.shape[1]}: the vision tower's input size differs from training's.")
        if vision_mask is None:
            vision_mask = torch.ones(vision_states.shape[:2], dtype=torch.long, device=vision_states.device)
        text = self.text_in(text_states.to(self.dtype))
        vision = self.vision_in(vision_states.to(self.dtype)) + self.vision_position
        text_pad, vision_pad = text_mask == 0, vision_mask == 0
        for layer in self.layers:
            text, vision = layer(text, text_pad, vision, vision_pad)
        text = _masked_mean(self.norm_text(text), text_mask)
        vision = _masked_mean(self.norm_vision(vision), vision_mask)
        return self.head(torch.cat([text, vision, text * vision], dim=-1)).squeeze(-1)


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def save_reranker(reranker: CoAttentionReranker, model_dir) -> Path:
    """Save the re-ranker into a dual encoder's export folder (its `reranker/` subfolder); returns that folder."""
    path = Path(model_dir) / RERANKER_FOLDER
    reranker.save_pretrained(path)
    return path


def require_reranker(model_dir) -> Path:
    """The export's re-ranker folder, or an error naming the export and the command that makes one."""
    path = Path(model_dir) / RERANKER_FOLDER
    if not (path / "config.json").is_file():
        raise SystemExit(f"--rerank_top_k: {model_dir} has no {RERANKER_FOLDER}/ folder (no re-ranker saved with this "
                         "model); train one with `python -m dualencoder.rerank.train --model_dir ...`")
    return path


def load_reranker(model_dir, device=None) -> Optional[CoAttentionReranker]:
    """The re-ranker saved with a dual encoder's export, or None when the export has none."""
    path = Path(model_dir) / RERANKER_FOLDER
    if not (path / "config.json").is_file():
        return None
    model = CoAttentionReranker.from_pretrained(path)
    return (model.to(device) if device is not None else model).eval()
