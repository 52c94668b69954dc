#!/usr/bin/env bash
# Call 1 (fourth session): exact-eval phase baseline with the array plans (200 KB of val), and the
# ensemble of bpe_gpt with a byte_gpt trained for the same wall-clock; then hourglass max-autotune bench.
CALL=call1; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
bash .carry/setup_bpe.sh > runs/logs/$CALL/setup_bpe.log 2>&1
echo "bpe setup done t=${SECONDS}s"
step bpe_train 170 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 train.out_dir=runs/patch_token
step exact200k 120 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact200k.json
step byte_train 150 bash .carry/train.sh configs/byte_gpt.yaml train.out_dir=runs/byte_gpt_69s train.time_budget_s=69 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=250 log.interval=50
step ensemble $(left 420) python eval.py runs/patch_token/ckpt.pt runs/byte_gpt_69s/ckpt.pt --data data/enwiki_bytes --split val --max-bytes 200000 --ensemble mixture --json runs/logs/$CALL/ensemble_mixture.json
TAILN=4 step hg_autotune $(left 590) python bench.py configs/hourglass_whitespace.yaml train.compile_mode=max-autotune-no-cudagraphs --steps 20 --json runs/logs/$CALL/bench.jsonl
snap
