#!/usr/bin/env bash
# Training throughput and MFU (BENCHMARKS.md, "Speed"): bench.py rows appended to $OUT/bench.jsonl, and
# the step-time profiles. Needs benchmarks/setup.sh. usage: benchmarks/speed.sh [OUT] (default runs/bench/speed)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/speed}
mkdir -p "$out"
export PYTHONPATH=.
bench() { python bench.py "$@" --json "$out/bench.jsonl"; }

# batch 16 (65,536 bytes per step), T=4096, d=768, 12 layers
bench configs/byte_gpt.yaml --steps 30
bench configs/byte_gpt.yaml --steps 30 --sdpa cudnn
bench configs/bpe_gpt.yaml --steps 30
for c in hourglass_whitespace hourglass_fixed hourglass_gumbel hat; do bench configs/$c.yaml --steps 20; done
bench configs/hat.yaml model.byte_window=0 --steps 20
bench configs/hat.yaml model.max_words=832 --steps 20
bench configs/hat.yaml model.byte_window=128 --steps 20

# larger batches and CUDA graphs
bench configs/byte_gpt.yaml train.batch_size=32 --steps 20
bench configs/byte_gpt.yaml train.batch_size=64 --steps 5
bench configs/hourglass_whitespace.yaml train.batch_size=32 --steps 20
bench configs/hourglass_whitespace.yaml train.batch_size=64 --steps 10
bench configs/hourglass_whitespace.yaml train.batch_size=128 --steps 12
bench configs/hat.yaml train.batch_size=32 --steps 20
bench configs/hat.yaml train.batch_size=64 --steps 10
bench configs/hat.yaml train.batch_size=64 model.byte_window=128 --steps 10
for c in hat hourglass_whitespace; do bench configs/$c.yaml train.compile_mode=reduce-overhead --steps 20; done
bench configs/hat.yaml train.batch_size=32 train.compile_mode=reduce-overhead --steps 20

# the dynamic-pooling paper's shape (d=512, T=2048, batch 8)
bench configs/byte_gpt.yaml model.d_model=512 model.n_head=8 model.block_size=2048 train.batch_size=8 --steps 30
for c in paper_hourglass_whitespace paper_hourglass_gumbel; do bench configs/$c.yaml --steps 30; done

# where the step time goes
python bench.py configs/byte_gpt.yaml --steps 5 --profile "$out/profile_byte_gpt.json"
python bench.py configs/hourglass_whitespace.yaml --steps 10 --profile "$out/profile_hourglass_whitespace.json"
python bench.py configs/hat.yaml --steps 10 --profile "$out/profile_hat.json"

# learned boundaries at their trained rates: the training log's bytes_per_s (metrics.jsonl)
python train.py configs/hourglass_unigram.yaml train.out_dir="$out/hourglass_unigram" train.max_steps=300 \
  train.ckpt_interval=1000000 eval.interval=0 log.interval=50
python train.py configs/entropy_gpt.yaml train.out_dir="$out/entropy_gpt" train.time_budget_s=90 eval.interval=0
python data_prep/boundaries.py entropy --data data/enwiki_bytes --model "$out/entropy_gpt/ckpt.pt" --batch-size 256
python train.py configs/hourglass_entropy.yaml train.out_dir="$out/hourglass_entropy" train.max_steps=300 \
  train.ckpt_interval=1000000 eval.interval=0 log.interval=50
python train.py configs/hourglass_gumbel.yaml train.out_dir="$out/hourglass_gumbel" train.max_steps=400 \
  train.ckpt_interval=1000000 eval.interval=0 log.interval=50
