"""A new family is one file and one config: a toy family defined here, registered from this module,
goes through training, eval.py, sample.py, FSDP2 wrapping and the byte-level view without any other
file knowing it (the contract is hlm/models/base.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from conftest import load_cli
from torch.distributed.fsdp import FSDPModule

from hlm.bytes import as_byte_lm
from hlm.config import load_config
from hlm.models import FAMILIES, build_model, register_family
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import Transformer
from hlm.parallel import apply_fsdp
from hlm.trainer import train


@dataclass
class ToyConfig:
    family: str = "toy"
    vocab_size: int = 256
    block_size: int = 32
    d_model: int = 16
    n_head: int = 2

    def describe(self) -> str:
        return f"toy 1L/{self.d_model}d"


class Toy(LanguageModel):
    """One causal block between an embedding and a head."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stack = Transformer(1, cfg.d_model, cfg.n_head, cfg.block_size)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def logits(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        return self.head(self.stack(self.embed(x), cache))

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        logits = self.logits(idx[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="none").view_as(idx[:, 1:])
        return ModelOutput(nll.mean(), nll, {})

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(idx).float(), dim=-1)

    def new_decoder(self, prompt: torch.Tensor) -> ToyDecoder:
        return ToyDecoder(self, prompt)


class ToyDecoder:
    def __init__(self, model: Toy, prompt: torch.Tensor):
        p = next(model.parameters())
        self.model, self.cache = model, model.stack.new_cache(prompt.size(0), model.cfg.block_size, p.device, p.dtype)
        self.logits = model.logits(prompt, self.cache)[:, -1]

    def push(self, nxt: torch.Tensor) -> None:
        self.logits = self.model.logits(nxt[:, None], self.cache)[:, -1]


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", FAMILIES.get("toy"))  # restored after the test
    register_family(ToyConfig, Toy)
    yield


def test_a_toy_family_trains_evaluates_and_samples(toy_family, tmp_path, byte_corpus, capfdbinary):
    config = tmp_path / "toy.yaml"
    config.write_text(f"model:\n  family: toy\n  block_size: 32\ndata:\n  path: {byte_corpus}\n"
                      f"train:\n  out_dir: {tmp_path / 'run'}\n  batch_size: 8\n  max_steps: 30\n  lr: 3.0e-3\n"
                      "  warmup_steps: 3\neval:\n  interval: 30\n  batches: 2\nlog:\n  interval: 10\n"
                      "  tensorboard: false\n")
    result = train(load_config(config))
    assert result["step"] == 30 and result["val_bpb"] < 7.5  # from 8 bits (uniform over bytes)
    ckpt = tmp_path / "run" / "ckpt.pt"

    assert load_cli("eval").main([str(ckpt), "--data", str(byte_corpus), "--split", "val", "--max-bytes", "2000",
                                  "--json", str(tmp_path / "eval.json")]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert row["model"] == "toy 1L/16d" and 0 < row["bpb"] < 8
    capfdbinary.readouterr()

    assert load_cli("sample").main([str(ckpt), "--prompt", "To be", "--max-bytes", "12", "--device", "cpu"]) == 0
    out = capfdbinary.readouterr().out
    assert out.startswith(b"To be") and len(out) <= len(b"To be") + 12 + 1


def test_a_toy_family_is_sharded_by_fsdp_and_is_a_byte_lm(toy_family, tmp_path):
    torch.manual_seed(0)
    model = build_model(ToyConfig())
    x = torch.randint(0, 256, (2, 17))
    want = model(x).nll.detach()
    lp = as_byte_lm(model).next_byte_logprobs(b"ab")
    assert lp.shape == (257,) and torch.isclose(lp.exp().sum(), torch.tensor(1.0, dtype=lp.dtype))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        apply_fsdp(model, 1, "cpu")
        assert isinstance(model.stack.blocks[0], FSDPModule) and isinstance(model, FSDPModule)
        torch.testing.assert_close(model(x).nll.detach(), want)
    finally:
        dist.destroy_process_group()


def test_a_family_must_follow_the_contract():
    with pytest.raises(TypeError, match="LanguageModel"):
        register_family(ToyConfig, nn.Linear)

    @dataclass
    class Unnamed:
        family: str = "unnamed"

    with pytest.raises(TypeError, match="describe"):
        register_family(Unnamed, Toy)
