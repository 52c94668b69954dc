#!/usr/bin/env bash
# Call 2: patch-level training vs token-only (issue 5); exact bytes: cost, sampling, ensemble (issue 6);
# FIM table (issue 7); then the entropy-boundary GPT and its targets (issue 3), as time allows.
CALL=call2; source .carry/lib.sh
step setup 150 bash .carry/setup.sh
P="train.batch_size=32 train.max_steps=1500"
step patch_token 300 bash .carry/train.sh configs/patch_bpe_gpt.yaml $P train.patch_fraction=0 train.out_dir=runs/patch_token
step patch_k4 300 bash .carry/train.sh configs/patch_bpe_gpt.yaml $P train.out_dir=runs/patch_k4
step plot 60 python scripts/plot_patch.py runs/patch_token runs/patch_k4 --labels "token-only" "patch K=4, 2/3 of tokens" --out runs/patch_k4/patch_vs_token.png
cp runs/patch_k4/patch_vs_token.png $OUT/ 2>/dev/null
step exact 150 python eval.py runs/patch_token/ckpt.pt --data data/enwiki_bpe --split val --exact-bytes --max-bytes 200000 --workers 16 --json runs/logs/$CALL/exact.json
PROMPT="The history of the Roman Emp"
step sample_boundary 60 python sample.py runs/patch_token/ckpt.pt --prompt "$PROMPT" --max-bytes 400 --seed 0
step sample_bytes 90 python sample.py runs/patch_token/ckpt.pt --prompt "$PROMPT" --max-bytes 150 --byte-level --seed 0
L=$(left 480)
echo "== untimed group: ${L}s"
timeout $L python fim_eval.py --token runs/fim_bpe_gpt/ckpt.pt --byte runs/fim_byte_gpt/ckpt.pt --data data/code_bytes --cuts 150 --json runs/logs/$CALL/fim.json > runs/logs/$CALL/fim_eval.log 2>&1 &
timeout $L python eval.py runs/patch_token/ckpt.pt runs/byte_gpt_short/ckpt.pt --data data/enwiki_bytes --split val --max-bytes 200000 --ensemble mixture --json runs/logs/$CALL/ensemble.json > runs/logs/$CALL/ensemble.log 2>&1 &
wait
tail -12 runs/logs/$CALL/fim_eval.log; tail -12 runs/logs/$CALL/ensemble.log
snap
L=$(left 575)
step entropy_gpt $L bash .carry/train.sh configs/entropy_gpt.yaml train.time_budget_s=60 eval.interval=0
L=$(left 585)
step entropy_targets $L python data_prep/boundaries.py entropy --data data/enwiki_bytes --model runs/entropy_gpt/ckpt.pt --batch-size 256
