#!/usr/bin/env bash
# Canonicalized bpb (issue 21): bpb_canon, bpb_canonicalized and the exact tree pass of the bpe_gpt from
# benchmarks/exact.sh on enwiki val, each with its cost against canonical scoring on the same windows, and
# the prefix-at-cut overhead over the FIM benchmark's 150 cuts (the fim_bpe_gpt of benchmarks/fim.sh).
# usage: benchmarks/canonical.sh [EXACT_OUT] [FIM_OUT] (defaults runs/bench/exact runs/bench/fim)
set -euo pipefail
cd "$(dirname "$0")/.."
exact=${1:-runs/bench/exact} fim=${2:-runs/bench/fim}
export PYTHONPATH=.
python benchmarks/canonical_eval.py "$exact/bpe_gpt/ckpt.pt" --data data/enwiki_bpe --split val --max-bytes 200000 \
  --fim-token "$fim/fim_bpe_gpt/ckpt.pt" --fim-data data/code_bytes --cuts 150
python benchmarks/canonical_eval.py "$exact/bpe_gpt/ckpt.pt" --data data/enwiki_bpe --split val
