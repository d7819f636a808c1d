"""Train the co-attention re-ranker on a trained dual encoder's frozen towers, and save it in the export folder.

    python -m dualencoder.rerank.train --model_dir outputs/flickr8k_offline --data ../shared/data/flickr8k \
        --output outputs/flickr8k_offline_rerank

Set-up, then the loop, as the dual encoder's training reads: load the dual encoder (frozen), cache the
towers' token outputs of the train split and of the first `--dev_images` validation images
(`features.py`), mine each train image's and caption's hardest wrong partners from the dual encoder's
own scores (`mining.py`), then each epoch draw `--positives_per_epoch` true pairs, one negative caption
and one negative image for each, and fit the re-ranker with binary cross-entropy (or, `--objective listwise`,
`--group_size - 1` negatives per direction and softmax cross-entropy over each group). After each epoch the
re-ranker re-ranks the validation images' top `--dev_top_k` both ways; the epoch with the best RSUM (at
the best blend weight) is kept. `--max_minutes` bounds the training loop (caching excluded): it ends the
epoch early and still validates and saves. The output folder holds the dual encoder (copied when it is
not `--model_dir`) with the re-ranker in `reranker/`, and `reranker/training_log.json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dualencoder.evaluation.common import (TRAINING_ARGS_FILE, data_options, load_model, load_split,
                                           load_trained_config)
from dualencoder.rerank.features import split_features
from dualencoder.rerank.mining import draw_groups, draw_negatives, mine_hard_negatives
from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig, save_reranker
from dualencoder.rerank.rerank import best_dual_weight, rerank_top_k

logger = logging.getLogger(__name__)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualencoder.rerank.train",
                                     description="Train a co-attention re-ranker of a trained dual encoder's top-k.")
    parser.add_argument("--model_dir", required=True, help="a trained dual encoder's export folder")
    parser.add_argument("--data", default=None,
                        help="the data set it was trained on: a Flickr8k folder, a folder of your images and captions, "
                             "or 'synthetic' (default: the run's, with its tables and columns, from its "
                             "training_args.json)")
    parser.add_argument("--output", default=None,
                        help="folder to write the dual encoder + reranker/ into (default: --model_dir itself)")
    data = parser.add_argument_group("data")
    data.add_argument("--train_images", type=int, default=None, help="use the first N train images (default: all)")
    data.add_argument("--dev_images", type=int, default=100,
                      help="validation images the epochs are compared on (each validation scores up to "
                           "(images + captions) x dev_top_k pairs)")
    data.add_argument("--num_images", type=int, default=None, help="synthetic only: size of the generated set")
    data.add_argument("--synthetic_image_size", type=int, default=None, help="synthetic only: image size")
    data.add_argument("--max_length", type=int, default=None, help="tokens per caption (default: the run's)")
    data.add_argument("--cache_dir", default=None,
                      help="where the towers' token outputs are cached (default: <output>/../rerank_cache)")
    model = parser.add_argument_group("re-ranker")
    model.add_argument("--hidden_size", type=int, default=256)
    model.add_argument("--num_layers", type=int, default=2, help="co-attention layers (2-4)")
    model.add_argument("--num_heads", type=int, default=4)
    model.add_argument("--intermediate_size", type=int, default=512)
    model.add_argument("--dropout", type=float, default=0.1)
    train = parser.add_argument_group("training")
    train.add_argument("--hard_negatives", type=_bool, default=True,
                       help="true: negatives drawn from the dual encoder's top --negatives_top_n; false: random")
    train.add_argument("--negatives_top_n", type=int, default=16)
    train.add_argument("--paraphrase_quantile", type=float, default=0.5,
                       help="do not mine a caption as a negative of an image when it is at least as close to one of "
                            "the image's own captions as this quantile of two captions of one image (cosine of the "
                            "dual encoder's text embeddings; 0.5: as close as a typical pair of the image's own "
                            "captions): such pairs are likely true matches. Pass -1 to mine them too (default: 0.5, "
                            "chosen on Flickr8k's whole validation split, doc/RERANKER.md)")
    train.add_argument("--hard_fraction", type=float, default=0.5,
                       help="with --hard_negatives true, the share of negatives drawn from the mined top-n (the rest "
                            "random; default 0.5, chosen with --paraphrase_quantile on Flickr8k's validation split)")
    train.add_argument("--objective", choices=("bce", "listwise"), default="bce",
                       help="bce: binary cross-entropy on each pair (one negative caption and one negative image per "
                            "positive); listwise: softmax cross-entropy over a positive and --group_size - 1 "
                            "negatives per direction, scored as at test time (itm + --listwise_dual_weight x the "
                            "dual encoder's logit): the re-ranker learns to correct the dual encoder's order")
    train.add_argument("--group_size", type=int, default=8, help="listwise: candidates per group (1 positive)")
    train.add_argument("--listwise_dual_weight", type=float, default=1.0,
                       help="listwise: weight of the dual encoder's logit added to each pair's score in training "
                            "(0: the re-ranker's score alone)")
    train.add_argument("--epochs", type=int, default=8,
                       help="at most this many epochs; --max_minutes may end the run sooner (the best epoch is kept)")
    train.add_argument("--positives_per_epoch", type=int, default=3000,
                       help="true pairs per epoch, each with one negative caption and one negative image")
    train.add_argument("--positives_per_batch", type=int, default=16)
    train.add_argument("--learning_rate", type=float, default=3e-4)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--max_minutes", type=float, default=30.0,
                       help="time budget of the training loop (caching excluded); it stops cleanly, validates, saves")
    train.add_argument("--dev_top_k", type=int, default=16, help="candidates re-ranked per validation query")
    train.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("compute")
    run.add_argument("--batch_size", type=int, default=64, help="images/captions/pairs per inference batch")
    run.add_argument("--device", default="auto")
    run.add_argument("--bf16", type=_bool, default=True,
                     help="train the re-ranker under bfloat16 autocast (CPU or CUDA; its weights stay float32, and "
                          "validation and re-ranking run in float32)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def pair_logits(reranker, text, mask, vision, *, bf16: bool = False) -> torch.Tensor:
    """The re-ranker's float32 logits of a batch of pairs, under bf16 autocast when asked (training only)."""
    device = next(reranker.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return reranker(text.to(device), mask.to(device), vision.to(device)).float()


def _update(optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def itm_step(reranker, optimizer, text, mask, vision, labels, *,
             bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of binary cross-entropy on a batch of pairs: (logits, loss). The training loop's step,
    and the one `benchmarks/rerank_speed.py` times."""
    logits = pair_logits(reranker, text, mask, vision, bf16=bf16)
    # one positive per two negatives: weighted so both classes count equally
    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=logits.new_tensor(2.0))
    _update(optimizer, loss)
    return logits, loss


def listwise_step(reranker, optimizer, text, mask, vision, dual, group_size: int, *,
                  bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of the listwise objective: (group scores `[2n, group_size]`, loss).

    The batch holds n positives, then `group_size - 1` negative captions of each positive's image, then as many
    negative images of each positive caption (`n * (2 * group_size - 1)` pairs). Each positive and its negatives
    of one direction form a group, scored as at test time (`itm + dual`, `dual` the dual encoder's weighted logits
    of the pairs: with weight 0 the re-ranker's alone) and trained with softmax cross-entropy towards the positive:
    the re-ranker learns to correct the dual encoder's order of its own top candidates, as it will be used."""
    logits = pair_logits(reranker, text, mask, vision, bf16=bf16) + dual.to(next(reranker.parameters()).device)
    n, others = logits.shape[0] // (2 * group_size - 1), group_size - 1
    positive = logits[:n, None]
    groups = torch.cat([torch.cat([positive, logits[n:n + n * others].view(n, others)], 1),
                        torch.cat([positive, logits[n + n * others:].view(n, others)], 1)])
    loss = F.cross_entropy(groups, torch.zeros(2 * n, dtype=torch.long, device=groups.device))
    _update(optimizer, loss)
    return groups, loss


def train_one_epoch(reranker, optimizer, scheduler, tokens, embedded, hard, *, positives: int, per_batch: int,
                    generator, deadline: float, bf16: bool = False, hard_fraction: float = 1.0, group_size: int = 0,
                    dual_scale: float = 0.0) -> dict:
    """One epoch on true pairs and their drawn negatives; stops at `deadline`.

    `group_size` 0: binary cross-entropy, one negative caption and one negative image per positive (`itm_accuracy`:
    pairs classified right); else the listwise objective on groups of that size (`group_accuracy`: groups whose
    positive scores highest), the dual encoder's logits times `dual_scale` added to the pairs' scores."""
    reranker.train()
    t2i = embedded.text_to_image
    order = torch.randperm(t2i.shape[0], generator=generator)[:positives]
    if group_size:
        neg_captions, neg_images = draw_groups(order, t2i, hard, generator, group_size, hard_fraction)
    else:
        neg_captions, neg_images = draw_negatives(order, t2i, hard, generator, hard_fraction)
    device = next(reranker.parameters()).device
    total, correct, loss_sum, steps, start = 0, 0, 0.0, 0, time.perf_counter()
    for first in range(0, order.shape[0], per_batch):
        if time.monotonic() > deadline:
            logger.info("--max_minutes reached: ending the epoch after %d pairs", total)
            break
        pos = order[first:first + per_batch]
        batch_captions, batch_images = neg_captions[first:first + per_batch], neg_images[first:first + per_batch]
        if group_size:
            others = group_size - 1
            texts = torch.cat([pos, batch_captions.reshape(-1), pos.repeat_interleave(others)])
            images = torch.cat([t2i[pos], t2i[pos].repeat_interleave(others), batch_images.reshape(-1)])
        else:
            texts = torch.cat([pos, batch_captions, pos])
            images = torch.cat([t2i[pos], t2i[pos], batch_images])
        text, mask, vision = tokens.batch([embedded.image_ids[i] for i in images.tolist()],
                                          [embedded.captions[j] for j in texts.tolist()])
        if group_size:
            dual = dual_scale * (embedded.image_embeds[images] * embedded.text_embeds[texts]).sum(-1)
            groups, loss = listwise_step(reranker, optimizer, text, mask, vision, dual, group_size, bf16=bf16)
            total += groups.shape[0]
            correct += int((groups.argmax(1) == 0).sum())
        else:
            labels = torch.cat([torch.ones(len(pos)), torch.zeros(2 * len(pos))]).to(device)
            logits, loss = itm_step(reranker, optimizer, text, mask, vision, labels, bf16=bf16)
            total += len(labels)
            correct += int(((logits > 0).float() == labels).sum())
        scheduler.step()
        loss_sum += loss.item()
        steps += 1
    seconds = time.perf_counter() - start
    pairs = total * (2 * group_size - 1) // 2 if group_size else total
    return {"pairs": pairs, "loss": loss_sum / max(steps, 1),
            ("group_accuracy" if group_size else "itm_accuracy"): correct / max(total, 1),
            "seconds": seconds, "pairs_per_second": pairs / max(seconds, 1e-9)}


def validate(reranker, tokens, embedded, k: int, dual_scale: float, batch_size: int) -> dict:
    """Re-ranked validation metrics at the best blend weight, in float32 as the evaluate command scores."""
    top = rerank_top_k(reranker, tokens, embedded, k, dual_scale, batch_size)
    weight, metrics = best_dual_weight(top, embedded.text_to_image)
    return {"dual_weight": weight, "metrics": metrics, "ms_per_query": top.ms_per_query, "seconds": top.seconds}


def save_output(model, processor, reranker, model_dir: str, output: str) -> Path:
    """The re-ranker in `<output>/reranker/`; the dual encoder (and its run's options) copied there first if needed."""
    if Path(output).resolve() != Path(model_dir).resolve():
        model.save_pretrained(output)
        processor.save_pretrained(output)
        if (Path(model_dir) / TRAINING_ARGS_FILE).is_file():
            shutil.copy(Path(model_dir) / TRAINING_ARGS_FILE, Path(output) / TRAINING_ARGS_FILE)
    return save_reranker(reranker, output)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not 2 <= args.num_layers <= 4:
        raise SystemExit(f"--num_layers {args.num_layers}: use 2-4 co-attention layers")
    if args.objective == "listwise" and args.group_size < 2:
        raise SystemExit(f"--group_size {args.group_size}: a group is a positive and at least one negative")
    load_trained_config(args.model_dir)  # a path without a saved model fails here, in one line
    output = args.output or args.model_dir
    cache_dir = args.cache_dir or str(Path(output).resolve().parent / "rerank_cache")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    model, processor = load_model(args.model_dir, args.device)
    device = next(model.parameters()).device
    options = data_options(args.model_dir, dataset=args.data, num_images=args.num_images,
                           synthetic_image_size=args.synthetic_image_size, max_length=args.max_length)
    features = dict(max_length=options["max_length"], batch_size=args.batch_size, device=device, cache_dir=cache_dir,
                    show_progress=not args.quiet)
    started = time.perf_counter()
    train_view = load_split(**{**options, "split": "train", "max_images": args.train_images})
    train_tokens, train = split_features(model, processor, train_view, mirror_average=False, **features)
    dev_tokens, dev = split_features(model, processor, load_split(**{**options, "split": "validation",
                                                                      "max_images": args.dev_images}), **features)
    caching_seconds = time.perf_counter() - started
    dual_scale = float(model.get_logit_scale().detach())
    quantile = None if args.paraphrase_quantile < 0 else args.paraphrase_quantile
    hard = mine_hard_negatives(train.image_embeds, train.text_embeds, train.text_to_image, args.negatives_top_n,
                               paraphrase_quantile=quantile) if args.hard_negatives else None
    logger.info("train: %d images, %d captions; validation: %d images; token caching took %.0f s",
                len(train.image_ids), len(train.captions), len(dev.image_ids), caching_seconds)

    config = RerankerConfig(**train_tokens.widths, hidden_size=args.hidden_size, num_layers=args.num_layers,
                            num_heads=args.num_heads, intermediate_size=args.intermediate_size, dropout=args.dropout,
                            rerank_top_k=args.dev_top_k)
    reranker = CoAttentionReranker(config).to(device)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(min(args.positives_per_epoch, len(train.captions)) / args.positives_per_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))

    dual_dev = dev.metrics()
    log = {"dual_encoder_validation": dual_dev, "caching_seconds": caching_seconds, "options": vars(args), "epochs": [],
           "paraphrase_share": hard.paraphrase_share if hard is not None else None}
    logger.info("dual encoder, validation (%d images): RSUM %.1f", len(dev.image_ids), dual_dev["rsum"])
    best, best_state = None, None
    deadline = time.monotonic() + 60 * args.max_minutes
    for epoch in range(1, args.epochs + 1):
        stats = train_one_epoch(reranker, optimizer, scheduler, train_tokens, train, hard,
                                positives=args.positives_per_epoch, per_batch=args.positives_per_batch,
                                generator=generator, deadline=deadline, bf16=args.bf16,
                                hard_fraction=args.hard_fraction,
                                group_size=args.group_size if args.objective == "listwise" else 0,
                                dual_scale=args.listwise_dual_weight * dual_scale)
        result = {"epoch": epoch, **stats, "validation": validate(reranker, dev_tokens, dev, args.dev_top_k,
                                                                  dual_scale, args.batch_size)}
        log["epochs"].append(result)
        rsum = result["validation"]["metrics"]["rsum"]
        accuracy = "group_accuracy" if args.objective == "listwise" else "itm_accuracy"
        logger.info("epoch %d: %d pairs at %.1f pairs/s, loss %.4f, %s %.3f; validation re-ranked top-%d "
                    "RSUM %.1f (dual_weight %g; dual encoder %.1f)", epoch, stats["pairs"], stats["pairs_per_second"],
                    stats["loss"], accuracy.replace("_", " "), stats[accuracy], args.dev_top_k, rsum,
                    result["validation"]["dual_weight"], dual_dev["rsum"])
        if best is None or rsum > best["validation"]["metrics"]["rsum"]:
            best, best_state = result, copy.deepcopy(reranker.state_dict())
        if time.monotonic() > deadline:
            break
    reranker.load_state_dict(best_state)
    best_rsum = best["validation"]["metrics"]["rsum"]
    reranker.config.dual_weight = best["validation"]["dual_weight"]
    reranker.config.validation_gain = round(best_rsum - dual_dev["rsum"], 2)
    log["best_epoch"] = best["epoch"]
    folder = save_output(model, processor, reranker, args.model_dir, output)
    (folder / "training_log.json").write_text(json.dumps(log, indent=2))
    print(f"\nre-ranker saved in {folder}: epoch {best['epoch']}, validation RSUM {best_rsum:.1f} "
          f"re-ranked top-{args.dev_top_k} (dual_weight {reranker.config.dual_weight:g}) vs {dual_dev['rsum']:.1f} "
          "for the dual encoder alone")
    if reranker.config.validation_gain <= 0:
        print(f"warning: no epoch re-ranked the {len(dev.image_ids)} validation images better than the dual encoder "
              "alone, so re-ranking with it (--rerank_top_k) will likely make retrieval worse; train longer "
              "(--max_minutes, --epochs), on more data, or validate on more images (--dev_images) before using it")
    return log


if __name__ == "__main__":
    main()
