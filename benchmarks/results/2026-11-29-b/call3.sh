#!/usr/bin/env bash
# Call 3: hourglass (whitespace) at the byte_gpt 5-minute budget; trained-rate speed of the
# unigram and entropy boundary predictors (issue 3).
CALL=call3; source .carry/lib.sh
step setup 150 bash .carry/setup.sh
step hg_train 460 bash .carry/train.sh configs/hourglass_whitespace.yaml train.time_budget_s=300 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=500 log.interval=100
step hg_test 60 python eval.py runs/hourglass_whitespace/ckpt.pt --data data/enwiki_bytes --split test --batch-size 16 --json runs/logs/$CALL/hg_test.json
step hg_nextword 60 python -m hlm.next_word runs/hourglass_whitespace/ckpt.pt --data data/enwiki_bytes --split val
S="train.max_steps=300 train.ckpt_interval=1000000 eval.interval=0 log.interval=50"
step unigram_speed $(left 570) bash .carry/train.sh configs/hourglass_unigram.yaml $S
[ -f data/enwiki_bytes/train.boundaries.entropy.bin ] && step entropy_speed $(left 585) bash .carry/train.sh configs/hourglass_entropy.yaml $S
snap
