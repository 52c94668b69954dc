"""CUDA graphs replay the static decoder's steps exactly: greedy decoding of the same checkpoint through
the static decoder with graphs and without (bf16 weights), every step's logits compared.

  python benchmarks/graph_check.py CKPT [CKPT ...] --data data/enwiki_bytes [--batch 64] [--steps 128]

Prints one line per checkpoint: whether the greedy ids agree and the largest logit difference (0 when
the graph replays the same kernels on the same inputs). The CPU tests prove the static step equals the
full forward; this proves the graph equals the static step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hlm.checkpoint import load_model  # noqa: E402
from hlm.data import Split  # noqa: E402
from hlm.models.parts.static_decoding import graphs_match, weights_to  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="append one JSON line per checkpoint")
    args = p.parse_args()
    ids = np.asarray(Split(args.data, "test").memmap())[: args.batch * args.prompt_tokens].astype(np.int64)
    for ckpt in args.checkpoints:
        model = weights_to(load_model(Path(ckpt), args.device)[0], torch.bfloat16)
        prompt = torch.from_numpy(ids).view(args.batch, args.prompt_tokens).to(args.device)
        row = {"checkpoint": ckpt, "batch": args.batch, "steps": args.steps, **graphs_match(model, prompt, args.steps)}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
