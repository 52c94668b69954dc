#!/usr/bin/env bash
# Unpack enwiki_wv100M and write data/enwiki_bytes and data/enwiki_bpe (sentencepiece BPE, vocab 16384).
# usage: scripts/prepare_enwiki.sh [TARBALL] [TOKENIZER_MODEL]
# With TOKENIZER_MODEL the BPE model is reused instead of trained (the GPU runs reuse the one trained once on CPU).
set -euo pipefail
tarball=${1:-../shared/data/enwiki_wv100M.tar.xz}
tokenizer=${2:-}
mkdir -p data/src
tar xJf "$tarball" -C data/src
python data_prep/prepare.py --input data/src/enwiki_wv100M --out data/enwiki_bytes
if [ -n "$tokenizer" ]; then
  python data_prep/prepare.py --input data/src/enwiki_wv100M --out data/enwiki_bpe --tokenizer bpe --tokenizer-model "$tokenizer"
else
  python data_prep/prepare.py --input data/src/enwiki_wv100M --out data/enwiki_bpe --tokenizer bpe --vocab-size 16384
fi
