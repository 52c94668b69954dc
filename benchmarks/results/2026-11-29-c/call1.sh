#!/usr/bin/env bash
# Call 1 (session c): where the GPU time of a training step goes (profiles of hourglass, HAT, byte_gpt;
# issues 3/4); the FIM models and table (issue 7); the entropy-boundary GPT and its targets (issue 3).
CALL=call1; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)") > runs/logs/$CALL/machine.txt 2>&1
bash .carry/setup_bpe.sh > runs/logs/$CALL/setup_bpe.log 2>&1 &
BPE=$!
TAILN=40 step prof_hg 120 python bench.py configs/hourglass_whitespace.yaml --steps 10 --profile runs/logs/$CALL/prof_hg.json
TAILN=40 step prof_hat 120 python bench.py configs/hat.yaml --steps 10 --profile runs/logs/$CALL/prof_hat.json
TAILN=40 step prof_byte 100 python bench.py configs/byte_gpt.yaml --steps 5 --profile runs/logs/$CALL/prof_byte.json
L=$(left 400)
echo "== untimed group 1: ${L}s"
timeout $L bash .carry/train.sh configs/fim_bpe_gpt.yaml > runs/logs/$CALL/fim_bpe.log 2>&1 &
F1=$!
timeout $L bash .carry/train.sh configs/fim_byte_gpt.yaml > runs/logs/$CALL/fim_byte.log 2>&1 &
F2=$!
wait $F1 $F2
for f in fim_bpe fim_byte; do echo "-- $f"; grep "val bpb" runs/logs/$CALL/$f.log | tail -1; tail -1 runs/logs/$CALL/$f.log; done
snap
L=$(left 575)
echo "== untimed group 2: ${L}s"
timeout $L python fim_eval.py --token runs/fim_bpe_gpt/ckpt.pt --byte runs/fim_byte_gpt/ckpt.pt --data data/code_bytes --cuts 150 --json runs/logs/$CALL/fim.json > runs/logs/$CALL/fim_eval.log 2>&1 &
FIM=$!
step entropy_gpt $(( $(left 500) > 150 ? 150 : $(left 500) )) bash .carry/train.sh configs/entropy_gpt.yaml train.time_budget_s=90 eval.interval=0
step entropy_targets $(left 570) python data_prep/boundaries.py entropy --data data/enwiki_bytes --model runs/entropy_gpt/ckpt.pt --batch-size 256
wait $FIM $BPE
tail -8 runs/logs/$CALL/fim_eval.log; tail -2 runs/logs/$CALL/setup_bpe.log
snap
