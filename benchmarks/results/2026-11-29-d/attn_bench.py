"""Microbenchmark: one forward of bpe_gpt (12L/768d, V=16384, random init) over 8 tree windows, by attention path."""
import time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from hlm.models.gpt import GPT, GPTConfig
import hlm.models.blocks as blocks

torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
model = GPT(GPTConfig(vocab_size=16384, block_size=1024, n_layer=12, n_head=12, d_model=768)).to(dev).eval()
B = 8

def tree_mask(T):
    """Every third position off the trunk: it sees the trunk before it and itself; trunk nodes skip it."""
    i = torch.arange(T, device=dev)
    m = (i[:, None] >= i[None, :]) & ((i[None, :] % 3 != 1) | (i[:, None] == i[None, :]))
    return m[None, None].expand(B, 1, T, T).contiguous()

def timeit(name, fn, n=10):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    print(f"{name:40s} {1e3 * (time.perf_counter() - t) / n:8.2f} ms", flush=True)

for T in (1024, 1021):
    ids = torch.randint(0, 16384, (B, T), device=dev)
    pos = torch.arange(T, device=dev)[None].expand(B, T).contiguous()
    mask = tree_mask(T)
    timeit(f"T={T} causal (no mask)", lambda: model.logits(ids))
    timeit(f"T={T} bool mask", lambda: model.logits(ids, attn_mask=mask, positions=pos))
    fmask = torch.zeros(B, 1, T, T, device=dev, dtype=torch.bfloat16).masked_fill_(~mask, float("-inf"))
    timeit(f"T={T} additive bf16 mask", lambda: model.logits(ids, attn_mask=fmask, positions=pos))
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            timeit(f"T={T} bool mask, efficient only", lambda: model.logits(ids, attn_mask=mask, positions=pos))
    except Exception as e:
        print("efficient only failed:", str(e).splitlines()[0][:200])
    with sdpa_kernel([SDPBackend.MATH]):
        timeit(f"T={T} bool mask, math only", lambda: model.logits(ids, attn_mask=mask, positions=pos), n=3)

T = 1024
ids = torch.randint(0, 16384, (B, T), device=dev)
pos = torch.arange(T, device=dev)[None].expand(B, T).contiguous()
mask = tree_mask(T)
m0 = mask[:, 0]
t = time.perf_counter()
bm = create_block_mask(lambda b, h, q, k: m0[b, q, k], B, None, T, T, device=dev)
torch.cuda.synchronize(); print(f"create_block_mask {1e3*(time.perf_counter()-t):.1f} ms")
timeit("create_block_mask again", lambda: create_block_mask(lambda b, h, q, k: m0[b, q, k], B, None, T, T, device=dev))
cflex = torch.compile(flex_attention, dynamic=False)
orig = torch.nn.functional.scaled_dot_product_attention
def sdpa_flex(q, k, v, attn_mask=None, **kw):
    if attn_mask is None:
        return orig(q, k, v, attn_mask=attn_mask, **kw)
    return cflex(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=bm)
blocks.F.scaled_dot_product_attention = sdpa_flex
t = time.perf_counter()
timeit("flex (compiled attention only)", lambda: model.logits(ids, attn_mask=mask, positions=pos))
print(f"  incl. compile {time.perf_counter()-t:.1f} s")
blocks.F.scaled_dot_product_attention = orig
cm = torch.compile(model.logits, dynamic=False)
t = time.perf_counter()
timeit("whole model compiled, bool mask", lambda: cm(ids, attn_mask=mask, positions=pos))
print(f"  incl. compile {time.perf_counter()-t:.1f} s")
# scoring cost per 2048-row chunk like _tree_pass
V = 16384
perm = torch.randperm(V, device=dev)
inv = torch.rand(4000, V, device=dev) < 0.05
logits = torch.randn(2048, V, device=dev, dtype=torch.bfloat16)
keys = torch.randint(0, 4000, (2048,), device=dev)
buf = torch.empty(2048, V, dtype=torch.float64, device=dev)
def score():
    lp = torch.log_softmax(logits.float(), -1)
    s = lp.index_select(1, perm)
    return buf.copy_(s).exp_().masked_fill_(inv[keys], 0).cumsum_(1)
timeit("scoring chunk of 2048 rows (fp64 cumsum)", score)
