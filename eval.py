"""Bits per byte of one or more checkpoints on the same bytes.

  python eval.py runs/a/ckpt.pt runs/b/ckpt.pt --data data/enwiki --split test --json out.json
  python eval.py runs/a/ckpt.pt --text some_file.txt --stride 512

Each checkpoint encodes the bytes with its own tokenizer (bytes for byte models), so the
table compares models with different vocabularies on identical text. Prints a markdown table.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from hlm import HLMError
from hlm.checkpoint import load_model, tokenizer_from_checkpoint
from hlm.evaluate import encode_stream, evaluate, split_documents


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prepared data folder")
    src.add_argument("--text", help="a file whose bytes are scored as one document")
    p.add_argument("--split", default="test")
    p.add_argument("--stride", type=int, default=None, help="sliding windows scoring the last STRIDE targets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=None, help="score only the first N bytes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        if args.data:
            docs = split_documents(args.data, args.split)
            source = f"{args.data}:{args.split}"
        else:
            path = Path(args.text)
            if not path.is_file():
                raise HLMError(f"text file not found: {path}")
            docs, source = [path.read_bytes()], str(path)
        if args.max_bytes is not None:
            docs = truncate(docs, args.max_bytes)
        rows = []
        for ckpt_path in args.checkpoints:
            model, cfg, ckpt = load_model(ckpt_path, args.device)
            tok = tokenizer_from_checkpoint(ckpt)
            ids = encode_stream(docs, tok, ckpt["data_meta"]["separator_id"])
            res = evaluate(model, ids, ckpt["token_nbytes"], cfg.model.block_size, args.stride,
                           args.batch_size, args.device)
            rows.append({"checkpoint": ckpt_path, "model": describe(cfg), "source": source, **res})
    except HLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def truncate(docs: list[bytes], limit: int) -> list[bytes]:
    out, total = [], 0
    for doc in docs:
        if total >= limit:
            break
        out.append(doc[: limit - total])
        total += len(out[-1]) + 1
    return out


def describe(cfg) -> str:
    m = cfg.model
    return f"{m.family} {m.n_layer}L/{m.d_model}d V={m.vocab_size}" if hasattr(m, "n_layer") else m.family


def print_table(rows: list[dict]) -> None:
    print("| checkpoint | model | bits/byte | ppl/token | bytes | tokens | seconds | bytes/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['model']} | {r['bpb']:.4f} | {r['ppl_token']:.3f} | {r['bytes']:,} | "
              f"{r['tokens']:,} | {r['seconds']:.2f} | {r['bytes_per_s']:,.0f} |")
    if rows:
        print(f"\nsource: {rows[0]['source']}; stride {rows[0]['stride']} tokens (equal to the context: "
              "every byte scored once)")

if __name__ == "__main__":
    sys.exit(main())
