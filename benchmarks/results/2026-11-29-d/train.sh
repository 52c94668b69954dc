#!/usr/bin/env bash
# train.py; with DRY=1, tiny shapes and a few steps (a CPU dry run of the callN.sh scripts).
extra=()
if [ "${DRY:-}" = 1 ]; then
  extra=(train.max_steps=6 train.time_budget_s=3 train.compile=false eval.batches=1 model.block_size=256)
  case $(grep -m1 "family:" "$1") in
    *hat*) extra+=(model.d_byte=32 model.n_head_byte=2 model.d_model=64 model.n_head=2 model.n_layer=1 model.max_words=64 model.byte_window=32) ;;
    *hourglass*) extra+=(model.d_model=64 model.n_head=2 model.n_short=1 model.max_groups=64 model.byte_window=32) ;;
    *) extra+=(model.d_model=64 model.n_head=2 model.n_layer=1) ;;
  esac
fi
exec python train.py "$@" "${extra[@]}"
