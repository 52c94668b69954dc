"""Model registry: `build_model(cfg.model)` picks the family named by `cfg.model.family`.

A family is one file: a config dataclass and a `hlm.models.base.LanguageModel` (the contract),
registered with `register_family` — here for the built-in ones, or from any module imported before
the config is read (tests/test_family_contract.py adds one that way).
"""

from __future__ import annotations

from hlm import ConfigError
from hlm.models.base import LanguageModel
from hlm.models.blt import BLT, BLTConfig
from hlm.models.gpt import GPT, GPTConfig
from hlm.models.hat import HAT, HATConfig
from hlm.models.hnet import HNet, HNetConfig
from hlm.models.hourglass import Hourglass, HourglassConfig

FAMILIES: dict[str, tuple[type, type[LanguageModel]]] = {}


def register_family(config_cls: type, model_cls: type[LanguageModel]) -> None:
    """Make a family known under its config's default `family` name."""
    if not issubclass(model_cls, LanguageModel):
        raise TypeError(f"{model_cls.__name__} must subclass hlm.models.base.LanguageModel")
    if not callable(getattr(config_cls, "describe", None)):
        raise TypeError(f"{config_cls.__name__} needs describe(), the shape eval.py prints")
    FAMILIES[config_cls.family] = (config_cls, model_cls)


for _config, _model in ((BLTConfig, BLT), (GPTConfig, GPT), (HATConfig, HAT), (HNetConfig, HNet),
                        (HourglassConfig, Hourglass)):
    register_family(_config, _model)


def model_config_class(family: str) -> type:
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family '{family}' (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[family][0]


def build_model(model_cfg) -> LanguageModel:
    """Instantiate the model for a family config dataclass."""
    return FAMILIES[model_cfg.family][1](model_cfg)
