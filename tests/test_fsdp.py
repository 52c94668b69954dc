"""FSDP2 (`train.parallel=fsdp`) through `torchrun --nproc_per_node=2` (gloo on CPU): the sharded
run equals one process at the same global batch, ranks agree, save + resume is bit-exact, and the
checkpoint is the plain single-process format that eval.py reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import QUIET, ROOT, SMOKE_BYTE, TINY_MODEL, cli_env, run_cli

from hlm.checkpoint import load_checkpoint, load_model
from hlm.config import ConfigError, load_config
from hlm.evaluate import encode_stream, evaluate, split_documents
from hlm.trainer import Trainer

# Runs the real Trainer under torchrun; STOP_AT=n ends the run right after the checkpoint of step n
# (a crash that loses nothing saved). Each rank writes the full weights it sees after training.
WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from hlm.config import ConfigError, load_config
    from hlm.parallel import full_state_dicts, is_sharded
    from hlm.trainer import Trainer

    class Stop(Exception):
        pass

    save = Trainer.save
    def save_then_stop(self):
        save(self)
        if self.step == int(os.environ.get("STOP_AT", -1)):
            raise Stop
    Trainer.save = save_then_stop

    out_dir = sys.argv[1]
    trainer = Trainer(load_config(sys.argv[2], sys.argv[3:]))
    assert is_sharded(trainer.raw_model)
    try:
        trainer.fit()
    except Stop:
        pass
    else:
        rank = trainer.rt.rank
        local = {k: v.full_tensor() for k, v in trainer.raw_model.state_dict().items()}  # every rank gathers
        torch.save(local, f"{out_dir}/weights{rank}.pt")
        full, _ = full_state_dicts(trainer.raw_model, trainer.optimizer)
        assert bool(full) == (rank == 0)  # the checkpoint state lives on rank 0 only
    trainer.close()
""")

STEPS = 4
# batch 4 x 2 micro-steps per rank; a tight clip so clipping acts on every step; validation of 3
# windows of batch 1 leaves rank 1 one forward short (it must still join rank 0's second forward)
COMMON = [*TINY_MODEL, *QUIET, f"train.max_steps={STEPS}", "train.grad_accum=2", "train.warmup_steps=1",
          "train.grad_clip=0.05", "train.ckpt_interval=2", "eval.interval=2", "eval.batches=3", "eval.batch_size=1",
          "log.interval=1"]
FSDP = [*COMMON, "train.batch_size=4", "train.parallel=fsdp", "train.keep_best=true"]


def torchrun(tmp, run_dir, corpus, config=SMOKE_BYTE, overrides=FSDP, **env) -> None:
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    overrides = [f"data.path={corpus}", f"train.out_dir={run_dir}", *overrides]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp), str(config), *overrides],
                          cwd=ROOT, env={**cli_env(), **env}, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


# Weights after a few steps, sharded vs one process: Adam's m/sqrt(v) magnifies fp32 summation-order
# differences where gradients are near zero (observed up to 1.9e-6, varying between runs), while
# one step moves a weight by up to lr = 3e-3, so a wrong gradient shows far above this bound.
WEIGHT_ATOL = 1e-4


def records(run_dir, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, byte_corpus):
    tmp = tmp_path_factory.mktemp("fsdp")
    torchrun(tmp, tmp / "run", byte_corpus)
    return tmp, tmp / "run"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, byte_corpus):
    """One process, no sharding, batch 8: the same global batch and the same windows as 2 ranks x 4."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    Trainer(load_config(SMOKE_BYTE, [f"data.path={byte_corpus}", f"train.out_dir={run_dir}", *COMMON,
                                     "train.batch_size=8"])).fit()
    return run_dir


def test_ranks_agree_and_rank0_checkpoints(fsdp_run):
    tmp, run_dir = fsdp_run
    w0, w1 = (torch.load(tmp / f"weights{r}.pt", weights_only=True) for r in range(2))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    assert ckpt["step"] == STEPS
    assert ckpt["model"].keys() == w0.keys()
    assert all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)
    assert [r["step"] for r in records(run_dir, "val")] == [2, 4]  # written once, by rank 0
    # train.keep_best: the sharded weights are gathered for best.pt too, at the step of the lowest val bpb
    best, lowest = load_checkpoint(run_dir / "best.pt"), min(records(run_dir, "val"), key=lambda r: r["bpb"])
    assert best["step"] == lowest["step"] and best["val_bpb"] == lowest["bpb"] == ckpt["best_val_bpb"]
    assert best["model"].keys() == w0.keys()
    if best["step"] == STEPS:
        assert all(torch.equal(best["model"][k], w0[k]) for k in w0)


def test_fsdp_matches_one_process_at_the_same_global_batch(fsdp_run, single_run):
    """Losses, clipped gradient norms, weights, optimizer state and validation agree to fp32 rounding
    (reduce-scatter and all-reduce sum in a different order than one process's backward)."""
    _, run_dir = fsdp_run
    train_f, train_s = records(run_dir, "train"), records(single_run, "train")
    assert [r["step"] for r in train_f] == [r["step"] for r in train_s] == list(range(1, STEPS + 1))
    for f, s in zip(train_f, train_s, strict=True):
        assert f["loss"] == pytest.approx(s["loss"], rel=1e-7, abs=0)
        assert f["grad_norm"] == pytest.approx(s["grad_norm"], rel=2e-6, abs=0)
        assert f["grad_norm"] > 0.05  # clipping was active
    fsdp, single = load_checkpoint(run_dir / "ckpt.pt"), load_checkpoint(single_run / "ckpt.pt")
    for name, p in single["model"].items():
        torch.testing.assert_close(fsdp["model"][name], p, rtol=0, atol=WEIGHT_ATOL)
    # the optimizer state has the single-process layout: same indices, groups and moments
    assert fsdp["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()
    for i, state in single["optimizer"]["state"].items():
        assert torch.equal(fsdp["optimizer"]["state"][i]["step"], state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert (fsdp["optimizer"]["state"][i][key] - state[key]).abs().max() <= 1e-5 * state[key].abs().max()
    val_f, val_s = records(run_dir, "val"), records(single_run, "val")
    assert [r["bytes"] for r in val_f] == [r["bytes"] for r in val_s]
    for f, s in zip(val_f, val_s, strict=True):
        assert f["bpb"] == pytest.approx(s["bpb"], rel=1e-6)


def test_fsdp_resume_is_bit_exact(fsdp_run, byte_corpus, tmp_path):
    """4 steps straight == 2 steps, stop after the checkpoint, resume to 4 (both under FSDP2)."""
    tmp, straight = fsdp_run
    resumed = tmp_path / "resumed"
    torchrun(tmp_path, resumed, byte_corpus, STOP_AT="2")
    assert load_checkpoint(resumed / "ckpt.pt")["step"] == 2
    torchrun(tmp_path, resumed, byte_corpus)
    want, got = (load_checkpoint(d / "ckpt.pt") for d in (straight, resumed))
    assert got["step"] == want["step"] == STEPS
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    for i, state in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][i][k], v) for k, v in state.items())
    assert records(resumed, "val") == records(straight, "val")
    losses = {r["step"]: r["loss"] for r in records(straight, "train")}
    assert len(records(resumed, "train")) >= 2
    assert all(losses[r["step"]] == r["loss"] for r in records(resumed, "train"))


def test_eval_cli_reads_the_fsdp_checkpoint(fsdp_run, byte_corpus, tmp_path):
    """The checkpoint of a sharded run holds plain tensors: eval.py scores it like any other."""
    _, run_dir = fsdp_run
    out = tmp_path / "res.json"
    proc = run_cli("eval.py", run_dir / "ckpt.pt", "--data", byte_corpus, "--split", "val", "--json", out)
    assert proc.returncode == 0, proc.stderr.decode()
    (row,) = json.loads(out.read_text())
    model, cfg, saved = load_model(run_dir / "ckpt.pt")
    ids = encode_stream(split_documents(byte_corpus, "val"), None, 0)
    expected = evaluate(model, ids, saved["token_nbytes"], cfg.model.block_size)
    assert row["bytes"] == expected["bytes"] > 0
    assert row["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)


def test_single_process_resumes_an_fsdp_checkpoint(fsdp_run, byte_corpus, tmp_path):
    """Same file format under every mode: one process picks up the sharded run's optimizer state."""
    _, run_dir = fsdp_run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    trainer = Trainer(load_config(SMOKE_BYTE, [f"data.path={byte_corpus}", f"train.out_dir={tmp_path / 'run'}",
                                               *COMMON, "train.batch_size=8", f"train.max_steps={STEPS + 1}"]))
    assert trainer.step == STEPS
    saved = load_checkpoint(run_dir / "ckpt.pt")["optimizer"]["state"]
    state = trainer.optimizer.state_dict()["state"]
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[i][k], v) for i in saved for k, v in saved[i].items())
    trainer.fit()
    assert trainer.step == STEPS + 1


def test_hierarchical_model_under_fsdp_matches_one_process(byte_corpus, tmp_path):
    """Hourglass: blocks of three stacks are sharded units, the pooling parameters live in the root."""
    config = ROOT / "configs" / "smoke" / "hourglass_whitespace.yaml"
    common = [*QUIET, "train.max_steps=3", "train.grad_accum=2", "train.warmup_steps=1", "eval.interval=0",
              "eval.batches=1", "eval.batch_size=2", "log.interval=1"]
    torchrun(tmp_path, tmp_path / "fsdp", byte_corpus, config, [*common, "train.batch_size=2", "train.parallel=fsdp"])
    Trainer(load_config(config, [f"data.path={byte_corpus}", f"train.out_dir={tmp_path / 'single'}", *common,
                                 "train.batch_size=4"])).fit()
    fsdp, single = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("fsdp", "single"))
    for name, p in single["model"].items():
        torch.testing.assert_close(fsdp["model"][name], p, rtol=0, atol=WEIGHT_ATOL)
    for f, s in zip(records(tmp_path / "fsdp", "train"), records(tmp_path / "single", "train"), strict=True):
        assert f["loss"] == pytest.approx(s["loss"], rel=1e-7, abs=0)


def test_unknown_parallel_mode(byte_corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.parallel"):  # refused when the config is read
        load_config(SMOKE_BYTE, [f"data.path={byte_corpus}", f"train.out_dir={tmp_path}", "train.parallel=zero3"])
