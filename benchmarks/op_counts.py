"""Host work in eager inference, counted as aten ops dispatched (TorchDispatchMode): machine-independent, so a
change that cuts kernel launches shows on any CPU before it is timed on a GPU.

  python benchmarks/op_counts.py decode [CONFIG ...] [--batch 2] [--random-router]
                                                                         ops per cached decoding step
  python benchmarks/op_counts.py push [CONFIG ...]                       ops of a batch-64 step without and with
                                                                         every row closing a word
  python benchmarks/op_counts.py cut --tokenizer M.model --docs D.jsonl.xz   ops per cut of the batched prefix
                                                                         probability and of canonical scoring of
                                                                         the same tokens, one cut per batch and all

Random weights with fixed seeds: the counts depend on the code and the shapes, not on training.
"""

from __future__ import annotations

import argparse
import collections
import json
import lzma
import random
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> collections.Counter:
    with OpCount() as mode:
        fn()
    return mode.ops


def decode(configs: list[str], batch: int, random_router: bool) -> None:
    from hlm.config import load_config
    from hlm.models import build_model
    from hlm.models.parts.boundaries import CosineRouter

    print(f"| config | aten ops per decoding step (batch {batch}) |\n|---|---:|")
    for name in configs:
        torch.manual_seed(0)
        model = build_model(load_config(f"configs/{name}.yaml").model).eval()
        if random_router:
            for m in model.modules():
                if isinstance(m, CosineRouter):
                    torch.nn.init.normal_(m.q.weight, std=m.q.in_features ** -0.5)
                    torch.nn.init.normal_(m.k.weight, std=m.k.in_features ** -0.5)
        prompt = torch.randint(1, 256, (batch, 64))
        steps = [sum(count(lambda m=model, x=prompt, n=n: list(m.generate_stream(x, n, temperature=0))).values())
                 for n in (1, 17)]
        print(f"| {name} | {(steps[1] - steps[0]) / 16:.0f} |")


def push(configs: list[str]) -> None:
    """Ops of one decoding step at batch 64 when no row closes a word (a letter) and when every row does (a
    space): what a step costs when the main network runs. For families whose `new_decoder` groups bytes at
    whitespace (byte_gpt as the reference)."""
    from hlm.config import load_config
    from hlm.models import build_model

    print("| config | aten ops, no row closes a word | every row closes one |\n|---|---:|---:|")
    for name in configs:
        torch.manual_seed(0)
        model = build_model(load_config(f"configs/{name}.yaml").model).eval()
        prompt = torch.randint(97, 123, (64, 64))
        prompt[:, ::5] = 32
        with torch.no_grad():
            decoder = model.new_decoder(prompt)
            ops = []
            for byte in (97, 32):
                decoder.push(torch.full((64,), 98))
                ops.append(sum(count(lambda d=decoder, b=byte: d.push(torch.full((64,), b))).values()))
        print(f"| {name} | {ops[0]} | {ops[1]} |", flush=True)
        del model, decoder  # a batch-64 cache of the full context is a few GiB


def cut(tokenizer: str, docs_path: str, n_docs: int) -> None:
    from hlm.bytes.covers import ConversionRules
    from hlm.bytes.cut import CutRequest, canonical_logprobs_batch, cut_logprobs_batch, plan_cuts
    from hlm.models.gpt import GPT, GPTConfig
    from hlm.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=12, n_head=2, d_model=32)).eval()
    rules = ConversionRules(tok)
    with lzma.open(docs_path, "rt") as f:
        docs = [json.loads(line)["text"].encode() for _, line in zip(range(n_docs), f, strict=False)]
    rng = random.Random(0)
    requests = [CutRequest(d[:c], tok.encode(d[: c + 40]), 0) for d in docs if len(d) > 600
                for c in [rng.randrange(200, 500)]]
    plans = plan_cuts(rules, 0, requests)  # planning is host work without aten ops; counted are the passes
    sequences = [[0, *r.text_tokens] for r in requests]
    n = len(requests)

    def canonical(batch: int):
        canonical_logprobs_batch(model, sequences, [1] * n, [0] * n, batch_size=batch)

    def cuts(batch: int):
        cut_logprobs_batch(model, rules, 0, requests, plans=plans, batch_size=batch)

    print(f"{n} cuts, 12-layer GPT: aten ops per cut\n")
    print("| batch | canonical | cut | cut - canonical |\n|---:|---:|---:|---:|")
    with torch.no_grad():
        for batch in (1, n):
            per = {name: sum(count(lambda f=fn, b=batch: f(b)).values()) / n
                   for name, fn in (("canonical", canonical), ("cut", cuts))}
            print(f"| {batch} | {per['canonical']:.1f} | {per['cut']:.1f} | {per['cut'] - per['canonical']:+.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "push", "cut"])
    p.add_argument("configs", nargs="*", default=["byte_gpt", "hourglass_whitespace", "hnet_1stage", "hat"])
    p.add_argument("--batch", type=int, default=2, help="decode: rows decoded together")
    p.add_argument("--random-router", action="store_true",
                   help="decode: H-Net routers drawn at random instead of the identity, so that a random-weight "
                        "model starts chunks at about half the positions (at the identity it starts almost none)")
    p.add_argument("--tokenizer")
    p.add_argument("--docs")
    p.add_argument("--docs-count", type=int, default=40)
    args = p.parse_args()
    if args.what == "decode":
        decode(args.configs, args.batch, args.random_router)
    elif args.what == "push":
        push(args.configs)
    else:
        if not (args.tokenizer and args.docs):
            p.error("cut needs --tokenizer and --docs")
        cut(args.tokenizer, args.docs, args.docs_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
