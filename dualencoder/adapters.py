"""Adapters-only copies of a LoRA-trained dual encoder: the small trained parts, not the backbones.

A model fine-tuned with LoRA differs from its two pretrained backbones only in the adapters, the
projection heads and the temperature: a few MB instead of hundreds. `save_adapters` writes them in
PEFT's own format, so peft alone can put a tower's adapters on its base model
(`PeftModel.from_pretrained(base_tower, "adapters/text")`):

    adapters/config.json              the dual encoder's config (names both backbones)
    adapters/heads.safetensors        projection heads, temperature (and bias)
    adapters/vision/, adapters/text/  adapter_config.json + adapter_model.safetensors, per tower with LoRA

`load_adapters` rebuilds the backbones from where they came from (the Hub or an offline alias), puts
the adapters on them with peft and the heads back. (It still reads the single `adapters.safetensors`
of copies saved before the PEFT format.)
"""

from __future__ import annotations

import inspect
import json
import os

from safetensors.torch import load_file, save_file

from backbones_dualencoder import hub_original
from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

HEADS_FILE = "heads.safetensors"
LEGACY_FILE = "adapters.safetensors"  # adapters and heads in one file, the format before PEFT's
# config fields that describe the backbones themselves: the rebuilt backbones bring their own
_FROM_BACKBONES = {"vision_config", "text_config", "vision_model_name_or_path", "text_model_name_or_path",
                   "vision_feature_dim"}


def adapter_towers(config) -> list[str]:
    """The towers that carry LoRA adapters under `config`."""
    return list(config.lora_towers) if config.lora_rank else []


def save_adapters(model: DualEncoderModel, save_directory: str) -> None:
    """Save only the small trained parts of `model`: config.json, heads.safetensors and each adapted tower's PEFT
    adapter (its `adapter_config.json` names the tower's Hub original as base model, never a local folder).

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
    heads = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items() if "lora_" not in k}
    save_file(heads, os.path.join(save_directory, HEADS_FILE))
    for tower in adapter_towers(model.config):
        folder = os.path.join(save_directory, tower)
        getattr(model, f"{tower}_model").save_pretrained(folder)
        # peft writes the base tower's folder as its base model (a local path, for a Hub or offline tower too): the
        # copy names the tower's Hub original instead, or none
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as handle:
            peft_config = json.load(handle)
        peft_config["base_model_name_or_path"] = hub_original(getattr(model.config, f"{tower}_model_name_or_path"))
        with open(path, "w") as handle:
            json.dump(peft_config, handle, indent=2)
        if os.path.isfile(os.path.join(folder, "README.md")):  # peft's blank template: the export's card says it
            os.remove(os.path.join(folder, "README.md"))


def load_adapters(directory: str) -> DualEncoderModel:
    """Rebuild a model saved with `save_adapters`: the base backbones, their PEFT adapters (trainable, as when they
    were saved) and the saved heads."""
    from peft import PeftModel

    directory = str(directory)
    config = DualEncoderConfig.from_pretrained(directory)
    legacy = os.path.isfile(os.path.join(directory, LEGACY_FILE))
    own_fields = set(inspect.signature(DualEncoderConfig.__init__).parameters) - {"self", "kwargs"}
    overrides = {k: v for k, v in config.to_dict().items() if k in own_fields - _FROM_BACKBONES}
    if not legacy:
        overrides["lora_rank"] = 0  # bare towers: peft puts the saved adapters on them below
    model = DualEncoderModel.from_vision_text_pretrained(config.vision_model_name_or_path,
                                                         config.text_model_name_or_path,
                                                         vision_weights=getattr(config, "vision_weights", None),
                                                         **overrides)
    if not legacy:
        for tower in adapter_towers(config):
            path = os.path.join(directory, tower)
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise ValueError(f"{path}/adapter_config.json is missing: config.json says the {tower} tower has "
                                 "LoRA adapters; save the copy again with save_adapters().")
            setattr(model, f"{tower}_model", PeftModel.from_pretrained(getattr(model, f"{tower}_model"), path,
                                                                       is_trainable=True))
        model.config.lora_rank, model.config.lora_towers = config.lora_rank, list(config.lora_towers)
    file = os.path.join(directory, LEGACY_FILE if legacy else HEADS_FILE)
    saved = load_file(file)
    expected = {k for k in model.adapter_state_dict() if legacy or "lora_" not in k}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{file} does not fit this config: missing {missing[:3]}, extra {extra[:3]}.")
    model.load_state_dict(saved, strict=False)
    return model
