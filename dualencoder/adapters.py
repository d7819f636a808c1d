"""Adapters-only copies of a LoRA-trained dual encoder: the small trained parts, not the backbones.

A model fine-tuned with LoRA differs from its two pretrained backbones only in the adapters, the
projection heads and the temperature: a few MB instead of hundreds. `save_adapters` writes those
with the config (which names both backbones); `load_adapters` rebuilds the backbones from where they
came from (the Hub or an offline alias) and puts the saved parts back.
"""

from __future__ import annotations

import inspect
import os

from safetensors.torch import load_file, save_file

from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

ADAPTERS_FILE = "adapters.safetensors"
# config fields that describe the backbones themselves: the rebuilt backbones bring their own
_FROM_BACKBONES = {"vision_config", "text_config", "vision_model_name_or_path", "text_model_name_or_path",
                   "vision_feature_dim"}


def save_adapters(model: DualEncoderModel, save_directory: str) -> None:
    """Save only the small trained parts of `model` (config.json + adapters.safetensors).

    A model that also trains backbone weights is refused: the copy would silently lose them.
    """
    outside = model.trained_outside_adapters()
    if outside:
        raise ValueError(f"{len(outside)} trained parameters are not adapters or heads (e.g. {outside[0]}): an "
                         "adapters-only copy would drop them. Save the whole model with save_pretrained() (or, if "
                         "they did not train, freeze them: requires_grad_(False)).")
    for tower in ("vision", "text"):
        if getattr(model.config, f"{tower}_model_name_or_path") is None:
            raise ValueError(f"config.{tower}_model_name_or_path is unset: build the model with "
                             "from_vision_text_pretrained() to save adapters only.")
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    save_file(tensors, os.path.join(save_directory, ADAPTERS_FILE))


def load_adapters(directory: str) -> DualEncoderModel:
    """Rebuild a model saved with `save_adapters`: the base backbones + the saved small parts."""
    config = DualEncoderConfig.from_pretrained(directory)
    own_fields = set(inspect.signature(DualEncoderConfig.__init__).parameters) - {"self", "kwargs"}
    overrides = {k: v for k, v in config.to_dict().items() if k in own_fields - _FROM_BACKBONES}
    model = DualEncoderModel.from_vision_text_pretrained(config.vision_model_name_or_path,
                                                         config.text_model_name_or_path,
                                                         vision_weights=getattr(config, "vision_weights", None),
                                                         **overrides)
    saved = load_file(os.path.join(directory, ADAPTERS_FILE))
    expected = model.adapter_state_dict()
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"{directory}/{ADAPTERS_FILE} does not fit this config: missing {missing[:3]}, "
                         f"extra {extra[:3]}.")
    model.load_state_dict(saved, strict=False)
    return model
