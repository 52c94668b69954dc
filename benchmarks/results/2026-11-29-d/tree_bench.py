"""Microbenchmark: bpe_gpt (12L/768d, V=16384, random init) forward over 8 synthetic tree windows of ~4,300
nodes (1,000 trunk tokens, each with ~3.3 off-trunk nodes in chains of 1-3), by attention path."""
import time
import torch
from hlm.models.gpt import GPT, GPTConfig
from hlm.models.blocks import tree_block_mask

torch.manual_seed(0)
dev = "cuda"
model = GPT(GPTConfig(vocab_size=16384, block_size=1024, n_layer=12, n_head=12, d_model=768)).to(dev).eval()
B, TRUNK = 8, 1000
g = torch.Generator().manual_seed(0)

def window():
    """Node order as planned (by creation): each trunk node, then its off-trunk chains."""
    parent, trunk, depth = [], [], []
    last_trunk = -1
    for k in range(TRUNK):
        v = len(parent); parent.append(last_trunk); trunk.append(True); depth.append(k); last_trunk = v
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            p, d = v, k
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                parent.append(p); trunk.append(False); d += 1; depth.append(d); p = len(parent) - 1
    n = len(parent)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if parent[i] >= 0:
            anc[i] = anc[parent[i]]
        anc[i, i] = True
    return anc, torch.tensor(trunk), torch.tensor(depth)

wins = [window() for _ in range(B)]
L = max(w[0].shape[0] for w in wins)
print("nodes per window", [w[0].shape[0] for w in wins])

def batch(order_trunk_first, pad_to):
    ids = torch.randint(0, 16384, (B, pad_to))
    pos = torch.zeros(B, pad_to, dtype=torch.int64)
    mask = torch.zeros(B, 1, pad_to, pad_to, dtype=torch.bool)
    mask[:, 0] |= torch.eye(pad_to, dtype=torch.bool)
    for b, (anc, trunk, depth) in enumerate(wins):
        n = len(trunk)
        perm = torch.cat([torch.nonzero(trunk).flatten(), torch.nonzero(~trunk).flatten()]) if order_trunk_first else torch.arange(n)
        mask[b, 0, :n, :n] = anc[perm][:, perm]
        pos[b, :n] = depth[perm]
    return ids.to(dev), pos.to(dev), mask.to(dev)

def timeit(name, fn, n=5):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"{name:50s} {1e3 * (time.perf_counter() - t) / n:8.2f} ms  (first call {first:.2f} s)", flush=True)

for pad in (L, -(-L // 128) * 128):
    ids, pos, mask = batch(False, pad)
    timeit(f"dense bool mask, L={pad}", lambda: model.logits(ids, attn_mask=mask, positions=pos))
ids, pos, mask = batch(False, L + 1)
timeit(f"dense bool mask, L={L+1} (new shape)", lambda: model.logits(ids, attn_mask=mask, positions=pos))

pad = -(-L // 128) * 128
for first in (False, True):
    ids, pos, mask = batch(first, pad)
    t = time.perf_counter()
    bm = tree_block_mask(mask[:, 0])
    torch.cuda.synchronize()
    print(f"tree_block_mask {1e3 * (time.perf_counter() - t):.1f} ms; {bm.sparsity():.1f}% of tiles skipped", flush=True)
    timeit("  again", lambda: tree_block_mask(mask[:, 0]))
    timeit(f"flex, trunk first={first}, L={pad}", lambda: model.logits(ids, attn_mask=bm, positions=pos))
    timeit(f"dense, trunk first={first}, L={pad}", lambda: model.logits(ids, attn_mask=mask, positions=pos))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a = model.logits(ids, attn_mask=bm, positions=pos).float()
        b = model.logits(ids, attn_mask=mask, positions=pos).float()
    print("  max |flex - dense| logit", (a - b).abs().max().item())
ids1 = torch.randint(0, 16384, (B, 1024), device=dev)
timeit("canonical batch 8 x 1024 (causal)", lambda: model.logits(ids1))
