#!/usr/bin/env bash
# Call 5 (fifth session): exact eval with TreeMask attention (trunk causal, off-trunk chunks over the
# trunk and a short band) on the trained bpe_gpt: all of val, 200 KB, and a check against dense masks.
CALL=call5; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step setup_bpe 150 bash .carry/setup_bpe.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc) > runs/logs/$CALL/machine.txt 2>&1
step bpe_train 170 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 train.out_dir=runs/patch_token
TAILN=8 step exact_val 90 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json runs/logs/$CALL/exact_val.json
TAILN=8 step exact200k 45 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact200k.json
TAILN=8 step tree_check $(left 300) python .carry/tree_check.py runs/patch_token/ckpt.pt
snap
