#!/usr/bin/env bash
# Call 1 (fifth session): CUDA graphs (train.compile_mode=reduce-overhead) and batch 32 for HAT,
# the hourglass and byte_gpt (issues 3, 4: MFU).
CALL=call1; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
J=runs/logs/$CALL/bench.jsonl
step hat_ro 110 python bench.py configs/hat.yaml train.compile_mode=reduce-overhead --steps 20 --json $J
step hat_b32 100 python bench.py configs/hat.yaml train.batch_size=32 --steps 20 --json $J
step hat_b32_ro 110 python bench.py configs/hat.yaml train.batch_size=32 train.compile_mode=reduce-overhead --steps 20 --json $J
step byte_b32 $(left 470) python bench.py configs/byte_gpt.yaml train.batch_size=32 --steps 10 --json $J
step hg_ro $(left 540) python bench.py configs/hourglass_whitespace.yaml train.compile_mode=reduce-overhead --steps 20 --json $J
step hat_b16 $(left 590) python bench.py configs/hat.yaml --steps 20 --json $J
snap
