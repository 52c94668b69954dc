"""The optimizer and the learning-rate schedule.

The learning rate is warmup (in steps) times a decay over training progress, where progress is
step/max_steps or, with `train.time_budget_s` and/or `train.flop_budget`, the largest of that,
the share of the time budget spent and the share of the FLOP budget spent, so a wall-clock- or
compute-limited run still finishes its schedule and stops at the first step that reaches it.
With a patch phase (hlm/patch.py) each phase has its own warmup and decay over its steps.
"""

from __future__ import annotations

import math

import torch

from hlm.config import ConfigError, TrainConfig
from hlm.models.base import LanguageModel
from hlm.patch import PatchPhases


def lr_at(tc: TrainConfig, step: int, progress: float) -> float:
    """Warmup over the first steps, then cosine, warmup-stable-decay or constant over progress."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    if tc.schedule == "cosine":
        decay = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif tc.schedule == "wsd":
        start = 1.0 - tc.decay_frac
        decay = 1.0 if p <= start else 1.0 - (1.0 - tc.min_lr_ratio) * (p - start) / tc.decay_frac
    elif tc.schedule == "constant":
        decay = 1.0
    else:
        raise ConfigError(f"train.schedule: unknown schedule '{tc.schedule}' (cosine, wsd, constant)")
    return tc.lr * warm * decay


def training_progress(tc: TrainConfig, step: int, train_time: float, flops_seen: int) -> float:
    """How far training is, 1.0 at its end: the largest share spent of the steps, time and FLOP budgets."""
    p = step / max(1, tc.max_steps)
    if tc.time_budget_s > 0:
        p = max(p, train_time / tc.time_budget_s)
    if tc.flop_budget > 0:
        p = max(p, flops_seen / tc.flop_budget)
    return p


def step_lr(tc: TrainConfig, phases: PatchPhases, step: int, progress: float) -> float:
    """The learning rate of optimizer step `step` (0-based); a patch phase restarts the schedule at the switch."""
    if phases.enabled:
        return lr_at(tc, *phases.schedule_position(step))
    return lr_at(tc, step, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times its `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model: LanguageModel, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay on matrices and embeddings, not on gains or biases; each
    part of `model.param_groups_lr_scale()` (H-Net's stages) keeps its learning-rate multiplier in
    its groups' `lr_scale`."""
    groups = []
    for scale, params in model.param_groups_lr_scale():
        params = [p for p in params if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")
