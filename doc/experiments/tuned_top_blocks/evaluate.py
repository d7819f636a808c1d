"""Re-rank the whole Flickr8k validation split's top-16 with the state train.py saved (NV=2, NT=1), blends 0-3."""
import sys, torch, math, copy
sys.argv = [sys.argv[0], '2', '1', '0', '5e-5']
src = open('doc/experiments/tuned_top_blocks/train.py').read()
exec(src.split("t0 = time.time()")[0])          # imports, model, prefix_tokens
exec("def embedded" + src.split("def embedded")[1].split("train, dev =")[0])
exec("class TunedTop" + src.split("class TunedTop")[1].split("net = TunedTop()")[0])
from dualencoder.rerank.rerank import rerank_top_k, best_dual_weight, reranked_metrics
vf = prefix_tokens('validation', None, f'outputs/tuned_top/prefix-val-{DV}-{DT}.pt')
E = embedded(torch.load('outputs/rerank_cache/rerank-tokens-1b648be59dc4c182.pt', weights_only=False), 'validation', None)
net = TunedTop(); net.load_state_dict(torch.load(f'outputs/tuned_top/tuned_top_{NV}_{NT}.pt')); net.eval()
scale = float(model.get_logit_scale())
top = rerank_top_k(net, SplitTokens(vf['image_tokens'], vf['caption_tokens']), E, 16, scale)
print('dual', round(E.metrics()['rsum'], 2), 'ms/query', round(top.ms_per_query, 1))
for w in (0.0, 0.5, 1.0, 2.0, 3.0):
    m = reranked_metrics(top, E.text_to_image, w); print(w, round(m['rsum'], 2), round(m['i2t_r1'], 1), round(m['t2i_r1'], 1), flush=True)
torch.save(top, 'outputs/tuned_top/tuned_top_val_top16.pt')
