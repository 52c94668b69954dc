#!/usr/bin/env bash
# H-Net and BLT beside byte_gpt and the whitespace hourglass (BENCHMARKS.md, "Hierarchical families").
# Needs data/enwiki_bytes (benchmarks/setup.sh, or scripts/prepare_enwiki.sh).
# usage: benchmarks/hierarchical.sh speed [OUT]            bench.py rows, all in one process run after another
#        benchmarks/hierarchical.sh quality CONFIG [OUT [OVERRIDES ...]]
#                                                          $BUDGET s (default 300) of training, then eval.py
#                                                          on the test split; the run is named $NAME (default:
#                                                          the config's name)
# OUT defaults to runs/bench/hierarchical.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
what=$1
case $what in
  speed)
    out=${2:-runs/bench/hierarchical}
    mkdir -p "$out"
    bench() { python bench.py "$@" --json "$out/bench.jsonl"; }
    bench configs/byte_gpt.yaml --steps 10
    bench configs/hourglass_whitespace.yaml --steps 10
    bench configs/hnet_1stage.yaml --steps 10
    bench configs/hnet_2stage.yaml --steps 10
    # BLT with an untrained entropy model run inside each step (no side file): every byte over θ = 0
    # starts a patch, so the 1152 patch slots are full, the same shapes as a trained patcher fills
    bench configs/blt_p4.5.yaml model.entropy_model=random model.entropy_file="" model.entropy_threshold=0.0 --steps 10
    ;;
  quality)
    cfg=$2 out=${3:-runs/bench/hierarchical}
    name=${NAME:-$(basename "$cfg" .yaml)}
    mkdir -p "$out"
    python train.py "$cfg" train.out_dir="$out/$name" train.time_budget_s="${BUDGET:-300}" train.max_steps=1000000 \
      train.ckpt_interval=1000000 eval.interval=250 log.interval=50 log.tensorboard=false "${@:4}"
    python eval.py "$out/$name/ckpt.pt" --data data/enwiki_bytes --split test --batch-size 16 --json "$out/${name}_test.json"
    ;;
  *) echo "usage: $0 speed [OUT] | quality CONFIG [OUT [OVERRIDES ...]]" >&2; exit 2 ;;
esac
