"""Cached generation speed of checkpoints (bf16 on CUDA): prefill and decode bytes/s at each batch size.

  python benchmarks/generation_speed.py CKPT [CKPT ...] --data data/enwiki_bytes [--batch 1 64] [--json FILE]
                                       [--cuda-graphs]

Prompts are consecutive slices of the data folder's test split (512 tokens each), then 256 new tokens
(hlm.compare.generation_speed, the comparison runner's measurement). `--cuda-graphs` also decodes
through the static decoder of models that have one (gpt, the hourglass, H-Net): bf16
weights, one CUDA graph per step ("graphed" rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hlm.compare import measure_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="append one JSON line per checkpoint")
    p.add_argument("--cuda-graphs", action="store_true", help="also decode with CUDA graphs where the family can")
    args = p.parse_args()
    generation = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch_sizes": args.batch,
                  "cuda_graphs": args.cuda_graphs}
    print("| checkpoint | decoding | batch | prefill bytes/s | decode bytes/s | decode bytes/s, median step |")
    print("|---|---|---:|---:|---:|---:|")
    for ckpt in args.checkpoints:
        res = measure_checkpoint(Path(ckpt), args.data, generation, args.device)
        for mode, key in (("eager", "generation"), ("graphed", "generation_graphs")):
            for b, g in res.get(key, {}).items():
                print(f"| {ckpt} | {mode} | {b} | {g['prefill_bytes_per_s']:,.0f} | {g['decode_bytes_per_s']:,.0f} | "
                      f"{g['decode_bytes_per_s_median_step']:,.0f} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"checkpoint": ckpt, **res}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
