"""Prototype, not a toolkit feature: the co-attention re-ranker with the towers' top blocks tuned too (doc/RERANKER.md).

Issue 29's last CPU remedy: instead of reading the frozen towers' last token outputs, the re-ranker holds copies of
the vision tower's last NV blocks and the text tower's last NT layers and tunes them with its co-attention layers
(learning rate TOWER_LR; the vision blocks' batch-norm statistics frozen). The token caches are the towers' outputs
NV / NT blocks below the top (computed once into outputs/tuned_top/); the dual encoder's embeddings, for mining and
the blend, come from the re-ranker's own token caches (`split_features`, in outputs/rerank_cache/). The rest is the training command's recipe and
code (`train_one_epoch`, `validate`): filtered half-hard negatives, 8 epochs of 3,000 positives, 16 per batch,
MINUTES of training including the per-epoch validation on 100 images; the best epoch's state is saved, and
evaluate.py (which imports this file's set-up) re-ranks the whole validation split with it.

    OMP_NUM_THREADS=1 python doc/experiments/tuned_top_blocks/train.py 2 1 30 5e-5   # NV NT MINUTES TOWER_LR
    OMP_NUM_THREADS=1 python doc/experiments/tuned_top_blocks/evaluate.py
"""
import math
import os
import sys
import time
import copy

import torch
from torch import nn

from backbones_dualencoder import tower_blocks
from data_scripts import ImageTransform
from dualencoder.evaluation.common import data_options, load_model, load_split
from dualencoder.evaluation.embed import pooled_image_features, pooled_text_features, split_captions
from dualencoder.rerank import train as T
from dualencoder.rerank.features import SplitTokens, split_features
from dualencoder.rerank.mining import mine_hard_negatives
from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig
from modeling_dualencoder import _block_output

OUT = 'outputs/tuned_top'
torch.manual_seed(0)  # before loading: the recorded run's re-ranker initialisation follows this model load
model, proc = load_model('outputs/flickr8k_offline', 'cpu')
vb, tb = tower_blocks(model.vision_model), tower_blocks(model.text_model)
opts = data_options('outputs/flickr8k_offline', dataset='../shared/data/flickr8k')


def split_view(split, n=None):
    return load_split(**{**opts, 'split': split, 'max_images': n})


def dual_embedded(view, mirror_average=True):
    """The dual encoder's embeddings of a split, from the re-ranker's token caches (computed there when missing)."""
    return split_features(model, proc, view, max_length=opts['max_length'], cache_dir='outputs/rerank_cache',
                          mirror_average=mirror_average)[1]


def prefix_tokens(view, nv, nt, path):
    """SplitTokens of the towers' outputs nv / nt blocks below their tops, cached in `path`."""
    dv, dt = len(vb) - nv, len(tb) - nt
    if not os.path.exists(path):
        tf = ImageTransform(proc.image_processor, train=False)
        with torch.no_grad():
            im = pooled_image_features(model, view, tf, encode=lambda p: model.vision_prefix(p, dv),
                                       dtype=torch.float16, batch_size=32, device='cpu', show_progress=False)
            tx = pooled_text_features(model, split_captions(view)[1], proc.tokenizer, max_length=opts['max_length'],
                                      prefix_depth=dt, dtype=torch.float16, batch_size=32, device='cpu',
                                      show_progress=False)
        torch.save({'image_tokens': im, 'caption_tokens': tx}, path)
    cached = torch.load(path, weights_only=False)
    return SplitTokens(cached['image_tokens'], cached['caption_tokens'])


class TunedTop(nn.Module):
    """Copies of the towers' top nv / nt blocks, then the co-attention re-ranker, on prefix tokens."""

    def __init__(self, nv, nt):
        super().__init__()
        self.vision_blocks = nn.ModuleList(copy.deepcopy(b) for b in vb[len(vb) - nv:])
        self.text_blocks = nn.ModuleList(copy.deepcopy(b) for b in tb[len(tb) - nt:])
        self.reranker = CoAttentionReranker(RerankerConfig(text_dim=384, vision_dim=320, num_vision_tokens=81))

    def train(self, mode=True):
        super().train(mode)
        for m in self.vision_blocks.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # frozen statistics, as the dual training
        return self

    def forward(self, text, mask, vision):
        b, n, c = vision.shape
        side = int(math.isqrt(n))
        v = vision.transpose(1, 2).reshape(b, c, side, side)
        for blk in self.vision_blocks:
            v = _block_output(blk(v))
        t = model._run_text_blocks(model.text_model, list(self.text_blocks), text, mask)
        return self.reranker(t, mask, v.flatten(2).transpose(1, 2))


def main(nv, nt, minutes, tower_lr):
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    train_view, dev_view = split_view('train'), split_view('validation', 100)
    train_tokens = prefix_tokens(train_view, nv, nt, f'{OUT}/prefix-train-{len(vb) - nv}-{len(tb) - nt}.pt')
    dev_tokens = prefix_tokens(dev_view, nv, nt, f'{OUT}/prefix-val100-{len(vb) - nv}-{len(tb) - nt}.pt')
    print('prefix caches', round(time.time() - t0), 's', flush=True)
    train, dev = dual_embedded(train_view, mirror_average=False), dual_embedded(dev_view)
    net = TunedTop(nv, nt)
    tower_params = [p for m in (net.vision_blocks, net.text_blocks) for p in m.parameters()]
    for p in tower_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{'params': net.reranker.parameters(), 'lr': 3e-4},
                             {'params': tower_params, 'lr': tower_lr}], weight_decay=0.01)
    steps = 8 * math.ceil(3000 / 16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    hard = mine_hard_negatives(train.image_embeds, train.text_embeds, train.text_to_image, 16, paraphrase_quantile=0.5)
    scale = float(model.get_logit_scale().detach())
    print('dual dev', dev.metrics()['rsum'], flush=True)
    deadline = time.monotonic() + 60 * minutes
    best = None
    for epoch in range(1, 9):
        st = T.train_one_epoch(net, opt, sched, train_tokens, train, hard, positives=3000, per_batch=16,
                               generator=gen, deadline=deadline, bf16=True, hard_fraction=0.5)
        va = T.validate(net, dev_tokens, dev, 16, scale, 64)
        print(epoch, {k: round(v, 3) for k, v in st.items()}, va['dual_weight'], round(va['metrics']['rsum'], 1),
              flush=True)
        if best is None or va['metrics']['rsum'] > best[0]:
            best = (va['metrics']['rsum'], va['dual_weight'], epoch)
            torch.save(net.state_dict(), f'{OUT}/tuned_top_{nv}_{nt}.pt')
        if time.monotonic() > deadline:
            break
    print('best', best, flush=True)


if __name__ == '__main__':
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
