"""Patch-level training: patch inputs, next-patch loss, the step of the switch to token mode,
and exact resume in either phase."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.prepare import main as prepare_main
from hlm.checkpoint import load_checkpoint
from hlm.config import ConfigError, TrainConfig, config_from_dict
from hlm.data import Split, WindowSampler
from hlm.models.gpt import GPT, GPTConfig
from hlm.patch import patch_phases
from hlm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests/fixtures/tinyshakespeare_head32k.txt")
BLOCK, BATCH, K = 16, 4, 4


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bytes")
    assert prepare_main(["--input", FIXTURE, "--out", str(out)]) == 0
    return out


def tiny_model(vocab: int = 37) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=8, n_layer=2, n_head=2, d_model=16)).double().eval()


def test_patch_embeddings_are_the_mean():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(1))
    got = model.patch_embeddings(idx, 3)
    assert got.shape == (2, 4, 16)
    table = model.embed.weight
    for b in range(2):
        for i in range(4):
            want = sum(table[idx[b, 3 * i + k]] for k in range(3)) / 3
            torch.testing.assert_close(got[b, i], want, rtol=0, atol=1e-15)


def test_patch_loss_matches_naive_loop():
    """Patch i sees patches 0..i only and scores each of the K tokens of patch i+1 with its one
    distribution; the loss is the mean over all of them."""
    model = tiny_model()
    n_patches, k = 5, 3
    idx = torch.randint(0, 37, (2, k * (n_patches + 1)), generator=torch.Generator().manual_seed(2))
    out = model(idx, patch_size=k)
    assert out.nll.shape == (2, n_patches * k)
    table = model.embed.weight
    want = torch.zeros(2, n_patches * k, dtype=torch.float64)
    for b in range(2):
        patches = torch.stack([table[idx[b, k * i : k * i + k]].mean(0) for i in range(n_patches)])
        for i in range(n_patches):
            logits = model.head(model.hidden(patches[None, : i + 1]))[0, -1]  # prefix only: causal
            for j in range(k):
                want[b, i * k + j] = -F.log_softmax(logits, -1)[idx[b, k * (i + 1) + j]]
    torch.testing.assert_close(out.nll, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, want.mean(), rtol=0, atol=1e-12)


def test_token_mode_is_unchanged_by_patch_size_one():
    model = tiny_model()
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(3))
    a, b = model(idx), model(idx, patch_size=1)
    assert torch.equal(a.nll, b.nll) and torch.equal(a.loss, b.loss)


def test_patch_phases_split_the_token_budget():
    phases = patch_phases(TrainConfig(max_steps=30, batch_size=8, patch_size=4, patch_fraction=2 / 3))
    assert phases.switch_step == 20
    assert [phases.patch_size_at(s) for s in (0, 19, 20, 29)] == [4, 4, 1, 1]
    assert [phases.schedule_position(s) for s in (0, 10, 20, 25)] == [(0, 0.0), (10, 0.5), (0, 0.0), (5, 0.5)]
    assert not patch_phases(TrainConfig(max_steps=30, patch_size=4, patch_fraction=0.0)).enabled
    assert patch_phases(TrainConfig(max_steps=30, batch_size=8, patch_size=4, patch_fraction=1.0)).switch_step == 30
    with pytest.raises(ConfigError, match="multiple of train.patch_size"):
        patch_phases(TrainConfig(max_steps=30, batch_size=6, patch_size=4, patch_fraction=0.5))
    with pytest.raises(ConfigError, match="time_budget_s"):
        patch_phases(TrainConfig(max_steps=30, batch_size=8, patch_size=4, patch_fraction=0.5, time_budget_s=60))
    with pytest.raises(ConfigError, match="patch_size > 1"):
        patch_phases(TrainConfig(max_steps=30, patch_size=1, patch_fraction=0.5))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        patch_phases(TrainConfig(max_steps=30, batch_size=8, patch_size=4, patch_fraction=1.5))


def run_config(data, out_dir, max_steps=6, patch_fraction=0.5, **train):
    return config_from_dict({
        "model": {"family": "gpt", "vocab_size": 256, "block_size": BLOCK, "n_layer": 1, "n_head": 2,
                  "d_model": 16},
        "data": {"path": str(data)},
        "train": {"out_dir": str(out_dir), "batch_size": BATCH, "max_steps": max_steps, "lr": 3e-3,
                  "warmup_steps": 2, "patch_size": K, "patch_fraction": patch_fraction, "device": "cpu",
                  "ckpt_interval": 1000, **train},
        "eval": {"interval": 0, "batches": 2},
        "log": {"interval": 1, "tensorboard": False},
    })


def records(out_dir, kind):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class RecordingTrainer(Trainer):
    """Remembers the batch of every (step, micro-step) that `fit` trains on."""

    def fit(self):
        self.seen, train = [], self.batches.train

        def recorded(step, micro):
            idx, kwargs = train(step, micro)
            self.seen.append((step, idx))
            return idx, kwargs

        self.batches.train = recorded
        return super().fit()


def test_switch_happens_at_the_right_step(byte_data, tmp_path):
    trainer = RecordingTrainer(run_config(byte_data, tmp_path, max_steps=6, patch_fraction=0.5))
    trainer.fit()
    assert [s for s, _ in trainer.seen] == list(range(6))
    token_sampler = WindowSampler(Split(byte_data, "train").n_tokens, BLOCK + 1, BATCH, 1, seed=1337)
    for step, x in trainer.seen:
        if step < 3:  # patch mode: batch/K windows of K*(block+1) tokens, the same tokens per step
            assert x.shape == (BATCH // K, K * (BLOCK + 1))
        else:  # token mode reads exactly the batches of a token-only run at these steps
            assert torch.equal(x, trainer.batches.train_split.windows(token_sampler.starts(step, 0), BLOCK + 1))
    train_recs = records(tmp_path, "train")
    assert [(r["step"], r["mode"]) for r in train_recs] == [(1, "patch"), (2, "patch"), (3, "patch"),
                                                            (4, "token"), (5, "token"), (6, "token")]
    assert all("patch_loss" in r and "bpb" not in r for r in train_recs[:3])
    assert all("loss" in r and "bpb" in r and "patch_loss" not in r for r in train_recs[3:])
    # steps 1 and 4 carry compilation: logged, but kept out of the clock
    assert [r["step"] for r in train_recs if "tokens_per_s" not in r] == [1, 4]
    assert all(r["tokens_per_s"] > 0 for r in train_recs if r["step"] not in (1, 4))
    cosine = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # the schedule restarts at the switch
    phase = [3e-3 * 0.5, 3e-3 * cosine(1 / 3), 3e-3 * cosine(2 / 3)]  # warmup of 2 steps, then cosine
    assert [r["lr"] for r in train_recs] == pytest.approx(phase + phase, rel=1e-12)
    tokens_per_step = BATCH * BLOCK
    assert [r["tokens_seen"] for r in train_recs] == [tokens_per_step * r["step"] for r in train_recs]
    assert math.isfinite(records(tmp_path, "val")[-1]["bpb"])


class StoppingTrainer(Trainer):
    """Stops (with the end-of-run validation and checkpoint) after `stop_at` steps, as if killed
    right after a checkpoint."""

    stop_at = 0

    def _done(self):
        return self.step >= self.stop_at or super()._done()


@pytest.fixture(scope="module")
def straight_run(byte_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = Trainer(run_config(byte_data, out)).fit()
    return result, load_checkpoint(out / "ckpt.pt")


@pytest.mark.parametrize("stop_at", [2, 3, 4])  # inside the patch phase, at the switch, inside the token phase
def test_resume_across_the_switch_is_exact(byte_data, tmp_path, straight_run, stop_at):
    want_result, want = straight_run
    first = StoppingTrainer(run_config(byte_data, tmp_path))
    first.stop_at = stop_at
    assert first.fit()["step"] == stop_at
    result = Trainer(run_config(byte_data, tmp_path)).fit()
    got = load_checkpoint(tmp_path / "ckpt.pt")
    assert got["step"] == want["step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for key, state in want["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["optimizer"]["state"][key][name], state[name])
    assert result["val_bpb"] == want_result["val_bpb"]


def test_loss_falls_in_patch_mode(byte_data, tmp_path):
    Trainer(run_config(byte_data, tmp_path, max_steps=30, patch_fraction=1.0, lr=1e-2)).fit()
    train_recs = records(tmp_path, "train")
    assert all(r["mode"] == "patch" for r in train_recs)
    first, last = train_recs[0]["patch_loss"], train_recs[-1]["patch_loss"]
    assert last < 0.8 * first, (first, last)


def test_token_run_starts_from_a_patch_checkpoint(byte_data, tmp_path, straight_run):
    """The paper's two-run recipe: a token-level run initialised from a patch-trained model."""
    _, patch_ckpt = straight_run
    source = tmp_path / "patch.pt"
    torch.save(patch_ckpt, source)
    trainer = Trainer(run_config(byte_data, tmp_path / "token", patch_fraction=0.0, init_from=str(source)))
    assert not trainer.phases.enabled and trainer.step == 0
    for name, tensor in patch_ckpt["model"].items():
        assert torch.equal(trainer.raw_model.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", ["patch_byte_gpt", "patch_bpe_gpt"])
def test_smoke_configs_switch_and_report_val_bpb(tmp_path, name):
    from hlm.config import load_config

    data = tmp_path / "data"
    tokenizer = ["--tokenizer", "bpe", "--vocab-size", "512"] if "bpe" in name else []
    assert prepare_main(["--input", FIXTURE, "--out", str(data), *tokenizer]) == 0
    cfg = load_config(ROOT / f"configs/smoke/{name}.yaml", [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}",
                                                           "train.max_steps=9", "log.tensorboard=false"])
    result = Trainer(cfg).fit()
    logged = [(r["step"], r["mode"]) for r in records(tmp_path / "run", "train")]
    # logged at the switch (step 6), every log.interval=7 steps and at the end
    assert logged == [(6, "patch"), (7, "token"), (9, "token")] and result["step"] == 9
    assert math.isfinite(result["val_bpb"])


def torchrun(data, out_dir, stop_at=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(data), str(out_dir), str(stop_at)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_ddp_resume_across_the_switch_is_exact(byte_data, tmp_path):
    """Two gloo ranks: 6 steps straight == 2 (patch phase) + resume + 4 (switch at step 3)."""
    torchrun(byte_data, tmp_path / "straight")
    torchrun(byte_data, tmp_path / "resumed", stop_at=2)
    torchrun(byte_data, tmp_path / "resumed")
    want, got = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("straight", "resumed"))
    assert got["step"] == want["step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert [r["mode"] for r in records(tmp_path / "resumed", "train")][-1] == "token"


if __name__ == "__main__":  # the DDP worker of the test above, launched by torchrun
    data_dir, run_dir, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer = StoppingTrainer(run_config(data_dir, run_dir))
    trainer.stop_at = stop or trainer.cfg.train.max_steps
    trainer.fit()
    trainer.close()
