#!/usr/bin/env bash
# Patch-level training against token-only training (BENCHMARKS.md, "Patch-level training"), same token budget,
# plus the control: 500 token steps from scratch. Needs benchmarks/setup.sh. usage: benchmarks/patch.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/patch}
export PYTHONPATH=.
common="train.batch_size=32"
python train.py configs/patch_bpe_gpt.yaml $common train.max_steps=1500 train.patch_fraction=0 train.out_dir="$out/token_only"
python train.py configs/patch_bpe_gpt.yaml $common train.max_steps=1500 train.out_dir="$out/patch_k4"
python train.py configs/patch_bpe_gpt.yaml $common train.max_steps=500 train.patch_fraction=0 train.out_dir="$out/token_500"
python scripts/plot_patch.py "$out/token_only" "$out/patch_k4" --labels "token-only" "patch K=4, 2/3 of tokens" \
  --out "$out/patch_vs_token.png"
