"""Compare a token-only run with a patch-level run: val bpb against training GPU seconds.

    python scripts/plot_patch.py runs/bench_bpe_token runs/bench_bpe_patch --out patch_bpe_gpt.png

Each argument is a run directory (or its metrics.jsonl). The GPU seconds of a validation
point are the run's `train_time_s` at that step (interpolated between logged train records;
evaluation and the compiling steps are not counted). Prints the final val bpb, GPU time and
the patch run's cost ratio and bpb change against the first run. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load_run(path: str) -> dict:
    """Val curve (steps, GPU seconds, bpb) and the first token-mode step of one run."""
    metrics = Path(path)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    if not metrics.is_file():
        sys.exit(f"error: no metrics file at {metrics}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    if not train or not val:
        sys.exit(f"error: {metrics} has no train or no val records")
    steps = np.array([r["step"] for r in val])
    seconds = np.interp(steps, [0] + [r["step"] for r in train], [0.0] + [r["train_time_s"] for r in train])
    token_steps = [r["step"] for r in train if r.get("mode") == "token"]
    patch_steps = [r["step"] for r in train if r.get("mode") == "patch"]
    switch = max(patch_steps) if patch_steps and token_steps else None
    return {"name": metrics.parent.name, "steps": steps, "seconds": seconds,
            "bpb": np.array([r["bpb"] for r in val]), "switch": switch,
            "switch_s": float(np.interp(switch, steps, seconds)) if switch is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files; the first is the baseline")
    p.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    p.add_argument("--out", default="patch_vs_token.png")
    p.add_argument("--title", default="val bpb against training GPU time")
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    labels = args.labels or [r["name"] for r in runs]
    if len(labels) != len(runs):
        sys.exit("error: give one label per run")

    base = runs[0]
    for run, label in zip(runs, labels, strict=True):
        ratio = run["seconds"][-1] / base["seconds"][-1]
        change = 100 * (run["bpb"][-1] / base["bpb"][-1] - 1)
        print(f"{label}: final val bpb {run['bpb'][-1]:.4f} at step {run['steps'][-1]}, "
              f"GPU time {run['seconds'][-1]:.1f}s, time ratio {ratio:.3f}x, bpb {change:+.2f}% vs {labels[0]}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = min(r["bpb"].min() for r in runs)
    hi = max(np.percentile(r["bpb"], 90) for r in runs)  # the first points of a run are off the scale
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run, label in zip(runs, labels, strict=True):
        (line,) = ax.plot(run["seconds"], run["bpb"], marker="o", markersize=3, label=label)
        if run["switch_s"] is not None:
            ax.axvline(run["switch_s"], color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate("patch → token", (run["switch_s"], hi), color=line.get_color(),
                        fontsize=8, rotation=90, va="top", ha="right")
    ax.set_xlabel("training GPU seconds (train_time_s)")
    ax.set_ylabel("val bits per byte")
    ax.set_title(args.title)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
