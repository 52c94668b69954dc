#!/usr/bin/env bash
# Call 5 (sixth session): exact eval of a retrained bpe_gpt on all of val, same machine: the previous exact_eval.py
# (copied into /tmp/old) against the current one (no device syncs in the tree pass; planning overlapped in 8 groups).
CALL=call5; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step setup_bpe 150 bash .carry/setup_bpe.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
step bpe_train 170 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 train.out_dir=runs/patch_token
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r eval.py hlm configs /tmp/old/ && ln -s $PWD/data /tmp/old/data && ln -s $PWD/runs /tmp/old/runs && cp .carry/old_exact_eval.py /tmp/old/hlm/bytes/exact_eval.py
L=$PWD/runs/logs/$CALL
TAILN=8 step exact_val_old 120 bash -c "cd /tmp/old && PYTHONPATH=/tmp/old python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json $L/exact_val_old.json"
TAILN=8 step exact_val_new 120 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json $L/exact_val_new.json
TAILN=8 step exact_val_new_w15 $(left 560) python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 15 --json $L/exact_val_new_w15.json
TAILN=8 step exact200k_new $(left 590) python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json $L/exact200k_new.json
snap
