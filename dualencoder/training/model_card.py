"""The README.md written beside a trained model: what it is, what it was trained on, how it scores."""

from __future__ import annotations

import os

import yaml

from dualencoder.metrics import format_metrics_table
from dualencoder.training.arguments import all_options


QUERYBANK_NOTE = """
The querybank-normalised row scores each candidate by its cosine similarity minus how strongly the
training split's embeddings match it (an inverted softmax, beta {beta}; `dualencoder/querybank.py`):
a different scoring rule from the plain rows, which discounts "hub" items close to many queries.
"""


def write_model_card(output_dir: str, *, model_config, args: tuple, metrics: dict, location: str = None) -> str:
    """Write `output_dir/README.md` with Hub metadata, the recipe, the metrics table and usage.

    `location` is where the model will be loaded from, if not `output_dir` (which may be a staging folder).
    """
    model_args, data_args, train_args = args
    options = all_options(args)
    tables = {name: values for name, values in metrics.items() if isinstance(values, dict) and "rsum" in values}
    header = {
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-image-classification",
        "tags": ["dual-encoder", "contrastive", "image-text-retrieval"],
        "datasets": [data_args.dataset],
    }
    # what the model is comes from its config (a --model_name_or_path run keeps the saved model's), how it
    # was trained from the options
    vision = model_config.vision_model_name_or_path or model_config.timm_model_name or "a ViT"
    text_model = model_config.text_model_name_or_path or "a BERT-family encoder"
    lora = {tower: ", LoRA" if tower in model_config.lora_towers and model_config.lora_rank else ""
            for tower in ("vision", "text")}
    text = f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# Dual encoder: {vision} + {text_model}

A CLIP-style image-text dual encoder trained contrastively (loss: `{model_config.loss_type}`) on
`{data_args.dataset}`. Image and text are embedded into one {model_config.projection_dim}-d space
(L2-normalised); similarity is a dot product.

- Vision backbone: `{vision}` (training: {model_args.vision_train}{lora["vision"]})
- Text backbone: `{text_model}` (training: {model_args.text_train}{lora["text"]})
- Projection head: {model_config.projection_head}; text pooling: {model_config.text_pooling}

## Retrieval

Ranks over all images / all captions of the split; image->text uses the best of an image's
captions; ties count against the model.

{format_metrics_table(tables) if tables else "(no evaluation ran)"}
{QUERYBANK_NOTE.format(beta=train_args.querybank_beta) if any("querybank" in name for name in tables) else ""}
## How to use

```python
import torch
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{train_args.hub_model_id or os.path.abspath(location or output_dir)}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{train_args.hub_model_id or os.path.abspath(location or output_dir)}")
inputs = processor(text=["a dog runs on the grass"], images=[image], return_tensors="pt", padding=True)
with torch.no_grad():
    out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
print(out.logits_per_image)
```

## Training options

```yaml
{yaml.safe_dump(options, sort_keys=True).strip()}
```
"""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as handle:
        handle.write(text)
    return path
