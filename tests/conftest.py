"""Shared fixtures: tiny prepared corpora and one tiny trained byte model, made once per session,
plus helpers that run the CLIs in-process (fast) or as subprocesses (the real entry points)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHAKESPEARE = FIXTURES / "tinyshakespeare_head32k.txt"
ENWIKI = FIXTURES / "enwiki_wv_test_head64k.txt"  # multi-byte UTF-8
SMOKE_BYTE = ROOT / "configs" / "smoke" / "byte_gpt.yaml"
SMOKE_BPE = ROOT / "configs" / "smoke" / "bpe_gpt.yaml"  # vocab 512

# A model smaller than the smoke config, for tests that train several times.
TINY_MODEL = ["model.block_size=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32"]
QUIET = ["log.tensorboard=false"]


class Interrupted(Exception):
    """A crash right after a checkpoint was written."""


@contextlib.contextmanager
def crash_after_save(step: int):
    """Inside the block, Trainer.save writes its checkpoint and then raises Interrupted at `step`;
    the block must end in that crash."""
    from hlm.trainer import Trainer

    save = Trainer.save

    def save_then_crash(self):
        save(self)
        if self.step == step:
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted):
        patch.setattr(Trainer, "save", save_then_crash)
        yield


def load_cli(name: str):
    """Import a top-level script (train.py, eval.py, sample.py) as a module without shadowing builtins."""
    spec = importlib.util.spec_from_file_location(f"hlm_cli_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repo root as a user would; output captured as bytes."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=cli_env(), capture_output=True,
                          timeout=timeout)


def assert_one_line_error(rc: int, stderr: str | bytes, *needles: str) -> None:
    """A bad input must end in a non-zero exit and a single `error: ...` line, never a traceback."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def prepare(*args: str | Path) -> int:
    from data_prep.prepare import main

    return main([str(a) for a in args])


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory) -> Path:
    """The Shakespeare fixture as a byte corpus, made through the prepare.py CLI."""
    out = tmp_path_factory.mktemp("corpora") / "shakespeare_bytes"
    proc = run_cli("data_prep/prepare.py", "--input", SHAKESPEARE, "--out", out)
    assert proc.returncode == 0, proc.stderr.decode()
    return out


@pytest.fixture(scope="session")
def bpe_corpus(tmp_path_factory) -> Path:
    """The multi-byte UTF-8 enwiki fixture as a sentencepiece BPE token corpus (vocab 512)."""
    out = tmp_path_factory.mktemp("corpora") / "enwiki_bpe"
    assert prepare("--input", ENWIKI, "--out", out, "--tokenizer", "bpe", "--vocab-size", "512",
                   "--threads", "1") == 0
    return out


@pytest.fixture(scope="session")
def byte_run(tmp_path_factory, byte_corpus) -> Path:
    """A run directory of the byte smoke config, trained through the train.py CLI (40 steps)."""
    out = tmp_path_factory.mktemp("runs") / "byte_gpt"
    proc = run_cli("train.py", SMOKE_BYTE, f"data.path={byte_corpus}", f"train.out_dir={out}")
    assert proc.returncode == 0, proc.stderr.decode()
    return out


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, bpe_corpus) -> Path:
    """The BPE smoke config (40 steps) trained on the BPE corpus through the train.py CLI."""
    out = tmp_path_factory.mktemp("runs") / "bpe_gpt"
    proc = run_cli("train.py", SMOKE_BPE, f"data.path={bpe_corpus}", f"train.out_dir={out}", *QUIET)
    assert proc.returncode == 0, proc.stderr.decode()
    return out


def random_merges(seed: int, n: int = 7, alphabet: bytes = b"abc") -> list[tuple[bytes, bytes]]:
    """n random BPE merges over single-byte atoms, each making a new token from two existing ones."""
    rng = random.Random(seed)
    toks, merges = [bytes([c]) for c in alphabet], []
    while len(merges) < n:
        left, right = rng.choice(toks), rng.choice(toks)
        if left + right not in toks:
            merges.append((left, right))
            toks.append(left + right)
    return merges


def decode_against_teacher_forcing(model, dec, seq, start: int, push=None) -> int:
    """Feed seq[:, start:] to a cached decoder `dec` (its current window in `dec.ids`, its next-id
    logits in `dec.logits`) and assert that every step's distribution equals the full forward on
    the same window (fp64, to 1e-10). Returns how many times the window restarted."""
    restarts = 0
    for t in range(start, seq.size(1)):
        window = dec.ids.size(1)
        assert torch.equal(dec.ids, seq[:, t - window : t])
        ref = model.next_logprobs(dec.ids)[:, -1]
        torch.testing.assert_close(torch.log_softmax(dec.logits, -1), ref, rtol=0, atol=1e-10)
        (push or type(dec).push)(dec, seq[:, t])
        restarts += dec.ids.size(1) < window
    return restarts
