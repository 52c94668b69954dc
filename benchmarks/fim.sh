#!/usr/bin/env bash
# Fill-in-the-middle (BENCHMARKS.md, "Fill-in-the-middle"): a token and a byte FIM model on the CPython
# stdlib, then fim_eval.py on 150 cuts. Needs benchmarks/setup.sh. usage: benchmarks/fim.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/fim}
mkdir -p "$out"
export PYTHONPATH=.
python train.py configs/fim_bpe_gpt.yaml train.out_dir="$out/fim_bpe_gpt"
python train.py configs/fim_byte_gpt.yaml train.out_dir="$out/fim_byte_gpt"
python fim_eval.py --token "$out/fim_bpe_gpt/ckpt.pt" --byte "$out/fim_byte_gpt/ckpt.pt" --data data/code_bytes \
  --cuts 150 --json "$out/fim.json"
