"""open_clip's own model and training step, as a row of benchmarks/throughput.py.

The model is open_clip's `CustomTextCLIP` of the `vit-bert` shape: a timm ViT tower (ViT-B/16 at
`--size base`) and a HF BERT text tower (BertConfig(num_hidden_layers=6) at base, random init, read
through its pooler as `cls_pooler`), each with a linear projection to 512. The BERT config is saved
to a temporary folder because open_clip's HF tower takes a name or a folder, never a config; with
`hf_model_pretrained=False` it only reads the config, so nothing comes from the Hub.

The step is open_clip_train's `train_one_epoch` for one batch: forward under autocast (bf16, or
none for fp32), `ClipLoss`, backward, gradient-norm clipping at 1.0, AdamW (open_clip_train's
groups: no weight decay on gains, biases and the temperature; betas 0.9/0.98, eps 1e-6), a cosine
schedule, and the temperature clamped to [0, ln 100]. `--compile` anything but `off` compiles the
whole model with `torch.compile(model)`, as open_clip_train's `--torch-compile` does.
"""

from __future__ import annotations

import contextlib
import math
import tempfile

import torch


def timm_vit_name(size: str, image_size: int) -> str:
    """A timm model name for throughput.vit_config(size, image_size), registered with timm on first use.

    open_clip builds its timm tower from a name alone (`timm.create_model(name)`), so the shape
    has to be a registered model; the registered builder is timm's ViT-B/16 entry with the
    shape's width, depth, heads, MLP ratio, patch and image size.
    """
    import timm
    from timm.models import register_model

    from benchmarks.throughput import vit_config

    name = f"dualencoder_bench_vit_{size}_{image_size}"
    if timm.is_model(name):
        return name
    config = vit_config(size, image_size)
    shape = dict(img_size=image_size, patch_size=config.patch_size, embed_dim=config.hidden_size,
                 depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                 mlp_ratio=config.intermediate_size / config.hidden_size)

    def build(pretrained=False, **kwargs):
        return timm.create_model("vit_base_patch16_224", pretrained=False, **{**shape, **kwargs})

    build.__name__ = name
    register_model(build)
    return name


def build_open_clip(spec: dict):
    """open_clip's CustomTextCLIP of the row's shape (random init); its text tower's token vocabulary size."""
    import open_clip

    from benchmarks.throughput import bert_like, distilbert_config

    text = bert_like(distilbert_config(spec["size"]))
    with tempfile.TemporaryDirectory() as folder:  # HFTextEncoder reads AutoConfig.from_pretrained(folder)
        text.save_pretrained(folder)
        vision_cfg = dict(timm_model_name=timm_vit_name(spec["size"], spec["image_size"]), timm_model_pretrained=False,
                          timm_pool="", timm_proj="linear", image_size=spec["image_size"])
        text_cfg = dict(hf_model_name=folder, hf_tokenizer_name=folder, hf_model_pretrained=False,
                        hf_proj_type="linear", hf_pooler_type="cls_pooler", context_length=spec["seq_len"])
        model = open_clip.CustomTextCLIP(embed_dim=512, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)
    return model, text.vocab_size


def open_clip_optimizer(model, lr: float = 5e-4, weight_decay: float = 0.2) -> torch.optim.AdamW:
    """open_clip_train's AdamW: gains, biases and the temperature without weight decay."""
    def exclude(name, param):
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def run_open_clip(spec: dict) -> dict:
    """Time open_clip_train's step on open_clip's CustomTextCLIP (see the module docstring)."""
    from open_clip.loss import ClipLoss

    from benchmarks.common import StepClock, clock_calls, count_flops, pick_device, reset_peak_memory
    from benchmarks.throughput import summarise
    from dualencoder.training.optim import cosine_with_warmup

    device = pick_device()
    torch.manual_seed(0)
    model, vocab_size = build_open_clip(spec)
    model.to(device).train()
    count = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    size = spec["batch_size"]
    # token id 0 is BERT's [PAD]: open_clip's HF tower masks it out, so draw real tokens only
    images = torch.randn(size, 3, spec["image_size"], spec["image_size"], generator=generator).to(device)
    texts = torch.randint(1, vocab_size, (size, spec["seq_len"]), generator=generator).to(device)
    loss_fn = ClipLoss()
    bf16 = spec["precision"] == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def forward_backward(net):
        with autocast():
            out = net(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss

    with count_flops(device) as counter:  # one uncompiled forward + backward, not timed
        forward_backward(model)
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    optimizer = open_clip_optimizer(model)
    scheduler = cosine_with_warmup(optimizer, spec["warmup"], spec["warmup"] + spec["steps"])
    net = torch.compile(model) if spec["compile"] != "off" else model

    def step():
        forward_backward(net)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    reset_peak_memory(device)
    clock: StepClock = clock_calls(step, device, spec["warmup"], spec["steps"])
    return summarise(spec, device, clock, flops, {"total": count, "trainable": count}, "random")

