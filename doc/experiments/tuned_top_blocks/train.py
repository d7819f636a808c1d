"""Prototype, not a toolkit feature: the co-attention re-ranker with the towers' top blocks tuned too (doc/RERANKER.md).

Issue 29's last CPU remedy: instead of reading the frozen towers' last token outputs, the re-ranker holds copies of
the vision tower's last NV blocks and the text tower's last NT layers and tunes them with its co-attention layers
(learning rate TOWER_LR; the vision blocks' batch-norm statistics frozen). The token caches are the towers' outputs
NV / NT blocks below the top (computed once into outputs/tuned_top/). The rest is the training command's recipe and
code (`train_one_epoch`, `validate`): filtered half-hard negatives, 8 epochs of 3,000 positives, 16 per batch,
MINUTES of training including the per-epoch validation on 100 images; the best epoch's state is saved, and
evaluate.py re-ranks the whole validation split with it.

    OMP_NUM_THREADS=1 python doc/experiments/tuned_top_blocks/train.py 2 1 30 5e-5   # NV NT MINUTES TOWER_LR
    OMP_NUM_THREADS=1 python doc/experiments/tuned_top_blocks/evaluate.py
"""
import sys, os, time, copy, math, json, torch
from torch import nn
from dualencoder.evaluation.common import load_model, load_split, data_options
from dualencoder.evaluation.embed import EmbeddedSplit, split_captions, pooled_image_features, pooled_text_features
from dualencoder.rerank.features import SplitTokens
from dualencoder.rerank.mining import mine_hard_negatives
from dualencoder.rerank.model import CoAttentionReranker, RerankerConfig
from dualencoder.rerank import train as T
from backbones_dualencoder import tower_blocks
from data_scripts import ImageTransform
from modeling_dualencoder import _block_output
NV, NT, MINUTES, TOWER_LR = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
os.makedirs('outputs/tuned_top', exist_ok=True)
torch.manual_seed(0); gen = torch.Generator().manual_seed(0)
model, proc = load_model('outputs/flickr8k_offline', 'cpu')
vb, tb = tower_blocks(model.vision_model), tower_blocks(model.text_model)
DV, DT = len(vb) - NV, len(tb) - NT
opts = data_options('outputs/flickr8k_offline', dataset='../shared/data/flickr8k')

def prefix_tokens(split, n, path):
    if os.path.exists(path): return torch.load(path, weights_only=False)
    view = load_split(**{**opts, 'split': split, 'max_images': n})
    ids, caps, _ = split_captions(view)
    tf = ImageTransform(proc.image_processor, train=False)
    with torch.no_grad():
        im = pooled_image_features(model, view, tf, encode=lambda p: model.vision_prefix(p, DV), dtype=torch.float16,
                                   batch_size=32, device='cpu', show_progress=False)
        tx = pooled_text_features(model, caps, proc.tokenizer, max_length=opts['max_length'], prefix_depth=DT,
                                  dtype=torch.float16, batch_size=32, device='cpu', show_progress=False)
    out = {'image_tokens': im, 'caption_tokens': tx}; torch.save(out, path); return out

t0 = time.time()
tr = prefix_tokens('train', None, f'outputs/tuned_top/prefix-train-{DV}-{DT}.pt')
dv = prefix_tokens('validation', 100, f'outputs/tuned_top/prefix-val100-{DV}-{DT}.pt')
print('prefix caches', round(time.time() - t0), 's', flush=True)
full_tr = torch.load('outputs/rerank_cache/rerank-tokens-8c0d90a7887ae948.pt', weights_only=False)
full_dv = torch.load('outputs/rerank_cache/rerank-tokens-0e629ca1514b057e.pt', weights_only=False)
def embedded(full, split, n):
    ids, caps, t2i = split_captions(load_split(**{**opts, 'split': split, 'max_images': n}))
    return EmbeddedSplit(full['image_embeds'], full['text_embeds'], t2i, ids, caps)
train, dev = embedded(full_tr, 'train', None), embedded(full_dv, 'validation', 100)
train_tokens, dev_tokens = SplitTokens(tr['image_tokens'], tr['caption_tokens']), SplitTokens(dv['image_tokens'], dv['caption_tokens'])

class TunedTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_blocks = nn.ModuleList(copy.deepcopy(b) for b in vb[DV:])
        self.text_blocks = nn.ModuleList(copy.deepcopy(b) for b in tb[DT:])
        self.reranker = CoAttentionReranker(RerankerConfig(text_dim=384, vision_dim=320, num_vision_tokens=81))
        self.text_tower = model.text_model
    def train(self, mode=True):
        super().train(mode)
        for m in self.vision_blocks.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.eval()   # frozen statistics, as the dual training
        return self
    def forward(self, text, mask, vision):
        b, n, c = vision.shape; side = int(math.isqrt(n))
        v = vision.transpose(1, 2).reshape(b, c, side, side)
        for blk in self.vision_blocks: v = _block_output(blk(v))
        t = model._run_text_blocks(model.text_model, list(self.text_blocks), text, mask)
        return self.reranker(t, mask, v.flatten(2).transpose(1, 2))

net = TunedTop()
tower_params = [p for m in (net.vision_blocks, net.text_blocks) for p in m.parameters()]
for p in tower_params: p.requires_grad_(True)
opt = torch.optim.AdamW([{'params': net.reranker.parameters(), 'lr': 3e-4},
                         {'params': tower_params, 'lr': TOWER_LR}], weight_decay=0.01)
steps = 8 * math.ceil(3000 / 16)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
hard = mine_hard_negatives(train.image_embeds, train.text_embeds, train.text_to_image, 16, paraphrase_quantile=0.5)
scale = float(model.get_logit_scale())
print('dual dev', dev.metrics()['rsum'], flush=True)
deadline = time.monotonic() + 60 * MINUTES; best = None
for epoch in range(1, 9):
    st = T.train_one_epoch(net, opt, sched, train_tokens, train, hard, positives=3000, per_batch=16, generator=gen,
                           deadline=deadline, bf16=True, hard_fraction=0.5)
    va = T.validate(net, dev_tokens, dev, 16, scale, 64)
    print(epoch, {k: round(v, 3) for k, v in st.items()}, va['dual_weight'], round(va['metrics']['rsum'], 1), flush=True)
    if best is None or va['metrics']['rsum'] > best[0]:
        best = (va['metrics']['rsum'], va['dual_weight'], epoch); torch.save(net.state_dict(), f'outputs/tuned_top/tuned_top_{NV}_{NT}.pt')
    if time.monotonic() > deadline: break
print('best', best, flush=True)
