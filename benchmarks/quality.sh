#!/usr/bin/env bash
# Quality at the same wall-clock (BENCHMARKS.md, "Quality at matched wall-clock"): 300 s of training each, then
# eval.py over the whole test split and next-word accuracy on val. Needs benchmarks/setup.sh.
# usage: benchmarks/quality.sh [OUT] [RUN ...]   (default OUT runs/bench/quality; default runs: all below)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/quality}
names=("${@:2}")
[ ${#names[@]} -gt 0 ] || names=(byte_gpt bpe_gpt hourglass_whitespace hat hat_b64 hourglass_w128)
mkdir -p "$out"
export PYTHONPATH=.
budget="train.time_budget_s=300 train.max_steps=1000000 train.ckpt_interval=1000000 log.interval=100"
declare -A runs=(
  [byte_gpt]="configs/byte_gpt.yaml eval.interval=400"
  [bpe_gpt]="configs/bpe_gpt.yaml eval.interval=1000 log.interval=200"
  [hourglass_whitespace]="configs/hourglass_whitespace.yaml eval.interval=500"
  [hat]="configs/hat.yaml eval.interval=500"
  [hat_b64]="configs/hat.yaml train.batch_size=64 eval.interval=125 log.interval=25"
  [hourglass_w128]="configs/hourglass_whitespace.yaml model.byte_window=128 eval.interval=500"
)
for name in "${names[@]}"; do
  read -r cfg overrides <<< "${runs[$name]}"
  # shellcheck disable=SC2086
  python train.py "$cfg" train.out_dir="$out/$name" $budget $overrides
  python eval.py "$out/$name/ckpt.pt" --data data/enwiki_bytes --split test --batch-size 16 --json "$out/${name}_test.json"
  python -m hlm.next_word "$out/$name/ckpt.pt" --data data/enwiki_bytes --split val > "$out/${name}_nextword.log"
done
