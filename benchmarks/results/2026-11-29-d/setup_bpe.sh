#!/usr/bin/env bash
# enwiki BPE 16384 corpus with the tokenizer trained once on CPU (needs setup_fast.sh first).
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
[ -f data/enwiki_bpe/meta.json ] || python data_prep/prepare.py --input data/src/enwiki_wv100M --out data/enwiki_bpe \
  --tokenizer bpe --tokenizer-model .carry/enwiki_bpe16k.model
