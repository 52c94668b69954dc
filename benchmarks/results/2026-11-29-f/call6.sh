#!/usr/bin/env bash
# Call 6 (sixth session): the hourglass at batch 128 again (issue 3's MFU), twice, for the spread.
CALL=call6; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
J=runs/logs/$CALL/bench.jsonl
step hg_b128_a 110 python bench.py configs/hourglass_whitespace.yaml train.batch_size=128 --steps 12 --json $J
step hg_b128_b $(left 250) python bench.py configs/hourglass_whitespace.yaml train.batch_size=128 --steps 12 --json $J
snap
