#!/usr/bin/env bash
# Multi-GPU runs on one host (BENCHMARKS.md, "Multi-GPU"). Needs data/enwiki_bytes (benchmarks/setup.sh).
#
#   scripts/multigpu_bench.sh ddp N CONFIG [STEPS]   DDP scaling of configs/CONFIG.yaml on N GPUs vs 1 GPU
#   scripts/multigpu_bench.sh fsdp N [STEPS]         FSDP2 1.2B GPT: straight vs stop + resume, and DDP memory
#
# ddp: three runs, then a table (scripts/compare_runs.py):
#   CONFIG_1gpu        1 GPU, the config's batch B                     -> reference throughput and loss curve
#   CONFIG_Ngpu        N GPUs, the same per-GPU batch B                -> "scaling eff." (target >= 90 %)
#   CONFIG_Ngpu_same   N GPUs, per-GPU batch B/N: same global batch     -> "max dloss", "max dval bpb" vs 1 GPU
# fsdp: 1.2B byte GPT (configs/fsdp_gpt_1b.yaml) on N GPUs with a constant learning rate after warmup (so a
#   run stopped at STEPS/2 and resumed sees the schedule of the straight run): the final weights of both are
#   compared (0 on CPU; on GPU bf16 kernels may differ in the last bits), eval.py scores the FSDP checkpoint,
#   and the same model under DDP for 10 steps gives the unsharded peak memory and the same losses and val bpb
#   at step 10. (The resumed run's first train record after the restart averages one step fewer - the first
#   step of a process is compiling and not timed - so its "max dloss" is not 0; the later records are.)
# DATA (default data/enwiki_bytes) and EXTRA (more key=value overrides) come from the environment, e.g. a CPU
# dry run: DATA=data/smoke_bytes EXTRA="train.device=cpu model.n_layer=2 model.d_model=64 model.n_head=2" ...
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?ddp or fsdp}
n=${2:?number of GPUs}
out=runs/multigpu
data=${DATA:-data/enwiki_bytes}
quiet="train.ckpt_interval=1000000 train.resume=false log.tensorboard=false data.path=$data ${EXTRA:-}"

if [ "$mode" = ddp ]; then
  cfg=${3:?config name, e.g. byte_gpt or hourglass_whitespace}
  steps=${4:-200}
  common="train.max_steps=$steps eval.interval=50 eval.batches=10 log.interval=10 $quiet"
  batch=$(python -c "from hlm.config import load_config; print(load_config('configs/$cfg.yaml').train.batch_size)")
  rm -rf "$out/${cfg}_1gpu" "$out/${cfg}_${n}gpu" "$out/${cfg}_${n}gpu_same"
  python train.py "configs/$cfg.yaml" "train.out_dir=$out/${cfg}_1gpu" $common
  torchrun --standalone --nproc_per_node="$n" train.py "configs/$cfg.yaml" "train.out_dir=$out/${cfg}_${n}gpu" $common
  torchrun --standalone --nproc_per_node="$n" train.py "configs/$cfg.yaml" "train.out_dir=$out/${cfg}_${n}gpu_same" \
    $common "train.batch_size=$((batch / n))"
  python scripts/compare_runs.py "$out/${cfg}_1gpu" "$out/${cfg}_${n}gpu" "$out/${cfg}_${n}gpu_same" --world 1 "$n" "$n"
elif [ "$mode" = fsdp ]; then
  steps=${3:-40}
  common="train.schedule=constant train.warmup_steps=10 eval.interval=$((steps / 2)) eval.batches=4 log.interval=5"
  run="torchrun --standalone --nproc_per_node=$n train.py configs/fsdp_gpt_1b.yaml"
  rm -rf "$out/fsdp_straight" "$out/fsdp_resumed" "$out/fsdp_as_ddp"
  $run "train.out_dir=$out/fsdp_straight" "train.max_steps=$steps" $common $quiet
  $run "train.out_dir=$out/fsdp_resumed" "train.max_steps=$((steps / 2))" $common $quiet
  $run "train.out_dir=$out/fsdp_resumed" "train.max_steps=$steps" $common data.path="$data" ${EXTRA:-}  # resumes
  python - "$out/fsdp_straight/ckpt.pt" "$out/fsdp_resumed/ckpt.pt" <<'EOF'
import sys
import torch
a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:])
diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
print(f"steps {a['step']} and {b['step']}: max |weight difference| straight vs resumed = {diff:.3e}")
EOF
  python scripts/compare_runs.py "$out/fsdp_straight" "$out/fsdp_resumed" --world "$n" "$n" --skip 0
  python eval.py "$out/fsdp_resumed/ckpt.pt" --data "$data" --split val --max-bytes 1000000
  $run "train.out_dir=$out/fsdp_as_ddp" train.parallel=ddp $common train.max_steps=10 eval.interval=0 \
    log.interval=5 $quiet
  python scripts/compare_runs.py "$out/fsdp_straight" "$out/fsdp_as_ddp" --world "$n" "$n" --skip 0
else
  echo "usage: $0 ddp N CONFIG [STEPS] | fsdp N [STEPS]" >&2
  exit 1
fi
