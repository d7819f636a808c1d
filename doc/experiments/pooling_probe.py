"""Which global pooling of EfficientNet-Lite0's last feature map serves retrieval best?

A probe, not a toolkit feature: the frozen ImageNet tower's 9x9x1280 map (288 px) is pooled
several ways (average, as timm does; max; their mean; GeM with p=3), and for each the
InfoNCE MLP-heads baseline (`dualencoder.baselines.projection_head.ContrastiveHeads`, the same
one `compare.py` runs) is trained on frozen MiniLM mean-pooled captions and scored on the test split.
It reads the depth-8 vision prefix that `run_contrastive.py` cached (`--prefix`) and runs the
tower's top from it, so it costs a forward pass of the top blocks, not of the whole tower.

    python doc/experiments/pooling_probe.py --prefix <cache dir>/vision-prefix-<key>.pt
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm


from data_scripts import load_image_caption_dataset
from dualencoder.baselines.base import evaluate
from dualencoder.baselines.features import SplitFeatures
from dualencoder.baselines.projection_head import ContrastiveHeads
from dualencoder.evaluation.embed import pooled_text_features, split_captions
from dualencoder.processing import build_processor
from dualencoder.trainable import tower_blocks
from modeling_dualencoder import DualEncoderModel

POOLINGS = {
    "avg": lambda m: m.mean((2, 3)),
    "max": lambda m: m.amax((2, 3)),
    "avgmax": lambda m: (m.mean((2, 3)) + m.amax((2, 3))) / 2,
    "gem3": lambda m: m.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3),
}


@torch.no_grad()
def top_maps(model, prefix: dict, image_ids: list[str], depth: int, batch: int = 32) -> torch.Tensor:
    """The tower's last map (after conv_head and its BatchNorm + activation), un-pooled: [N, 1280, h, w]."""
    tower = model.vision_model.eval()
    blocks = tower_blocks(tower)
    maps = []
    for start in tqdm(range(0, len(image_ids), batch), desc="top of the tower"):
        hidden = torch.stack([prefix[i] for i in image_ids[start:start + batch]]).float()
        hidden = hidden.contiguous(memory_format=torch.channels_last)
        for block in blocks[depth:]:
            hidden = block(hidden)
        maps.append(tower.bn2(tower.conv_head(hidden)).half())
    return torch.cat(maps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", required=True, help="run_contrastive's vision-prefix-<key>.pt (depth 8, 288 px)")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=288)
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    model = DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2",
                                                         image_size=args.image_size).eval()
    model.vision_model.to(memory_format=torch.channels_last)
    prefix = torch.load(args.prefix, weights_only=True)
    views = load_image_caption_dataset(args.data, view="images")
    tokenizer = build_processor(model.config).tokenizer
    splits = {}
    for split in ("train", "validation", "test"):
        image_ids, captions, text_to_image = split_captions(views[split])
        text = pooled_text_features(model, captions, tokenizer, max_length=40, batch_size=256, device="cpu",
                                    desc=f"text {split}", show_progress=True)
        splits[split] = (image_ids, torch.stack([text[c] for c in captions]).float(), text_to_image,
                         top_maps(model, prefix, image_ids, args.depth))
    results = {}
    for name, pool in POOLINGS.items():
        features = {split: SplitFeatures(pool(maps.float()), texts, t2i, ids)
                    for split, (ids, texts, t2i, maps) in splits.items()}
        heads = ContrastiveHeads().fit(features["train"].images, features["train"].texts,
                                       features["train"].text_to_image, val=features["validation"])
        results[name] = {"validation": evaluate(heads, features["validation"]), "test": evaluate(heads, features["test"]),
                         "epoch": heads.selected.get("epoch")}
        t = results[name]["test"]
        print(f"{name:8s} val rsum {results[name]['validation']['rsum']:.1f} | test "
              f"{t['i2t_r1']:.1f} / {t['i2t_r5']:.1f} / {t['i2t_r10']:.1f} | "
              f"{t['t2i_r1']:.1f} / {t['t2i_r5']:.1f} / {t['t2i_r10']:.1f} | rsum {t['rsum']:.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
