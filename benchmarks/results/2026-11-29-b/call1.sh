#!/usr/bin/env bash
# Call 1: HAT at the byte_gpt 5-minute budget (issue 4), then the small FIM models (issue 7) and a
# short byte_gpt for the ensemble (issue 6), trained side by side (untimed).
CALL=call1; source .carry/lib.sh
step setup 150 bash .carry/setup.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)") > runs/logs/$CALL/machine.txt 2>&1
step hat_train 460 bash .carry/train.sh configs/hat.yaml train.time_budget_s=300 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=500 log.interval=100
step hat_test 60 python eval.py runs/hat/ckpt.pt --data data/enwiki_bytes --split test --batch-size 16 --json runs/logs/$CALL/hat_test.json
step hat_nextword 60 python -m hlm.next_word runs/hat/ckpt.pt --data data/enwiki_bytes --split val
L=$(left 580)
echo "== untimed group: ${L}s"
timeout $L bash .carry/train.sh configs/fim_bpe_gpt.yaml > runs/logs/$CALL/fim_bpe.log 2>&1 &
timeout $L bash .carry/train.sh configs/fim_byte_gpt.yaml > runs/logs/$CALL/fim_byte.log 2>&1 &
timeout $L bash .carry/train.sh configs/byte_gpt.yaml train.max_steps=400 train.out_dir=runs/byte_gpt_short train.ckpt_interval=100 eval.interval=200 log.interval=50 > runs/logs/$CALL/byte_gpt_short.log 2>&1 &
wait
for f in fim_bpe fim_byte byte_gpt_short; do echo "-- $f"; tail -2 runs/logs/$CALL/$f.log; done
ls -la runs/*/ckpt.pt
snap
