#!/usr/bin/env bash
# Call 2 (fourth session): exact-eval phases with the new planning/packing, on a random-init bpe_gpt
# (speed does not depend on the weights): 200 KB and the whole 5 MB val split.
CALL=call2; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step setup_bpe 150 bash .carry/setup_bpe.sh
step init_ckpt 120 python train.py configs/patch_bpe_gpt.yaml train.patch_fraction=0 train.max_steps=1 train.compile=false eval.batches=1 train.out_dir=runs/bpe_init
step exact200k 120 python eval.py runs/bpe_init/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact200k.json
TAILN=8 step exact_val $(left 560) python eval.py runs/bpe_init/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --workers 16 --json runs/logs/$CALL/exact_val.json
snap
