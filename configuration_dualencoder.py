"""The configuration of a dual encoder: pure, serialisable data (nested configs of both towers).

Kept in its own file, as transformers does (`configuration_*.py` beside `modeling_*.py`), so the
config can be read, validated and diffed without building a model. `save_pretrained` copies it
beside the weights for `trust_remote_code`.
"""

from __future__ import annotations

import math
from typing import Optional

from transformers import AutoConfig, PretrainedConfig

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

