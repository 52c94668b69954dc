"""Bits-per-byte accounting, checked by hand on tiny cases: a stub model with known
NLL per target over a token vocabulary whose tokens cover different numbers of bytes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import QUIET, SMOKE_BYTE, TINY_MODEL, read_meta

from hlm.config import load_config
from hlm.data import DataError, eval_windows
from hlm.evaluate import encode_stream, evaluate, split_documents
from hlm.models.base import ModelOutput
from hlm.tokenizers import load_tokenizer
from hlm.trainer import Trainer

LN2 = math.log(2)


class StubModel(torch.nn.Module):
    """nll[b, t] = table[idx[b, t+1]]: a known cost per target id, whatever the context."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.double())
        self.windows: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        self.windows.extend(idx)
        nll = self.table[idx[:, 1:]]
        return ModelOutput(nll.mean(), nll, {})


def scored_targets(windows) -> list[int]:
    return [t for start, length, n in windows for t in range(start + length - n, start + length)]


@pytest.mark.parametrize("n_tokens", [2, 3, 9, 10, 11, 33, 100])
@pytest.mark.parametrize(("block", "stride"), [(8, None), (8, 8), (8, 3), (8, 1), (1, None), (5, 4)])
def test_eval_windows_score_every_target_once(n_tokens, block, stride):
    windows = eval_windows(n_tokens, block, stride)
    assert sorted(scored_targets(windows)) == list(range(1, n_tokens))
    for start, length, n in windows:
        assert 0 <= start and start + length <= n_tokens
        assert 1 <= n <= length - 1 <= block
        assert length == min(block + 1, start + length)  # full context unless the window starts at 0
    if stride is not None:
        assert all(n <= stride for _, _, n in windows[1:])


def test_eval_windows_rejects_bad_stride():
    with pytest.raises(DataError, match="stride"):
        eval_windows(100, 8, 9)


# id:          0 (separator)  1    2    3
TOKEN_BYTES = torch.tensor([1, 2, 3, 5])
TOKEN_NLL = torch.tensor([0.5, 1.0, 1.5, 2.0])
STREAM = torch.tensor([0, 1, 2, 3, 3, 1, 0, 2])
# targets 1 2 3 3 1 0 2: nll 1.0+1.5+2.0+2.0+1.0+0.5+1.5 = 9.5 nats over 2+3+5+5+2+1+3 = 21 bytes, 7 tokens
HAND_BPB = 9.5 / (LN2 * 21)


@pytest.mark.parametrize(("block", "stride", "batch_size"), [(3, None, 8), (3, None, 1), (4, 2, 2), (7, None, 8),
                                                               (20, None, 8), (3, 1, 3)])
def test_evaluate_by_hand(block, stride, batch_size):
    model = StubModel(TOKEN_NLL)
    res = evaluate(model, STREAM, TOKEN_BYTES, block, stride, batch_size)
    assert res["bytes"] == 21 and res["tokens"] == 7
    assert res["bpb"] == pytest.approx(HAND_BPB, rel=1e-12)
    assert res["ppl_token"] == pytest.approx(math.exp(9.5 / 7), rel=1e-12)
    assert all(len(w) <= block + 1 for w in model.windows)
    assert res["stride"] == (stride or block)


def test_evaluate_empty_stream():
    with pytest.raises(DataError, match="empty"):
        evaluate(StubModel(TOKEN_NLL), torch.tensor([0]), TOKEN_BYTES, 4)


def test_encode_stream_layout():
    ids = encode_stream([b"ab", b"c"], None, 0)
    assert ids.tolist() == [0, 97, 98, 0, 99]


def tiny_trainer(tmp_path, corpus, *overrides) -> Trainer:
    vocab = read_meta(corpus)["vocab_size"]
    cfg = load_config(SMOKE_BYTE, [f"data.path={corpus}", f"train.out_dir={tmp_path / 'run'}",
                                   f"model.vocab_size={vocab}", *TINY_MODEL, *QUIET, *overrides])
    return Trainer(cfg)


def test_trainer_validate_by_hand(tmp_path, bpe_corpus):
    """Trainer.validate on a token corpus: sum(nll) / (ln 2 * bytes of the scored tokens)."""
    meta = read_meta(bpe_corpus)
    trainer = tiny_trainer(tmp_path, bpe_corpus, "eval.batches=3", "eval.batch_size=4")
    table = torch.linspace(0.1, 3.0, meta["vocab_size"], dtype=torch.float64)
    trainer.raw_model = StubModel(table)
    res = trainer.validate()

    tok = load_tokenizer(bpe_corpus / "tokenizer.model")
    val = np.fromfile(bpe_corpus / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    block = 32
    starts = [k * block for k in range(12) if k * block + block + 1 <= len(val)]
    assert len(starts) == 12
    targets = np.concatenate([val[s + 1 : s + block + 1] for s in starts])
    nll = float(table[torch.from_numpy(targets)].sum())
    nbytes = sum(len(tok.token_bytes(int(t))) for t in targets)
    assert nbytes > len(targets)  # tokens cover several bytes on average
    assert res["bytes"] == nbytes
    assert res["bpb"] == pytest.approx(nll / (LN2 * nbytes), rel=1e-12)
    assert res["loss"] == pytest.approx(nll / len(targets), rel=1e-12)


@pytest.mark.parametrize("corpus_name", ["byte_corpus", "bpe_corpus"])
def test_every_byte_of_a_split_is_counted_once(request, corpus_name):
    """Scoring a split's stream (one context-only separator first) counts exactly its raw bytes."""
    corpus = request.getfixturevalue(corpus_name)
    meta = read_meta(corpus)
    tok = load_tokenizer(corpus / meta["tokenizer"]) if meta["tokenizer"] else None
    docs = split_documents(corpus, "val")
    ids = encode_stream(docs, tok, meta["separator_id"])
    nbytes = torch.ones(meta["vocab_size"], dtype=torch.int64)
    if tok is not None:
        nbytes = torch.tensor([len(tok.token_bytes(i)) for i in range(tok.vocab_size)])
        nbytes[meta["separator_id"]] = 1
    res = evaluate(StubModel(torch.ones(meta["vocab_size"])), ids, nbytes, 32, 12)
    assert res["bytes"] == meta["splits"]["val"]["bytes"]
    assert res["tokens"] == len(ids) - 1


@pytest.fixture(scope="module")
def byte_model_and_stream(byte_corpus):
    cfg = load_config(SMOKE_BYTE, TINY_MODEL)
    torch.manual_seed(0)
    from hlm.models import build_model

    model = build_model(cfg.model).eval()
    ids = encode_stream(split_documents(byte_corpus, "val"), None, 0)[:700]
    return model, ids


def test_evaluate_real_model_by_hand(byte_model_and_stream):
    """Non-overlapping windows of a real byte model, summed by hand; the last, partial window
    scores its targets with a full context."""
    model, ids = byte_model_and_stream
    block = 32
    n_full, tail = divmod(len(ids) - 1, block)
    assert tail
    with torch.no_grad():
        nll = sum(model(ids[k * block : (k + 1) * block + 1][None]).nll.double().sum().item() for k in range(n_full))
        nll += model(ids[-block - 1 :][None]).nll[:, -tail:].double().sum().item()
    res = evaluate(model, ids, torch.ones(256, dtype=torch.int64), block)
    assert res["bytes"] == len(ids) - 1
    assert res["bpb"] == pytest.approx(nll / (LN2 * (len(ids) - 1)), rel=1e-6)


def test_stride_changes_context_not_bytes(byte_model_and_stream):
    model, ids = byte_model_and_stream
    ones = torch.ones(256, dtype=torch.int64)
    plain = evaluate(model, ids, ones, 32)
    same = evaluate(model, ids, ones, 32, stride=32)
    slid = evaluate(model, ids, ones, 32, stride=8)
    assert plain["bpb"] == same["bpb"]
    assert plain["bytes"] == slid["bytes"] == len(ids) - 1
    assert slid["bpb"] != plain["bpb"]


def read_records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_training_log_bpb_consistent(byte_run, bpe_run):
    """Byte models: bpb = loss / ln 2. Token models: bpb = loss * tokens / (ln 2 * bytes) < loss / ln 2."""
    for rec in read_records(byte_run, "train"):
        assert rec["bpb"] == pytest.approx(rec["loss"] / LN2, rel=1e-9)
    for rec in read_records(bpe_run, "train"):
        assert rec["bpb"] == pytest.approx(rec["loss"] / LN2 * rec["tokens_per_s"] / rec["bytes_per_s"], rel=1e-9)
        assert rec["bpb"] < rec["loss"] / LN2
