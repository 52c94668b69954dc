"""What a run reports: FLOPs per step, the log window, train records and metrics.jsonl.

Training FLOPs of a step are the counted forward+backward FLOPs (hlm/flops.py; the patch
phase's own count for patch steps) plus the model's `extra_train_flops(tokens_per_step)`, the
FLOPs of a frozen helper model it runs outside forward. A train record covers the steps since
the last one: loss and bits per byte over all of them, throughput (tokens/s, bytes/s, MFU) over
those that were timed.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hlm import LN2
from hlm.batches import Batches
from hlm.checkpoint import write_atomic
from hlm.flops import count_flops
from hlm.models.base import LanguageModel


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one optimizer step, all ranks together."""

    token: int  # counted, token mode
    patch: int  # counted, patch mode (0 without a patch phase)
    extra: int  # a frozen helper model's, every step
    switch_step: int  # the first token step (0 without a patch phase)

    def counted(self, step: int) -> int:
        """Counted FLOPs of step `step` (0-based), at its phase's count."""
        return self.patch if step < self.switch_step else self.token

    def seen(self, steps: int) -> int:
        """Training FLOPs of steps 0..steps-1."""
        patch_steps = min(steps, self.switch_step)
        return patch_steps * self.patch + (steps - patch_steps) * self.token + steps * self.extra


def count_step_flops(model: LanguageModel, batches: Batches, autocast: contextlib.AbstractContextManager,
                     grad_accum: int, world: int) -> StepFlops:
    """Count a step's FLOPs on the batches of step 0 in each mode (on the unsharded model)."""
    idx, kwargs = batches.at_patch_size(0, 0, 1)
    token = count_flops(model, idx, autocast, **kwargs) * grad_accum * world
    patch = 0
    if batches.phases.enabled:
        idx, kwargs = batches.at_patch_size(0, 0, batches.phases.patch_size)
        patch = count_flops(model, idx, autocast, **kwargs) * grad_accum * world
    return StepFlops(token, patch, model.extra_train_flops(batches.tokens_per_step), batches.phases.switch_step)


@dataclass
class LogWindow:
    """Training stats since the last log record. Checkpoints hold it, so the first record after a
    resume covers the same steps as an uninterrupted run's. The clock is this process's own:
    throughput counts only the steps since `start` (not a step that compiled, nor eval or save)."""

    stats: torch.Tensor  # nll sum, bytes sum (float64, on the device)
    targets: int = 0  # per rank
    steps: int = 0  # steps that trained (a skipped non-finite step adds nothing)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    start: float = 0.0
    timed_steps: int = 0
    timed_targets: int = 0

    def add(self, stats: torch.Tensor, targets: int, metrics: dict[str, torch.Tensor], timed: bool) -> None:
        if targets:
            self.stats += stats
            self.targets += targets
            self.steps += 1
            for k, v in metrics.items():
                self.metrics[k] = self.metrics.get(k, 0) + v
        if timed:
            self.timed_steps += 1
            self.timed_targets += targets
        else:
            self.restart_clock()

    def restart_clock(self) -> None:
        self.start, self.timed_steps, self.timed_targets = time.perf_counter(), 0, 0

    def reset(self) -> None:
        self.stats.zero_()
        self.targets, self.steps, self.metrics = 0, 0, {}
        self.restart_clock()

    def state_dict(self, world: int) -> dict:
        """Targets are saved for all ranks together, so a resume on another rank count logs the same."""
        return {"stats": self.stats.cpu(), "targets_all_ranks": self.targets * world, "steps": self.steps,
                "metrics": {k: v.cpu() for k, v in self.metrics.items()}}

    def load_state_dict(self, state: dict, with_stats: bool, world: int) -> None:
        """`with_stats`: rank 0 only (a saved window holds every rank's sums)."""
        if with_stats:
            self.stats.copy_(state["stats"])
        self.targets, self.steps = state["targets_all_ranks"] // world, state["steps"]
        self.metrics = {k: v.to(self.stats.device) for k, v in state["metrics"].items()}


def train_record(window: LogWindow, seconds: float, nll: float, nbytes: float, world: int, *, step: int, lr: float,
                 grad_norm: torch.Tensor | None, counters: dict, mode: str | None, step_flops: int,
                 peak: float | None, device: torch.device) -> dict:
    """One train record of `window` (`nll`, `nbytes`: its sums over all ranks; `seconds` since its
    clock started; `counters`: tokens, bytes, time and FLOPs seen). Throughput covers the timed steps
    (bytes/s at the window's mean bytes per token) and is left out when none is. In patch `mode`
    the loss is the next-patch loss: logged apart, without bits per byte."""
    n_targets = window.targets * world
    rec = {"kind": "train", "step": step, "loss": nll / n_targets, "bpb": nll / (LN2 * nbytes), "lr": lr, **counters}
    if window.timed_steps:
        timed_targets = window.timed_targets * world
        rec.update(tokens_per_s=timed_targets / seconds, bytes_per_s=nbytes / n_targets * timed_targets / seconds,
                   step_time_s=seconds / window.timed_steps)
    if mode is not None:
        rec["mode"] = mode
        if mode == "patch":
            rec["patch_loss"] = rec.pop("loss")
            del rec["bpb"]
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    if peak and window.timed_steps:
        rec["mfu"] = step_flops * window.timed_steps / seconds / (peak * world)  # all ranks' FLOPs
    if device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    rec.update({k: float(v) / window.steps for k, v in window.metrics.items()})
    return rec


def train_line(rec: dict, max_steps: int, eta_s: float) -> str:
    """The console line of a train record."""
    if "patch_loss" in rec:
        parts = [f"step {rec['step']}/{max_steps} patch", f"patch loss {rec['patch_loss']:.4f}"]
    else:
        parts = [f"step {rec['step']}/{max_steps}", f"loss {rec['loss']:.4f}", f"bpb {rec['bpb']:.4f}"]
    parts.append(f"lr {rec['lr']:.2e}")
    if "bytes_per_s" in rec:
        parts += [f"{rec['bytes_per_s'] / 1e3:.1f}k B/s", f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s"]
    parts.append(f"{rec['tokens_seen'] / 1e6:.2f}M tok")
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if "peak_mem_gib" in rec:
        parts.append(f"mem {rec['peak_mem_gib']:.1f}GiB")
    parts.append(f"eta {eta_s:.0f}s")
    return " | ".join(parts)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records of `path` (metrics.jsonl) logged after `step`, the step a run starts from
    (all of an earlier run's, when a fresh run reuses its out_dir), so it describes this run only."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            record_step = record["step"] if isinstance(record, dict) else None
        except json.JSONDecodeError:
            record_step = None
        if isinstance(record_step, int):
            keep += [line] if record_step <= step else []
        else:  # a line cut short by a crash (power loss mid-write)
            torn += 1
    if torn:
        print(f"{path}: dropped {torn} unreadable line(s), cut short by a crash", flush=True)
    write_atomic(path, "".join(line + "\n" for line in keep).encode())


class MetricsLog:
    """Rank 0's metrics.jsonl and, with log.tensorboard, TensorBoard scalars; other ranks write nothing."""

    def __init__(self, out_dir: Path, master: bool, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.master = master
        self.writer = None
        if master and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
