"""Bad input through the real CLIs (train.py, eval.py, sample.py, fim_eval.py as subprocesses):
each case must exit non-zero with exactly one stderr line, `error: ...`, that names the problem,
no traceback, and leave every file of the run, corpus and checkpoint folders involved as it was.
Plus the positive side: a byte model continues any prompt bytes, UTF-8 or not.

The cases run concurrently (each is a fresh interpreter that mostly imports torch), once per module.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHAKESPEARE, SMOKE_BYTE, cli_env, load_cli, run_cli

from hlm import HLMError

HAT = ROOT / "configs" / "smoke" / "hat.yaml"
HOURGLASS = ROOT / "configs" / "smoke" / "hourglass_fixed.yaml"


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {ckpt}, {run}, {data}, {bad} are filled in from the fixture's folders
    needle: str  # the error line must contain this (the key, flag or file at fault)


def train_case(name: str, *overrides: str, needle: str, config: Path = SMOKE_BYTE) -> Case:
    """train.py on a copy of a finished run (resume on): a refused config must not touch it."""
    return Case(name, ("train.py", str(config), "data.path={data}", "train.out_dir={run}", *overrides), needle)


CASES = [
    train_case("lr-nan", "train.lr=nan", needle="train.lr"),
    train_case("lr-yaml-nan", "train.lr=.nan", needle="train.lr"),
    train_case("lr-negative", "train.lr=-1", needle="train.lr"),
    train_case("override-not-yaml", "train.lr=[1,", needle="train.lr=[1,"),
    train_case("heads-do-not-divide", "model.n_head=3", needle="model.n_head"),
    train_case("hat-byte-heads", "model.n_head_byte=5", needle="model.n_head_byte", config=HAT),
    train_case("hourglass-heads", "model.n_head=5", needle="model.n_head", config=HOURGLASS),
    train_case("seed-negative", "train.seed=-1", needle="train.seed"),
    train_case("seed-too-large", f"train.seed={2**64}", needle="train.seed"),
    train_case("warmup-negative", "train.warmup_steps=-1", needle="train.warmup_steps"),
    train_case("eval-interval-negative", "eval.interval=-1", needle="eval.interval"),
    train_case("eval-batch-size-negative", "eval.batch_size=-1", needle="eval.batch_size"),
    train_case("log-interval-zero", "log.interval=0", needle="log.interval"),
    train_case("batch-size-zero", "train.batch_size=0", needle="train.batch_size"),
    train_case("grad-accum-zero", "train.grad_accum=0", needle="train.grad_accum"),
    train_case("max-steps-negative", "train.max_steps=-1", needle="train.max_steps"),
    train_case("ckpt-interval-zero", "train.ckpt_interval=0", needle="train.ckpt_interval"),
    train_case("beta-one", "train.beta2=1", needle="train.beta2"),
    train_case("fim-rate-above-one", "data.fim_rate=1.5", needle="data.fim_rate"),
    train_case("out-dir-empty", "train.out_dir=", needle="train.out_dir"),
    Case("eval-stride-zero", ("eval.py", "{ckpt}", "--text", str(SHAKESPEARE), "--stride", "0"), "--stride"),
    Case("eval-batch-size-zero", ("eval.py", "{ckpt}", "--data", "{data}", "--batch-size", "0"), "--batch-size"),
    Case("eval-max-bytes-negative", ("eval.py", "{ckpt}", "--data", "{data}", "--max-bytes", "-1"), "--max-bytes"),
    Case("eval-ckpt-bare-tensor", ("eval.py", "{bad}/tensor.pt", "--data", "{data}"), "tensor.pt"),
    Case("eval-ckpt-text-file", ("eval.py", "{bad}/text.pt", "--data", "{data}"), "text.pt"),
    Case("eval-ckpt-empty-file", ("eval.py", "{bad}/empty.pt", "--data", "{data}"), "empty"),
    Case("eval-ckpt-missing-keys", ("eval.py", "{bad}/partial.pt", "--data", "{data}"), "not an hlm checkpoint"),
    Case("eval-ckpt-list-meta", ("eval.py", "{bad}/list_meta.pt", "--data", "{data}"), "data_meta"),
    Case("sample-max-bytes-negative", ("sample.py", "{ckpt}", "--max-bytes", "-5"), "--max-bytes"),
    Case("sample-temperature-negative", ("sample.py", "{ckpt}", "--temperature", "-1"), "--temperature"),
    Case("sample-top-k-zero", ("sample.py", "{ckpt}", "--top-k", "0"), "--top-k"),
    Case("sample-prompt-file-missing", ("sample.py", "{ckpt}", "--prompt-file", "{bad}/none.txt"), "none.txt"),
    Case("fim-eval-seed-negative", ("fim_eval.py", "--byte", "{ckpt}", "--seed", "-1"), "--seed"),
]


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (an added or removed file shows too)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(byte_corpus, byte_run, tmp_path_factory) -> dict[str, Path]:
    """A copy of the session's byte run (so a wrongly accepted config cannot disturb other tests),
    the session's byte corpus, and a folder of files that are not hlm checkpoints."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    shutil.copytree(byte_run, run)
    bad = root / "bad"
    bad.mkdir()
    torch.save(torch.zeros(3), bad / "tensor.pt")
    torch.save({"model": {}}, bad / "partial.pt")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "data_meta": []}, bad / "list_meta.pt")
    (bad / "text.pt").write_text("not a checkpoint\n")
    (bad / "empty.pt").write_bytes(b"")
    return {"run": run, "data": byte_corpus, "bad": bad, "ckpt": run / "ckpt.pt"}


@pytest.fixture(scope="module")
def outcomes(folders) -> dict[str, tuple[subprocess.CompletedProcess, bool]]:
    """Every case's finished process, and whether the watched folders were unchanged around the runs."""
    watched = [folders[k] for k in ("run", "data", "bad")]
    before = [tree_hashes(f) for f in watched]
    fill = {k: str(v) for k, v in folders.items()}

    def run(case: Case) -> subprocess.CompletedProcess:
        args = [a.format(**fill) for a in case.args]
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=cli_env(), capture_output=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = dict(zip([c.name for c in CASES], pool.map(run, CASES), strict=True))
    unchanged = [tree_hashes(f) for f in watched] == before
    return {name: (proc, unchanged) for name, proc in procs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line(case: Case, outcomes):
    proc, unchanged = outcomes[case.name]
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert case.needle in err, err
    assert proc.stdout == b"", proc.stdout
    assert unchanged  # no file under the run, corpus or checkpoint folders was written, added or removed


def test_refused_config_creates_no_out_dir(byte_corpus, tmp_path):
    out = tmp_path / "new_run"
    proc = run_cli("train.py", SMOKE_BYTE, f"data.path={byte_corpus}", f"train.out_dir={out}", "train.lr=nan")
    assert proc.returncode == 1 and proc.stderr.decode().startswith("error: train.lr")
    assert list(tmp_path.iterdir()) == []


NOT_UTF8 = b"\xff\xfe caf\xc3 \x80 end"  # stray continuation bytes and a cut character


@pytest.mark.parametrize("source", ["argv", "file"])
def test_byte_model_continues_any_prompt_bytes(byte_run, tmp_path, source):
    """The prompt's exact bytes come first on stdout, then the sample: argv keeps them through
    the surrogateescape round trip, --prompt-file reads them as they are (a NUL included, which
    argv cannot carry)."""
    prompt = NOT_UTF8 if source == "argv" else NOT_UTF8 + b"\x00"
    if source == "argv":
        prompt_args = [b"--prompt", prompt]
    else:
        (tmp_path / "prompt.bin").write_bytes(prompt)
        prompt_args = [b"--prompt-file", bytes(tmp_path / "prompt.bin")]
    cmd = [sys.executable, b"sample.py", bytes(byte_run / "ckpt.pt"), *prompt_args, b"--max-bytes", b"4",
           b"--temperature", b"0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(prompt)
    assert len(proc.stdout) <= len(prompt) + 4 + 1  # at most 4 sampled bytes, then the newline


def test_max_bytes_zero_writes_just_the_prompt(byte_run):
    proc = run_cli("sample.py", byte_run / "ckpt.pt", "--prompt", "abc", "--max-bytes", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"abc\n"


def test_token_model_prompt_must_be_utf8_but_may_end_mid_character():
    """Token models encode text: sample.py refuses a malformed prompt up front, naming the byte."""
    sample = load_cli("sample")
    sample.check_text_prompt("café".encode()[:-1])  # a cut character at the end: the sampler completes it
    with pytest.raises(HLMError, match=r"byte 2: b'\\xff'.*byte models take any bytes"):
        sample.check_text_prompt(b"ab\xffcd")
