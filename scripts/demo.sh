#!/usr/bin/env bash
# The main job on the bundled demo corpus: prepare -> train a small byte GPT -> evaluate -> sample.
# Runs on a laptop CPU in a few minutes (a GPU is used when torch sees one).
set -euo pipefail
cd "$(dirname "$0")/.."
python data_prep/prepare.py --input corpora/tinyshakespeare.txt --out data/shakespeare
python train.py configs/demo_byte_gpt.yaml "$@"
python eval.py runs/demo_byte_gpt/ckpt.pt --data data/shakespeare --split test --json runs/demo_byte_gpt/eval_test.json
python sample.py runs/demo_byte_gpt/ckpt.pt --prompt "ROMEO:" --max-bytes 300
