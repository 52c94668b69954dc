#!/usr/bin/env bash
# Call 1 (sixth session): FlexAttention kernel options for the 512-byte sliding window (hourglass and HAT byte layers).
CALL=call1; source .carry/lib.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print(torch.__version__)"; nproc) > runs/logs/$CALL/machine.txt 2>&1
TAILN=20 step flex_hg 300 python .carry/flex_tune.py 16 12
TAILN=20 step flex_autotune $(left 520) python .carry/flex_tune.py 16 12 autotune
snap
