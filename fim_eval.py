"""Fill-in-the-middle evaluation on Python files with prompts cut at random bytes (hlm/infilling.py).

  python fim_eval.py --token runs/fim_bpe_gpt/ckpt.pt --byte runs/fim_byte_gpt/ckpt.pt \\
      --data data/code_bytes --cuts 200 --json fim.json

--token: a FIM-trained token model, filled by plain prompting, token healing and exact byte-level
conversion (method cut: healing's fill, scored by the ratio at the cut of hlm/bytes/cut.py, every cut
in one batched pass); --byte: a FIM-trained byte model. Every method fills the same cuts. Prints a markdown
table: exact match of the middle, bits per byte of the true middle (plus its end), the share of
filled files that ast.parse accepts, and wall time. Each method's row is printed (and the --json
file rewritten) as soon as that method is done, so a run killed midway keeps the finished methods.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

import torch

from hlm import HLMError, infilling, require_exact_bytes
from hlm.checkpoint import load_model, tokenizer_from_checkpoint, write_atomic
from hlm.evaluate import split_documents
from hlm.fim import N_SENTINELS

METHODS = ("plain", "healing", "exact", "cut", "byte")
EXACT_BYTE_METHODS = ("exact", "cut", "byte")  # the ones that use hlm/bytes


def _load(path: str, device: str, kind: str):
    model, cfg, ckpt = load_model(path, device)
    tok = tokenizer_from_checkpoint(ckpt)
    if (tok is None) != (kind == "byte"):
        raise HLMError(f"{path}: --{kind} needs a {'byte' if kind == 'byte' else 'token'} model checkpoint")
    need = ckpt["data_meta"]["vocab_size"] + N_SENTINELS
    if cfg.model.vocab_size < need or cfg.data.fim_rate <= 0:
        raise HLMError(f"{path} was not trained for FIM (data.fim_rate > 0 and model.vocab_size >= {need})")
    return model.double() if device == "cpu" else model, tok, cfg, ckpt


def run(args: argparse.Namespace) -> Iterator[dict]:
    """Yield one row per method as soon as it has filled every cut, so a killed run keeps them."""
    if not args.token and not args.byte:
        raise HLMError("give --token and/or --byte checkpoints")
    if min(args.cuts, args.max_middle, args.prefix_bytes, args.suffix_bytes) < 1 or args.max_new_bytes < 0:
        raise HLMError("--cuts, --max-middle, --prefix-bytes and --suffix-bytes must be >= 1, --max-new-bytes >= 0")
    if args.seed < 0:
        raise HLMError(f"--seed must be >= 0, got {args.seed}")
    if args.workers < 1:
        raise HLMError(f"--workers must be >= 1, got {args.workers}")
    exact = [m for m in args.methods if m in EXACT_BYTE_METHODS and (args.byte if m == "byte" else args.token)]
    if exact:
        require_exact_bytes(f"methods {', '.join(exact)} (run the others with --methods plain healing)")
    token = _load(args.token, args.device, "token") if args.token else None
    byte = _load(args.byte, args.device, "byte") if args.byte else None
    data = args.data or (token or byte)[2].data.path
    docs = split_documents(data, args.split)
    cuts = infilling.make_cuts(docs, args.cuts, args.seed, args.max_middle, args.prefix_bytes, args.suffix_bytes)
    max_new = args.max_new_bytes or 2 * args.max_middle
    methods = {}  # name -> (cut, max new bytes) -> (fill, nll of the true middle)
    if token:
        model, tok, _, ckpt = token
        fim = infilling.TokenFIM(model, tok, ckpt["data_meta"]["separator_id"], ckpt["data_meta"]["vocab_size"])
        methods["plain"] = lambda c, m: (fim.plain_fill(c, m), fim.plain_nll(c))
        methods["healing"] = lambda c, m: (fim.healing_fill(c, m), fim.healing_nll(c))
        methods["exact"] = lambda c, m: infilling.exact_fill_and_nll(*infilling.exact_tail(fim, c), m)
        cut_nlls: dict[int, float] = {}  # every cut's NLL from one batched pass, on first use

        def cut_nll(c: infilling.Cut) -> float:
            if not cut_nlls:
                cut_nlls.update(zip(map(id, cuts), fim.cut_nlls(cuts, args.workers), strict=True))
            return cut_nlls[id(c)]

        methods["cut"] = lambda c, m: (fim.healing_fill(c, m), cut_nll(c))
    if byte:
        bmodel = byte[0]
        methods["byte"] = lambda c, m: (infilling.native_byte_fill(bmodel, c, m),
                                        infilling.byte_nll(infilling.native_byte_lm(bmodel, c), c))
    for name, model, length in (
            ("token", token and token[0], lambda c: len(fim.context(c)) + len(token[1].encode(c.prefix))),
            ("byte", byte and byte[0], lambda c: len(c.suffix) + len(c.prefix) + 4)):
        if model and max(map(length, cuts)) + max_new > model.cfg.block_size:
            raise HLMError(f"FIM prompts plus {max_new} new bytes do not fit the {name} model's context of "
                           f"{model.cfg.block_size}: lower --prefix-bytes / --suffix-bytes / --max-new-bytes")
    inside = sum(infilling.inside_token(token[1], c) for c in cuts) / len(cuts) if token else None
    for name in [m for m in args.methods if m in methods]:
        t0 = time.perf_counter()
        with torch.no_grad():
            fills, nlls = zip(*[methods[name](c, max_new) for c in cuts], strict=True)
        yield infilling.summarize(name, cuts, fills, nlls, time.perf_counter() - t0) | {"inside_token_share": inside}


HEADER = "| method | cuts | exact match | middle bpb | ast.parse ok | time (s) |\n|---|---:|---:|---:|---:|---:|"


def table_row(r: dict) -> str:
    return (f"| {r['method']} | {r['cuts']} | {100 * r['exact_match']:.1f}% | {r['middle_bpb']:.4f} | "
            f"{100 * r['parse_rate']:.1f}% | {r['seconds']:.1f} |")


def summary(rows: list[dict]) -> str:
    """The line under the table: how often the cut falls inside a token ('' without a token model)."""
    if not rows or rows[0]["inside_token_share"] is None:
        return ""
    return (f"\n{100 * rows[0]['inside_token_share']:.0f}% of the cuts fall inside a token of the "
            "token model's encoding of prefix + middle.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token", help="FIM-trained token model checkpoint (plain, healing, exact, cut)")
    p.add_argument("--byte", help="FIM-trained byte model checkpoint")
    p.add_argument("--data", help="prepared data folder (default: the first checkpoint's data.path)")
    p.add_argument("--split", default="test")
    p.add_argument("--cuts", type=int, default=200, help="number of FIM tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-middle", type=int, default=48, help="middle length: uniform in 1..N bytes")
    p.add_argument("--max-new-bytes", type=int, default=0, help="fill at most N bytes (default 2 x --max-middle)")
    p.add_argument("--prefix-bytes", type=int, default=1024, help="bytes of text before the middle in the prompt")
    p.add_argument("--suffix-bytes", type=int, default=512, help="bytes of text after the middle in the prompt")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--workers", type=int, default=1, help="processes that plan the cut method's covers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = []
    try:
        for row in run(args):  # print and save each method's row as soon as it is done
            if not rows:
                print(HEADER)
            rows.append(row)
            print(table_row(row), flush=True)
            if args.json:
                write_atomic(args.json, json.dumps(rows, indent=2).encode())  # a kill keeps earlier rows
    except (HLMError, OSError) as e:  # bad input or an unusable path: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary(rows):
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
