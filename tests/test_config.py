"""Config loader: YAML -> dataclasses, overrides, and errors that name the key."""

from __future__ import annotations

import pytest
from conftest import SMOKE_BYTE

from hlm import HLMError
from hlm.config import ConfigError, config_from_dict, config_to_dict, load_config
from hlm.models import build_model
from hlm.models.gpt import GPT, GPTConfig


def write_yaml(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_smoke_config_loads_typed():
    cfg = load_config(SMOKE_BYTE)
    assert isinstance(cfg.model, GPTConfig)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.block_size) == (2, 64, 64)
    assert cfg.train.lr == 3.0e-3 and cfg.train.max_steps == 40
    assert isinstance(build_model(cfg.model), GPT)


def test_overrides_apply_including_nested_and_new_keys():
    cfg = load_config(SMOKE_BYTE, ["model.n_layer=3", "train.lr=0.01", "data.path=/x/y", "eval.batches=7",
                                   "train.compile=false", "log.interval=1"])
    assert cfg.model.n_layer == 3
    assert cfg.train.lr == 0.01
    assert cfg.data.path == "/x/y"
    assert cfg.eval.batches == 7
    assert cfg.train.compile is False
    assert cfg.log.interval == 1
    assert cfg.model.d_model == 64  # untouched keys keep the file's value


def test_override_creates_missing_section(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "model:\n  family: gpt\n"), ["train.max_steps=5"])
    assert cfg.train.max_steps == 5


def test_override_into_an_empty_section(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "model:\n  family: gpt\ntrain:\n"), ["train.max_steps=5"])
    assert cfg.train.max_steps == 5


def test_int_accepted_for_float():
    cfg = load_config(SMOKE_BYTE, ["train.lr=1", "model.mlp_ratio=2"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.model.mlp_ratio, float)


@pytest.mark.parametrize("text", ["1e-3", "6E-4"])
def test_exponent_without_dot_is_a_float(tmp_path, text):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a float field must still take it."""
    assert load_config(SMOKE_BYTE, [f"train.lr={text}"]).train.lr == float(text)
    path = write_yaml(tmp_path, f"model:\n  family: gpt\ntrain:\n  lr: {text}\n")
    assert load_config(path).train.lr == float(text)


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.lrr=1"], "train.lrr"),
    (["model.n_layers=2"], "model.n_layers"),
    (["data.folder=x"], "data.folder"),
])
def test_unknown_key_is_named(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(SMOKE_BYTE, overrides)


def test_unknown_key_in_file_is_named(tmp_path):
    path = write_yaml(tmp_path, "model:\n  family: gpt\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="train.batchsize"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = write_yaml(tmp_path, "model:\n  family: gpt\noptim:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optim"):
        load_config(path)


@pytest.mark.parametrize(("override", "key"), [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),
    ("train.compile=3", "train.compile"),
    ("train.lr=fast", "train.lr"),
    ("model.n_layer=[1, 2]", "model.n_layer"),
    ("data.path=3", "data.path"),
])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE_BYTE, [override])


@pytest.mark.parametrize("override", ["train.lr", "lr=1", "train..lr=1", ".lr=1", "=1"])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(SMOKE_BYTE, [override])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="lr"):
        load_config(SMOKE_BYTE, ["train.lr.x=1"])


def test_unknown_family_names_it_and_the_known_ones():
    with pytest.raises(ConfigError, match="unknown family 'nope'.*gpt"):
        load_config(SMOKE_BYTE, ["model.family=nope"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- a\n- b\n", "model: 3\n",
                                  "model:\n  family: gpt\ntrain: 5\n"])
def test_not_a_yaml_mapping(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(write_yaml(tmp_path, text))


def test_config_errors_are_hlm_errors_with_one_line():
    with pytest.raises(HLMError) as info:
        load_config(SMOKE_BYTE, ["model.n_layers=2"])
    assert "\n" not in str(info.value)


def test_dict_round_trip():
    cfg = load_config(SMOKE_BYTE, ["train.lr=1e-3", "train.compile=true"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("override", ["train.dtype=fp16", "train.schedule=linear", "train.device=tpu",
                                      "train.compile_mode=max-autotune",
                                      "log.interval=0", "train.ckpt_interval=0", "eval.batches=0",
                                      "train.lr=0", "train.lr=-inf", "train.min_lr_ratio=1.5", "train.decay_frac=-0.1",
                                      "train.beta1=-0.1", "train.weight_decay=-1", "train.grad_clip=-1",
                                      "train.time_budget_s=-1", "train.patch_size=0", "train.patch_fraction=2",
                                      "train.seed=-1", "data.fim_spm_rate=1.01", "model.vocab_size=0",
                                      "model.block_size=0", "model.d_model=0", "model.n_head=0", "model.n_layer=-1",
                                      "model.mlp_ratio=0", "model.rope_theta=nan", "model.init_std=-0.02"])
def test_bad_values_are_refused_when_read(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE_BYTE, [override])


@pytest.mark.parametrize("override", ["train.beta1=0", "eval.interval=0", "eval.batch_size=0", "train.warmup_steps=0",
                                      "train.grad_clip=0", "train.seed=0", f"train.seed={2**64 - 1}",
                                      "train.min_lr_ratio=1", "model.n_layer=0"])
def test_edge_values_that_mean_something_are_accepted(override):
    """0 means off (grad_clip, eval.interval: only at the end), the train batch size (eval.batch_size)
    or no warmup; torch and numpy take any seed in [0, 2**64)."""
    load_config(SMOKE_BYTE, [override])


@pytest.mark.parametrize("config,overrides,key", [
    ("byte_gpt", ["model.d_model=64", "model.n_head=3"], "model.n_head"),
    ("byte_gpt", ["model.d_model=48", "model.n_head=16"], "model.n_head"),  # heads of 3: rotary needs pairs
    ("hourglass_fixed", ["model.d_model=64", "model.n_head=6"], "model.n_head"),
    ("hat", ["model.d_model=64", "model.n_head=6"], "model.n_head"),
    ("hat", ["model.d_byte=32", "model.n_head_byte=3"], "model.n_head_byte"),
])
def test_heads_must_split_the_width_into_even_sizes(config, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE_BYTE.parent / f"{config}.yaml", overrides)


@pytest.mark.parametrize("config,override", [
    ("hnet_2stage", "model.d_model=[32, 0, 64]"), ("hnet_2stage", "model.n_enc=[1, -1]"),
    ("hnet_1stage", "model.n_main=-1"), ("hnet_1stage", "model.head_dim=0"), ("blt", "model.max_patches=-3"),
    ("byte_gpt", "train.flop_budget=-1"), ("byte_gpt", "train.max_bad_steps=-1"),
])
def test_ranges_cover_every_family_and_per_stage_lists(config, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SMOKE_BYTE.parent / f"{config}.yaml", [override])


def test_every_shipped_config_passes_the_value_checks():
    for path in sorted([*SMOKE_BYTE.parent.parent.glob("*.yaml"), *SMOKE_BYTE.parent.glob("*.yaml")]):
        load_config(path)


def test_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,'.*not valid YAML") as info:
        load_config(SMOKE_BYTE, ["train.lr=[1,"])
    assert "\n" not in str(info.value)
