"""Bits per byte of one or more checkpoints on the same bytes.

  python eval.py runs/a/ckpt.pt runs/b/ckpt.pt --data data/enwiki --split test --json out.json
  python eval.py runs/a/ckpt.pt --text some_file.txt --stride 512
  python eval.py runs/bpe/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes
  python eval.py runs/bpe/ckpt.pt runs/byte/ckpt.pt --data data/enwiki --ensemble mixture --max-bytes 20000

Each checkpoint encodes the bytes with its own tokenizer (bytes for byte models), so the
table compares models with different vocabularies on identical text. Prints a markdown table.

--exact-bytes (token models): also the exact byte-level conversion in one batched tree pass
(hlm/bytes/exact_eval.py): bpb_canon and bpb_conv on the same windows (each document from the
separator, with its end of text counted as one byte), their gap, documents skipped because
they do not round-trip, and the cost relative to canonical scoring.
--canonical (token models): bpb_canon and bpb_canonicalized (next tokens that cannot occur in a
canonical encoding masked out, renormalised; hlm/bytes/canonical.py) from one pass over the same
windows as the bits/byte column, their difference, the leaked mass per position, and the cost
relative to canonical scoring alone on those windows.
--ensemble: also score the step-by-step mixture/product of all checkpoints as byte LMs, and
each member scored the same way (token models through the batched tree pass with full
next-byte distributions: memory grows with the text, so use --max-bytes up to ~1e6).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from hlm import LN2, HLMError, require_exact_bytes
from hlm.checkpoint import load_model, tokenizer_from_checkpoint, write_atomic
from hlm.config import Config
from hlm.evaluate import encode_stream, evaluate, inference_autocast, split_documents


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
    p.add_argument("--exact-bytes", action="store_true", help="exact converted bpb for token models")
    p.add_argument("--canonical", action="store_true", help="canonicalized bpb and leak for token models")
    p.add_argument("--ensemble", choices=["mixture", "product"], help="also score the ensemble of all checkpoints")
    p.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per checkpoint")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes planning the exact conversion")
    args = p.parse_args(argv)
    try:
        check_args(args)
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
            row = {"checkpoint": ckpt_path, "model": describe(cfg), "source": source,
                   "context": cfg.model.block_size, **res}
            if args.exact_bytes and tok is not None:
                row["exact"] = exact_row(model, tok, docs, ckpt, args)
            if args.canonical and tok is not None:
                row["canonical"] = canonical_row(model, tok, ids, ckpt, cfg, args)
            rows.append(row)
        if args.ensemble:
            rows.append(ensemble_row(docs, source, args))
        print_table(rows)
        if args.json:
            write_atomic(args.json, json.dumps(rows, indent=2).encode())
    except (HLMError, OSError) as e:  # bad input or an unusable path: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that would crash or silently mean something else deep inside the scoring."""
    for flag, value in (("--stride", args.stride), ("--max-bytes", args.max_bytes)):
        if value is not None and value < 1:
            raise HLMError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            raise HLMError(f"{flag} must be >= 1, got {value}")
    if args.weights is not None and not all(math.isfinite(w) and w >= 0 for w in args.weights):
        raise HLMError(f"--weights must be finite and >= 0, got {args.weights}")
    for flag, given in (("--exact-bytes", args.exact_bytes), ("--canonical", args.canonical),
                        ("--ensemble", args.ensemble)):
        if given:
            require_exact_bytes(flag)


def exact_row(model, tok, docs: list[bytes], ckpt: dict, args) -> dict:
    from hlm.bytes.exact_eval import exact_bpb

    dev = torch.device(args.device)
    res = exact_bpb(model, tok, docs, ckpt["data_meta"]["separator_id"], dev, args.batch_size,
                    autocast=inference_autocast(dev), workers=args.workers, time_canonical=True)
    res.pop("per_doc")
    res["cost_vs_canonical"] = res["seconds"] / res["canonical_seconds"]  # canonical scoring on the same windows
    return res


def canonical_row(model, tok, ids: torch.Tensor, ckpt: dict, cfg: Config, args) -> dict:
    from hlm.bytes.canonical import canonical_eval

    dev = torch.device(args.device)
    return canonical_eval(model, tok, ids, ckpt["data_meta"]["separator_id"], ckpt["token_nbytes"],
                          cfg.model.block_size, args.stride, args.batch_size, dev, inference_autocast(dev))


def ensemble_row(docs: list[bytes], source: str, args) -> dict:
    """bpb of the step-by-step ensemble of every checkpoint, and of each member scored the same way
    (full next-byte distributions: token models through one batched tree pass, byte models directly;
    each document with its end of text). Documents some token model cannot round-trip are left out."""
    import time

    from hlm.bytes import ByteLM, Ensemble, byte_lm_from_checkpoint
    from hlm.bytes.exact_eval import exact_prefix_logprobs

    dev = torch.device(args.device)
    autocast = inference_autocast(dev)
    t0 = time.perf_counter()
    members, rows = [], []
    for path in args.checkpoints:
        blm, model, _, _ = byte_lm_from_checkpoint(path, args.device)
        members.append(blm)
        if isinstance(blm, ByteLM):
            rows.append(exact_prefix_logprobs(model, blm.tok, docs, blm.start_id, dev, args.batch_size,
                                              autocast=autocast, workers=args.workers))
        else:
            rows.append([blm.prefix_logprobs(doc) for doc in docs])
    ens = Ensemble(members, args.ensemble, args.weights)
    nll = torch.zeros(len(members) + 1, dtype=torch.float64)
    n_bytes = skipped = 0
    for d, doc in enumerate(docs):
        doc_rows = [r[d] for r in rows]
        if any(r is None for r in doc_rows):
            skipped += 1
            continue
        targets = torch.tensor(list(doc) + [256])
        picked = torch.arange(len(targets))
        nll -= torch.stack([r[picked, targets].double().sum() for r in doc_rows + [ens.combine(doc_rows)]])
        n_bytes += len(doc) + 1
    seconds = time.perf_counter() - t0
    bpb = (nll / (LN2 * max(n_bytes, 1))).tolist()
    return {"checkpoint": f"ensemble ({args.ensemble})", "model": " + ".join(args.checkpoints), "source": source,
            "bpb": bpb[-1], "members_bpb": bpb[:-1], "docs_skipped": skipped, "ppl_token": float("nan"),
            "bytes": n_bytes, "tokens": n_bytes, "seconds": seconds, "bytes_per_s": n_bytes / max(seconds, 1e-9),
            "stride": None}


def truncate(docs: list[bytes], limit: int) -> list[bytes]:
    out, total = [], 0
    for doc in docs:
        if total >= limit:
            break
        out.append(doc[: limit - total])
        total += len(out[-1]) + 1
    return out


def describe(cfg: Config) -> str:
    """The model column: the family's own account of its shape (its config's `describe()`)."""
    return cfg.model.describe()


def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> None:
    """Print a markdown table; the first `text_columns` columns left-aligned, the rest numbers."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * text_columns + "---:|" * (len(header) - text_columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_table(rows: list[dict]) -> None:
    markdown_table(["checkpoint", "model", "bits/byte", "ppl/token", "bytes", "tokens", "seconds", "bytes/s"],
                   [[r["checkpoint"], r["model"], f"{r['bpb']:.4f}", f"{r['ppl_token']:.3f}", f"{r['bytes']:,}",
                     f"{r['tokens']:,}", f"{r['seconds']:.2f}", f"{r['bytes_per_s']:,.0f}"] for r in rows], 2)
    if rows:
        print(f"\nsource: {rows[0]['source']}")
    for r in rows:
        if r.get("stride") and r["stride"] < r["context"]:
            print(f"{r['checkpoint']}: sliding windows of {r['context']} tokens, the last {r['stride']} targets of "
                  "each scored (every byte scored once, with more left context)")
    for r in rows:
        if "members_bpb" in r:
            members = ", ".join(f"{b:.4f}" for b in r["members_bpb"])
            print(f"\n{r['checkpoint']}: {r['bpb']:.4f} bits/byte; members alone, scored the same way (exact "
                  f"byte-level, each document with its end of text): {members}; documents left out: "
                  f"{r['docs_skipped']}")
    exact = [r for r in rows if "exact" in r]
    if exact:
        print("\nexact byte-level conversion (same windows for both columns; end of text counted as one byte)\n")
        markdown_table(["checkpoint", "bpb_canon", "bpb_conv", "gap", "docs", "skipped (no round trip)",
                        "tree nodes / tokens", "seconds", "cost vs canonical"],
                       [[r["checkpoint"], f"{e['bpb_canon']:.4f}", f"{e['bpb_conv']:.4f}", f"{e['bpb_gap']:.5f}",
                         str(e["docs"]), str(e["docs_skipped"]), f"{e['nodes'] / max(e['tokens'], 1):.2f}",
                         f"{e['seconds']:.2f}", f"{e['cost_vs_canonical']:.1f}x"]
                        for r in exact for e in [r["exact"]]])
        for r in exact:
            e = r["exact"]
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in e["seconds_split"].items())
            plan = e["planning"]
            print(f"\n{r['checkpoint']}: exact seconds by phase: {parts}\n"
                  f"  model forwards {e['forward_seconds']:.2f} s of device time over {e['windows']} windows; "
                  f"planned {plan['texts']:,} distinct segments ({plan['text_bytes']:,} bytes) in "
                  f"{plan['chunks']} chunks, slowest {plan['chunk_seconds_max']:.2f} s, "
                  f"sum {plan['chunk_seconds_sum']:.2f} s; canonical scoring alone on these windows "
                  f"{e['canonical_seconds']:.2f} s ({e['canonical_forward_seconds']:.2f} s of forwards)")
    canonical = [r for r in rows if "canonical" in r]
    if canonical:
        print("\ncanonicalized (invalid next tokens masked; same windows as bits/byte)\n")
        markdown_table(["checkpoint", "bpb_canon", "bpb_canonicalized", "difference", "mean leak",
                        "positions leaking > 1%", "canonical s", "canonicalized s", "cost vs canonical"],
                       [[r["checkpoint"], f"{c['bpb_canon']:.4f}", f"{c['bpb_canonicalized']:.4f}",
                         f"{c['bpb_leak']:.5f}", f"{c['mean_leak']:.4f}", f"{100 * c['share_leak_above_1pct']:.1f}%",
                         f"{c['canonical_seconds']:.2f}", f"{c['seconds']:.2f}", f"{c['cost_vs_canonical']:.2f}x"]
                        for r in canonical for c in [r["canonical"]]])
        for r in canonical:
            c = r["canonical"]
            if c["masked_targets"]:
                print(f"{r['checkpoint']}: {c['masked_targets']} canonical tokens rejected by the validity masks "
                      "(scored unmasked)")
            if c.get("bpb_canon_open_end") is not None:
                print(f"{r['checkpoint']}: bpb_canon {c['bpb_canon_open_end']:.4f} with the split's unterminated last "
                      "document scored as a prefix (covers at its end) instead of ending on a token boundary")
            print(f"{r['checkpoint']}: validity masks for {c['mask_keys']:,} keys ({c['mask_bytes'] / 2**20:.1f} MiB "
                  f"packed) built in {c['mask_seconds']:.2f} s, not in the cost")

if __name__ == "__main__":
    sys.exit(main())
