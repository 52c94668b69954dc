"""A training run never destroys data: non-finite steps stop it (or are skipped, up to a limit)
without saving, one run at a time per out_dir, stale temporary files cleared, a resume on the
same corpus only, and an unusable out_dir refused before any work."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil

import pytest
import torch
from conftest import QUIET, SMOKE_BYTE, TINY_MODEL, assert_one_line_error, crash_after_save, load_cli, prepare, run_cli
from test_train import SHAKESPEARE_HEAD, dead_pid, records, tiny_config

from hlm import trainer as trainer_module
from hlm.checkpoint import load_checkpoint
from hlm.finite import NonFiniteError
from hlm.rundir import RunLock
from hlm.trainer import Trainer

FAST = ["train.batch_size=4", "eval.interval=0", "eval.batches=1", "log.interval=1", "train.warmup_steps=1"]


def run_train(capsys, *args) -> tuple[int, str, str]:
    rc = load_cli("train").main([str(SMOKE_BYTE), *TINY_MODEL, *QUIET, *FAST, *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by relative path -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_huge_lr_stops_at_a_named_step_and_keeps_the_checkpoint(tmp_path, byte_corpus, capsys):
    """lr=1e6 drives the weights to overflow within a few steps (weight decay alone multiplies them
    by 1 - lr * 0.1 per step): exit 1, one line naming the step, ckpt.pt of the good run untouched."""
    out = tmp_path / "run"
    args = [f"data.path={byte_corpus}", f"train.out_dir={out}"]
    assert run_train(capsys, *args, "train.max_steps=2")[0] == 0
    good = (out / "ckpt.pt").read_bytes()
    rc, _, err = run_train(capsys, *args, "train.max_steps=40", "train.ckpt_interval=20", "train.lr=1e6")
    assert_one_line_error(rc, err, "non-finite", "not overwritten")
    assert re.search(r"at step \d+|after step \d+", err)
    assert (out / "ckpt.pt").read_bytes() == good
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.json", "metrics.jsonl"]


def test_non_finite_weights_are_never_saved(tmp_path, byte_corpus):
    """The last check before a checkpoint: a weight that became non-finite stops the save."""
    trainer = Trainer(tiny_config(byte_corpus, tmp_path / "run", *FAST, "train.max_steps=1"))
    trainer.fit()
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with torch.no_grad():
        next(trainer.raw_model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteError, match="non-finite weights .* after step 1"):
        trainer.save()
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good


@pytest.fixture
def nan_grad_norm_at(monkeypatch):
    """Make the gradient norm of the given (1-based) steps NaN, as a blow-up would."""
    bad: set[int] = set()
    step = {"now": 0}
    real_clip, real_train_step = trainer_module.clip_grad_norm, Trainer.train_step

    def train_step(self):
        step["now"] = self.step + 1
        return real_train_step(self)

    def clip(params, max_norm):
        norm = real_clip(params, max_norm)
        return norm * math.nan if step["now"] in bad else norm

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer_module, "clip_grad_norm", clip)
    return bad


SKIP = [*FAST, "train.max_steps=8", "train.ckpt_interval=4"]


def test_bad_steps_are_skipped_up_to_the_limit(tmp_path, byte_corpus, nan_grad_norm_at):
    nan_grad_norm_at.update({2, 6})
    straight = tmp_path / "straight"
    Trainer(tiny_config(byte_corpus, straight, *SKIP, "train.max_bad_steps=2")).fit()
    ckpt = load_checkpoint(straight / "ckpt.pt")
    assert ckpt["step"] == 8 and ckpt["bad_steps"] == 2
    assert all(s["step"].item() == 6 for s in ckpt["optimizer"]["state"].values())  # 2 of 8 updates dropped
    assert [r["step"] for r in records(straight, "skip")] == [2, 6]
    train = records(straight, "train")
    assert [r["step"] for r in train] == [1, 3, 4, 5, 7, 8]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)

    # the same run crashed at step 4 and resumed: the same weights (a skip is part of the resumable state)
    resumed = tmp_path / "resumed"
    with crash_after_save(4):
        Trainer(tiny_config(byte_corpus, resumed, *SKIP, "train.max_bad_steps=2")).fit()
    Trainer(tiny_config(byte_corpus, resumed, *SKIP, "train.max_bad_steps=2")).fit()
    again = load_checkpoint(resumed / "ckpt.pt")
    assert all(torch.equal(ckpt["model"][k], again["model"][k]) for k in ckpt["model"])

    # one skip allowed: the second bad step stops the run, also when the first came before a resume
    limited = tmp_path / "limited"
    with crash_after_save(4):
        Trainer(tiny_config(byte_corpus, limited, *SKIP, "train.max_bad_steps=1")).fit()
    saved = (limited / "ckpt.pt").read_bytes()
    with pytest.raises(NonFiniteError, match="at step 6, bad step 2 of at most train.max_bad_steps=1"):
        Trainer(tiny_config(byte_corpus, limited, *SKIP, "train.max_bad_steps=1")).fit()
    assert (limited / "ckpt.pt").read_bytes() == saved


def test_a_second_run_on_a_locked_out_dir_is_refused(tmp_path, byte_corpus, capsys):
    out = tmp_path / "run"
    assert run_train(capsys, f"data.path={byte_corpus}", f"train.out_dir={out}", "train.max_steps=1")[0] == 0
    assert not (out / ".lock").exists()  # released at the end of the run
    lock = RunLock(out)  # this process is the other run
    try:
        before = snapshot(tmp_path)
        proc = run_cli("train.py", SMOKE_BYTE, *TINY_MODEL, *QUIET, *FAST, f"data.path={byte_corpus}",
                       f"train.out_dir={out}", "train.max_steps=2")
        assert_one_line_error(proc.returncode, proc.stderr, "in use by another training run", f"pid {os.getpid()}")
        assert snapshot(tmp_path) == before
    finally:
        lock.release()
    assert not (out / ".lock").exists()


def test_stale_temporary_files_are_removed_live_ones_kept(tmp_path, byte_corpus):
    out = tmp_path / "run"
    out.mkdir()
    stale, live = out / f".ckpt.pt.tmp{dead_pid()}", out / f".ckpt.pt.tmp{os.getppid()}"
    others = [out / "ckpt.pt.tmp1", out / ".notes.txt", out / f".metrics.jsonl.tmp{os.getppid()}"]
    for path in (stale, live, *others):
        path.write_bytes(b"x")
    trainer = Trainer(tiny_config(byte_corpus, out, *FAST))
    trainer.release_lock()
    assert not stale.exists()
    assert live.exists() and all(p.exists() for p in others)


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, byte_corpus, capsys):
    out = tmp_path / "run"
    args = [f"data.path={byte_corpus}", f"train.out_dir={out}"]
    assert run_train(capsys, *args, "train.max_steps=2")[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # power lost mid-append
    rc, stdout, err = run_train(capsys, *args, "train.max_steps=3")
    assert rc == 0, err
    assert "dropped 1 unreadable line" in stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [(r["kind"], r["step"]) for r in map(json.loads, lines)] == \
        [("train", 1), ("train", 2), ("val", 2), ("train", 3), ("val", 3)]


def test_resume_refuses_another_corpus_and_data_fixing_settings(tmp_path, byte_corpus, capsys):
    out = tmp_path / "run"
    args = [f"train.out_dir={out}", "train.max_steps=2"]
    assert run_train(capsys, f"data.path={byte_corpus}", *args)[0] == 0
    before = snapshot(out)

    src = tmp_path / "other.txt"
    src.write_bytes(SHAKESPEARE_HEAD * 4)
    assert prepare("--input", src, "--out", tmp_path / "other") == 0
    rc, _, err = run_train(capsys, f"data.path={tmp_path / 'other'}", *args)
    assert_one_line_error(rc, err, "different corpus", "source.sha256")

    rc, _, err = run_train(capsys, f"data.path={byte_corpus}", *args, "train.batch_size=2", "train.seed=7")
    assert_one_line_error(rc, err, "global batch (train.batch_size x ranks) 4 x 1 -> 2 x 1", "train.seed 1337 -> 7")
    assert snapshot(out) == before

    # the same corpus in another folder, with a longer run: resumes, and says what changed
    moved = tmp_path / "moved"
    shutil.copytree(byte_corpus, moved)
    rc, stdout, err = run_train(capsys, f"data.path={moved}", f"train.out_dir={out}", "train.max_steps=3")
    assert rc == 0, err
    assert "changed settings" in stdout and "train.max_steps: 2 -> 3" in stdout and f"data.path: '{byte_corpus}'" \
        in stdout
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3


def test_out_dir_that_is_a_file_or_not_writable(tmp_path, byte_corpus, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"keep me")
    for out, needle in ((blocker, "is a file"), (blocker / "run", "lies under")):
        rc, _, err = run_train(capsys, f"data.path={byte_corpus}", f"train.out_dir={out}")
        assert_one_line_error(rc, err, "train.out_dir", needle)
    assert blocker.read_bytes() == b"keep me"

    read_only = tmp_path / "ro"
    read_only.mkdir()
    # tests may run as root, which may write anywhere: the permission answer is simulated
    monkeypatch.setattr("hlm.rundir.os.access", lambda path, mode: path != read_only)
    rc, _, err = run_train(capsys, f"data.path={byte_corpus}", f"train.out_dir={read_only / 'run'}")
    assert_one_line_error(rc, err, "not writable")
    assert list(read_only.iterdir()) == []
