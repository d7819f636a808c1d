#!/usr/bin/env python
"""Exploratory harness behind the depth / caption ablation in doc/FLICKR8K_RECIPE.md.

Not part of the toolkit: a deliberately small loop that answers "how much does tuning the top of
EfficientNet-Lite0 add?" in minutes, before spending an hour per question on `run_contrastive.py`.
By default it keeps the text tower frozen (pooled MiniLM features from `dualencoder.baselines.features`),
caches the 14x14x112 output of EfficientNet's first 11 blocks once (plain and mirrored), and
trains the chosen top stages + MLP heads with a CLIP loss in which each image sees one or all
five of its captions per step (multi-positive). The shipped recipe is then run and measured by
`run_contrastive.py --config configs/flickr8k_offline.yaml`.

    python doc/experiments/prefix_ablation.py cache --out /tmp/prefix224.pt
    python doc/experiments/prefix_ablation.py train --prefix /tmp/prefix224.pt --stages 5,6 --captions 5

With `text-cache --depth 4 --out /tmp/text_d4.pt` and `train --text_cache /tmp/text_d4.pt`, MiniLM's
layers above depth 4 train too, from cached token states (`DualEncoderModel.text_prefix/text_suffix`);
`--tta 1` also reports the test split with plain and mirrored image embeddings averaged.
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "flickr8k"
SPLITS = ("train", "validation", "test")
PREFIX_DEPTH = 11  # stem + EfficientNet stages 0-4 (11 blocks) are cached; stages 5 and 6 + conv_head may train
TRAIN_MODE = {"": "frozen", "6": "top:1", "5,6": "top:5"}  # --stages -> vision_train


def load_backbones():
    from modeling_dualencoder import DualEncoderModel

    return DualEncoderModel.from_vision_text_pretrained("offline:efficientnet-lite0", "offline:all-minilm-l6-v2")


def cache(args):
    from data_scripts import ImageTransform, load_image_caption_dataset, to_image_view
    from dualencoder.processing import build_processor

    model = load_backbones().eval()
    transform = ImageTransform(build_processor(model.config).image_processor, train=False)
    pairs = load_image_caption_dataset(str(args.data), view="pairs", seed=42)
    out = {}
    for split in SPLITS:
        view = to_image_view(pairs[split])
        hidden = []
        for start in range(0, len(view), 64):
            pixels = torch.stack([transform.pixels(image) for image in view[start:start + 64]["image"]])
            with torch.no_grad():
                both = [model.vision_prefix(x, PREFIX_DEPTH) for x in (pixels, pixels.flip(-1))]
            hidden.append(torch.stack(both, 1).half())
            print(f"{split} {start + len(pixels)}/{len(view)}", flush=True)
        out[split] = {"ids": list(view["image_id"]), "h": torch.cat(hidden)}
    torch.save(out, args.out)


def text_cache(args):
    """MiniLM's token states after its first `--depth` layers, for every caption (trimmed, float16)."""
    from dualencoder.baselines.features import load_features
    from dualencoder.processing import build_processor

    model = load_backbones().eval()
    tokenizer = build_processor(model.config).tokenizer
    features = load_features(str(args.data), show_progress=False)
    out = {"depth": args.depth}
    for split in SPLITS:
        captions = features[split].captions
        states = []
        for start in range(0, len(captions), 256):
            batch = tokenizer(captions[start:start + 256], padding=True, truncation=True, max_length=40, return_tensors="pt")
            with torch.no_grad():
                hidden = model.text_prefix(batch.input_ids, batch.attention_mask, args.depth)
            states.extend(h[:int(n)].half() for h, n in zip(hidden, batch.attention_mask.sum(1)))
        out[split] = states
        print(f"{split}: {len(states)} captions", flush=True)
    torch.save(out, args.out)


def mlp(dim_in, dim_out):
    return nn.Sequential(nn.Linear(dim_in, 1024), nn.GELU(), nn.Linear(1024, dim_out))


def train(args):
    from data_scripts.collator import pad_token_states
    from dualencoder.baselines.features import load_features
    from dualencoder.metrics import retrieval_metrics
    from dualencoder.trainable import set_tower_trainable
    from modeling_dualencoder import tower_blocks

    torch.manual_seed(0)
    prefix = torch.load(args.prefix, weights_only=False)
    features = load_features(str(args.data), show_progress=False)
    model = load_backbones()
    set_tower_trainable(model, "vision", TRAIN_MODE[args.stages])
    tower = model.vision_model
    text_states = torch.load(args.text_cache, weights_only=False) if args.text_cache else None
    text_depth = text_states["depth"] if text_states else None
    num_text_layers = len(tower_blocks(model.text_model))
    set_tower_trainable(model, "text", f"top:{num_text_layers - text_depth}" if text_states else "frozen")

    def top(hidden):  # the rest of EfficientNet from the cached prefix, average-pooled
        return model.vision_suffix(hidden, PREFIX_DEPTH)
    image_head, text_head = mlp(1280, 512), mlp(384, 512)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW([
        {"params": [p for p in tower.parameters() if p.requires_grad], "lr": args.lr},
        {"params": [p for p in model.text_model.parameters() if p.requires_grad], "lr": args.text_lr},
        {"params": [*image_head.parameters(), *text_head.parameters(), logit_scale], "lr": args.head_lr},
    ], weight_decay=0.05)

    def split_data(name):
        split, cached = features[name], prefix[name]
        row = {image_id: k for k, image_id in enumerate(cached["ids"])}
        return cached["h"][torch.tensor([row[i] for i in split.image_ids])], split.texts, split.text_to_image

    hidden, texts, text_to_image = split_data("train")
    by_image = [[] for _ in range(hidden.shape[0])]
    for j, i in enumerate(text_to_image.tolist()):
        by_image[i].append(j)
    captions_of = torch.tensor(by_image)  # [N, 5]

    def embed_texts(name, rows, pooled):
        """Text embeddings of captions `rows` of split `name`: head on frozen pooled features, or the
        trained upper MiniLM layers on their cached lower-layer states."""
        if text_states is None:
            return F.normalize(text_head(pooled[rows]), dim=-1)
        hidden, mask = pad_token_states([text_states[name][i] for i in rows.tolist()])
        return F.normalize(text_head(model.text_suffix(hidden, mask, text_depth)), dim=-1)

    def evaluate(name, tta=False):
        h, t, t2i = split_data(name)
        tower.eval(), image_head.eval(), text_head.eval(), model.text_model.eval()
        with torch.no_grad():
            t = torch.cat([embed_texts(name, torch.arange(s, min(s + 256, len(t2i))), t) for s in range(0, len(t2i), 256)])
            def embed(view):
                return torch.cat([F.normalize(image_head(top(h[s:s + 256, view].float())), dim=-1)
                                  for s in range(0, len(h), 256)])
            images = embed(0)
            if tta:  # mean of the plain and mirrored image's embeddings
                images = F.normalize(images + embed(1), dim=-1)
            return retrieval_metrics(images, t, t2i)

    num_images = hidden.shape[0]
    steps = args.epochs * math.ceil(num_images / args.batch_size)
    warmup = 0.05 * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    started = time.time()
    for epoch in range(args.epochs):
        tower.eval()  # BatchNorm keeps its ImageNet statistics; its affine weights still train
        image_head.train(), text_head.train()
        model.text_model.train(text_states is not None)
        for start in range(0, num_images, args.batch_size):
            rows = torch.randperm(num_images, generator=torch.Generator().manual_seed(epoch))[start:start + args.batch_size]
            view = torch.randint(0, 2, (len(rows),)) if args.flip else torch.zeros(len(rows), dtype=torch.long)
            images = F.normalize(image_head(top(hidden[rows, view].float())), dim=-1)
            if args.captions == 1:
                chosen = captions_of[rows, torch.randint(0, 5, (len(rows),))]
            else:
                chosen = captions_of[rows].reshape(-1)
            text_embeds = embed_texts("train", chosen, texts)
            logits = logit_scale.exp().clamp(max=100) * images @ text_embeds.t()  # [B, B * captions]
            owner = torch.arange(len(rows)).repeat_interleave(args.captions)
            positives = (owner[None, :] == torch.arange(len(rows))[:, None]).float()
            image_to_text = -(F.log_softmax(logits, 1) * positives).sum(1) / args.captions
            loss = (image_to_text.mean() + F.cross_entropy(logits.t(), owner)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        r = evaluate("validation")
        print(f"epoch {epoch + 1} {time.time() - started:.0f}s loss {loss.item():.3f} validation i2t R@1 {r['i2t_r1']:.1f} "
              f"t2i R@1 {r['t2i_r1']:.1f} rsum {r['rsum']:.1f}", flush=True)
    if args.tta:
        r = evaluate("test", tta=True)
        print(f"TEST+TTA i2t {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/"
              f"{r['t2i_r10']:.1f} rsum {r['rsum']:.1f}")
    r = evaluate("test")
    print(f"TEST i2t {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/"
          f"{r['t2i_r10']:.1f} rsum {r['rsum']:.1f} ({time.time() - started:.0f}s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("cache", help="compute the 14x14x112 prefix of every image, plain and mirrored")
    c.add_argument("--data", type=Path, default=DATA)
    c.add_argument("--out", type=Path, required=True)
    t = commands.add_parser("train", help="train the chosen top stages + heads on the cached prefix, report test")
    t.add_argument("--data", type=Path, default=DATA)
    t.add_argument("--prefix", type=Path, required=True)
    t.add_argument("--stages", default="6", choices=sorted(TRAIN_MODE),
                   help="'' (heads only), '6' (last block) or '5,6' (last 5 blocks)")
    t.add_argument("--captions", type=int, default=5, choices=(1, 5), help="captions per image per step")
    t.add_argument("--flip", type=int, default=1, help="draw the mirrored prefix for half the rows")
    t.add_argument("--tta", type=int, default=0, help="also report test with plain+mirrored image embeddings averaged")
    t.add_argument("--text_cache", type=Path, help="train MiniLM's layers above this text-cache file's depth")
    t.add_argument("--text_lr", type=float, default=5e-5)
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch_size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--head_lr", type=float, default=1e-3)
    x = commands.add_parser("text-cache", help="MiniLM's token states after its first --depth layers, every caption")
    x.add_argument("--data", type=Path, default=DATA)
    x.add_argument("--depth", type=int, default=4)
    x.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"cache": cache, "train": train, "text-cache": text_cache}[args.command](args)


if __name__ == "__main__":
    main()
