#!/usr/bin/env bash
# Exact byte-level conversion (BENCHMARKS.md, "Exact bytes"): a bpe_gpt trained 1,500 steps, then the exact
# eval on 200 KB and on all of val, prompt-boundary and byte-level sampling, and ensembles with a byte_gpt
# trained for the same 69 s. Needs benchmarks/setup.sh. usage: benchmarks/exact.sh [OUT] (default runs/bench/exact)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/exact}
mkdir -p "$out"
export PYTHONPATH=.
tok="$out/bpe_gpt/ckpt.pt" byte="$out/byte_gpt_69s/ckpt.pt"
python train.py configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 \
  train.out_dir="$out/bpe_gpt"
python eval.py "$tok" --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json "$out/exact_200k.json"
python eval.py "$tok" --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json "$out/exact_val.json"
python sample.py "$tok" --prompt "The history of the Roman Emp" --max-bytes 400 --seed 0
python sample.py "$tok" --prompt "The history of the Roman Emp" --max-bytes 150 --byte-level --seed 0
python train.py configs/byte_gpt.yaml train.out_dir="$out/byte_gpt_69s" train.time_budget_s=69 train.max_steps=1000000 \
  train.ckpt_interval=1000000 eval.interval=250
pair=("$tok" "$byte" --data data/enwiki_bytes --split val --max-bytes 200000)
python eval.py "${pair[@]}" --ensemble mixture --json "$out/ensemble_mixture.json"
python eval.py "${pair[@]}" --ensemble mixture --weights 0.8 0.2 --json "$out/ensemble_mixture_0.8_0.2.json"
python eval.py "${pair[@]}" --ensemble product --json "$out/ensemble_product.json"
