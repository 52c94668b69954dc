"""The CLIs end to end as subprocesses (prepare -> train -> eval --json -> sample, for a byte and a
BPE model), and bad inputs that end in one `error:` line and a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ENWIKI, ROOT, SHAKESPEARE, SMOKE_BYTE, assert_one_line_error, load_cli, read_meta, run_cli

from hlm.checkpoint import load_model, tokenizer_from_checkpoint
from hlm.evaluate import encode_stream, evaluate, split_documents


def test_eval_json_matches_library(byte_run, byte_corpus, tmp_path):
    ckpt = byte_run / "ckpt.pt"
    out = tmp_path / "res.json"
    proc = run_cli("eval.py", ckpt, "--data", byte_corpus, "--split", "val", "--json", out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("| checkpoint | model | bits/byte |")
    (row,) = json.loads(out.read_text())
    assert row["bytes"] == read_meta(byte_corpus)["splits"]["val"]["bytes"]
    assert row["tokens"] == row["bytes"]  # byte model: one token per byte
    assert row["ppl_token"] == pytest.approx(2 ** row["bpb"], rel=1e-9)
    assert row["bpb"] < 5.0  # trained: far below the 8 bits of a uniform guess
    model, cfg, saved = load_model(ckpt)
    ids = encode_stream(split_documents(byte_corpus, "val"), None, 0)
    expected = evaluate(model, ids, saved["token_nbytes"], cfg.model.block_size)
    assert row["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)
    assert {"checkpoint", "model", "source", "seconds", "bytes_per_s", "stride"} <= set(row)


def test_eval_byte_and_bpe_models_on_the_same_text(byte_run, bpe_run, tmp_path):
    """--text: each checkpoint encodes the same bytes its own way; both count every byte once."""
    out = tmp_path / "res.json"
    proc = run_cli("eval.py", byte_run / "ckpt.pt", bpe_run / "ckpt.pt", "--text", ENWIKI, "--json", out,
                   "--max-bytes", "6000")
    assert proc.returncode == 0, proc.stderr.decode()
    byte_row, bpe_row = json.loads(out.read_text())
    assert byte_row["bytes"] == bpe_row["bytes"] == 6000
    assert byte_row["tokens"] == 6000 and bpe_row["tokens"] < 6000
    assert "V=512" in bpe_row["model"] and "V=256" in byte_row["model"]
    table = proc.stdout.decode()
    assert table.count("ckpt.pt") == 2


def test_eval_stride(byte_run, tmp_path):
    out = tmp_path / "res.json"
    proc = run_cli("eval.py", byte_run / "ckpt.pt", "--text", SHAKESPEARE, "--max-bytes", "3000", "--stride", "16",
                   "--json", out)
    assert proc.returncode == 0, proc.stderr.decode()
    (row,) = json.loads(out.read_text())
    assert row["stride"] == 16 and row["bytes"] == 3000
    assert "the last 16 targets of each scored" in proc.stdout.decode()


def test_sample_byte_model(byte_run):
    proc = run_cli("sample.py", byte_run / "ckpt.pt", "--prompt", "ROMEO:", "--max-bytes", "40", "--seed", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"ROMEO:") and proc.stdout.endswith(b"\n")
    assert len(proc.stdout) == len(b"ROMEO:") + 40 + 1
    again = run_sample_in_process(byte_run / "ckpt.pt", "--prompt", "ROMEO:", "--max-bytes", "40", "--seed", "1")
    assert again == proc.stdout  # seeded sampling is reproducible


def test_sample_with_cuda_graphs_takes_the_static_decoder(byte_run, bpe_run, capsys):
    """Greedy bytes through the static decoder equal eager decoding's; a family or sampler without one is
    one line. (Off CUDA the static steps run eagerly: BENCHMARKS.md times the graphs.)"""
    args = (byte_run / "ckpt.pt", "--prompt", "ROMEO:", "--max-bytes", "30", "--temperature", "0")
    assert run_sample_in_process(*args, "--cuda-graphs") == run_sample_in_process(*args)
    for ckpt, extra in ((bpe_run / "ckpt.pt", ()), (byte_run / "ckpt.pt", ("--byte-level",))):
        assert load_cli("sample").main([str(ckpt), "--prompt", "x", "--cuda-graphs", *extra]) == 1
        assert_one_line_error(1, capsys.readouterr().err, "--cuda-graphs applies to the native sampling")


def run_sample_in_process(*args) -> bytes:
    import io
    import sys

    buffer = io.BytesIO()
    stdout, sys.stdout = sys.stdout, io.TextIOWrapper(buffer)
    try:
        assert load_cli("sample").main([str(a) for a in args]) == 0
        sys.stdout.flush()
        return buffer.getvalue()
    finally:
        sys.stdout.detach()
        sys.stdout = stdout


def test_sample_bpe_model(bpe_run):
    prompt = "Café — "
    proc = run_cli("sample.py", bpe_run / "ckpt.pt", "--prompt", prompt, "--max-bytes", "30", "--top-k", "5")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(prompt.encode()) and proc.stdout.endswith(b"\n")
    # tokens are cut to --max-bytes; control tokens (the separator) print no bytes
    assert len(prompt.encode()) + 1 < len(proc.stdout) <= len(prompt.encode()) + 30 + 1


def test_bpe_checkpoint_carries_its_tokenizer(bpe_run, bpe_corpus):
    model, cfg, ckpt = load_model(bpe_run / "ckpt.pt")
    tok = tokenizer_from_checkpoint(ckpt)
    assert tok.vocab_size == cfg.model.vocab_size == read_meta(bpe_corpus)["vocab_size"]
    text = ENWIKI.read_bytes()[:2000]
    assert tok.decode(tok.encode(text)) == text
    expected = torch.tensor([len(tok.token_bytes(i)) for i in range(tok.vocab_size)])
    expected[tok.eos_id] = 1  # the document separator counts as one byte
    assert torch.equal(ckpt["token_nbytes"], expected)


# ----- bad inputs, through the real entry points -----

@pytest.fixture(scope="module")
def corrupt_ckpt(tmp_path_factory, byte_run):
    path = tmp_path_factory.mktemp("bad") / "corrupt.pt"
    path.write_bytes((byte_run / "ckpt.pt").read_bytes()[:5000])
    return path


def test_eval_corrupt_checkpoint(corrupt_ckpt):
    proc = run_cli("eval.py", corrupt_ckpt, "--text", SHAKESPEARE)
    assert_one_line_error(proc.returncode, proc.stderr, "corrupt.pt")


def test_sample_corrupt_checkpoint(corrupt_ckpt):
    proc = run_cli("sample.py", corrupt_ckpt, "--prompt", "x")
    assert_one_line_error(proc.returncode, proc.stderr, "corrupt.pt")


def test_prepare_missing_input_cli(tmp_path):
    proc = run_cli("data_prep/prepare.py", "--input", tmp_path / "nope.txt", "--out", tmp_path / "out")
    assert_one_line_error(proc.returncode, proc.stderr, "nope.txt")
    assert not (tmp_path / "out").exists()


def test_train_unknown_key_cli():
    proc = run_cli("train.py", SMOKE_BYTE, "model.n_layers=3")
    assert_one_line_error(proc.returncode, proc.stderr, "model.n_layers")


def run_main(capsys, name: str, *args) -> tuple[int, str]:
    rc = load_cli(name).main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", ["eval", "sample"])
def test_missing_checkpoint(capsys, tmp_path, name):
    extra = ["--text", str(SHAKESPEARE)] if name == "eval" else []
    assert_one_line_error(*run_main(capsys, name, tmp_path / "none.pt", *extra), "not found")


def test_not_an_hlm_checkpoint(capsys, tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    assert_one_line_error(*run_main(capsys, "eval", path, "--text", SHAKESPEARE), "not an hlm checkpoint")


@pytest.mark.parametrize("name", ["eval", "sample"])
def test_cuda_asked_for_without_cuda(capsys, byte_run, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = ["--text", str(SHAKESPEARE)] if name == "eval" else []
    assert_one_line_error(*run_main(capsys, name, byte_run / "ckpt.pt", *extra, "--device", "cuda"), "no CUDA")


def test_eval_missing_text(capsys, byte_run, tmp_path):
    assert_one_line_error(*run_main(capsys, "eval", byte_run / "ckpt.pt", "--text", tmp_path / "none.txt"),
                          "not found")


def test_eval_missing_split(capsys, byte_run, tmp_path):
    assert_one_line_error(*run_main(capsys, "eval", byte_run / "ckpt.pt", "--data", tmp_path), "meta.json")


def test_eval_bad_stride(capsys, byte_run):
    assert_one_line_error(*run_main(capsys, "eval", byte_run / "ckpt.pt", "--text", SHAKESPEARE, "--stride", "999"),
                          "stride")


def test_eval_empty_text(capsys, byte_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_one_line_error(*run_main(capsys, "eval", byte_run / "ckpt.pt", "--text", empty), "empty")


def test_eval_token_model_on_invalid_utf8(capsys, bpe_run, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"valid text \xff\xfe then more")
    assert_one_line_error(*run_main(capsys, "eval", bpe_run / "ckpt.pt", "--text", bad), "UTF-8")


def test_eval_corrupt_meta(capsys, byte_run, tmp_path):
    (tmp_path / "meta.json").write_text("{ not json")
    assert_one_line_error(*run_main(capsys, "eval", byte_run / "ckpt.pt", "--data", tmp_path), "meta.json")


def test_bench_runs_on_cpu(byte_corpus, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = load_cli("bench").main([str(SMOKE_BYTE), f"data.path={byte_corpus}", "--steps", "2", "--warmup", "1",
                                 "--json", str(out)])
    assert rc == 0
    assert "| config | bytes/s |" in capsys.readouterr().out
    row = json.loads(out.read_text())
    assert row["bytes_per_s"] > 0 and row["tokens_per_s"] == row["bytes_per_s"]


def test_bench_profile_splits_the_step_time(byte_corpus, tmp_path, capsys):
    """--profile writes each op's time per step and the kinds it falls into; on CPU the matmuls
    of the smoke GPT are found and the kinds add up to the total."""
    out = tmp_path / "profile.json"
    assert load_cli("bench").main([str(SMOKE_BYTE), f"data.path={byte_corpus}", "--steps", "1", "--warmup", "1",
                                   "--profile", str(out), "--profile-steps", "2"]) == 0
    assert "kernel time per step" in capsys.readouterr().out
    b = json.loads(out.read_text())
    assert b["kinds_ms"]["matmul"] > 0 and "aten::mm" in {k["name"] for k in b["kernels"]}
    assert sum(b["kinds_ms"].values()) == pytest.approx(b["ms_per_step"])
    assert b["row"]["bytes_per_s"] > 0


def test_bench_counts_the_flops_of_the_mode_it_times(byte_corpus, tmp_path, capsys):
    """Patch steps cost about 1/K of a token step: the TFLOP/s uses the patch count in patch mode,
    and a timed span across the patch/token switch is refused."""
    bench, cfg = load_cli("bench"), ROOT / "configs" / "smoke" / "patch_byte_gpt.yaml"
    rows = {}
    for mode, extra in (("patch", []), ("token", ["train.patch_fraction=0"])):
        out = tmp_path / f"{mode}.json"
        assert bench.main([str(cfg), f"data.path={byte_corpus}", *extra, "--steps", "2", "--warmup", "1",
                           "--json", str(out)]) == 0
        rows[mode] = json.loads(out.read_text())
    assert rows["patch"]["mode"] == "patch" and rows["token"]["mode"] == "token"
    flops = {m: r["tflops"] * r["step_s"] for m, r in rows.items()}  # TFLOP per step
    assert 0.15 < flops["patch"] / flops["token"] < 0.4
    assert bench.main([str(cfg), f"data.path={byte_corpus}", "--steps", "30", "--warmup", "1"]) == 1
    assert "switch" in capsys.readouterr().err


def test_eval_model_column_names_each_family():
    from hlm.config import load_config

    describe = load_cli("eval").describe
    assert describe(load_config(ROOT / "configs" / "hourglass_whitespace.yaml")) == "hourglass 2+8+2L/768d whitespace"
    assert describe(load_config(ROOT / "configs" / "hat.yaml")) == "hat 2+12+2L/384-768d"
    assert describe(load_config(ROOT / "configs" / "byte_gpt.yaml")) == "gpt 12L/768d V=256"
