"""Model registry: `build_model(cfg.model)` picks the family named by `cfg.model.family`.

A new architecture is one file here plus one entry in `FAMILIES`.
"""

from __future__ import annotations

import torch.nn as nn

from hlm import ConfigError
from hlm.models.gpt import GPT, GPTConfig
from hlm.models.hat import HAT, HATConfig
from hlm.models.hourglass import Hourglass, HourglassConfig

FAMILIES: dict[str, tuple[type, type]] = {
    "gpt": (GPTConfig, GPT),
    "hat": (HATConfig, HAT),
    "hourglass": (HourglassConfig, Hourglass),
}


def model_config_class(family: str) -> type:
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family '{family}' (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[family][0]


def build_model(model_cfg: GPTConfig | HourglassConfig | HATConfig) -> nn.Module:
    """Instantiate the model for a family config dataclass."""
    return FAMILIES[model_cfg.family][1](model_cfg)
