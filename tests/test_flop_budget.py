"""train.flop_budget: the run stops at the first step whose counted FLOPs reach the budget, and
the learning-rate schedule runs over the budget (not over max_steps)."""

from __future__ import annotations

import json

from conftest import QUIET, SMOKE_BYTE, TINY_MODEL

from hlm.config import load_config
from hlm.optim import lr_at
from hlm.trainer import Trainer


def make_trainer(corpus, out_dir, *overrides) -> Trainer:
    return Trainer(load_config(SMOKE_BYTE, [f"data.path={corpus}", f"train.out_dir={out_dir}", *TINY_MODEL, *QUIET,
                                            "train.max_steps=100000", "train.warmup_steps=1", "eval.interval=0",
                                            "log.interval=1", *overrides]))


def test_flop_budget_stops_at_the_step_that_reaches_it(tmp_path, byte_corpus):
    probe = make_trainer(byte_corpus, tmp_path / "probe")
    per_step = probe.flops.token
    assert per_step > 0
    k = 5
    for budget, steps in ((k * per_step, k), (k * per_step - 1, k), (k * per_step + 1, k + 1)):
        trainer = make_trainer(byte_corpus, tmp_path / f"run{budget}", f"train.flop_budget={float(budget)}")
        result = trainer.fit()
        assert result["step"] == steps and result["flops_seen"] == steps * per_step
        assert trainer.progress() >= 1.0
        recs = [json.loads(line) for line in (tmp_path / f"run{budget}" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["kind"] == "train"]
        assert train[-1]["step"] == steps  # the first step (compilation) is kept out of the logs
        assert all(r["flops_seen"] == r["step"] * per_step for r in train)
        # the schedule is driven by the FLOP share: with max_steps 100000 the step share alone would
        # keep the cosine near its peak; here step s runs at progress s*per_step/budget
        tc = trainer.cfg.train
        for r in train:
            s = r["step"] - 1
            assert r["lr"] == lr_at(tc, s, s * per_step / budget)
        assert train[-1]["lr"] < 0.5 * tc.lr


def test_auxiliary_model_flops_count_toward_the_budget(tmp_path, byte_corpus, monkeypatch):
    from hlm.models.gpt import GPT

    seen = {}

    def extra_train_flops(self, tokens_per_step: int) -> int:
        seen["tokens"] = tokens_per_step
        return 1000 * tokens_per_step

    monkeypatch.setattr(GPT, "extra_train_flops", extra_train_flops, raising=False)
    probe = make_trainer(byte_corpus, tmp_path / "probe")
    tc = probe.cfg.train
    assert seen["tokens"] == tc.batch_size * (probe.cfg.model.block_size + 1)
    per_step = probe.flops.token + 1000 * seen["tokens"]
    trainer = make_trainer(byte_corpus, tmp_path / "run", f"train.flop_budget={3.0 * per_step}")
    assert trainer.fit()["step"] == 3


def test_patch_steps_count_the_patch_phase_flops(tmp_path, byte_corpus):
    cfg = load_config("configs/smoke/patch_byte_gpt.yaml", [f"data.path={byte_corpus}",
                                                             f"train.out_dir={tmp_path}", *QUIET])
    trainer = Trainer(cfg)
    switch, patch, token = trainer.phases.switch_step, trainer.flops.patch, trainer.flops.token
    assert switch == 28 and patch < token  # a patch step runs 1/K of the positions
    for step, want in ((0, 0), (5, 5 * patch), (switch, switch * patch), (40, switch * patch + 12 * token)):
        trainer.step = step
        assert trainer.flops_seen() == want
