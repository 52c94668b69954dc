"""The comparison's outputs from its results records (hlm/compare.py): a markdown table, one row
per model x corpus x budget with the seed spread, and PNG charts of test bpb against training
FLOPs, wall-clock and inference FLOPs per byte (matplotlib, the `plot` extra)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from hlm.checkpoint import write_atomic

CHARTS = {  # file stem -> (record key, axis label, log scale)
    "bpb_vs_train_flops": ("flops_seen", "training FLOPs (counted)", True),
    "bpb_vs_wall_clock": ("train_time_s", "training wall-clock (s)", False),
    "bpb_vs_inference_flops": ("inference_flops_per_byte", "inference FLOPs per byte (forward)", True),
}
MARKERS = "os^Dv<>pP*Xh"
EPOCH_FLAG = 4.0  # runs that saw their training split more often than this are flagged


def cells(records: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Records grouped by (model, corpus, budget), in the order they first appear."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["model"], r["corpus"], r["budget_label"]), []).append(r)
    return out


def spread(values: list[float], digits: int = 4) -> str:
    """Mean, and ± half the range when there are several seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def table(records: list[dict]) -> str:
    gen_batches = sorted({b for r in records for b in r["generation"]}, key=int)
    head = ["model", "corpus", "budget", "seeds", "steps", "train FLOPs", "train s", "epochs", "train bytes/s",
            "val bpb best (step)", "val bpb final", "**test bpb**", "test bpb, best-val ckpt", "infer MFLOP/byte"]
    head += [f"{kind} B/s @{b}" for b in gen_batches for kind in ("prefill", "decode")]
    graph_batches = sorted({b for r in records for b in r.get("generation_graphs", {})}, key=int)
    head += [f"graphed decode B/s @{b}, whole / median step" for b in graph_batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for (model, corpus, budget), rs in cells(records).items():
        mean = lambda key, rs=rs: statistics.fmean(r[key] for r in rs)  # noqa: E731
        epochs = ", ".join(f"{r['epochs']:.2f}" + (" ⚑" if r["over_epoch_flag"] else "") for r in rs)
        best = ", ".join(f"{r['val_bpb_best']:.4f} ({r['val_best_step']})" for r in rs)
        at_best = [r.get("test_bpb_best_val") for r in rs]  # None: not measured (older records)
        row = [model, corpus, budget, str(len(rs)), f"{mean('steps'):,.0f}", f"{mean('flops_seen'):.3g}",
               f"{mean('train_time_s'):.1f}", epochs, f"{mean('train_bytes_per_s'):,.0f}", best,
               spread([r["val_bpb_final"] for r in rs]), f"**{spread([r['test_bpb'] for r in rs])}**",
               spread(at_best) if None not in at_best else "–",
               f"{mean('inference_flops_per_byte') / 1e6:.4g}"]
        for b in gen_batches:
            for kind in ("prefill", "decode"):
                vals = [r["generation"][b][f"{kind}_bytes_per_s"] for r in rs if b in r["generation"]]
                row.append(f"{statistics.fmean(vals):,.0f}" if vals else "–")
        for b in graph_batches:
            runs = [r["generation_graphs"][b] for r in rs if b in r.get("generation_graphs", {})]
            rates = [statistics.fmean(g.get(k, math.nan) for g in runs)
                     for k in ("decode_bytes_per_s", "decode_bytes_per_s_median_step")] if runs else []
            row.append(" / ".join("–" if math.isnan(v) else f"{v:,.0f}" for v in rates) or "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def epochs_label(record: dict) -> str:
    """How often the run read its training split, flagged past EPOCH_FLAG (its test bpb may be overfitted)."""
    return f"{record['epochs']:.1f} ep" + (" ⚑" if record["over_epoch_flag"] else "")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (cost, bpb) that no other point beats on both: by rising cost, each with a lower bpb
    than every cheaper one."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def chart_figure(records: list[dict], key: str, label: str, log_x: bool):
    """Test bpb against `key`, a panel per corpus; each model family keeps one marker and colour in every
    panel, and one legend names them all. Each point is labelled with the epochs its run saw, and a
    line joins each family's Pareto front where it has several points."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    corpora = list(dict.fromkeys(r["corpus"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    style = {m: {"marker": MARKERS[i % len(MARKERS)], "color": f"C{i % 10}"} for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora) + 2, 4.2), squeeze=False,
                             layout="constrained")
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for model in models:
            runs = [r for r in records if r["corpus"] == corpus and r["model"] == model]
            if runs:
                ax.scatter([r[key] for r in runs], [r["test_bpb"] for r in runs], label=model, **style[model])
                front = pareto_front([(r[key], r["test_bpb"]) for r in runs])
                if len(front) > 1:
                    ax.plot(*zip(*front, strict=True), color=style[model]["color"], linewidth=1, alpha=0.6)
            for r in runs:
                ax.annotate(epochs_label(r), (r[key], r["test_bpb"]), xytext=(4, 3), textcoords="offset points",
                            fontsize="x-small", color="red" if r["over_epoch_flag"] else "0.35")
        ax.set(title=corpus, xlabel=label, ylabel="test bits per byte (final checkpoint)")
        if log_x:
            ax.set_xscale("log")
        else:  # from 0: the runs of one time budget stand in one column, not spread over milliseconds
            ax.set_xlim(0, 1.25 * max(r[key] for r in records if r["corpus"] == corpus))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="", label=m, **style[m]) for m in models]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def charts(records: list[dict], out: Path) -> list[Path]:
    """One PNG per chart (CHARTS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for stem, (key, label, log_x) in CHARTS.items():
        fig = chart_figure(records, key, label, log_x)
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def report_files() -> list[str]:
    """The names `write_report` (re)writes in the grid's out folder."""
    return ["results.md", *(f"{stem}.png" for stem in CHARTS)]


def write_report(records: list[dict], out: Path, grid_path: str, say: Callable[[str], object] = print) -> None:
    """results.md (table and notes) and the charts, rewritten from all records so far."""
    if not records:
        say("no finished runs yet: no table or charts written")
        return
    devices = ", ".join(sorted({r["device"] for r in records}))
    notes = [
        f"Grid `{grid_path}`; {len(records)} runs; written {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; "
        f"generation measured on: {devices}.",
        "",
        table(records),
        "",
        "- **test bpb**: eval.py on the whole test split with the *final* checkpoint; ± is half the range over "
        "seeds. val bpb best is the lowest val bpb the trainer logged (with its step), one per seed; test bpb, "
        "best-val ckpt scores the checkpoint of that step (`train.keep_best`), the final one where they agree.",
        "- train FLOPs: forward+backward FLOPs as the training log counts them (FlopCounterMode), times steps. "
        "train bytes/s: median of the training log. infer MFLOP/byte: one forward on a test window, per byte.",
        f"- epochs: bytes seen / bytes of the training split, one per seed; ⚑ past {EPOCH_FLAG:g} epochs.",
        "- generation: cached `generate_stream`; prefill = prompt bytes / time to the first new token, "
        "decode = new bytes / the rest; @B = B rows. Eager steps under bf16 autocast; graphed decode "
        "(grid `generation.cuda_graphs`, families with a static decoder): bf16 weights, one CUDA graph per step; "
        "whole = new bytes / the whole decode (graph captures included), median step = one step's bytes / the "
        "median step time (CUDA events between steps: the steady-state rate).",
    ]
    write_atomic(out / "results.md", ("\n".join(notes) + "\n").encode())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[plot]'): charts skipped")
        return
    paths = charts(records, out)
    say(f"wrote {out / 'results.md'} and {', '.join(p.name for p in paths)}")
