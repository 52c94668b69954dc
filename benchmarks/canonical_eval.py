"""Canonical, canonicalized and exact byte-level eval of a token checkpoint, each against canonical
scoring on its own windows; and the cost of the prefix probability at FIM cuts.

  python benchmarks/canonical_eval.py [runs/bpe_gpt/ckpt.pt --data data/enwiki_bpe --split val] \\
      [--max-bytes 2000000] [--fim-token runs/fim_bpe_gpt/ckpt.pt --fim-data data/code_bytes --cuts 150]

Runs eval.py once with --canonical and --exact-bytes (same model load; warm-up by the plain pass)
and prints one table; with --fim-token, times canonical scoring of prefix + middle + EOS after the
FIM prompt (one cut per forward, and batched) against the batched prefix probability at the cut
(hlm/bytes/cut.py: the same trunks plus the covers), with the covers given, planned here while the
device runs the trunks, or planned first in worker processes, over the cuts of fim_eval.py, and prints
the overheads. Tokens are given to every pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def eval_table(args) -> None:
    import eval as eval_cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [args.checkpoint, "--data", args.data, "--split", args.split, "--canonical", "--exact-bytes",
                "--json", str(out), "--batch-size", str(args.batch_size), "--device", args.device]
        if args.max_bytes:
            argv += ["--max-bytes", str(args.max_bytes)]
        if eval_cli.main(argv) != 0:
            raise SystemExit("eval.py failed")
        row = json.loads(out.read_text())[0]
    c, e = row["canonical"], row["exact"]
    print(f"\n## {args.checkpoint} on {args.data}:{args.split} ({row['bytes']:,} bytes)\n")
    print("| quantity | bpb | seconds | denominator: canonical on the same windows (s) | cost |")
    print("|---|---:|---:|---:|---:|")
    print(f"| canonical (stream windows) | {c['bpb_canon']:.4f} | {c['canonical_seconds']:.2f} | "
          f"{c['canonical_seconds']:.2f} | 1.00x |")
    print(f"| canonicalized (stream windows) | {c['bpb_canonicalized']:.4f} | {c['seconds']:.2f} | "
          f"{c['canonical_seconds']:.2f} | {c['cost_vs_canonical']:.2f}x |")
    print(f"| canonical (per-document windows) | {e['bpb_canon']:.4f} | {e['canonical_seconds']:.2f} | "
          f"{e['canonical_seconds']:.2f} | 1.00x |")
    print(f"| exact tree pass, bpb_conv | {e['bpb_conv']:.4f} | {e['seconds']:.2f} | {e['canonical_seconds']:.2f} | "
          f"{e['cost_vs_canonical']:.2f}x |")
    print(f"\nleak: bpb_canon - bpb_canonicalized = {c['bpb_leak']:.5f}, bpb_canon - bpb_conv = {e['bpb_gap']:.5f}; "
          f"mean leaked mass per position {c['mean_leak']:.4f}, positions leaking > 1%: "
          f"{100 * c['share_leak_above_1pct']:.1f}%; masks {c['mask_keys']:,} keys, {c['mask_bytes'] / 2**20:.1f} MiB, "
          f"built in {c['mask_seconds']:.2f} s (not in the cost); forwards: exact {e['forward_seconds']:.2f} s, "
          f"canonical on its windows {e['canonical_forward_seconds']:.2f} s")
    if c.get("bpb_canon_open_end") is not None:
        print(f"bpb_canon with the split's unterminated end scored as a prefix: {c['bpb_canon_open_end']:.5f}")


def fim_overhead(args) -> None:
    from hlm import infilling as fe
    from hlm.bytes.cut import canonical_logprobs_batch, cut_logprobs_batch, plan_cuts
    from hlm.checkpoint import load_model, tokenizer_from_checkpoint
    from hlm.evaluate import split_documents

    model, cfg, ckpt = load_model(args.fim_token, args.device)
    tok = tokenizer_from_checkpoint(ckpt)
    fim = fe.TokenFIM(model, tok, ckpt["data_meta"]["separator_id"], ckpt["data_meta"]["vocab_size"])
    docs = split_documents(args.fim_data, "test")
    cuts = fe.make_cuts(docs, args.cuts, 0, 48, args.prefix_bytes, args.suffix_bytes)
    cuts = [c for c in cuts if len(fim.context(c)) + len(tok.encode(c.prefix + c.middle)) + 8 < cfg.model.block_size]
    if not cuts:
        raise SystemExit("no FIM prompt fits the model's context: lower --prefix-bytes / --suffix-bytes")
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    # the tokens are given to every pass (tokenizing is the same for all): FIM prompt, start, prefix + middle
    requests = fim.cut_requests(cuts)
    start = fim.s.middle
    sequences = [[*r.context, start, *r.text_tokens] for r in requests]
    scored_from = [len(r.context) + 1 for r in requests]
    ends = [r.end_id for r in requests]

    def canonical_one_by_one():
        for seq, end in zip(sequences, ends, strict=True):
            with torch.no_grad():
                lp = torch.log_softmax(model.logits(torch.tensor([seq], device=fim.device))[0].float(), -1)
            float(lp[-1, end])

    def canonical_batched():
        canonical_logprobs_batch(model, sequences, scored_from, ends, batch_size=args.cut_batch)

    def plan_here():
        return plan_cuts(fim.rules, start, requests)

    def plan_in_workers():
        return plan_cuts(fim.rules, start, requests, args.workers)

    plans = plan_here()

    def cut_given_plans():
        cut_logprobs_batch(model, fim.rules, start, requests, plans=plans, batch_size=args.cut_batch)

    def cut_planned_here():
        cut_logprobs_batch(model, fim.rules, start, requests, batch_size=args.cut_batch)

    def cut_planned_in_workers():
        cut_logprobs_batch(model, fim.rules, start, requests, plans=plan_in_workers(), batch_size=args.cut_batch)

    passes = {"canonical, one cut per forward": canonical_one_by_one,
              "canonical, batched": canonical_batched,
              "cut, batched, plans given (device passes and host layout)": cut_given_plans,
              "cut, batched, planned here while the device runs the trunks": cut_planned_here,
              f"cut, batched, planned in {args.workers} worker processes": cut_planned_in_workers,
              "planning alone, here": plan_here,
              f"planning alone, {args.workers} worker processes": plan_in_workers}
    for fn in passes.values():  # warm-up: every batch shape, the rules' caches
        fn()
    times = {}
    for _ in range(args.repeats):
        for name, fn in passes.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    best = {name: min(t) for name, t in times.items()}
    inside = sum(fe.inside_token(tok, c) for c in cuts) / len(cuts)
    extra = sum(len(p.ids) - p.n_trunk for p in plans) / len(plans)
    print(f"\n## prefix probability at FIM cuts ({len(cuts)} cuts, {100 * inside:.0f}% inside a token, "
          f"{extra:.2f} chain positions per cut on {sum(map(len, sequences)) / len(sequences):.0f} trunk positions; "
          f"batches of {args.cut_batch}; best of {args.repeats})\n")
    print("| pass | seconds | per cut (ms) |\n|---|---:|---:|")
    for name, s in best.items():
        print(f"| {name} | {s:.4f} | {1e3 * s / len(cuts):.3f} |")
    base = best["canonical, batched"]
    print()
    for name in list(best)[2:5]:
        print(f"overhead of '{name}' over batched canonical scoring of the same tokens: "
              f"{100 * (best[name] / base - 1):.1f}%")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="token checkpoint for the eval table (omit: the FIM cuts only)")
    p.add_argument("--data")
    p.add_argument("--split", default="val")
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fim-token", help="FIM-trained token checkpoint for the prefix-at-cut overhead")
    p.add_argument("--fim-data", help="prepared code data folder with a test split")
    p.add_argument("--cuts", type=int, default=150)
    p.add_argument("--prefix-bytes", type=int, default=1024, help="as fim_eval.py")
    p.add_argument("--suffix-bytes", type=int, default=512, help="as fim_eval.py")
    p.add_argument("--cut-batch", type=int, default=160, help="cuts per batch of the batched passes")
    p.add_argument("--workers", type=int, default=8, help="planning processes")
    p.add_argument("--repeats", type=int, default=3, help="time each pass this many times, keep the best")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not (args.checkpoint or args.fim_token) or (args.checkpoint and not args.data):
        p.error("give CHECKPOINT with --data, and/or --fim-token with --fim-data")
    if args.checkpoint:
        eval_table(args)
    if args.fim_token:
        fim_overhead(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
