"""End to end: a tiny token GPT and byte GPT through eval.py --exact-bytes / --ensemble and sample.py
with a prompt that ends mid-word (CLI entry points called in-process)."""

import json
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import sample as sample_cli
import train as train_cli
from data_prep import prepare

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "enwiki_wv_test_head64k.txt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    text = tmp / "corpus.txt"
    text.write_bytes(FIXTURE.read_bytes()[:24000])
    out = {}
    for name, extra in (("bytes", []), ("bpe", ["--tokenizer", "bpe", "--vocab-size", "400"])):
        assert prepare.main(["--input", str(text), "--out", str(tmp / name), "--threads", "1", *extra]) == 0
        vocab = json.loads((tmp / name / "meta.json").read_text())["vocab_size"]
        assert train_cli.main([str(ROOT / "configs/smoke/byte_gpt.yaml"), f"data.path={tmp / name}",
                               f"train.out_dir={tmp / name}_run", f"model.vocab_size={vocab}", "train.max_steps=6",
                               "train.ckpt_interval=6", "eval.interval=6"]) == 0
        out[name] = (tmp / f"{name}_run" / "ckpt.pt", tmp / name)
    return out


def test_eval_exact_bytes_and_ensemble(runs, tmp_path, capsys):
    bpe_ckpt, bpe_data = runs["bpe"]
    byte_ckpt, _ = runs["bytes"]
    js = tmp_path / "out.json"
    assert eval_cli.main([str(bpe_ckpt), str(byte_ckpt), "--data", str(bpe_data), "--split", "val", "--exact-bytes",
                          "--max-bytes", "600", "--ensemble", "mixture", "--workers", "1", "--json", str(js),
                          "--canonical"]) == 0
    rows = json.loads(js.read_text())
    exact = rows[0]["exact"]
    assert exact["docs_skipped"] == 0 and exact["bpb_conv"] <= exact["bpb_canon"] + 1e-9
    phases = exact["seconds_split"]
    assert {"rules", "planning", "masks", "packing", "model_and_scoring"} <= set(phases)
    assert min(phases.values()) >= 0 and abs(sum(phases.values()) - exact["seconds"]) < 1e-6
    assert 0 < exact["forward_seconds"] <= phases["model_and_scoring"] and exact["windows"] >= 1
    plan = exact["planning"]
    assert plan["chunks"] >= 1 and 0 < plan["chunk_seconds_max"] <= plan["chunk_seconds_sum"] <= phases["planning"]
    assert 1 <= plan["texts"] and plan["text_bytes"] <= exact["bytes"]  # distinct segments, planned once
    assert exact["canonical_seconds"] > 0
    assert exact["cost_vs_canonical"] == exact["seconds"] / exact["canonical_seconds"]
    assert abs(exact["bpb_canon_trunk"] - exact["bpb_canon"]) < 1e-5  # canonical scoring on the same windows
    canon = rows[0]["canonical"]
    assert abs(canon["bpb_canon"] - rows[0]["bpb"]) < 1e-5 and canon["tokens"] == rows[0]["tokens"]  # same windows
    assert 0 < canon["bpb_leak"] and canon["bpb_canonicalized"] < canon["bpb_canon"] and canon["masked_targets"] == 0
    assert canon["cost_vs_canonical"] > 0 and 0 < canon["mean_leak"] < 1
    assert canon["bpb_canon_open_end"] <= canon["bpb_canon"]  # a prefix is at least as likely as one tokenization
    assert "exact" not in rows[1] and "canonical" not in rows[1]  # byte model: nothing to convert
    ens = rows[2]
    assert ens["checkpoint"] == "ensemble (mixture)" and len(ens["members_bpb"]) == 2
    assert 0 < ens["bpb"] <= sum(ens["members_bpb"]) / 2 + 1e-9  # Jensen: a mixture beats the mean member
    out = capsys.readouterr().out
    assert "bpb_conv" in out and "model forwards" in out and "bpb_canonicalized" in out


def test_sample_mid_word_prompt(runs, capsysbinary):
    for ckpt in (runs["bpe"][0], runs["bytes"][0]):
        modes = [[], ["--byte-level", "--top-k", "5"]] + [["--canonical-sampling"]] * (ckpt == runs["bpe"][0])
        for extra in modes:
            assert sample_cli.main([str(ckpt), "--prompt", "The hist", "--max-bytes", "12", *extra]) == 0
            out = capsysbinary.readouterr()
            assert out.out.startswith(b"The hist") and len(out.out) <= len(b"The hist") + 12 + 1
            assert b"bytes/s" in out.err


def test_canonical_sampling_needs_token_sampling(runs, capsys):
    for ckpt, extra in ((runs["bytes"][0], []), (runs["bpe"][0], ["--byte-level"])):
        assert sample_cli.main([str(ckpt), "--canonical-sampling", *extra]) == 1
        assert capsys.readouterr().err.startswith("error: --canonical-sampling")


def test_native_byte_sample_ends_at_the_document_separator(runs, capsysbinary, monkeypatch):
    """A byte model's sample stops where its document ends (the separator byte), as a token model's stops
    at EOS: the separator is not written and nothing after it is."""
    from hlm.models.gpt import GPT

    ckpt = torch.load(runs["bytes"][0], map_location="cpu", weights_only=True)
    separator = ckpt["data_meta"]["separator_id"]
    script = [ord("o"), ord("r"), ord("y"), separator, ord("X"), ord("Y")]
    monkeypatch.setattr(GPT, "generate_stream", lambda self, *a, **k: (torch.tensor([i]) for i in script))
    assert sample_cli.main([str(runs["bytes"][0]), "--prompt", "The hist", "--max-bytes", "12"]) == 0
    out = capsysbinary.readouterr()
    assert out.out == b"The history\n" and b"3 bytes" in out.err
