"""Configs with a `base:` file: every shipped config resolves to its recorded values, and the
base key merges, chains and refuses cycles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, cli_env

from hlm.config import ConfigError, config_to_dict, load_config

GOLDEN = json.loads((FIXTURES / "resolved_configs.json").read_text())


def shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/smoke/*.yaml")])


def resolved(name: str) -> dict:
    return json.loads(json.dumps(config_to_dict(load_config(ROOT / name))))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shipped_config_resolves_to_recorded_values(name):
    """The recorded values were written from the configs before they were rewritten as deltas over a
    base. After an intended change to a config, rewrite them: `python tests/test_config_base.py`."""
    assert resolved(name) == GOLDEN[name]


def write(folder, name: str, text: str):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GRANDPARENT = """model:
  family: gpt
  n_layer: 4
  d_model: 64
  n_head: 2
train:
  lr: 0.01
  max_steps: 100
eval:
  batches: 3
"""


def test_chain_merges_key_by_key_and_paths_are_relative_to_the_including_file(tmp_path):
    write(tmp_path, "root.yaml", GRANDPARENT)
    write(tmp_path, "mid/parent.yaml", "base: ../root.yaml\nmodel:\n  n_layer: 6\ntrain:\n  max_steps: 50\n")
    child = write(tmp_path, "mid/deeper/child.yaml", "base: ../parent.yaml\ntrain:\n  lr: 0.02\neval:\n")
    cfg = load_config(child)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (6, 64, 2)
    assert (cfg.train.lr, cfg.train.max_steps) == (0.02, 50)
    assert cfg.eval.batches == 3  # an empty section in the child keeps the base's


def test_override_of_a_nested_key_beats_file_and_base(tmp_path):
    write(tmp_path, "root.yaml", GRANDPARENT)
    child = write(tmp_path, "child.yaml", "base: root.yaml\nmodel:\n  n_layer: 6\n")
    cfg = load_config(child, ["model.n_layer=8", "train.lr=0.5"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.train.lr) == (8, 64, 0.5)


@pytest.mark.parametrize("loop", [["a.yaml"], ["a.yaml", "b.yaml"], ["a.yaml", "b.yaml", "c.yaml"]])
def test_cycle_is_refused_in_one_line(tmp_path, loop):
    for name, nxt in zip(loop, loop[1:] + loop[:1], strict=True):
        write(tmp_path, name, f"base: {nxt}\nmodel:\n  family: gpt\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(info.value)


def test_unknown_key_in_the_base_is_named(tmp_path):
    write(tmp_path, "root.yaml", GRANDPARENT + "  batchsize: 4\n")  # under eval:
    child = write(tmp_path, "child.yaml", "base: root.yaml\ntrain:\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"eval\.batchsize"):
        load_config(child)


@pytest.mark.parametrize(("text", "needle"), [("base: missing.yaml\n", "missing.yaml"),
                                              ("base: [a.yaml]\n", "base"),
                                              ("base: ''\n", "base")])
def test_bad_base_is_named(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, "child.yaml", text))


def test_base_is_not_a_section_of_a_saved_config():
    """A checkpoint stores the resolved config, so `base` never reaches config_from_dict."""
    cfg = load_config(ROOT / "configs" / "smoke" / "hourglass_fixed.yaml")
    assert "base" not in config_to_dict(cfg)


def test_model_files_do_not_import_the_config_loader():
    """hlm.config imports the model registry; a model file importing hlm.config back would be a cycle."""
    code = "import sys, hlm.models; assert 'hlm.config' not in sys.modules, 'hlm.models imported hlm.config'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":  # rewrite the recorded values from the configs as they are now
    values = {name: resolved(name) for name in shipped_configs()}
    (FIXTURES / "resolved_configs.json").write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
