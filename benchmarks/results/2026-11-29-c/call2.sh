#!/usr/bin/env bash
CALL=call2; source .carry/lib.sh
step fim_byte_row 90 python fim_eval.py --token runs/fim_bpe_gpt/ckpt.pt --byte runs/fim_byte_gpt/ckpt.pt --data data/code_bytes --cuts 150 --methods byte --json runs/logs/$CALL/fim_byte.json
S="train.max_steps=300 train.ckpt_interval=1000000 eval.interval=0 log.interval=50"
step entropy_speed 120 bash .carry/train.sh configs/hourglass_entropy.yaml $S
step gumbel_speed 120 bash .carry/train.sh configs/hourglass_gumbel.yaml train.max_steps=400 train.ckpt_interval=1000000 eval.interval=0 log.interval=50
TAILN=4 step hat832 90 python bench.py configs/hat.yaml model.max_words=832 --steps 20 --json runs/logs/$CALL/bench.jsonl
step patch_token 150 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=1500 train.patch_fraction=0 train.out_dir=runs/patch_token
step exact $(left 590) python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact.json
snap
