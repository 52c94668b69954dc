"""Time of one decoding step's attention (one query over a growing KV cache) per SDPA backend, at
the shapes of configs/byte_gpt.yaml (12 heads of 64, bf16): why generation excludes cuDNN.

  python benchmarks/sdpa_decode.py [--batch 1 64] [--start 512] [--steps 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def step_ms(backend: SDPBackend, batch: int, start: int, steps: int) -> float:
    """Mean ms per decoding step, key length start+1 .. start+steps (each a new shape)."""
    q = torch.randn(batch, 12, 1, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, batch, 12, start + steps, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(backend):
        F.scaled_dot_product_attention(q, kv[0, :, :, :start], kv[1, :, :, :start])  # load the kernel
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for n in range(start + 1, start + steps + 1):
            F.scaled_dot_product_attention(q, kv[0, :, :, :n], kv[1, :, :, :n])
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--start", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| backend | batch | ms per step |")
    print("|---|---:|---:|")
    for name, backend in BACKENDS.items():
        for b in args.batch:
            try:
                ms = f"{step_ms(backend, b, args.start, args.steps):.3f}"
            except RuntimeError as e:  # a backend that does not take these shapes
                ms = f"n/a ({str(e).splitlines()[0][:60]})"
            print(f"| {name} | {b} | {ms} |", flush=True)


if __name__ == "__main__":
    main()
