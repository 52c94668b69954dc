#!/usr/bin/env bash
# Call 4 (sixth session): same-call A/B of the sm90 flex tiles end to end: bench.py with the previous blocks.py
# (inductor's default tiles, copied to /tmp/old) against the current one, hourglass and paper shape.
CALL=call4; source .carry/lib.sh
step setup_fast 150 bash .carry/setup_fast.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc; lscpu | grep "Model name") > runs/logs/$CALL/machine.txt 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r bench.py train.py eval.py hlm configs /tmp/old/ && ln -s $PWD/data /tmp/old/data && cp .carry/old_blocks.py /tmp/old/hlm/models/blocks.py
J=$PWD/runs/logs/$CALL/bench.jsonl
grep -c FLEX_SM90 hlm/models/blocks.py /tmp/old/hlm/models/blocks.py
step paper_old 90 bash -c "cd /tmp/old && PYTHONPATH=/tmp/old python bench.py configs/paper_hourglass_whitespace.yaml --steps 30 --json $J.old"
step paper_new 90 python bench.py configs/paper_hourglass_whitespace.yaml --steps 30 --json $J
step hg_old 110 bash -c "cd /tmp/old && PYTHONPATH=/tmp/old python bench.py configs/hourglass_whitespace.yaml --steps 20 --json $J.old"
step hg_new 110 python bench.py configs/hourglass_whitespace.yaml --steps 20 --json $J
step paper_old2 90 bash -c "cd /tmp/old && PYTHONPATH=/tmp/old python bench.py configs/paper_hourglass_whitespace.yaml --steps 30 --json $J.old"
step paper_new2 90 python bench.py configs/paper_hourglass_whitespace.yaml --steps 30 --json $J
cp $J.old runs/logs/$CALL/bench_old.jsonl 2>/dev/null
snap
