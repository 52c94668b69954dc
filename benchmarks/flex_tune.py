"""Sliding-window FlexAttention (window 512, head dim 64, bf16) forward+backward under different kernel
options on this GPU; one JSON line per config (median of 20 timed passes), then cuDNN's full causal
attention over T for the FLOP-rate comparison. Needs a CUDA GPU.

  PYTHONPATH=. python benchmarks/flex_tune.py B H T             # inductor's default tiles and 12 alternatives
  PYTHONPATH=. python benchmarks/flex_tune.py B H T autotune    # what max-autotune picks
  PYTHONPATH=. python benchmarks/flex_tune.py B H T tuned       # default tiles against hlm's FLEX_SM90_HEAD64
"""
import json
import sys
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch.nn.attention.flex_attention import flex_attention

from hlm.models.blocks import sliding_window_block_mask

B, H, T = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
D, W = 64, 512
dev = "cuda"
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
bm = sliding_window_block_mask(T, W, dev)


def timeit(fn, n=20):
    for _ in range(3):
        out = fn(q, k, v)
        out.backward(g)
    torch.cuda.synchronize()
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
    for e in ev:
        e[0].record()
        out = fn(q, k, v)
        e[1].record()
        out.backward(g)
        e[2].record()
    torch.cuda.synchronize()
    fwd = sorted(a.elapsed_time(b) for a, b, _ in ev)[n // 2]
    bwd = sorted(b.elapsed_time(c) for _, b, c in ev)[n // 2]
    return fwd, bwd, out


ref = None
configs = {
    "default": {},
    "safe_rows": {"ROWS_GUARANTEED_SAFE": True},
    "tma": {"USE_TMA": True},
    "fwd128x64w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    "fwd128x128w8s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    "fwd128x64w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
}
for name, (m1, n1, m2, n2, s, w) in {
    "bwd64x64s3w4": (64, 64, 64, 64, 3, 4),
    "bwd32x128s3w4": (32, 128, 128, 32, 3, 4),
    "bwd64x128s2w8": (64, 128, 128, 64, 2, 8),
    "bwd32x64s3w4": (32, 64, 64, 32, 3, 4),
    "bwd64x64s4w4": (64, 64, 64, 64, 4, 4),
    "bwd64x128s3w4": (64, 128, 128, 64, 3, 4),
    "bwd128x128s2w8": (128, 128, 128, 128, 2, 8),
}.items():
    configs[name] = {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
                     "bwd_num_stages": s, "bwd_num_warps": w}
if sys.argv[4:] == ["autotune"]:
    configs = {"autotune": None}
elif sys.argv[4:] == ["tuned"]:
    from hlm.models.blocks import FLEX_SM90_HEAD64
    configs = {"default": {}, "hlm_tuned": FLEX_SM90_HEAD64}
for name, opts in configs.items():
    torch._dynamo.reset()
    t0 = time.time()
    try:
        if opts is None:
            inductor_config.max_autotune = True
            fn = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm),
                               mode="max-autotune-no-cudagraphs")
        else:
            fn = torch.compile(lambda q, k, v, o=opts: flex_attention(q, k, v, block_mask=bm, kernel_options=o))
        fwd, bwd, out = timeit(fn)
        if ref is None:
            ref = (out.detach().float(), q.grad.detach().float().clone())
        err = (out.detach().float() - ref[0]).abs().max().item()
        print(json.dumps({"config": name, "B": B, "H": H, "fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3),
                          "total_ms": round(fwd + bwd, 3), "max_out_diff": err,
                          "compile_s": round(time.time() - t0, 1)}), flush=True)
    except Exception as e:  # a config the kernel rejects on this GPU
        print(json.dumps({"config": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)
    q.grad = k.grad = v.grad = None

# cuDNN flash causal over the full T (byte_gpt's layer) for the FLOP-rate comparison
torch._dynamo.reset()
fn = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
fwd, bwd, _ = timeit(fn)
print(json.dumps({"config": "sdpa_full_causal", "B": B, "H": H, "fwd_ms": round(fwd, 3), "bwd_ms": round(bwd, 3)}))
