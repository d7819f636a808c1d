"""Pairs per second of the co-attention re-ranker (dualencoder/rerank/model.py): training steps and scoring.

    python benchmarks/rerank_speed.py --threads 1 --bf16 true

One batch of random token outputs of the shipped model's shapes (81 vision tokens of width 320: EfficientNet-
Lite0's last 9 x 9 map at 288 px; 18 text tokens of width 384: MiniLM), the re-ranker at the training
command's defaults. A training step is forward, binary cross-entropy, backward and AdamW, under bf16 autocast
when asked (as `dualencoder.rerank.train --bf16`); scoring is a float32 forward without gradients (as
validation and `evaluate --rerank_top_k`). The numbers size `--positives_per_epoch`, `--epochs` and
`--max_minutes` (doc/RERANKER.md).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import add_threads_argument, clock_calls, command_line, median, set_threads, write_json
from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig
from dualencoder.rerank.train import itm_step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=512)
    parser.add_argument("--vision_tokens", type=int, default=81)
    parser.add_argument("--text_tokens", type=int, default=18)
    parser.add_argument("--batch_size", type=int, default=48, help="pairs per step (16 positives x 3 by default)")
    parser.add_argument("--bf16", choices=("true", "false"), default="true", help="bf16 autocast for training steps")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output_json", default="benchmarks/results/rerank_speed.json")
    add_threads_argument(parser)
    return parser


def measure(args) -> dict:
    torch.manual_seed(0)
    config = RerankerConfig(text_dim=384, vision_dim=320, num_vision_tokens=args.vision_tokens,
                            hidden_size=args.hidden_size, num_layers=args.num_layers,
                            intermediate_size=args.intermediate_size)
    reranker = CoAttentionReranker(config)
    text, vision = torch.randn(args.batch_size, args.text_tokens, 384), torch.randn(args.batch_size, args.vision_tokens, 320)
    mask, labels = torch.ones(args.batch_size, args.text_tokens, dtype=torch.long), torch.rand(args.batch_size).round()
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=1e-4)

    def train_step():
        itm_step(reranker, optimizer, text, mask, vision, labels, bf16=args.bf16 == "true")

    @torch.no_grad()
    def score():
        reranker(text, mask, vision)

    def seconds(run, train: bool) -> float:
        reranker.train(train)
        return median(clock_calls(run, torch.device("cpu"), args.warmup, args.steps).seconds())

    train_s, score_s = seconds(train_step, True), seconds(score, False)
    return {"command": command_line(), "threads": torch.get_num_threads(), "parameters": reranker.num_parameters(),
            "config": config.to_diff_dict(), "batch_size": args.batch_size, "bf16_training": args.bf16 == "true",
            "train_pairs_per_s": args.batch_size / train_s, "score_pairs_per_s": args.batch_size / score_s}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    result = measure(args)
    print(f"{result['parameters'] / 1e6:.2f} M parameters, {result['threads']} thread(s): training "
          f"{result['train_pairs_per_s']:.1f} pairs/s, scoring {result['score_pairs_per_s']:.1f} pairs/s")
    if args.output_json:
        write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
