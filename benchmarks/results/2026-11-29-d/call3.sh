#!/usr/bin/env bash
# Call 3 (fourth session): the trained bpe_gpt's exact eval on 200 KB and on the whole 5 MB val split;
# ensembles (weighted mixture, product) with a byte_gpt trained for the same wall-clock.
CALL=call3; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step setup_bpe 150 bash .carry/setup_bpe.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc) > runs/logs/$CALL/machine.txt 2>&1
step bpe_train 170 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 train.out_dir=runs/patch_token
step exact200k 90 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact200k.json
TAILN=8 step exact_val 120 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json runs/logs/$CALL/exact_val.json
step byte_train 150 bash .carry/train.sh configs/byte_gpt.yaml train.out_dir=runs/byte_gpt_69s train.time_budget_s=69 train.max_steps=1000000 train.ckpt_interval=1000000 eval.interval=250 log.interval=50
step ens_mix_w 60 python eval.py runs/patch_token/ckpt.pt runs/byte_gpt_69s/ckpt.pt --data data/enwiki_bytes --split val --max-bytes 200000 --ensemble mixture --weights 0.8 0.2 --json runs/logs/$CALL/ensemble_mixture_w.json
step ens_product $(left 590) python eval.py runs/patch_token/ckpt.pt runs/byte_gpt_69s/ckpt.pt --data data/enwiki_bytes --split val --max-bytes 200000 --ensemble product --json runs/logs/$CALL/ensemble_product.json
snap
