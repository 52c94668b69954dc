#!/usr/bin/env bash
# Prepare every corpus the benchmarks read, from the shared data folder (default ../shared/data):
#   data/enwiki_bytes, data/enwiki_bpe (sentencepiece BPE 16384)   from enwiki_wv100M.tar.xz
#   data/code_bytes, data/code_bpe (sentencepiece BPE 8192)         from code/ (CPython 3.11 stdlib, JSONL)
#   data/enwiki_bytes/*.boundaries.unigram.bin                      targets of configs/hourglass_unigram.yaml
# usage: benchmarks/setup.sh [SHARED_DATA]
# ENWIKI_BPE_MODEL / CODE_BPE_MODEL: reuse a trained sentencepiece model instead of training one (CPU-heavy).
# Skips what already exists, so it can be re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data}
export PYTHONPATH=.
[ -f data/enwiki_bpe/meta.json ] || bash scripts/prepare_enwiki.sh "$src/enwiki_wv100M.tar.xz" "${ENWIKI_BPE_MODEL:-}"
[ -f data/code_bytes/meta.json ] || python data_prep/prepare.py --input "$src/code" --out data/code_bytes
if [ ! -f data/code_bpe/meta.json ]; then
  if [ -n "${CODE_BPE_MODEL:-}" ]; then
    python data_prep/prepare.py --input "$src/code" --out data/code_bpe --tokenizer bpe --tokenizer-model "$CODE_BPE_MODEL"
  else
    python data_prep/prepare.py --input "$src/code" --out data/code_bpe --tokenizer bpe --vocab-size 8192
  fi
fi
[ -f data/enwiki_bytes/train.boundaries.unigram.bin ] ||
  python data_prep/boundaries.py unigram --data data/enwiki_bytes --vocab-size 5000
