"""Why H-Net trails the whitespace hourglass: step-matched ablations of tiny models.

  python benchmarks/hnet_ablation.py [--steps 400] [--out DIR] [--variants NAME ...] [overrides ...]

Trains benchmarks/configs/tiny_hourglass_whitespace.yaml and variants of benchmarks/configs/tiny_hnet_1stage.yaml
(1+4+1 layers at d=128, 512-byte windows, batch 16, on data/enwiki_bytes) and of tiny_hnet_2stage.yaml (the same
six layers over two stages) for the same steps with the same seed,
one train.py process per variant, and writes DIR/VARIANT_metrics.jsonl and DIR/table.md: val bpb at each
evaluation and, for H-Net, the bytes per chunk and whitespace precision / recall of the last logged interval.
Runs on any device; only quality at matched steps is compared (no speeds). Checkpoints go to
runs/ablation/VARIANT_STEPS/ (a run there resumes; a finished one is not redone).

Variants:
  hourglass                 the whitespace hourglass, the reference
  hnet                      learned chunks, W_res = 0 at initialisation (the paper's)
  hnet_identity             model.residual_init=identity: W_res = I, the hourglass's skip from the encoder
  hnet_lr1                  model.lr_scale=[1.0,1.0] (the config has 2x on the outer stage)
  hnet_identity_lr1         both
  hnet_ws_chunks            the router's decisions replaced by the whitespace rule (p = b, so the router and the
                            ratio loss get no gradient): the rest of H-Net on the hourglass's boundaries
  hnet_identity_ws_chunks   both
  hnet_identity_ratio0      W_res = I, model.ratio_weight=0: no ratio loss (the router learns from the LM loss
                            alone, through the smoothing weights and the confidence STE)
  hnet_identity_ratio0.1    W_res = I, model.ratio_weight=0.1 (the config has 0.03)
  hnet_ratio0.1             W_res = 0, model.ratio_weight=0.1
  hnet2                     two stages (benchmarks/configs/tiny_hnet_2stage.yaml: 1+1+2+1+1 layers, 3 x 3 bytes
                            per main position), W_res = 0 in both stages
  hnet2_identity            two stages, W_res = I in both
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
VARIANTS = {
    "hourglass": ("tiny_hourglass_whitespace.yaml", []),
    "hnet": ("tiny_hnet_1stage.yaml", []),
    "hnet_identity": ("tiny_hnet_1stage.yaml", ["model.residual_init=identity"]),
    "hnet_lr1": ("tiny_hnet_1stage.yaml", ["model.lr_scale=[1.0,1.0]"]),
    "hnet_identity_lr1": ("tiny_hnet_1stage.yaml", ["model.residual_init=identity", "model.lr_scale=[1.0,1.0]"]),
    "hnet_ws_chunks": ("tiny_hnet_1stage.yaml", []),
    "hnet_identity_ws_chunks": ("tiny_hnet_1stage.yaml", ["model.residual_init=identity"]),
    "hnet_identity_ratio0": ("tiny_hnet_1stage.yaml", ["model.residual_init=identity", "model.ratio_weight=0"]),
    "hnet_identity_ratio0.1": ("tiny_hnet_1stage.yaml", ["model.residual_init=identity", "model.ratio_weight=0.1"]),
    "hnet_ratio0.1": ("tiny_hnet_1stage.yaml", ["model.ratio_weight=0.1"]),
    "hnet2": ("tiny_hnet_2stage.yaml", []),
    "hnet2_identity": ("tiny_hnet_2stage.yaml", ["model.residual_init=identity"]),
}


def whitespace_chunks() -> None:
    """Patch H-Net's stage-0 router to start a chunk exactly where the whitespace rule does (p = b)."""
    import hlm.models.hnet as hnet
    from hlm.models.parts.boundaries import whitespace_starts

    run, route = hnet.HNet._run, hnet.CosineRouter.forward
    current = {}

    def run_keeping_bytes(self, x):
        current["x"] = x
        return run(self, x)

    def rule(self, h, valid):
        p, b = route(self, h, valid)
        x = current["x"]
        if h.size(1) != x.size(1):  # an inner stage keeps its router
            return p, b
        starts = whitespace_starts(x)
        starts[:, 0] = True
        b = starts & valid
        return b.to(p.dtype), b

    hnet.HNet._run, hnet.CosineRouter.forward = run_keeping_bytes, rule


def train(variant: str, args: list[str]) -> None:
    """This process becomes `train.py CONFIG overrides` for `variant`."""
    if variant.endswith("ws_chunks"):
        whitespace_chunks()
    sys.argv = ["train.py", *args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def summary(variant: str, metrics: Path) -> str:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    val = " / ".join(f"{r['step']}: {r['bpb']:.4f}" for r in rows if r["kind"] == "val")
    last = [r for r in rows if r["kind"] == "train"][-1]
    if "bytes_per_chunk_s0" not in last:
        return f"| {variant} | {val} | – | – | – |"
    return (f"| {variant} | {val} | {last['bytes_per_chunk_s0']:.2f} | {last['ws_precision_s0']:.2f} | "
            f"{last['ws_recall_s0']:.2f} |")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--train":
        train(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results/hnet_ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (e.g. train.device=cuda)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| variant | val bpb at step | bytes per chunk | ws precision | ws recall |", "|---|---|---:|---:|---:|"]
    for variant in a.variants:
        config, overrides = VARIANTS[variant]
        run_dir = ROOT / "runs" / "ablation" / f"{variant}_{a.steps}"
        cmd = [sys.executable, __file__, "--train", variant, str(CONFIGS / config), *overrides,
               f"train.out_dir={run_dir}", f"train.max_steps={a.steps}", f"eval.interval={a.steps // 2}",
               *a.overrides]
        print(" ".join(cmd[1:]), flush=True)
        with open(out / f"{variant}_train.log", "a") as log:  # a resumed run adds to its log
            if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                print(f"{variant}: training failed, see {out / f'{variant}_train.log'}", file=sys.stderr)
                return 1
        shutil.copyfile(run_dir / "metrics.jsonl", out / f"{variant}_metrics.jsonl")
        lines.append(summary(variant, out / f"{variant}_metrics.jsonl"))
        print(lines[-1], flush=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
