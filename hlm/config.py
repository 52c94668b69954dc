"""YAML experiment files -> typed dataclasses, with `section.key=value` overrides.

Every key is checked: an unknown key or a value of the wrong type fails at load time with
the key named, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hlm import ConfigError
from hlm.models import model_config_class


@dataclass
class DataConfig:
    path: str = ""  # folder written by data_prep/prepare.py
    fim_rate: float = 0.0  # share of training documents rearranged for fill-in-the-middle (hlm/fim.py)
    fim_spm_rate: float = 0.5  # of those, the share in SPM order (the rest PSM)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (per rank)
    max_steps: int = 1000
    time_budget_s: float = 0.0  # > 0: stop and finish the schedule after this many seconds of training
    flop_budget: float = 0.0  # > 0: stop and finish the schedule once the counted training FLOPs reach this
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # wsd: share of the run spent in the final linear decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_bad_steps: int = 0  # non-finite loss/grad-norm steps skipped (no update) before stopping; 0: stop at the first
    dtype: str = "bf16"  # autocast dtype on CUDA: bf16 | fp32 (CPU always runs fp32)
    compile: bool | None = None  # None: on for CUDA, off for CPU
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # under torchrun: ddp (replicate the model) | fsdp (FSDP2: shard params, grads, optimizer)
    ckpt_interval: int = 1000
    keep_best: bool = False  # also write out_dir/best.pt (weights only) at each new lowest val bpb
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists
    init_from: str = ""  # start from the weights of this checkpoint (new optimizer and schedule)
    patch_size: int = 1  # patch-level training: K tokens per patch (1 = off)
    patch_fraction: float = 0.0  # share of the token budget consumed in patch mode


@dataclass
class EvalConfig:
    interval: int = 200  # steps between validation passes (0 = only at the end)
    batches: int = 20  # validation batches per pass
    batch_size: int = 0  # 0: same as train.batch_size


@dataclass
class LogConfig:
    interval: int = 10
    tensorboard: bool = True


@dataclass
class Config:
    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "log": LogConfig}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` where lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{override}': key must be section.key")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`train:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': value is not valid YAML ({str(e).splitlines()[0]})") from None


def config_from_dict(raw: dict) -> Config:
    """Build a Config from a plain dict (a parsed YAML file or a checkpoint's saved config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got a {type(raw).__name__}")
    unknown = set(raw) - set(SECTIONS) - {"model"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a mapping, got {model_raw!r}")
    family = model_raw.get("family", "gpt")
    if not isinstance(family, str):
        raise ConfigError(f"model.family: expected a name, got {family!r}")
    model_cls = model_config_class(family)
    sections = {name: build_dataclass(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    cfg = Config(model=build_dataclass(model_cls, model_raw, "model"), **sections)
    check_values(cfg)
    return cfg


CHOICES = {"train.schedule": ("cosine", "wsd", "constant"), "train.dtype": ("bf16", "fp32"),
           "train.device": ("auto", "cpu", "cuda"),
           "train.compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
           "train.parallel": ("ddp", "fsdp")}
# key -> (lowest allowed, highest allowed, whether the bounds themselves are allowed); model keys
# apply to the families that have them
RANGES: dict[str, tuple[float, float, bool]] = {
    **dict.fromkeys(("train.batch_size", "train.grad_accum", "train.max_steps", "train.ckpt_interval",
                     "train.patch_size", "log.interval", "eval.batches", "model.vocab_size", "model.block_size",
                     "model.n_head", "model.d_model", "model.n_head_byte", "model.d_byte", "model.fixed_stride",
                     "model.head_dim", "model.d_local", "model.n_head_local"),
                    (1, math.inf, True)),
    "model.max_words": (2, math.inf, True),  # hat: word slots per window
    "model.max_word_bytes": (4, math.inf, True),  # hat: a UTF-8 character has up to 4 bytes
    **dict.fromkeys(("train.warmup_steps", "train.time_budget_s", "train.flop_budget", "train.max_bad_steps",
                     "train.weight_decay", "train.grad_clip",
                     "eval.interval", "eval.batch_size", "model.n_layer", "model.n_pre", "model.n_short",
                     "model.n_post", "model.n_enc_layer", "model.n_dec_layer", "model.byte_window",
                     "model.max_groups", "model.aux_weight", "model.init_std", "model.n_main", "model.n_enc",
                     "model.n_dec", "model.inner_window", "model.max_chunks", "model.ratio_weight",
                     "model.max_patches", "model.train_flop"),
                    (0, math.inf, True)),
    **dict.fromkeys(("train.min_lr_ratio", "train.decay_frac", "train.patch_fraction", "data.fim_rate",
                     "data.fim_spm_rate"), (0, 1, True)),
    **dict.fromkeys(("train.lr", "model.mlp_ratio", "model.rope_theta", "model.gumbel_temperature",
                     "model.predictor_ratio"), (0, math.inf, False)),
    "model.prior": (0, 1, False),
}
BETAS = ("train.beta1", "train.beta2")  # AdamW: in [0, 1)
SEED_LIMIT = 2**64  # seeds in [0, 2**64): what both torch.manual_seed and numpy's generators accept
HEADS = (("d_model", "n_head"), ("d_byte", "n_head_byte"))  # (width, heads) of the families' attention


def _describe_range(low: float, high: float, inclusive: bool) -> str:
    if high == math.inf:
        return f"{'>=' if inclusive else '>'} {low}"
    return f"in {'[' if inclusive else '('}{low}, {high}{']' if inclusive else ')'}"


def check_values(cfg: Config) -> None:
    """Values the loop would only trip over later (a NaN learning rate training to NaN weights, a
    zero interval dividing by zero after the first step, heads that do not split the width) are
    refused when the config is read, with the key named."""
    def value(key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name, None)

    for section in ("data", "train", "eval", "log", "model"):
        for f in dataclasses.fields(getattr(cfg, section)):
            v = getattr(getattr(cfg, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {v}")
    for key, allowed in CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"{key}: unknown value {value(key)!r} ({', '.join(allowed)})")
    for key, (low, high, inclusive) in RANGES.items():
        v = value(key)
        if v is None:
            continue
        for x in v if isinstance(v, list) else [v]:  # a per-stage list (H-Net): every entry
            if not (low <= x <= high if inclusive else low < x < high):
                raise ConfigError(f"{key} must be {_describe_range(low, high, inclusive)}, got {v}")
    for key in BETAS:
        if not 0 <= value(key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value(key)}")
    if not 0 <= cfg.train.seed < SEED_LIMIT:
        raise ConfigError(f"train.seed must be in [0, 2**64), got {cfg.train.seed}")
    for width, heads in HEADS:
        w, h = value(f"model.{width}"), value(f"model.{heads}")
        # rotary embeddings rotate pairs of dimensions; H-Net's per-stage widths use head_dim instead
        if isinstance(w, int) and isinstance(h, int) and (w % h or (w // h) % 2):
            raise ConfigError(f"model.{heads}={h} must split model.{width}={w} into heads of even size")
    if not cfg.train.out_dir.strip():
        raise ConfigError("train.out_dir must not be empty")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def _merge(base: dict, child: dict) -> dict:
    """`child` over `base`, key by key: mappings merge recursively, any other value replaces.
    An empty section in the child (`train:` with nothing under it) keeps the base's."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(merged.get(key), dict) and (isinstance(value, dict) or value is None):
            merged[key] = _merge(merged[key], value or {})
        else:
            merged[key] = value
    return merged


def resolve_base(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read `path` and, when it names `base: other.yaml` (relative to `path`), merge it over
    that file, itself resolved the same way; a file that is its own ancestor is refused."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config base cycle: {cycle}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected a path to a YAML file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file not found: {base_path}")
    return _merge(resolve_base(base_path, (*chain, resolved)), raw)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment file (merged over its `base:` file, if it names one) and apply
    `section.key=value` overrides."""
    raw = resolve_base(Path(path))
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
