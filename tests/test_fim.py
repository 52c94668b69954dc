"""Fill-in-the-middle: the training transform (round trip, purity, exact resume, sentinels in
byte and token batches), sentinel encode/decode, the cut invariance of exact conversion that
plain token prompting lacks (fp64), and fim_eval.py end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES, QUIET, ROOT, TINY_MODEL, crash_after_save, load_cli

from data_prep import prepare
from hlm.checkpoint import load_checkpoint
from hlm.config import ConfigError, load_config
from hlm.fim import (
    SENTINEL_NAMES,
    FIMTransform,
    Sentinels,
    decode_with_sentinels,
    fim_window,
    rearrange,
    restore_psm,
    restore_spm,
    spm_prompt,
)
from hlm.infilling import (
    Cut,
    TokenFIM,
    byte_fill,
    byte_nll,
    exact_byte_lm,
    exact_fill_and_nll,
    exact_tail,
    native_byte_fill,
    native_byte_lm,
)
from hlm.models.gpt import GPT, GPTConfig
from hlm.tokenizers import BPETokenizer, load_tokenizer
from hlm.trainer import Trainer

CODE = FIXTURES / "cpython_slice"
FIM_BYTE = ROOT / "configs" / "smoke" / "fim_byte_gpt.yaml"
FIM_BPE = ROOT / "configs" / "smoke" / "fim_bpe_gpt.yaml"
S = Sentinels.after(256)


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """The code fixture prepared as bytes and as a sentencepiece BPE corpus (vocab 400)."""
    tmp = tmp_path_factory.mktemp("code")
    for name, extra in (("bytes", []), ("bpe", ["--tokenizer", "bpe", "--vocab-size", "400"])):
        assert prepare.main(["--input", str(CODE), "--out", str(tmp / name), "--threads", "1", *extra]) == 0
    return tmp


def test_prepare_reads_named_jsonl_xz_splits(code, tmp_path, monkeypatch):
    meta = json.loads((code / "bytes" / "meta.json").read_text())
    assert {k: v["documents"] for k, v in meta["splits"].items()} == {"train": 74, "val": 4, "test": 7}
    monkeypatch.setitem(sys.modules, "datasets", None)  # without `datasets`: the standard-library reader
    assert prepare.main(["--input", str(CODE), "--out", str(tmp_path / "b"), "--threads", "1"]) == 0
    for split in ("train", "val", "test"):
        assert (tmp_path / "b" / f"{split}.bin").read_bytes() == (code / "bytes" / f"{split}.bin").read_bytes()


@pytest.mark.parametrize("spm", [False, True])
def test_rearrange_round_trips(spm):
    rng = np.random.default_rng(0)
    for _ in range(50):
        doc = rng.integers(1, 256, size=int(rng.integers(0, 12)))
        lo, hi = sorted(rng.integers(0, len(doc) + 1, size=2))
        out = rearrange(doc, lo, hi, S, spm)
        assert len(out) == len(doc) + 3 and sorted(out[np.isin(out, S.ids)]) == list(S.ids)
        parts = restore_spm(out, S, lo) if spm else restore_psm(out, S)
        assert parts == (doc[:lo].tolist(), doc[lo:hi].tolist(), doc[hi:].tolist())


def test_fim_window_keeps_documents_and_separators():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 256, size=n) for n in (7, 0, 12, 5, 9)]
    window = np.concatenate([np.concatenate([d, [0]]) for d in docs])
    for spm_rate in (0.0, 1.0):
        out = fim_window(window, 0, S, np.random.default_rng(2), 1.0, spm_rate)
        assert len(out) == len(window)
        pieces = np.split(out, np.flatnonzero(out == 0))
        pieces = [p[1:] if i else p for i, p in enumerate(pieces)][: len(docs)]
        for doc, piece in zip(docs[:-1], pieces[:-1], strict=True):  # the last one is cut at the window end
            if not len(doc):
                assert not len(piece)
                continue
            if spm_rate:  # <PRE> <SUF> suffix <MID> prefix+middle
                i_mid = piece.tolist().index(S.middle)
                assert piece[:2].tolist() == [S.prefix, S.suffix]
                assert np.concatenate([piece[i_mid + 1 :], piece[2:i_mid]]).tolist() == doc.tolist()
            else:
                prefix, middle, suffix = restore_psm(piece, S)
                assert prefix + middle + suffix == doc.tolist()
    assert np.array_equal(fim_window(window, 0, S, np.random.default_rng(2), 0.0, 0.5), window)


def test_transform_is_a_pure_function_of_the_step():
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 5, size=(4, 40)))  # separators (0) are frequent
    fim = FIMTransform(256, 0, 0.5, 0.5, seed=7, rank=0)
    a = fim(x, 3, 1)
    assert torch.equal(a, fim(x, 3, 1)) and torch.equal(a, FIMTransform(256, 0, 0.5, 0.5, 7, 0)(x, 3, 1))
    assert not torch.equal(a, fim(x, 4, 1)) and not torch.equal(a, FIMTransform(256, 0, 0.5, 0.5, 7, 1)(x, 3, 1))
    assert a.max() <= 258 and (a >= 256).any()


def fim_config(path, data, out, *extra):
    return load_config(path, [f"data.path={data}", f"train.out_dir={out}", *QUIET, *extra])


def test_byte_batches_carry_sentinels_and_val_stays_plain(code, tmp_path):
    trainer = Trainer(fim_config(FIM_BYTE, code / "bytes", tmp_path, *TINY_MODEL, "model.block_size=64"))
    assert np.fromfile(code / "bytes" / "train.bin", dtype=np.uint8).size == trainer.batches.train_split.n_tokens
    x, _ = trainer.batches.train(0, 0)
    assert x.shape == (8, 65) and int(x.max()) in (256, 257, 258)
    assert trainer.batches.token_nbytes.tolist()[256:] == [0, 0, 0]
    val = trainer.batches.val_split.windows(np.array([0]), 65)
    assert int(val.max()) < 256


def test_fim_needs_room_for_sentinels(code, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size >= 259"):
        Trainer(fim_config(FIM_BYTE, code / "bytes", tmp_path, *TINY_MODEL, "model.vocab_size=256"))


def test_fim_resume_is_bit_exact(code, tmp_path):
    args = [*TINY_MODEL, "model.block_size=64", "train.max_steps=4", "train.ckpt_interval=2", "eval.interval=0",
            "train.batch_size=4"]
    Trainer(fim_config(FIM_BYTE, code / "bytes", tmp_path / "straight", *args)).fit()
    with crash_after_save(2):
        Trainer(fim_config(FIM_BYTE, code / "bytes", tmp_path / "resumed", *args)).fit()
    Trainer(fim_config(FIM_BYTE, code / "bytes", tmp_path / "resumed", *args)).fit()
    a, b = (load_checkpoint(tmp_path / r / "ckpt.pt")["model"] for r in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sentinels_in_encode_and_decode(code):
    tok = load_tokenizer(code / "bpe" / "tokenizer.model")
    s = Sentinels.after(tok.vocab_size)
    prefix, suffix = b"def f(x):\n    return x", b"\n\nprint(f(<MID>))\n"
    assert max(tok.encode(suffix)) < tok.vocab_size  # sentinel names in text stay text
    ids = spm_prompt(tok.encode(prefix), tok.encode(suffix), s, start=tok.eos_id)
    assert ids[:3] == [tok.eos_id, s.prefix, s.suffix] and ids.count(s.middle) == 1
    text = decode_with_sentinels(ids[1:], tok.decode, s)
    assert text == SENTINEL_NAMES[0] + SENTINEL_NAMES[1] + suffix + SENTINEL_NAMES[2] + prefix
    psm = rearrange(np.array(tok.encode(prefix + suffix)), 3, 5, s, spm=False)
    assert b"".join(tok.decode(p) for p in restore_psm(psm, s)) == prefix + suffix


def test_exact_conversion_is_cut_invariant_plain_prompting_is_not():
    """On a toy BPE and a random fp64 GPT: for cuts k of one text x (the middle is x[k:]), the
    score of the prompt plus the score of the middle given it is the same for every k under exact
    conversion (to 1e-9), but not under plain token prompting when k falls inside a token."""
    tok = BPETokenizer.from_merges([(b"a", b"b"), (b"ab", b"c"), (b"c", b"a"), (b" ", b"ab")])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size + 3, block_size=64, n_layer=1, n_head=2, d_model=16,
                          init_std=0.3)).double().eval()
    fim = TokenFIM(model, tok, tok.eos_id, tok.vocab_size)
    text, suffix = b"abcab cabc ab", b"ca\n"
    boundaries, pos = set(), 0
    for t in tok.encode(text):
        pos += len(tok.token_bytes(t))
        boundaries.add(pos)
    exact, plain, inside = [], [], []
    for k in range(1, len(text)):
        cut = Cut(0, text[:k], text[k:], b"", text[:k], suffix)
        exact.append(exact_byte_lm(fim, cut).logprob(cut.prefix) - byte_nll(exact_byte_lm(fim, cut), cut))
        plain.append(-fim._score(fim.context(cut), tok.encode(cut.prefix)) - fim.plain_nll(cut))
        inside.append(k not in boundaries)
    assert any(inside) and not all(inside)
    assert max(exact) - min(exact) < 1e-9
    cut = Cut(0, text[:4], text[4:9], b"", text[:4], suffix)  # one prefill for both: same as two fresh ones
    fill, nll = exact_fill_and_nll(exact_byte_lm(fim, cut), cut, 6)
    assert fill == byte_fill(exact_byte_lm(fim, cut), cut, 6)
    assert nll == pytest.approx(byte_nll(exact_byte_lm(fim, cut), cut), rel=1e-12)  # fp64 summation order
    plain_edge = [p for p, i in zip(plain, inside, strict=True) if not i]
    plain_inside = [p for p, i in zip(plain, inside, strict=True) if i]
    assert max(plain_edge) - min(plain_edge) < 1e-9  # cuts at token edges: the canonical tokens, all alike
    assert min(abs(p - plain_edge[0]) for p in plain_inside) > 0.1


def test_exact_tail_equals_the_whole_prefix(code):
    """Feeding the prefix up to its last cover-restart point as canonical tokens changes nothing
    (fp64, a sentencepiece BPE): the same NLL of the middle to 1e-9 and the same greedy fill, with
    far fewer model calls; cuts inside tokens and inside words included."""
    tok = load_tokenizer(code / "bpe" / "tokenizer.model")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size + 3, block_size=256, n_layer=1, n_head=2, d_model=16,
                          init_std=0.3)).double().eval()
    fim = TokenFIM(model, tok, tok.eos_id, tok.vocab_size)
    text = b"def area(width, height):\n    return width * height  # rectangle\n\nprint(area(2, 3))\n"
    for k, m in ((40, 47), (43, 52), (50, 51), (57, 70)):
        cut = Cut(0, text[:k], text[k:m], text[m:], text[:k], text[m:])
        whole = exact_byte_lm(fim, cut)
        tail, short = exact_tail(fim, cut)
        fill, nll = exact_fill_and_nll(whole, cut, 10)
        fill_tail, nll_tail = exact_fill_and_nll(tail, short, 10)
        assert len(short.prefix) < 12 and short.middle == cut.middle
        assert fill_tail == fill and abs(nll_tail - nll) < 1e-9
        assert tail.model_calls < whole.model_calls / 2


def test_cached_byte_fill_matches_the_uncached_reference():
    """The KV-cached greedy fill of a FIM byte GPT equals byte_fill over NativeByteLM (fp64), for fills
    cut at max_bytes and fills ended by the separator; a prompt that would overflow the context
    takes the uncached path."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=259, block_size=96, n_layer=2, n_head=2, d_model=32,
                          init_std=0.05)).double().eval()
    texts = [(b"def f(x):\n    ret", b"urn x\n", b"\n\nprint(f(1))\n"), (b"import os\n", b"im", b"port sys\n"),
             (b"a = [", b"1, 2", b"]\n"), (b"", b"x", b"y = 2\n"), (b"#" * 85, b"!", b"\n")]
    cuts = [Cut(0, p, m, s, p, s) for p, m, s in texts]

    def check(max_bytes: int) -> list[bytes]:
        refs = [byte_fill(native_byte_lm(model, c), c, max_bytes) for c in cuts]
        assert [native_byte_fill(model, c, max_bytes) for c in cuts] == refs
        return refs

    assert all(len(f) == 12 for f in check(12))
    with torch.no_grad():  # the separator (END) now beats b"o" wherever b"o" would win with a positive logit
        model.head.weight[0] = 1.5 * model.head.weight[ord("o")]
    refs = check(12)
    assert any(0 < len(f) < 12 for f in refs[:4]) and any(len(f) == 12 for f in refs)
    assert len(cuts[-1].suffix) + len(cuts[-1].prefix) + 4 + 12 > model.cfg.block_size  # the uncached path


def test_fim_eval_cli_end_to_end(code, tmp_path, capsysbinary, monkeypatch):
    train = load_cli("train")
    runs = {}
    for name, cfg in (("bytes", FIM_BYTE), ("bpe", FIM_BPE)):
        runs[name] = tmp_path / name
        assert train.main([str(cfg), f"data.path={code / name}", f"train.out_dir={runs[name]}", *QUIET,
                           "train.max_steps=6", "train.ckpt_interval=6", "eval.interval=6"]) == 0
    capsysbinary.readouterr()
    out = tmp_path / "fim.json"
    fim_eval = load_cli("fim_eval")
    assert fim_eval.main(["--token", str(runs["bpe"] / "ckpt.pt"), "--byte", str(runs["bytes"] / "ckpt.pt"),
                          "--data", str(code / "bytes"), "--cuts", "4", "--max-middle", "6", "--prefix-bytes", "48",
                          "--suffix-bytes", "24", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["plain", "healing", "exact", "cut", "byte"]
    assert rows[3]["middle_bpb"] >= rows[2]["middle_bpb"] - 1e-9  # the ratio keeps the leak that exact removes
    for r in rows:
        assert r["cuts"] == 4 and 0 <= r["exact_match"] <= 1 and 0 <= r["parse_rate"] <= 1 and r["middle_bpb"] > 0
    printed = capsysbinary.readouterr().out
    assert b"| exact |" in printed and printed.count(b"| method |") == 1 and b"of the cuts fall inside" in printed

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(fim_eval.infilling, "native_byte_fill", killed)  # killed in the byte method: plain is kept
    with pytest.raises(KeyboardInterrupt):
        fim_eval.main(["--token", str(runs["bpe"] / "ckpt.pt"), "--byte", str(runs["bytes"] / "ckpt.pt"),
                       "--data", str(code / "bytes"), "--cuts", "2", "--max-middle", "6", "--prefix-bytes", "48",
                       "--suffix-bytes", "24", "--device", "cpu", "--json", str(out), "--methods", "plain", "byte"])
    assert [r["method"] for r in json.loads(out.read_text())] == ["plain"]
    assert b"| plain | 2 |" in capsysbinary.readouterr().out
    assert fim_eval.main(["--byte", str(runs["bpe"] / "ckpt.pt"), "--device", "cpu"]) == 1
    sample = load_cli("sample")  # left-to-right sampling from FIM models: a sentinel ends the sample
    for name in runs:
        for seed in range(3):
            assert sample.main([str(runs[name] / "ckpt.pt"), "--prompt", "def ", "--max-bytes", "300",
                                "--seed", str(seed), "--device", "cpu"]) == 0
