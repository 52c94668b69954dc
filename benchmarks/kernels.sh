#!/usr/bin/env bash
# FlexAttention tiles of the byte layers' sliding window (BENCHMARKS.md, "Kernel tuning"). Needs a CUDA GPU.
# usage: benchmarks/kernels.sh [OUT] (default runs/bench/kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/kernels}
mkdir -p "$out"
export PYTHONPATH=.
python benchmarks/flex_tune.py 16 12 4096 > "$out/flex_sweep_hourglass.log"
python benchmarks/flex_tune.py 16 12 4096 autotune > "$out/flex_max_autotune_hourglass.log"
python benchmarks/flex_tune.py 16 12 4096 tuned > "$out/flex_tuned_hourglass.log"
python benchmarks/flex_tune.py 16 6 4096 tuned > "$out/flex_tuned_hat.log"
python benchmarks/flex_tune.py 8 8 2048 tuned > "$out/flex_tuned_paper_hourglass.log"
