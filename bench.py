"""Training throughput of any config: `python bench.py CONFIG [section.key=value ...] [--steps N]`.

Builds the model exactly as train.py does (same data, compile, autocast), runs warm-up steps,
then times --steps optimizer steps with the device synchronised at both ends. Prints one
markdown row: bytes/s, tokens/s, model TFLOP/s (FlopCounterMode), MFU and peak memory. MFU is
against the GPU's datasheet dense bf16 peak (hlm.flops.peak_flops: 989 TFLOP/s for H100/H200),
or against `--peak-flops N`, or `--peak-flops measure`: the rate of a bf16 8192^3 matmul on this
GPU, the most a model's matmuls could reach. `--json FILE` appends the row as JSON.
`--profile FILE` then runs a few more steps under torch.profiler and writes where the GPU time
goes: each kernel's share, and the shares of matmuls, attention, the optimizer and the rest.
"""

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from hlm import HLMError
from hlm.checkpoint import write_atomic
from hlm.config import load_config
from hlm.flops import peak_flops
from hlm.trainer import Trainer

# First match wins. triton_tem_* (inductor templates) are FlexAttention; cudnn::fusion are cuDNN SDPA helpers.
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|triton_tem|cudnn::fusion|aten::_scaled_dot", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|aten::(mm|addmm|bmm)$", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
)


def summarize_kernels(kernels: list[tuple[str, float, int]]) -> dict:
    """(name, ms per step, calls per step) of each kernel -> total, time per kind, kernels by time."""
    kernels = sorted(kernels, key=lambda k: -k[1])
    kinds: dict[str, float] = {}
    for name, ms, _ in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {"ms_per_step": sum(ms for _, ms, _ in kernels), "kinds_ms": kinds,
            "kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels]}


def kernel_breakdown(prof, steps: int, cuda: bool) -> dict:
    """Time per step by kernel and by kind (matmul, attention, optimizer, other) from a profile:
    CUDA kernels' device time, or on CPU the ops' self time. User annotations (the optimizer's
    step range) are spans over other kernels, not kernels, and are left out."""
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if e.device_type == device and not e.is_user_annotation and us > 0:
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += us
            t[1] += 1
    return summarize_kernels([(n, us / 1e3 / steps, c // steps) for n, (us, c) in totals.items()])


def print_breakdown(b: dict, top: int = 25) -> None:
    total = b["ms_per_step"]
    print(f"kernel time per step: {total:.2f} ms; " + ", ".join(
        f"{k} {ms:.2f} ms ({100 * ms / total:.0f}%)" for k, ms in sorted(b["kinds_ms"].items(), key=lambda x: -x[1])))
    print("| kernel | ms/step | share | calls/step |\n|---|---:|---:|---:|")
    for k in b["kernels"][:top]:
        print(f"| `{k['name'][:90]}` | {k['ms']:.3f} | {100 * k['ms'] / total:.1f}% | {k['calls']} |")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a bf16 n x n x n matmul on a GPU: an attainable peak to set beside the datasheet's."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def mfu_peak(arg: str | None, device: torch.device) -> tuple[float | None, str]:
    """The peak FLOP/s MFU is measured against, and where it comes from."""
    if arg is None:
        return peak_flops(device), "datasheet"
    if arg == "measure":
        if device.type != "cuda":
            raise HLMError("--peak-flops measure needs a CUDA device")
        return matmul_flops(device), "measured bf16 8192^3 matmul"
    try:
        value = float(arg)
    except ValueError:
        raise HLMError(f"--peak-flops: expected a number of FLOP/s or 'measure', got {arg!r}") from None
    if not value > 0:
        raise HLMError(f"--peak-flops must be > 0, got {arg}")
    return value, "--peak-flops"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--sdpa", choices=["flash", "cudnn", "efficient"], help="force one attention backend")
    p.add_argument("--profile", metavar="FILE", help="then profile --profile-steps steps; write the breakdown as JSON")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--peak-flops", metavar="FLOPS|measure",
                   help="MFU against this peak (e.g. 791e12) or a measured bf16 matmul rate; "
                        "default: the GPU's datasheet dense bf16 peak")
    args = p.parse_args(argv)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    attention = sdpa_kernel(backends[args.sdpa]) if args.sdpa else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, attention:
        try:
            cfg = load_config(args.config, [*args.overrides, f"train.out_dir={tmp}", "train.resume=false",
                                            "log.tensorboard=false"])
            trainer = Trainer(cfg)
            peak, peak_source = mfu_peak(args.peak_flops, trainer.rt.device)
        except HLMError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        dev = trainer.rt.device
        for _ in range(args.warmup):
            trainer.train_step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        first, last = trainer.step, trainer.step + args.steps - 1
        if trainer.phases.patch_size_at(first) != trainer.phases.patch_size_at(last):
            print("error: the timed steps cross the patch/token switch: change --warmup/--steps or "
                  "train.patch_fraction", file=sys.stderr)
            return 1
        stats = torch.zeros(2, device=dev, dtype=torch.float64)
        n_targets = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step = trainer.train_step()
            stats += step.stats
            n_targets += step.n_targets
        sync(dev)
        dt = time.perf_counter() - t0
        timed_flops = trainer.flops.seen(last + 1) - trainer.flops.seen(first)
        breakdown = None
        if args.profile:
            cuda = dev.type == "cuda"
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
                for _ in range(args.profile_steps):
                    trainer.train_step()
                sync(dev)
            breakdown = kernel_breakdown(prof, args.profile_steps, cuda)
    # training FLOPs of the timed steps (hlm/metrics.py: counted in the step, at its phase's count, plus a
    # frozen model's FLOPs that a side file stood in for, BLT's entropy patcher); the headline rate leaves
    # the patcher out, `*_with_patcher` keeps it in
    flops_with_patcher = timed_flops / dt
    patcher = patcher_flops(trainer) * args.steps / dt
    flops = flops_with_patcher - patcher
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    row = {"config": args.config, "overrides": args.overrides, "sdpa": args.sdpa, "device": device_name,
           "mode": "patch" if trainer.phases.patch_size_at(first) > 1 else "token",
           "step_s": dt / args.steps, "bytes_per_s": stats[1].item() / dt,
           "tokens_per_s": n_targets / dt, "tflops": flops / 1e12,
           "mfu": flops / peak if peak else None, "peak_flops": peak, "peak_source": peak_source,
           **({"tflops_with_patcher": flops_with_patcher / 1e12,
               "mfu_with_patcher": flops_with_patcher / peak if peak else None} if patcher else {}),
           "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
           "params_m": sum(q.numel() for q in trainer.raw_model.parameters()) / 1e6,
           "torch": torch.__version__}
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
    mem = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] else "-"
    mfu_of = f"MFU (of {peak / 1e12:,.0f} TFLOP/s, {peak_source})" if peak else "MFU"
    print(f"| config | bytes/s | tokens/s | TFLOP/s | {mfu_of} | step s | mem GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    name = " ".join([args.config, *args.overrides, args.sdpa or ""]).strip()
    print(f"| {name} | {row['bytes_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | "
          f"{row['tflops']:.1f} | {mfu} | {row['step_s']:.3f} | {mem} |")
    if patcher:
        print(f"with the entropy patcher's forward: {row['tflops_with_patcher']:.1f} TFLOP/s"
              + (f", MFU {100 * row['mfu_with_patcher']:.1f}%" if peak else ""))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if breakdown:
        print_breakdown(breakdown)
        write_atomic(args.profile, json.dumps(breakdown | {"row": row}, indent=1).encode())
    return 0


def patcher_flops(trainer: Trainer) -> float:
    """Forward FLOPs per step of a model's frozen helper (BLT's entropy patcher), 0 for other families."""
    return trainer.raw_model.frozen_flops_per_token() * trainer.batches.tokens_per_step


if __name__ == "__main__":
    sys.exit(main())
