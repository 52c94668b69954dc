"""Scaling and agreement of training runs, from their metrics.jsonl.

    python scripts/compare_runs.py runs/gpt_1gpu runs/gpt_2gpu runs/gpt_4gpu --world 1 2 4

The first run is the reference. Per run: its GPUs (`--world`, default 1 each), the median
training bytes/s (all ranks) over the train records after the first `--skip` ones (compilation
and warm-up), peak memory per GPU, final val bpb; against the reference: the throughput ratio,
the scaling efficiency bytes/s / (world / world_ref x reference bytes/s), and the largest
|d train loss| and |d val bpb| over the steps both runs logged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median


def read(run: str) -> tuple[dict[int, dict], dict[int, dict]]:
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return ({r["step"]: r for r in records if r["kind"] == "train"},
            {r["step"]: r for r in records if r["kind"] == "val"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files); the first is the reference")
    p.add_argument("--world", type=int, nargs="+", help="GPUs of each run (default 1 each)")
    p.add_argument("--skip", type=int, default=2, help="train records to drop at the start of each run")
    args = p.parse_args(argv)
    worlds = args.world or [1] * len(args.runs)
    if len(worlds) != len(args.runs):
        p.error("--world needs one number per run")
    runs = [read(r) for r in args.runs]
    for run, (train, _) in zip(args.runs, runs, strict=True):
        if len(train) <= args.skip:
            p.error(f"{run}: {len(train)} train records, need more than --skip {args.skip}")
    # a record whose steps all carried compilation has no throughput
    speed = [median(r["bytes_per_s"] for r in list(train.values())[args.skip:] if "bytes_per_s" in r)
             for train, _ in runs]
    ref_train, ref_val = runs[0]
    print("| run | GPUs | bytes/s | x ref | scaling eff. | peak GiB | final val bpb | max dloss | max dval bpb |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, world, (train, val), bps in zip(args.runs, worlds, runs, speed, strict=True):
        eff = bps / (world / worlds[0] * speed[0])
        mem = max((r.get("peak_mem_gib", 0.0) for r in train.values()), default=0.0)
        common = sorted(set(train) & set(ref_train))
        dloss = max((abs(train[s]["loss"] - ref_train[s]["loss"]) for s in common), default=float("nan"))
        dval = max((abs(val[s]["bpb"] - ref_val[s]["bpb"]) for s in set(val) & set(ref_val)), default=float("nan"))
        final = val[max(val)]["bpb"] if val else float("nan")
        print(f"| {run} | {world} | {bps:,.0f} | {bps / speed[0]:.2f} | {100 * eff:.1f}% | {mem:.1f} | "
              f"{final:.4f} | {dloss:.4f} | {dval:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
