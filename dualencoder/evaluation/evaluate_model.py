"""Evaluate a saved dual encoder, and/or the untrained joined pair, on a split of an image-caption set.

    python -m dualencoder.evaluation.evaluate_model --model_dir outputs/default --dataset synthetic \
        --split test --untrained --output_json outputs/default/eval_test.json

`--model_dir` is a directory written by `run_contrastive.py` (model + processor), or a Hub id when
online. `--untrained` adds the untrained joined backbones (fresh projection heads) as a baseline
(its old name `--zero_shot` still works, with a warning: zero-shot means something else to CLIP
users, classification by prompts, which is `python -m dualencoder.apps.classify`):
by default the backbones named in the model's config, else the offline pair. The command prints a
markdown table (`format_metrics_table`) and writes the metrics, the similarity gap and the split
sizes as JSON. `--rerank_top_k 16 32` adds the model's retrieval re-ranked by the co-attention re-ranker
saved in its `reranker/` folder (`dualencoder/rerank/`, doc/RERANKER.md), a row per k.

The helpers it shares with the figures and report commands and the notebook (loading a model or the
zero-shot pair, a split, embedding it) are in `dualencoder/evaluation/common.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

from dualencoder.evaluation.common import (add_data_arguments, add_zero_shot_arguments, data_options, describe, embed,
                                           load_model, load_split, load_trained_config, load_zero_shot,
                                           zero_shot_backbones)
from dualencoder.metrics import format_metrics_table
from dualencoder.querybank import querybank_metrics

logger = logging.getLogger(__name__)


class _DeprecatedZeroShot(argparse.Action):
    """`--zero_shot`, the old name of `--untrained`: still sets it, with a warning."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn("--zero_shot is deprecated, use --untrained (the untrained joined backbones); zero-shot "
                      "classification with prompts is `python -m dualencoder.apps.classify`", FutureWarning)
        setattr(namespace, self.dest, True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualencoder.evaluation.evaluate_model",
        description="Image<->text retrieval metrics (Recall@K, median/mean rank, RSUM) of a saved dual "
                    "encoder and/or the untrained joined pair, on one split of a data set.")
    parser.add_argument("--model_dir", default=None, help="a run's output directory, or a Hub model id")
    parser.add_argument("--untrained", action="store_true",
                        help="also evaluate the untrained joined backbones (fresh projection heads) as a baseline")
    parser.add_argument("--zero_shot", action=_DeprecatedZeroShot, dest="untrained",
                        help="deprecated name of --untrained")
    add_zero_shot_arguments(parser)
    add_data_arguments(parser)
    bank = parser.add_argument_group("querybank normalisation (dualencoder/querybank.py)")
    bank.add_argument("--querybank_split", default=None,
                      help="also score with QB-Norm, the querybank being this split's images and captions (e.g. "
                           "train; never the evaluated split). Costs one embedding pass over it.")
    bank.add_argument("--querybank_beta", type=float, nargs="+", default=[10.0],
                      help="inverse temperature(s) of the querybank's inverted softmax; each gets a row "
                           "(default: 10, chosen on Flickr8k validation)")
    bank.add_argument("--querybank_max_images", type=int, default=None,
                      help="the first N images of the querybank split (and their captions) form the bank "
                           "(default: all)")
    parser.add_argument("--rerank_top_k", type=int, nargs="+", default=None, metavar="K",
                        help="also re-rank the model's top-K both ways with the co-attention re-ranker saved in "
                             "<model_dir>/reranker/ (python -m dualencoder.rerank.train); one row per K, e.g. 16 32")
    parser.add_argument("--output_json", default=None, help="write the results here as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation the parsed arguments describe; returns what `--output_json` holds."""
    if not args.model_dir and not args.untrained:
        raise SystemExit("nothing to evaluate: pass --model_dir DIR and/or --untrained")
    if args.querybank_split is not None and args.querybank_split == args.split:
        raise SystemExit(f"--querybank_split {args.querybank_split} is the evaluated split: the querybank must be "
                         "other queries (e.g. --querybank_split train), or the test queries would score themselves")
    if args.rerank_top_k and not args.model_dir:
        raise SystemExit("--rerank_top_k re-ranks a saved model's top-k: pass --model_dir DIR")
    trained_config = load_trained_config(args.model_dir) if args.model_dir else None  # a bad path fails first
    if args.rerank_top_k:
        from dualencoder.rerank.model import require_reranker  # loaded only when asked for

        require_reranker(args.model_dir)
    options = data_options(args.model_dir, **vars(args))
    view = load_split(**options)
    bank_view = None
    if args.querybank_split is not None:
        bank_view = load_split(**{**options, "split": args.querybank_split, "max_images": args.querybank_max_images})
        logger.info("querybank: %s/%s, %d images", options["dataset"], args.querybank_split, len(bank_view))
    logger.info("evaluating on %s/%s: %d images", options["dataset"], options["split"], len(view))
    show = not args.quiet
    # (key, row name, loader): one model in memory at a time
    runs = []
    if args.model_dir:
        runs.append(("model", args.model_dir, lambda: load_model(args.model_dir, args.device)))
    if args.untrained:
        vision, text = zero_shot_backbones(trained_config, args.vision_model, args.text_model)
        runs.append(("untrained", f"untrained ({vision} + {text})",
                     lambda: load_zero_shot(vision, text, args.device, like=trained_config)))

    results = {}
    num_captions = 0
    for key, name, load in runs:
        model, processor = load()
        embedded = embed(model, processor, view, max_length=options["max_length"], batch_size=args.batch_size,
                         show_progress=show)
        results[key] = {"name": name, **describe(embedded)}
        if bank_view is not None:
            bank = embed(model, processor, bank_view, max_length=options["max_length"], batch_size=args.batch_size,
                         show_progress=show)
            results[key]["querybank"] = {
                "split": args.querybank_split, "images": len(bank.image_ids), "captions": len(bank.captions),
                "metrics": {f"{beta:g}": querybank_metrics(embedded, bank, beta) for beta in args.querybank_beta}}
        if key == "model" and args.rerank_top_k:
            from dualencoder.rerank.rerank import rerank_results  # loaded only when asked for

            results[key]["rerank"] = rerank_results(model, processor, args.model_dir, view, embedded, args.rerank_top_k,
                                                    max_length=options["max_length"], batch_size=args.batch_size,
                                                    show_progress=show)
        del model
        num_captions = len(embedded.captions)
    return {"dataset": options["dataset"], "split": options["split"], "num_images": len(view),
            "num_captions": num_captions, "data_options": options, "results": results}


def results_table(output: dict) -> str:
    rows = {}
    for run in output["results"].values():
        rows[run["name"]] = run["metrics"]
        bank = run.get("querybank")
        for beta, metrics in (bank["metrics"].items() if bank else ()):
            rows[f"{run['name']}, querybank {bank['split']} beta {beta}"] = metrics
        for k, rerank in run.get("rerank", {}).items():
            rows[f"{run['name']}, re-ranked top-{k}"] = rerank["metrics"]
            if rerank["dual_weight"]:
                rows[f"{run['name']}, re-ranked top-{k} (re-ranker score only)"] = rerank["itm_only_metrics"]
    return format_metrics_table(rows)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output = evaluate(args)
    print(f"\n{output['dataset']} / {output['split']}: {output['num_images']} images, "
          f"{output['num_captions']} captions\n")
    print(results_table(output))
    for run in output["results"].values():
        gap = run["similarity"]
        print(f"\n{run['name']}: mean similarity aligned {gap['pos_mean']:.3f}, misaligned {gap['neg_mean']:.3f}, "
              f"gap {gap['gap']:.3f}")
    for k, rerank in output["results"].get("model", {}).get("rerank", {}).items():
        print(f"re-ranking top-{k}: {rerank['ms_per_query']:.1f} ms per query (top-{rerank['scored_top_k']}'s "
              f"{rerank['pairs_scored']} pairs scored in {rerank['seconds']:.1f} s), dual_weight {rerank['dual_weight']:g}")
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2))
        print(f"\nwrote {path}")
    return output



if __name__ == "__main__":
    main()
