"""data_prep/prepare.py: exact byte round trips, byte counts, input kinds, the
document rule, and bad inputs that fail in one line without leaving half-written folders."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import ENWIKI, ROOT, SHAKESPEARE, assert_one_line_error, prepare, read_meta

from data_prep.prepare import split_by_fraction
from hlm.data import SPLITS, token_byte_lengths
from hlm.evaluate import split_documents
from hlm.tokenizers import load_tokenizer


def split_bytes(folder) -> dict[str, bytes]:
    """Each split's raw bytes, decoded independently of hlm.evaluate (tokens through the tokenizer)."""
    meta = read_meta(folder)
    out = {}
    for name in SPLITS:
        data = np.fromfile(folder / f"{name}.bin", dtype=meta["dtype"])
        if meta["kind"] == "bytes":
            out[name] = data.tobytes()
        else:
            out[name] = load_tokenizer(folder / meta["tokenizer"]).decode(data.tolist())
    return out


@pytest.mark.parametrize("source", [SHAKESPEARE, ENWIKI], ids=["ascii", "utf8"])
def test_bytes_round_trip(tmp_path, source):
    out = tmp_path / "c"
    assert prepare("--input", source, "--out", out) == 0
    meta = read_meta(out)
    raw = source.read_bytes()
    parts = split_bytes(out)
    assert b"".join(parts[s] for s in SPLITS) == raw
    assert all(parts[s] for s in SPLITS)
    assert (meta["kind"], meta["dtype"], meta["vocab_size"], meta["separator_id"]) == ("bytes", "uint8", 256, 0)
    assert meta["source"]["sha256"] == hashlib.sha256(raw).hexdigest()
    for s in SPLITS:
        assert meta["splits"][s]["bytes"] == meta["splits"][s]["tokens"] == len(parts[s])
    assert sum(meta["splits"][s]["bytes"] for s in SPLITS) == len(raw)
    assert "doc_separator" in meta


def test_bpe_round_trip_multibyte(bpe_corpus):
    meta = read_meta(bpe_corpus)
    raw = ENWIKI.read_bytes()
    assert max(raw) >= 0xC0  # the fixture really has multi-byte characters
    parts = split_bytes(bpe_corpus)
    assert b"".join(parts[s] for s in SPLITS) == raw
    assert (meta["kind"], meta["tokenizer_type"], meta["dtype"]) == ("tokens", "bpe", "uint16")
    assert meta["vocab_size"] == load_tokenizer(bpe_corpus / "tokenizer.model").vocab_size
    lengths = token_byte_lengths(meta, bpe_corpus)
    for s in SPLITS:
        ids = np.fromfile(bpe_corpus / f"{s}.bin", dtype=meta["dtype"])
        assert meta["splits"][s]["tokens"] == len(ids)
        assert meta["splits"][s]["bytes"] == len(parts[s]) == int(lengths[ids].sum())
        assert len(ids) < len(parts[s])  # the tokenizer compresses
    assert sum(meta["splits"][s]["bytes"] for s in SPLITS) == len(raw)


def test_unigram_prepares_and_round_trips(tmp_path):
    out = tmp_path / "uni"
    assert prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer", "unigram", "--vocab-size", "400",
                   "--threads", "1") == 0
    meta = read_meta(out)
    assert (meta["kind"], meta["tokenizer_type"]) == ("tokens", "unigram")
    parts = split_bytes(out)
    assert b"".join(parts[s] for s in SPLITS) == SHAKESPEARE.read_bytes()


def test_reuse_a_tokenizer_model(tmp_path, bpe_corpus):
    """--tokenizer-model encodes a new corpus with an existing tokenizer (same ids for the same text)."""
    out = tmp_path / "c"
    assert prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer", "bpe",
                   "--tokenizer-model", bpe_corpus / "tokenizer.model", "--threads", "1") == 0
    assert (out / "tokenizer.model").read_bytes() == (bpe_corpus / "tokenizer.model").read_bytes()
    assert b"".join(split_bytes(out)[s] for s in SPLITS) == SHAKESPEARE.read_bytes()


def test_missing_tokenizer_model(tmp_path, capsys):
    out = tmp_path / "c"
    rc = prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer", "bpe", "--tokenizer-model", tmp_path / "no.model")
    assert_one_line_error(rc, capsys.readouterr().err, "no.model")
    assert not out.exists()


def test_tokenizer_model_needs_its_type(tmp_path, capsys, bpe_corpus):
    model, out = bpe_corpus / "tokenizer.model", tmp_path / "c"
    rc = prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer-model", model)
    assert_one_line_error(rc, capsys.readouterr().err, "--tokenizer-model needs --tokenizer")
    rc = prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer", "unigram", "--tokenizer-model", model)
    assert_one_line_error(rc, capsys.readouterr().err, "is a bpe model, not unigram")
    assert not out.exists()


def test_folder_with_named_splits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = {"train": "train text é\n" * 50, "valid": "valid ✓ text\n" * 5, "test": "test 𝄞 text\n" * 5}
    for name, text in texts.items():
        (src / f"{name}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out) == 0
    parts = split_bytes(out)
    assert parts == {"train": texts["train"].encode(), "val": texts["valid"].encode(), "test": texts["test"].encode()}
    meta = read_meta(out)
    assert all(meta["splits"][s]["documents"] == 1 for s in SPLITS)


def test_folder_of_documents_joined_by_separator(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    docs = [f"document {i}: {'ü' * i}\nline two\n".encode() for i in range(20)]
    for i, doc in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_bytes(doc)
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out) == 0
    parts = split_bytes(out)
    meta = read_meta(out)
    n = {s: meta["splits"][s]["documents"] for s in SPLITS}
    assert n == {"train": 18, "val": 1, "test": 1}
    assert parts["train"] == b"\x00".join(docs[:18])
    assert (parts["val"], parts["test"]) == (docs[18], docs[19])


def write_jsonl(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")


JSONL_TEXTS = [f"Record {i} — naïve café {'∑' * (i % 3)}\nsecond line {i}." for i in range(40)]


def test_jsonl_bytes_documents_separated(tmp_path):
    src = tmp_path / "corpus.jsonl"
    write_jsonl(src, JSONL_TEXTS)
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out) == 0
    meta = read_meta(out)
    docs = [t.encode() for t in JSONL_TEXTS]
    parts = split_bytes(out)
    assert parts["train"] == b"\x00".join(docs[:36])
    assert parts["val"] == b"\x00".join(docs[36:38])
    assert parts["test"] == b"\x00".join(docs[38:])
    assert [meta["splits"][s]["documents"] for s in SPLITS] == [36, 2, 2]
    assert split_documents(out, "train") == docs[:36]


def test_jsonl_tokens_documents_separated_by_eos(tmp_path):
    src = tmp_path / "corpus.jsonl"
    write_jsonl(src, JSONL_TEXTS)
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--threads", "1") == 0
    meta = read_meta(out)
    tok = load_tokenizer(out / "tokenizer.model")
    assert meta["separator_id"] == tok.eos_id
    ids = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    pieces = np.split(ids, np.flatnonzero(ids == tok.eos_id))
    decoded = [tok.decode(p[1 if i else 0:].tolist()) for i, p in enumerate(pieces)]
    assert decoded == [t.encode() for t in JSONL_TEXTS[:36]]
    # the separator counts as one byte: byte and token corpora of one source agree on byte counts
    assert meta["splits"]["train"]["bytes"] == len(b"\x00".join(t.encode() for t in JSONL_TEXTS[:36]))


@pytest.mark.parametrize(("content", "needle"), [
    ('{"text": "a"}\n{"text": null}\n{"text": "b"}\n', "record 1"),
    ('{"text": "a"}\n{"text": \n', "JSON"),
])
def test_jsonl_bad_records(tmp_path, capsys, content, needle):
    src = tmp_path / "corpus.jsonl"
    src.write_text(content)
    out = tmp_path / "c"
    assert_one_line_error(prepare("--input", src, "--out", out), capsys.readouterr().err, needle)
    assert not out.exists()


def test_jsonl_missing_field(tmp_path, capsys):
    src = tmp_path / "corpus.jsonl"
    write_jsonl(src, JSONL_TEXTS)
    assert_one_line_error(prepare("--input", src, "--out", tmp_path / "c", "--text-field", "body"),
                          capsys.readouterr().err, "body")


@pytest.mark.parametrize("text", ["é" * 300, "ab✓" * 200, "𝄞" * 150, "x" * 99 + "€" * 100])
def test_fraction_split_never_cuts_a_character(text):
    """A single long line leaves no newline to cut at; the cut must still fall between characters."""
    data = text.encode()
    parts = split_by_fraction([data], 0.05, 0.05)
    assert b"".join(parts[s][0] for s in SPLITS) == data
    for s in SPLITS:
        parts[s][0].decode("utf-8")  # raises if a character was cut


def test_single_line_utf8_prepares_with_bpe(tmp_path):
    src = tmp_path / "line.txt"
    src.write_text("ça va très bien, merci — " * 60, encoding="utf-8")
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--threads", "1") == 0
    assert b"".join(split_bytes(out)[s] for s in SPLITS) == src.read_bytes()


def test_fraction_split_cuts_at_line_starts():
    data = b"".join(b"line %03d\n" % i for i in range(200))
    parts = split_by_fraction([data], 0.05, 0.05)
    for s in ("val", "test"):
        assert parts[s][0].startswith(b"line ")
    assert parts["train"][0].endswith(b"\n")


# ----- bad inputs: one line, exit 1, nothing written -----

def test_missing_input(tmp_path, capsys):
    out = tmp_path / "c"
    rc = prepare("--input", tmp_path / "missing.txt", "--out", out)
    assert_one_line_error(rc, capsys.readouterr().err, "missing.txt")
    assert not out.exists()


def test_missing_relative_input_is_not_a_hub_name(tmp_path, capsys, monkeypatch):
    """A missing path under an existing folder is reported as missing, not looked up on the Hub."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "c"
    rc = prepare("--input", "tests/fixtures/no_such_file.txt", "--out", out)
    assert_one_line_error(rc, capsys.readouterr().err, "not found")


@pytest.mark.parametrize("content", [b"", b"tiny\n", b"0123456789"], ids=["empty", "one-line", "ten-bytes"])
def test_too_short_corpus(tmp_path, capsys, content):
    src = tmp_path / "small.txt"
    src.write_bytes(content)
    out = tmp_path / "c"
    assert_one_line_error(prepare("--input", src, "--out", out), capsys.readouterr().err, "empty")
    assert not out.exists()


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(prepare("--input", tmp_path / "empty", "--out", tmp_path / "c"), capsys.readouterr().err)


def test_invalid_utf8_with_bpe(tmp_path, capsys):
    src = tmp_path / "bad.txt"
    src.write_bytes(SHAKESPEARE.read_bytes()[:4000] + b"\xff\xfe broken" + SHAKESPEARE.read_bytes()[4000:8000])
    out = tmp_path / "c"
    rc = prepare("--input", src, "--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--threads", "1")
    assert_one_line_error(rc, capsys.readouterr().err, "UTF-8")
    assert not out.exists()


def test_invalid_utf8_is_fine_for_bytes(tmp_path):
    src = tmp_path / "bin.txt"
    data = bytes(range(256)) * 40
    src.write_bytes(data)
    out = tmp_path / "c"
    assert prepare("--input", src, "--out", out) == 0
    assert b"".join(split_bytes(out)[s] for s in SPLITS) == data


def test_tokenizer_that_does_not_round_trip(tmp_path, capsys):
    """U+2581 ('▁') is sentencepiece's own space marker: text containing it cannot decode back exactly."""
    src = tmp_path / "marker.txt"
    src.write_text("".join(f"line {i} with a \u2581 marker\n" for i in range(300)), encoding="utf-8")
    out = tmp_path / "c"
    rc = prepare("--input", src, "--out", out, "--tokenizer", "bpe", "--vocab-size", "300", "--threads", "1")
    assert_one_line_error(rc, capsys.readouterr().err, "round-trip")
    assert not out.exists()


def test_vocab_too_small(tmp_path, capsys):
    out = tmp_path / "c"
    rc = prepare("--input", SHAKESPEARE, "--out", out, "--tokenizer", "bpe", "--vocab-size", "50", "--threads", "1")
    assert_one_line_error(rc, capsys.readouterr().err, "vocab")
    assert not out.exists()


def test_failed_prepare_keeps_existing_folder(tmp_path, capsys):
    out = tmp_path / "c"
    assert prepare("--input", SHAKESPEARE, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "empty.txt"
    bad.write_bytes(b"")
    assert_one_line_error(prepare("--input", bad, "--out", out), capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("marker", [True, False], ids=["marked", "older-output"])
def test_reprepare_replaces_folder_atomically(tmp_path, marker):
    """A previous output (meta.json with the marker, or every key from before it), with boundary targets
    made for the old corpus, is replaced whole."""
    out = tmp_path / "c"
    assert prepare("--input", SHAKESPEARE, "--out", out) == 0
    meta = read_meta(out)
    assert meta["written_by"] == "hlm data_prep/prepare.py"
    if not marker:
        del meta["written_by"]
        (out / "meta.json").write_text(json.dumps(meta))
    (out / "train.boundaries.unigram.bin").write_bytes(b"\x01" * 10)
    (out / "boundaries.unigram.json").write_text("{}")
    assert prepare("--input", ENWIKI, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "train.bin", "val.bin"]
    assert b"".join(split_bytes(out)[s] for s in SPLITS) == ENWIKI.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left beside it
