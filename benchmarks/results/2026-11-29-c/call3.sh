#!/usr/bin/env bash
# Call 3 (session c): hourglass whitespace with a 128-byte window in its byte layers, 5 minutes at the
# byte_gpt budget (speed from the training log, test bpb, next-word accuracy); HAT with a 128-byte window (bench).
CALL=call3; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)") > runs/logs/$CALL/machine.txt 2>&1
step hg128_train 420 bash .carry/train.sh configs/hourglass_whitespace.yaml model.byte_window=128 train.out_dir=runs/hourglass_w128 train.time_budget_s=300 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=500 log.interval=100
step hg128_test 60 python eval.py runs/hourglass_w128/ckpt.pt --data data/enwiki_bytes --split test --batch-size 16 --json runs/logs/$CALL/hg128_test.json
step hg128_nextword 40 python -m hlm.next_word runs/hourglass_w128/ckpt.pt --data data/enwiki_bytes --split val
TAILN=4 step hat128 $(left 590) python bench.py configs/hat.yaml model.byte_window=128 --steps 20 --json runs/logs/$CALL/bench.jsonl
snap
