#!/usr/bin/env bash
# Call 3 (fifth session): HAT at batch 64 (40 % MFU in bench) for the same 5 minutes as the batch-16 run:
# training-log throughput, test bpb and next-word accuracy (issue 4).
CALL=call3; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step hat_b64_train 420 bash .carry/train.sh configs/hat.yaml train.batch_size=64 train.out_dir=runs/hat_b64 train.time_budget_s=300 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=125 log.interval=25
step hat_b64_test 70 python eval.py runs/hat_b64/ckpt.pt --data data/enwiki_bytes --split test --batch-size 16 --json runs/logs/$CALL/hat_b64_test.json
step hat_b64_nextword $(left 590) python -m hlm.next_word runs/hat_b64/ckpt.pt --data data/enwiki_bytes --split val
snap
