#!/usr/bin/env bash
# Call 3 (sixth session): hourglass at batch 128 (issue 3 MFU) and the tuned flex tiles at the paper's shape.
CALL=call3; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
J=runs/logs/$CALL/bench.jsonl
TAILN=4 step flex_paper 90 python .carry/flex_tune.py 8 8 2048 tuned
TAILN=4 step flex_hg 90 python .carry/flex_tune.py 16 12 4096 tuned
TAILN=4 step flex_hat 90 python .carry/flex_tune.py 16 6 4096 tuned
step hg_b128 150 python bench.py configs/hourglass_whitespace.yaml train.batch_size=128 --steps 8 --json $J
snap
