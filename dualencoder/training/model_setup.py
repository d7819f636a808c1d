"""The model and the loss a run trains, built from the options.

Which options change a model is derived from one source, `DualEncoderConfig`'s fields: an option of
`ModelArguments` with a config field's name sets that field of a new model. A saved model
(`--model_name_or_path`) keeps its structure, so such an option set to another value than the saved
model's is refused by name rather than silently ignored; the few options that change only how a model
runs (`RUNTIME_OPTIONS`) are applied to it. The loss is not part of the model: any loss trains any
model, and the config records the one it was trained with.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import yaml

from dualencoder.head_init import cca_options
from dualencoder.losses import build_loss
from dualencoder.trainable import set_tower_trainable
from dualencoder.training.arguments import ModelArguments
from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

CONFIG_FIELDS = set(inspect.signature(DualEncoderConfig.__init__).parameters) - {"self", "kwargs"}
# every option that sets the config field of its own name: derived, so a new field cannot be forgotten here
MODEL_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelArguments) if f.name in CONFIG_FIELDS)
# options that change how a model runs, not what it is: a saved model takes them too
RUNTIME_OPTIONS = ("image_flip_average", "vision_chunk_size")


def build_model(model_args, stated=()) -> DualEncoderModel:
    """A new model joined from two backbones, or a saved one (`--model_name_or_path`), with its towers frozen or
    trainable as asked and the training loss recorded in its config. `stated`: the options given in the config
    file or on the command line (`parse_args(..., with_sources=True)`), which a saved model must not ignore."""
    option_mapping("--loss_options", model_args.loss_options)  # a malformed mapping fails before any loading
    if model_args.model_name_or_path:
        model = DualEncoderModel.from_pretrained(model_args.model_name_or_path)
        kept = options_a_saved_model_keeps(model_args, model.config, stated)
        if kept:
            raise SystemExit(f"error: --model_name_or_path {model_args.model_name_or_path} keeps the saved model's "
                             f"structure, so these options would be ignored: {'; '.join(kept)}. Drop them, or build "
                             "a new model from backbones (--vision_model / --text_model).")
    else:
        model = DualEncoderModel.from_vision_text_pretrained(model_args.vision_model, model_args.text_model,
                                                             vision_weights=model_args.vision_weights,
                                                             **new_model_fields(model_args))
    for option in RUNTIME_OPTIONS:
        if getattr(model_args, option) is not None:
            setattr(model.config, option, getattr(model_args, option))
    model.config.loss_type, model.config.loss_kwargs = model_args.loss, loss_options(model_args, model.config)
    set_tower_trainable(model, "vision", model_args.vision_train)
    set_tower_trainable(model, "text", model_args.text_train)
    return model


def build_training_loss(model_args, config: DualEncoderConfig):
    """The loss module the loop applies to the model's outputs (`--loss`, `--loss_options`)."""
    return build_loss(model_args.loss, **loss_options(model_args, config))


def new_model_fields(model_args) -> dict:
    """The DualEncoderConfig fields the options give a new model (heads, pooling, temperature, LoRA, size...)."""
    fields = {option: getattr(model_args, option) for option in MODEL_OPTIONS}
    if "siglip" in model_args.loss and model_args.logit_bias_init_value is None:  # SigLIP's start: scale 10, bias -10
        fields.update(logit_scale_init_value=math.log(10.0), logit_bias_init_value=-10.0)
    if not model_args.lora_rank:
        fields["lora_towers"] = []
    return {name: value for name, value in fields.items() if value is not None}  # None: the config's default


def options_a_saved_model_keeps(model_args, config: DualEncoderConfig, stated) -> list[str]:
    """The structural options stated with other values than the saved model has."""
    kept = []
    for option in MODEL_OPTIONS:
        value = getattr(model_args, option)
        if option in stated and option not in RUNTIME_OPTIONS and value != getattr(config, option, None):
            kept.append(f"--{option} {value!r} (the model has {option}={getattr(config, option, None)!r})")
    return kept


def option_mapping(option: str, text: str) -> dict:
    """A YAML/JSON mapping option (`--loss_options`, `--head_init_options`) read as a dict, with errors naming it."""
    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise SystemExit(f"error: {option} must be a mapping, got {text!r}")
    glued = [key for key, value in mapping.items() if value is None and ":" in str(key)]
    if glued:  # YAML reads {margin:0.2} as the key 'margin:0.2' with no value
        raise SystemExit(f"error: {option} {text!r}: {glued[0]!r} needs a space after ':' "
                         f"(YAML), e.g. '{{{str(glued[0]).replace(':', ': ', 1)}}}'")
    return mapping


def loss_options(model_args, config: DualEncoderConfig = None) -> dict:
    """`--loss_options` as keyword arguments of `build_loss(model_args.loss, ...)` (a codebook gets the embedding
    width of the model, or of the options when there is no model yet)."""
    options = option_mapping("--loss_options", model_args.loss_options)
    if "codebook" in model_args.loss:
        options.setdefault("embed_dim", config.projection_dim if config is not None else model_args.projection_dim)
    return options


def head_init_options(model_args) -> dict:
    """`--head_init_options` over the defaults of `--head_init` (checked before any caching)."""
    try:
        return cca_options(option_mapping("--head_init_options", model_args.head_init_options))
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None
