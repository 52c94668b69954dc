"""bench.py's MFU: which peak it divides by, and bad --peak-flops values refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE_BYTE, assert_one_line_error, load_cli

from hlm.flops import peak_flops


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                            ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2.25e15),
                                            ("NVIDIA GeForce GTX 1080", None)])
def test_datasheet_peak_is_looked_up_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
    assert peak_flops(torch.device("cpu")) is None


def bench(byte_corpus, tmp_path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "bench.json"
    rc = load_cli("bench").main([str(SMOKE_BYTE), f"data.path={byte_corpus}", "--steps", "1", "--warmup", "1",
                                 "--json", str(out), *extra])
    return rc, json.loads(out.read_text()) if out.exists() else None


def test_mfu_is_against_the_given_peak(byte_corpus, tmp_path, capsys):
    rc, row = bench(byte_corpus, tmp_path, "--peak-flops", "2e12")
    assert rc == 0
    assert "MFU (of 2 TFLOP/s, --peak-flops)" in capsys.readouterr().out
    assert row["peak_flops"] == 2e12 and row["peak_source"] == "--peak-flops"
    assert row["mfu"] == pytest.approx(row["tflops"] / 2, rel=1e-12)


def test_no_mfu_without_a_known_peak(byte_corpus, tmp_path):
    rc, row = bench(byte_corpus, tmp_path)
    assert rc == 0 and row["mfu"] is None and row["peak_source"] == "datasheet"


@pytest.mark.parametrize(("value", "needle"), [("fast", "--peak-flops"), ("0", "--peak-flops"),
                                               ("-1e12", "--peak-flops"), ("measure", "CUDA")])
def test_bad_peak_is_refused(byte_corpus, tmp_path, capsys, value, needle):
    rc, row = bench(byte_corpus, tmp_path, f"--peak-flops={value}")
    assert row is None
    assert_one_line_error(rc, capsys.readouterr().err, needle)
