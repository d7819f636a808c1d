#!/usr/bin/env python
"""Train a CLIP-style dual encoder with Accelerate, evaluate it by retrieval, save it for the Hub.

    accelerate launch run_contrastive.py --config configs/default.yaml [--option value ...]
    python run_contrastive.py --help

The script reads top to bottom like the algorithm: parse the options; build the model, its loss, the
data and the caches of whatever does not train; evaluate the untrained model; loop over epochs (step,
log, checkpoint, validate, keep the best); then test the best model and export it with its processor,
metrics.json, training_args.json and a model card. Each part is one call into `dualencoder/training/`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data_scripts import DatasetFormatError, to_image_view
from dualencoder.distributed import decided_by_main, launch_mismatch
from dualencoder.evaluation.common import embed
from dualencoder.kernels import apply_levers
from dualencoder.metrics import format_metrics_table
from dualencoder.processing import build_processor
from dualencoder.querybank import querybank_metrics
from dualencoder.trainable import format_parameter_report, parameter_report, train_mode
from dualencoder.training.arguments import all_options, parse_args
from dualencoder.training.checkpoints import (best_model_dir, checkpoints_dir, earlier_checkpoints,
                                              keep_trained_weights_only, new_best_dir, read_loop_state, recover_swap,
                                              resolve_resume, resume_run, run_fingerprint, save_checkpoint,
                                              together, write_atomically)
from dualencoder.training.data import build_data, make_train_loader, views_read_while_training
from dualencoder.training.export import export
from dualencoder.training.feature_cache import FeatureCache
from dualencoder.training.model_setup import build_model, build_training_loss, head_init_options
from dualencoder.training.optim import cosine_with_warmup, make_optimizer
from dualencoder.training.preflight import check_free_space, check_writable
from dualencoder.training.publish import check_run_can_publish, upload_export
from dualencoder.training.research import apply_research_options
from dualencoder.training.sharded import WholeModel, full_tensor, is_sharded, prepare_for_sharding, sharding_problem
from dualencoder.training.step import TrainStep, compile_in_place
from dualencoder.training.streamed import StreamedEpochs
from dualencoder.training.stop import StopRequest
from modeling_dualencoder import DualEncoderModel

logger = logging.getLogger("run_contrastive")
LOWER_IS_BETTER = ("_medr", "_meanr")


def main(argv=None) -> dict:
    model_args, data_args, train_args, stated = parse_args(argv, with_sources=True)
    accelerator = start(train_args)
    show = accelerator.is_local_main_process

    # --- model, loss, data, and the caches of what does not train
    model = build_model(model_args, stated)
    check_free_space(train_args.output_dir, model, train_args.save_total_limit)  # before hours of training, not after
    loss_fn = build_training_loss(model_args, model.config)
    cca_init = head_init_options(model_args) if model_args.head_init == "cca" else None  # a bad option fails now
    processor = build_processor(model.config)
    logger.info("parameters:\n%s", format_parameter_report(parameter_report(model)))
    try:
        data = build_data(data_args, processor, seed=train_args.seed, image_size=model.config.image_size,
                          store_dir=train_args.feature_cache_dir or checkpoints_dir(train_args.output_dir),
                          main_process_first=accelerator.main_process_first, show_progress=show,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    except DatasetFormatError as error:  # a bad file, row or column: one line naming it, not a traceback
        raise SystemExit(f"error: {error}") from None
    if train_args.gradient_checkpointing:  # the trained towers recompute their activations in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    loss_fn.to(accelerator.device)
    if train_args.channels_last:  # convolutions then run in NHWC (caching included), whatever the input's layout
        model.vision_model.to(memory_format=torch.channels_last)
    if train_args.fused_kernels != "off" or train_args.fp8:  # same parameters, other kernels (dualencoder/kernels)
        logger.info("speed levers: %s", apply_levers(model, train_args.fused_kernels, train_args.fp8))
    cache_started = time.time()
    cached_views = views_read_while_training(data.eval_views)
    cache = FeatureCache.build(
        model, data.train_pairs, cached_views, {split: data.eval_captions[split] for split in cached_views},
        eval_transform=data.eval_transform,
        tokenizer=processor.tokenizer, max_length=data_args.max_length, device=accelerator.device,
        batch_size=train_args.per_device_eval_batch_size,
        # a stream's images are not known before they come: nothing of a streamed run is cached
        enabled=train_args.cache_frozen_features and data.stream is None, cache_dir=train_args.feature_cache_dir,
        dataset_key=data_args.dataset,
        pixel_store_size=data_args.pixel_store_size, prefix_dtype=train_args.prefix_cache_dtype, mirror=data.mirror,
        augment=data_args.augment, show_progress=show,
        main_process_first=accelerator.main_process_first)  # a disk cache: computed once, read by the others
    # one process reads the checkpoint through to find damage; the others take its answer
    resume = decided_by_main(lambda: resolve_resume(train_args.output_dir, train_args.resume_from_checkpoint))
    topics = apply_research_options(model, data.train_pairs, cache, topic_batches=data_args.topic_batches,
                                    topic_share=data_args.topic_share, cca_options=cca_init, seed=train_args.seed,
                                    topics=read_loop_state(resume).get("topics") if resume else None,
                                    resumed=bool(resume))
    cache_seconds = time.time() - cache_started
    # never decode images that a cache replaces
    train_pairs = data.train_pairs.remove_columns("image") if cache.replaces_images else data.train_pairs
    train_rows = cache.train_transform(data.train_transform, data.mirror, data.crop_draw)
    streamed = None if data.stream is None else StreamedEpochs(
        data.stream, train_rows, data.collator, accelerator, batch_size=train_args.per_device_train_batch_size,
        num_workers=data_args.dataloader_num_workers)

    def epoch_loader(epoch: int):
        return make_train_loader(train_pairs, train_rows, data.collator, data_args,
                                 train_args.per_device_train_batch_size, train_args.seed, epoch, topics)

    whole = WholeModel(accelerator, model)  # what reads the weights outside a forward (under FSDP: gathered)
    if is_sharded(accelerator):
        prepare_for_sharding(model)

    def evaluate(split: str):
        return cache.embed(whole(), data.eval_views[split], data.eval_captions[split])

    # --- optimiser and schedule (Accelerate steps a prepared scheduler once per process at each optimiser step:
    # the schedule is laid out in process-steps, or N processes would finish it after 1/N of the training)
    optimizer = make_optimizer(model, loss=loss_fn, backbone_lr=train_args.learning_rate,
                               vision_backbone_lr=train_args.vision_learning_rate,
                               lora_lr=train_args.lora_learning_rate, head_lr=train_args.head_learning_rate,
                               scale_lr=train_args.logit_scale_learning_rate, weight_decay=train_args.weight_decay)
    if streamed:  # a stream's epoch has no length known in advance: --max_steps is required with --streaming
        total_steps = train_args.max_steps
    else:
        steps_per_epoch = math.ceil(len(epoch_loader(0)) / accelerator.num_processes
                                    / train_args.gradient_accumulation_steps)
        total_steps = min(steps_per_epoch * train_args.num_train_epochs, train_args.max_steps or math.inf)
    processes = accelerator.num_processes
    scheduler = cosine_with_warmup(optimizer, int(train_args.warmup_ratio * total_steps) * processes,
                                   total_steps * processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    whole.track(model)
    keep_trained_weights_only(accelerator)  # checkpoints leave out frozen weights: the options rebuild them
    if any(p.requires_grad for p in loss_fn.parameters()):  # a loss that trains (a codebook): synced and saved
        loss_fn = accelerator.prepare(loss_fn)
    if train_args.torch_compile:  # in place: parameter names, checkpoints and save_pretrained stay as they are
        compile_for_training(accelerator.unwrap_model(model), train_args)
    if accelerator.log_with:
        options = all_options((model_args, data_args, train_args))
        accelerator.init_trackers("run_contrastive", config={name: str(value) for name, value in options.items()})

    # --- resume, or evaluate the untrained model
    fingerprint = run_fingerprint((model_args, data_args, train_args), train_pairs, data.stream)
    state = resume_run(accelerator, resume, fingerprint) if resume else {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None, "history": []}
    state["fingerprint"] = fingerprint
    if streamed and resume:
        streamed.load_state_dict(state.get("stream"))
    if topics is not None:
        state["topics"] = topics
    out = train_args.output_dir
    if not resume and train_args.eval_before_training and "validation" in data.eval_views:
        state["before_training"] = evaluate("validation").metrics()
        logger.info("validation before training:\n%s", format_metrics_table({"untrained": state["before_training"]}))
        # the starting point is the first candidate for the best model: training that only makes it worse
        # exports the model as it started (best_epoch 0), not the least bad epoch
        keep_if_best(state, state["before_training"], accelerator, whole, train_args.metric_for_best_model, out)

    # --- train: the loss is read on the host every step on CPU (free there), on a GPU at logging steps and saves
    hint = (f"Nothing was saved from that step on. Try a lower --learning_rate/--head_learning_rate, --max_grad_norm "
            f"1.0, --mixed_precision bf16 instead of fp16, or resume from the last checkpoint in "
            f"{train_args.output_dir}.")
    train_step = TrainStep(accelerator, model, loss_fn, optimizer, scheduler, max_grad_norm=train_args.max_grad_norm,
                           extras=cache.forward_extras, check_every=1 if accelerator.device.type == "cpu" else 0,
                           diverged_hint=hint, global_step=state["global_step"])
    if accelerator.is_main_process and best_model_dir(out, state):
        recover_swap(best_model_dir(out, state))  # a crash mid-swap must not lose the best model so far
    clock = TrainingClock(state.get("train_seconds", 0.0))  # with the training time of the runs this one resumes

    def checkpoint():
        train_step.check()
        state["train_seconds"] = clock.seconds()
        if streamed:
            state["stream"] = streamed.state_dict()  # every rank's position in its stream
        save_checkpoint(accelerator, train_args.output_dir, state["global_step"], state, train_args.save_total_limit)

    progress = tqdm(total=total_steps, initial=state["global_step"], desc="train", disable=not show)
    # (an epoch cut short by a crash after its last step's checkpoint still ends: validation, best model, checkpoint)
    with StopRequest() as stop:  # SIGINT/SIGTERM: a checkpoint after the step in flight, then exit
        while state["epoch"] < train_args.num_train_epochs and (state["global_step"] < total_steps
                                                                 or state["step_in_epoch"]):
            data.set_epoch(state["epoch"])
            loader = streamed.epoch(state["epoch"]) if streamed else resumable_loader(
                accelerator, epoch_loader(state["epoch"]), state, train_args)
            train_mode(accelerator.unwrap_model(model), freeze_batchnorm=train_args.freeze_batchnorm)
            train_one_epoch(loader, train_step, state, accelerator, train_args, total_steps, progress, checkpoint, stop)
            end_of_epoch(state, evaluate("validation").metrics() if "validation" in data.eval_views else None,
                         accelerator, whole, train_args.metric_for_best_model, out)
            checkpoint()
    progress.close()
    train_seconds = clock.seconds()
    accelerator.wait_for_everyone()

    # --- test the best model and export it
    final = whole()
    if state.get("best_epoch") == 0:
        logger.warning("no epoch beat the model as it was before training (validation %s %.2f): the exported model "
                       "is that starting point (best_epoch 0).", train_args.metric_for_best_model, state["best_metric"])
    if best_model_dir(out, state):
        final.load_state_dict(DualEncoderModel.from_pretrained(best_model_dir(out, state)).state_dict())
    metrics = {"before_training": state.get("before_training"), "validation": state.get("best_validation"),
               "best_epoch": state.get("best_epoch"), "train_seconds": round(train_seconds, 1),
               "cache_seconds": round(cache_seconds, 1), "global_step": state["global_step"],
               "resumed_from": resume or None}
    metrics.update(test_metrics(final, processor, data, train_args, data_args.max_length))
    if accelerator.is_main_process:
        export(final, processor, metrics, (model_args, data_args, train_args), state["history"])
        if train_args.push_to_hub:
            url = upload_export(train_args.output_dir, train_args.hub_model_id, train_args.hub_token)
            logger.info("uploaded %s to %s", train_args.output_dir, url)
    accelerator.end_training()
    return metrics


def start(train_args) -> Accelerator:
    """The accelerator, logging on the main process only, the seed, and a writable output_dir free of another
    run's checkpoints."""
    accelerator = Accelerator(mixed_precision=train_args.mixed_precision,
                              gradient_accumulation_steps=train_args.gradient_accumulation_steps,
                              log_with=None if train_args.report_to == "none" else train_args.report_to,
                              project_dir=train_args.output_dir)
    mismatch = launch_mismatch(os.environ, accelerator.num_processes, torch.cuda.device_count())
    mismatch = mismatch or sharding_problem(accelerator)
    if mismatch:  # before any process touches output_dir
        raise SystemExit(f"error: {mismatch}")
    # --push_to_hub: token, network and repository are checked now (by one process), not after the training
    train_args.hub_model_id = decided_by_main(lambda: check_run_can_publish(train_args)) or train_args.hub_model_id
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(train_args.seed)
    check_writable(train_args.output_dir)  # a file, or no permission: said now, not at the first checkpoint
    stale = earlier_checkpoints(train_args.output_dir, train_args.resume_from_checkpoint,
                                train_args.overwrite_output_dir)
    if stale and accelerator.is_main_process:
        logger.info("overwrite_output_dir: deleting %d checkpoints of an earlier run in %s", len(stale),
                    train_args.output_dir)
        for path in stale:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return accelerator


def resumable_loader(accelerator, loader, state: dict, train_args):
    """The epoch's prepared loader, from the batch a resumed run stopped at."""
    loader = accelerator.prepare(loader)
    # A prepared loader sets its sampler's epoch to its own count of iterations when iterated, 0 for this
    # new loader: without this every epoch would replay epoch 0's batches (on one process).
    loader.set_epoch(state["epoch"])
    if state["step_in_epoch"]:
        loader = accelerator.skip_first_batches(loader, state["step_in_epoch"] * train_args.gradient_accumulation_steps)
    return loader


def compile_for_training(model, train_args) -> None:
    compiled = compile_in_place(model, train_args.torch_compile_scope, backend=train_args.torch_compile_backend,
                                mode=train_args.torch_compile_mode)
    logger.info("torch.compile (%s, scope %s): %d modules", train_args.torch_compile_backend,
                train_args.torch_compile_scope, len(compiled))


def train_one_epoch(loader, train_step, state, accelerator, train_args, total_steps, progress, checkpoint,
                    stop: StopRequest) -> None:
    """Step through one epoch's batches (from `state["step_in_epoch"]` on), logging and checkpointing as asked;
    on a stop request (a signal), checkpoint and exit with that signal's code."""
    for batch in loader:
        if state["global_step"] >= total_steps:  # a resumed run whose last step was done before its epoch's end
            break
        loss = train_step(batch)
        if not accelerator.sync_gradients:
            continue
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        progress.update(1)
        if state["global_step"] % train_args.logging_steps == 0:
            train_step.check()
            loss = accelerator.reduce(loss, reduction="mean")  # the step's loss over every process's micro-batches
            record = {"step": state["global_step"], "epoch": state["epoch"], "loss": loss.item(),
                      "logit_scale": full_tensor(accelerator.unwrap_model(train_step.model).get_logit_scale()).item(),
                      "lr": train_step.scheduler.get_last_lr()[0]}
            state["history"].append(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", scale=f"{record['logit_scale']:.1f}")
            accelerator.log({"train/" + k: v for k, v in record.items() if k != "step"}, step=state["global_step"])
        if train_args.checkpointing_steps and state["global_step"] % train_args.checkpointing_steps == 0:
            checkpoint()
        if stop.requested(accelerator, synced=state["global_step"] % train_args.logging_steps == 0):
            checkpoint()
            logger.warning("stopped by %s after step %d: checkpoint-%d saved in %s; continue with "
                           "--resume_from_checkpoint latest", stop.name, state["global_step"], state["global_step"],
                           train_args.output_dir)
            raise SystemExit(stop.exit_code)
        if state["global_step"] >= total_steps:
            break
    train_step.check()


def end_of_epoch(state: dict, results, accelerator, whole, metric: str, output_dir: str) -> None:
    """Count the epoch done; log its validation results and save the model when they are the best so far
    (every process calls this: under FSDP they all take part in gathering the weights the main one saves)."""
    state["epoch"] += 1
    state["step_in_epoch"] = 0
    if results is None:
        return
    state["history"].append({"step": state["global_step"], "epoch": state["epoch"], **results})
    accelerator.log({"val/" + k: v for k, v in results.items()}, step=state["global_step"])
    logger.info("epoch %d validation: i2t R@1 %.1f R@5 %.1f | t2i R@1 %.1f R@5 %.1f | rsum %.1f", state["epoch"],
                results["i2t_r1"], results["i2t_r5"], results["t2i_r1"], results["t2i_r5"], results["rsum"])
    keep_if_best(state, results, accelerator, whole, metric, output_dir)


def keep_if_best(state: dict, results: dict, accelerator, whole, metric: str, output_dir: str) -> None:
    """Save the model as the best so far (`checkpoints/best-<step>`, named in the state) when `results` (of
    `state["epoch"]`; 0: before training) beat the best."""
    best = state["best_metric"]
    # the main process's evaluation decides for all (the others' might differ in a last bit): under FSDP every
    # process must then take part in gathering the weights, and only when they are saved
    if not decided_by_main(lambda: best is None or (results[metric] < best if metric.endswith(LOWER_IS_BETTER)
                                                    else results[metric] > best)):
        return
    model = whole()
    state["best_metric"], state["best_epoch"], state["best_validation"] = results[metric], state["epoch"], results
    best_dir = new_best_dir(output_dir, state["global_step"])
    state["best_dir"] = os.path.basename(best_dir)
    # the main process writes; a failed write ends every process with its line, not the main one alone
    together((lambda: write_atomically(best_dir, model.save_pretrained)) if accelerator.is_main_process else None)


def test_metrics(model, processor, data, train_args, max_length: int) -> dict:
    """The final model's test metrics (and without the test-time flip average, when it has one), and with
    querybank normalisation when asked (`--querybank_beta`), the training images being the bank.

    Every split is embedded here from its image files through the processor, as `evaluate_model` and a user's
    pipeline read them, never from the caches: a pixel store smaller than the images or a float16 prefix cache
    made the reported scores those of another model than the saved one (issue 30). The caches serve training and
    the choice of the best epoch only."""

    def from_files(view):
        return embed(model, processor, view, max_length=max_length, batch_size=train_args.per_device_eval_batch_size,
                     show_progress=False)

    metrics, embedded = {}, {}
    if "test" in data.eval_views:
        embedded["test"] = from_files(data.eval_views["test"])
        metrics["test"] = embedded["test"].metrics()
        if model.config.image_flip_average:  # what the test-time flip average adds
            model.config.image_flip_average = False
            metrics["test_without_flip_average"] = from_files(data.eval_views["test"]).metrics()
            model.config.image_flip_average = True
    if train_args.querybank_beta is not None and data.eval_views:
        started = time.time()
        bank_images = to_image_view(data.train_pairs)
        if train_args.querybank_max_images:
            bank_images = bank_images.select(range(min(train_args.querybank_max_images, len(bank_images))))
        bank = from_files(bank_images)
        for split, view in data.eval_views.items():
            scored = embedded.get(split) or from_files(view)
            metrics[f"{split}_querybank"] = querybank_metrics(scored, bank, train_args.querybank_beta)
        metrics["querybank"] = {"beta": train_args.querybank_beta, "bank": "train", "images": len(bank.image_ids),
                                "captions": len(bank.captions), "seconds": round(time.time() - started, 1)}
        logger.info("querybank (%d training images, %d captions, beta %g): embedded and scored in %.0f s",
                    len(bank.image_ids), len(bank.captions), train_args.querybank_beta, time.time() - started)
    return metrics


class TrainingClock:
    """This run's training time plus that of the runs it resumes (kept in each checkpoint's state)."""

    def __init__(self, earlier_seconds: float):
        self.earlier_seconds, self.started = earlier_seconds, time.time()

    def seconds(self) -> float:
        return self.earlier_seconds + time.time() - self.started



if __name__ == "__main__":
    main()
