"""End to end: a tiny token GPT and byte GPT through eval.py --exact-bytes / --ensemble and sample.py
with a prompt that ends mid-word."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "enwiki_wv_test_head64k.txt"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=False, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    text = tmp / "corpus.txt"
    text.write_bytes(FIXTURE.read_bytes()[:24000])
    out = {}
    for name, extra in (("bytes", []), ("bpe", ["--tokenizer", "bpe", "--vocab-size", "400"])):
        r = run("data_prep/prepare.py", "--input", str(text), "--out", str(tmp / name), "--threads", "1", *extra)
        assert r.returncode == 0, r.stderr.decode()
        vocab = json.loads((tmp / name / "meta.json").read_text())["vocab_size"]
        r = run("train.py", "configs/smoke/byte_gpt.yaml", f"data.path={tmp / name}", f"train.out_dir={tmp / name}_run",
                f"model.vocab_size={vocab}", "train.max_steps=6", "train.ckpt_interval=6", "eval.interval=6")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        out[name] = (tmp / f"{name}_run" / "ckpt.pt", tmp / name)
    return out


def test_eval_exact_bytes_and_ensemble(runs, tmp_path):
    bpe_ckpt, bpe_data = runs["bpe"]
    byte_ckpt, _ = runs["bytes"]
    js = tmp_path / "out.json"
    r = run("eval.py", str(bpe_ckpt), str(byte_ckpt), "--data", str(bpe_data), "--split", "val", "--exact-bytes",
            "--max-bytes", "600", "--ensemble", "mixture", "--json", str(js))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rows = json.loads(js.read_text())
    exact = rows[0]["exact"]
    assert exact["docs_skipped"] == 0 and exact["bpb_conv"] <= exact["bpb_canon"] + 1e-9
    assert "exact" not in rows[1]  # byte model: nothing to convert
    ens = rows[2]
    assert ens["checkpoint"] == "ensemble (mixture)" and len(ens["members_bpb"]) == 2
    assert 0 < ens["bpb"] <= sum(ens["members_bpb"]) / 2 + 1e-9  # Jensen: a mixture beats the mean member
    assert b"bpb_conv" in r.stdout


def test_sample_mid_word_prompt(runs):
    for ckpt in (runs["bpe"][0], runs["bytes"][0]):
        for extra in ([], ["--byte-level", "--top-k", "5"]):
            r = run("sample.py", str(ckpt), "--prompt", "The hist", "--max-bytes", "12", *extra)
            assert r.returncode == 0, r.stderr.decode()[-2000:]
            assert r.stdout.startswith(b"The hist") and len(r.stdout) <= len(b"The hist") + 12 + 1
