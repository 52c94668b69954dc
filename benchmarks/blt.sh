#!/usr/bin/env bash
# BLT on enwiki_wv100M end to end (BENCHMARKS.md, "Hierarchical families"): train the entropy model,
# write the entropies of every split and calibrate θ for 4.5 and 6 bytes per patch, then train each
# BLT config for $BUDGET s (default 300) and evaluate it on the test split.
# Needs data/enwiki_bytes. usage: benchmarks/blt.sh [OUT] [ENTROPY_BUDGET_S] [VARIANT ...]
# A VARIANT is p4.5, p6 or p4.5-nohash (BLT at 4.5 bytes per patch without hash n-gram embeddings). A variant
# whose test result is in OUT is skipped, so a second invocation goes on where a time limit stopped the first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
out=${1:-runs/bench/blt}
entropy_budget=${2:-600}
shift 2 || true
variants=("${@:-p4.5}")
mkdir -p "$out"
if [ ! -f "$out/entropy_gpt/ckpt.pt" ]; then
  python train.py configs/entropy_gpt.yaml train.out_dir="$out/entropy_gpt" train.time_budget_s="$entropy_budget" \
    log.tensorboard=false
fi
if [ ! -f data/enwiki_bytes/patches.entropy.json ]; then
  python data_prep/entropy_patches.py "$out/entropy_gpt/ckpt.pt" --data data/enwiki_bytes \
    --target-bytes-per-patch 4.5 6 --batch-size 64
fi
cp data/enwiki_bytes/patches.entropy.json "$out/"
for v in "${variants[@]}"; do
  if [ -f "$out/blt_${v}_test.json" ]; then  # done in an earlier invocation: run the script again to go on
    echo "blt_$v: $out/blt_${v}_test.json exists, skipped"
    continue
  fi
  case $v in
    p4.5) cfg=configs/blt_p4.5.yaml extra=() ;;
    p6) cfg=configs/blt_p6.yaml extra=() ;;
    p4.5-nohash) cfg=configs/blt_p4.5.yaml extra=(model.hash_ngrams=false) ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  # θ for the config's target_bytes_per_patch comes from data/enwiki_bytes/patches.entropy.json
  python train.py "$cfg" "${extra[@]}" model.entropy_model="$out/entropy_gpt/ckpt.pt" \
    train.out_dir="$out/blt_$v" train.time_budget_s="${BUDGET:-300}" \
    train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=250 log.interval=50 log.tensorboard=false
  python eval.py "$out/blt_$v/ckpt.pt" --data data/enwiki_bytes --split test --batch-size 16 \
    --json "$out/blt_${v}_test.json"
done
