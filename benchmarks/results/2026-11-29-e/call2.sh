#!/usr/bin/env bash
# Call 2 (fifth session): larger batches for HAT, byte_gpt and the hourglass (issues 3, 4: MFU).
CALL=call2; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
J=runs/logs/$CALL/bench.jsonl
step hat_b64 120 python bench.py configs/hat.yaml train.batch_size=64 --steps 10 --json $J
step byte_b64 120 python bench.py configs/byte_gpt.yaml train.batch_size=64 --steps 5 --json $J
step hg_b32 110 python bench.py configs/hourglass_whitespace.yaml train.batch_size=32 --steps 20 --json $J
step hg_b64 $(left 470) python bench.py configs/hourglass_whitespace.yaml train.batch_size=64 --steps 10 --json $J
step hat_b64_w128 $(left 560) python bench.py configs/hat.yaml train.batch_size=64 model.byte_window=128 --steps 10 --json $J
snap
