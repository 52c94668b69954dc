#!/usr/bin/env bash
# Call 4 (fifth session): the control for patch training's head start (issue 5): 500 token steps from
# scratch with their own schedule, to set against the patch run's 500 token steps after the switch.
CALL=call4; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
step setup_bpe 150 bash .carry/setup_bpe.sh
step tok500 200 bash .carry/train.sh configs/patch_bpe_gpt.yaml train.batch_size=32 train.max_steps=500 train.patch_fraction=0 train.out_dir=runs/tok500
snap
