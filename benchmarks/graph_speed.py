"""Decoding speed with and without CUDA graphs, from configs with random weights (one process, no checkpoints):

  python benchmarks/graph_speed.py CONFIG [CONFIG ...] --text FILE [--batch 1 64] [--prompt-bytes 512]
                                   [--new-bytes 256] [--json OUT]

Prompts are consecutive slices of the raw bytes of FILE (the boundaries of the whitespace hourglass come from
the bytes, not from training). Per config and batch: eager decoding under bf16 autocast (`generate_stream`),
then with bf16 weights the static decoder with CUDA graphs (hlm.compare.generation_speeds, as the grid
measures); then greedy decoding through the static decoder with and without graphs is compared step by
step (`graphs_match`: the same greedy ids and a largest logit difference of 0). Decode bytes/s count the
graph captures (one per key-length bucket).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hlm.compare import generation_speeds  # noqa: E402
from hlm.config import load_config  # noqa: E402
from hlm.models import build_model  # noqa: E402
from hlm.models.parts.static_decoding import graphs_match  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--text", required=True, help="raw bytes to cut prompts from")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-bytes", type=int, default=512)
    p.add_argument("--new-bytes", type=int, default=256)
    p.add_argument("--check-steps", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device(args.device)
    ids = np.frombuffer(Path(args.text).read_bytes(), dtype=np.uint8)
    nbytes = torch.ones(257)
    generation = {"prompt_tokens": args.prompt_bytes, "new_tokens": args.new_bytes, "batch_sizes": args.batch,
                  "cuda_graphs": True}
    for config in args.configs:
        torch.manual_seed(0)
        model = build_model(load_config(config).model).to(dev).eval()
        speeds = generation_speeds(model, ids, nbytes, generation, dev)  # leaves bf16 weights on CUDA
        prompt = torch.from_numpy(ids[: max(args.batch) * args.prompt_bytes].astype(np.int64))
        row = {"config": config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "params": sum(q.numel() for q in model.parameters()), "eager": speeds["generation"],
               "graphed": speeds["generation_graphs"],
               "graphs_match": graphs_match(model, prompt.view(max(args.batch), -1).to(dev), args.check_steps)}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
