"""The processor of a dual encoder, derived from its backbones so preprocessing is never re-typed.

It is transformers' `VisionTextDualEncoderProcessor` (an image processor + a tokenizer), saved
beside the weights with `save_pretrained` and restored by `AutoProcessor.from_pretrained(dir)`,
so one directory is all inference needs.
"""

from __future__ import annotations

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase, ViTImageProcessor
from transformers import VisionTextDualEncoderProcessor
from transformers.image_utils import PILImageResampling

from backbones_dualencoder import backbone_kind, hub_source
from configuration_dualencoder import DualEncoderConfig

_RESAMPLE = {
    "bicubic": PILImageResampling.BICUBIC,
    "bilinear": PILImageResampling.BILINEAR,
    "nearest": PILImageResampling.NEAREST,
}


def image_processor_from_config(config: DualEncoderConfig):
    """An image processor that resizes to the backbone's input size and normalises with its mean/std.

    For an HF vision checkpoint its own image processor is used when it can be loaded (it may
    know more, e.g. a centre crop); otherwise, and for timm backbones, the size/mean/std/resample
    recorded in the config (which came from the backbone's pretrained config) define it.
    """
    source = config.vision_model_name_or_path
    if config.timm_model_name is None and source and backbone_kind(source) == "hf":
        try:
            return AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            pass
    return ViTImageProcessor(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        resample=_RESAMPLE.get(config.image_resample, PILImageResampling.BICUBIC),
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def tokenizer_from_config(config: DualEncoderConfig) -> PreTrainedTokenizerBase:
    """The text backbone's tokenizer, from where the text tower came from."""
    source = config.text_model_name_or_path
    if source is None:
        raise ValueError("config.text_model_name_or_path is not set: pass a tokenizer to build_processor().")
    return load_tokenizer(source)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A text backbone's tokenizer from an HF id/path or an offline alias (`offline:all-minilm-l6-v2`)."""
    return AutoTokenizer.from_pretrained(hub_source(source))


def build_processor(config: DualEncoderConfig, tokenizer: PreTrainedTokenizerBase = None) -> VisionTextDualEncoderProcessor:
    """The processor for a model with this config (tokenizer from the config unless given)."""
    return VisionTextDualEncoderProcessor(
        image_processor=image_processor_from_config(config),
        tokenizer=tokenizer if tokenizer is not None else tokenizer_from_config(config),
    )
