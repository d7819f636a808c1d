"""Re-rank the whole Flickr8k validation split's top-16 with the state train.py saved (NV=2, NT=1), blends 0-3."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import OUT, TunedTop, dual_embedded, model, prefix_tokens, split_view, tb, vb  # noqa: E402

from dualencoder.rerank.rerank import rerank_top_k, reranked_metrics  # noqa: E402

NV, NT = 2, 1
view = split_view('validation')
tokens = prefix_tokens(view, NV, NT, f'{OUT}/prefix-val-{len(vb) - NV}-{len(tb) - NT}.pt')
E = dual_embedded(view)
net = TunedTop(NV, NT)
net.load_state_dict(torch.load(f'{OUT}/tuned_top_{NV}_{NT}.pt'))
net.eval()
scale = float(model.get_logit_scale().detach())
top = rerank_top_k(net, tokens, E, 16, scale)
print('dual', round(E.metrics()['rsum'], 2), 'ms/query', round(top.ms_per_query, 1))
for w in (0.0, 0.5, 1.0, 2.0, 3.0):
    m = reranked_metrics(top, E.text_to_image, w)
    print(w, round(m['rsum'], 2), round(m['i2t_r1'], 1), round(m['t2i_r1'], 1), flush=True)
torch.save(top, f'{OUT}/tuned_top_val_top16.pt')
