"""The README.md written beside a trained model: what it is, what it was trained on, how it scores, what loading needs.

The metadata is huggingface_hub's `ModelCardData`, so the Hub reads it as it means it: `base_model` (the two towers'
Hub ids: an offline alias counts as its Hub original, a local folder is left out), `license`, `datasets` (Hub ids
only, never a local path), `pipeline_tag` (the zero-shot-image-classification pipeline works on the export) and the
retrieval Recall@K as `model-index` results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import transformers
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from backbones_dualencoder import hub_original
from data_scripts.loading import hub_dataset_id
from dualencoder.metrics import STANDARD_KS, format_metrics_table
from dualencoder.training.arguments import all_options


QUERYBANK_NOTE = """
The querybank-normalised row scores each candidate by its cosine similarity minus how strongly the
training split's embeddings match it (an inverted softmax, beta {beta}; `dualencoder/querybank.py`):
a different scoring rule from the plain rows, which discounts "hub" items close to many queries.
"""
# metrics key prefix -> the Hub task of that retrieval direction and its name
RETRIEVAL_TASKS = (("i2t", "image-to-text", "Image-to-text retrieval"),
                   ("t2i", "text-to-image", "Text-to-image retrieval"))


def dataset_label(dataset: str) -> str:
    """The training data's name on the card: its Hub id, else its folder or file name (never the whole path)."""
    return hub_dataset_id(dataset) or Path(dataset).name or dataset


def retrieval_results(split: str, metrics: dict, dataset: str, dataset_config: Optional[str]) -> list[EvalResult]:
    """Recall@K of both retrieval directions on `split` as model-index results."""
    name = dataset_label(dataset)
    return [EvalResult(task_type=task, task_name=task_name, dataset_type=name, dataset_name=name,
                       dataset_config=dataset_config, dataset_split=split, metric_type=f"recall@{k}",
                       metric_name=f"Recall@{k}", metric_value=round(float(metrics[f"{prefix}_r{k}"]), 2))
            for prefix, task, task_name in RETRIEVAL_TASKS for k in STANDARD_KS if f"{prefix}_r{k}" in metrics]


def loading_needs(model_config, adapters: bool) -> str:
    """The card's section on the packages that load the model, with the versions it was trained with."""
    packages = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    if model_config.timm_model_name:
        import timm

        packages["timm"] = timm.__version__
    text = (f"`pip install {' '.join(packages)}` loads the model (its code comes with it: `trust_remote_code=True`); "
            f"trained with {', '.join(f'{name} {version}' for name, version in packages.items())}.")
    if adapters:
        import peft

        text += (f" The adapters-only copy in `adapters/` (LoRA in PEFT's format, peft {peft.__version__}) also needs "
                 "`pip install peft`; the model itself has its adapters merged and does not.")
    return text


def base_tower_code(model_config, tower: str) -> str:
    """Python that loads a tower's base model from the Hub as the adapters expect it (a timm tower through timm)."""
    hub_id = hub_original(getattr(model_config, f"{tower}_model_name_or_path"))
    if hub_id is None:
        return f"base_{tower}_tower  # {getattr(model_config, f'{tower}_model_name_or_path')}, loaded as in training"
    if tower == "vision" and model_config.timm_model_name:
        return f'timm.create_model("hf-hub:{hub_id}", pretrained=True, num_classes=0)'
    return f'AutoModel.from_pretrained("{hub_id}")'


def adapters_usage(model_config, lora_towers, location: str) -> str:
    """How to put the PEFT adapters of `adapters/` on the base towers."""
    towers = [tower for tower in ("vision", "text") if tower in lora_towers]
    lines = "\n".join(f'{tower} = PeftModel.from_pretrained({base_tower_code(model_config, tower)}, "{location}", '
                      f'subfolder="adapters/{tower}")' for tower in towers)
    imports = "import timm\n" if "vision" in towers and model_config.timm_model_name else ""
    return f"""
### The LoRA adapters alone (`adapters/`)

The model above has its LoRA adapters merged. `adapters/` holds them apart, in PEFT's format, a few MB beside the
base towers: {", ".join(f"`adapters/{tower}`" for tower in towers)} (each `adapter_config.json` +
`adapter_model.safetensors`), the projection heads and temperature (`adapters/heads.safetensors`) and the config
naming both base towers (`adapters/config.json`).

```python
{imports}from peft import PeftModel
from transformers import AutoModel

{lines}
```

With this project installed, `dualencoder.adapters.load_adapters(<local copy>/adapters)` rebuilds the whole dual
encoder from the base towers and these files.
"""


def write_model_card(output_dir: str, *, model_config, args: tuple, metrics: dict, location: str = None,
                     results: Optional[tuple[str, dict]] = None, lora_towers: tuple = (), adapters: bool = False
                     ) -> str:
    """Write `output_dir/README.md` with Hub metadata, the recipe, the metrics table, what loading needs and usage.

    `metrics`: {table row name: metrics} for the card's table; `results`: (split, metrics) for the model-index;
    `lora_towers`: the towers that trained LoRA adapters (the config no longer says once they are merged);
    `adapters`: whether `adapters/` holds them apart. `location` is where the model will be loaded from, if not
    `output_dir` (which may be a staging folder); with --hub_model_id, the Hub id.
    """
    model_args, data_args, train_args = args
    options = all_options(args)
    tables = {name: values for name, values in metrics.items() if isinstance(values, dict) and "rsum" in values}
    where = train_args.hub_model_id or os.path.abspath(location or output_dir)
    dataset_id = hub_dataset_id(data_args.dataset)
    dataset_name = dataset_label(data_args.dataset)
    bases = [hub_original(model_config.vision_model_name_or_path), hub_original(model_config.text_model_name_or_path)]
    data = ModelCardData(
        model_name=os.path.basename(where.rstrip("/")), license=train_args.license, library_name="transformers",
        pipeline_tag="zero-shot-image-classification", tags=["dual-encoder", "contrastive", "image-text-retrieval"],
        base_model=[base for base in bases if base] or None, datasets=[dataset_id] if dataset_id else None,
        eval_results=retrieval_results(*results, data_args.dataset, data_args.dataset_config_name) if results else None)
    # what the model is comes from its config (a --model_name_or_path run keeps the saved model's), how it
    # was trained from the options
    vision = model_config.vision_model_name_or_path or model_config.timm_model_name or "a ViT"
    text_model = model_config.text_model_name_or_path or "a BERT-family encoder"
    lora = {tower: ", LoRA" if tower in lora_towers else "" for tower in ("vision", "text")}
    text = f"""---
{data.to_yaml()}
---

# Dual encoder: {vision} + {text_model}

A CLIP-style image-text dual encoder trained contrastively (loss: `{model_config.loss_type}`) on `{dataset_name}`.
Image and text are embedded into one {model_config.projection_dim}-d space (L2-normalised); similarity is a dot
product.

- Vision backbone: `{vision}` (training: {model_args.vision_train}{lora["vision"]})
- Text backbone: `{text_model}` (training: {model_args.text_train}{lora["text"]})
- Projection head: {model_config.projection_head}; text pooling: {model_config.text_pooling}

## Retrieval

Ranks over all images / all captions of the split; image->text uses the best of an image's
captions; ties count against the model.

{format_metrics_table(tables) if tables else "(no evaluation ran)"}
{QUERYBANK_NOTE.format(beta=train_args.querybank_beta) if any("querybank" in name for name in tables) else ""}
## What loading needs

{loading_needs(model_config, adapters)}

## How to use

```python
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{where}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{where}")
inputs = processor(text=["a dog runs on the grass"], images=[image], return_tensors="pt", padding=True)
with torch.no_grad():
    out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
print(out.logits_per_image)
```

Zero-shot classification: `pipeline("zero-shot-image-classification", model="{where}", trust_remote_code=True)`.
{adapters_usage(model_config, lora_towers, where) if adapters else ""}
## Training options

```yaml
{yaml.safe_dump(options, sort_keys=True).strip()}
```
"""
    ModelCard(text).save(os.path.join(output_dir, "README.md"))
    return os.path.join(output_dir, "README.md")
