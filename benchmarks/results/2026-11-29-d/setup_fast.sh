#!/usr/bin/env bash
# Byte corpora, unigram targets and the code corpus on the device machine (fast; idempotent).
# The enwiki BPE corpus is .carry/setup_bpe.sh (CPU-heavy), run in the background.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ ! -f data/enwiki_bytes/meta.json ]; then
  mkdir -p data/src && tar xJf .carry/enwiki_wv100M.tar.xz -C data/src
  python data_prep/prepare.py --input data/src/enwiki_wv100M --out data/enwiki_bytes
fi
md5sum data/enwiki_bytes/train.bin  # the unigram targets were made for ae12e084de468b4b95e22d1cb9ac1916
if [ ! -f data/enwiki_bytes/train.boundaries.unigram.bin ]; then
  python - <<'PY'
import lzma, shutil
import numpy as np
for sp in ("train", "val", "test"):
    n = np.fromfile(f"data/enwiki_bytes/{sp}.bin", dtype=np.uint8).size
    bits = np.frombuffer(lzma.open(f".carry/unigram/{sp}.bits.xz").read(), dtype=np.uint8)
    assert bits.size == (n + 7) // 8, sp
    np.unpackbits(bits, count=n).tofile(f"data/enwiki_bytes/{sp}.boundaries.unigram.bin")
for f in ("boundaries.unigram.json", "boundaries.unigram.model"):
    shutil.copy(f".carry/unigram/{f}", f"data/enwiki_bytes/{f}")
print("unigram targets unpacked")
PY
fi
if [ ! -f data/code_bpe/meta.json ]; then
  python data_prep/prepare.py --input .carry/code --out data/code_bytes
  python data_prep/prepare.py --input .carry/code --out data/code_bpe --tokenizer bpe --tokenizer-model .carry/code_bpe8k.model
fi
