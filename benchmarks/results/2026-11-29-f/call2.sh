#!/usr/bin/env bash
# Call 2 (sixth session): hourglass and HAT bench rows with the tuned sm90 FlexAttention tiles (issue 3).
CALL=call2; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
J=runs/logs/$CALL/bench.jsonl
step hg_b16 120 python bench.py configs/hourglass_whitespace.yaml --steps 20 --json $J --profile runs/logs/$CALL/prof_hg.json
step hg_b64 120 python bench.py configs/hourglass_whitespace.yaml train.batch_size=64 --steps 10 --json $J
step hat_b16 $(left 400) python bench.py configs/hat.yaml --steps 20 --json $J
step hat_b64 $(left 490) python bench.py configs/hat.yaml train.batch_size=64 --steps 10 --json $J
step paper_hg $(left 580) python bench.py configs/paper_hourglass_whitespace.yaml --steps 20 --json $J
snap
