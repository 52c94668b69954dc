"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from hlm.config import ConfigError, TrainConfig
from hlm.models.base import LanguageModel


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
