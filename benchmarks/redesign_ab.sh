#!/usr/bin/env bash
# The redesign (model contract, hierarchy parts, trainer loop, exact bytes as a unit) against the tree before it,
# side by side (BENCHMARKS.md, "Redesign: before and after").
# usage: benchmarks/redesign_ab.sh smoke [OLD_REV] [OUT]   CPU: smoke configs trained 20 steps by both trees on the
#                                                           same corpus; every metrics.jsonl record compared
#        benchmarks/redesign_ab.sh speed [OLD_REV] [OUT]   GPU: bench.py throughput of byte_gpt, hourglass_whitespace
#                                                           and hat, old and new interleaved (needs data/enwiki_bytes)
# OLD_REV defaults to e01201c, the last commit before the redesign; a directory holding that tree (for a machine
# without the git history) is used as it is. OUT defaults to runs/bench/redesign.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1 old_rev=${2:-e01201c} out=${3:-runs/bench/redesign}
mkdir -p "$out"
repo=$(pwd) out=$(cd "$out" && pwd)
if [ -d "$old_rev" ]; then
  old=$(cd "$old_rev" && pwd)
else
  old=$(mktemp -d)
  trap 'rm -rf "$old"' EXIT
  git archive "$old_rev" | tar -x -C "$old"
fi
tree_dir() { if [ "$1" = old ]; then echo "$old"; else echo "$repo"; fi; }
case $what in
  smoke)
    corpus=$out/smoke_bytes
    [ -f "$corpus/meta.json" ] || { head -c 200000 corpora/tinyshakespeare.txt > "$out/ts.txt";
      PYTHONPATH=. python data_prep/prepare.py --input "$out/ts.txt" --out "$corpus"; }
    runs=$out
    for cfg in byte_gpt hourglass_whitespace hourglass_fixed hourglass_gumbel hat patch_byte_gpt fim_byte_gpt; do
      for tree in old new; do
        rm -rf "$runs/$tree/$cfg"
        (cd "$(tree_dir $tree)" && OMP_NUM_THREADS=1 PYTHONPATH=. python train.py configs/smoke/$cfg.yaml \
          data.path="$corpus" train.out_dir="$runs/$tree/$cfg" train.max_steps=20 eval.interval=10 log.interval=5 \
          log.tensorboard=false > "$runs/$tree.$cfg.log" 2>&1)
      done
    done
    python - "$runs" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
print("| config | records | train records with another loss | val bpb identical (steps 10, 20) |")
print("|---|---:|---|---|")
for cfg in sorted(p.name for p in (runs / "new").iterdir()):
    old, new = ([json.loads(line) for line in (runs / tree / cfg / "metrics.jsonl").read_text().splitlines()]
                for tree in ("old", "new"))
    assert [(r["kind"], r["step"]) for r in old] == [(r["kind"], r["step"]) for r in new], cfg
    loss = ("loss", "patch_loss")  # a patch-mode record has patch_loss
    moved = [f"step {a['step']}" for a, b in zip(old, new)
             if a["kind"] == "train" and [a.get(k) for k in loss] != [b.get(k) for k in loss]]
    val = all(a["bpb"] == b["bpb"] for a, b in zip(old, new) if a["kind"] == "val")
    print(f"| {cfg} | {len(new)} | {', '.join(moved) or 'none'} | {'yes' if val else 'NO'} |")
PY
    ;;
  speed)
    [ -e "$old/data" ] || ln -s "$repo/data" "$old/data"
    for cfg in byte_gpt hourglass_whitespace hat; do
      for tree in old new; do
        (cd "$(tree_dir $tree)" && PYTHONPATH=. python bench.py configs/$cfg.yaml --steps 10 \
          --json "$out/bench_$tree.jsonl" | tail -1)
      done
    done
    ;;
  *) echo "usage: $0 smoke|speed [OLD_REV] [OUT]" >&2; exit 2 ;;
esac
