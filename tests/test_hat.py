"""HAT: causality, a proper next-byte distribution equal to teacher forcing (also at word ends
and in overflow), cached generation, training on the fixture, compile == eager."""

from pathlib import Path

import pytest
import torch

from data_prep.prepare import main as prepare_main
from hlm.config import ConfigError, load_config
from hlm.models import build_model
from hlm.models.generation import decoding_attention, sample_next
from hlm.models.hat import EOW, HAT, HATConfig, _WordDecoder
from hlm.next_word import main as next_word_main
from hlm.next_word import next_word_accuracy, word_hits
from hlm.splitter import next_byte_starts, split_words, utf8_allowed_next, word_starts
from hlm.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ENWIKI = ROOT / "tests" / "fixtures" / "enwiki_wv_test_head64k.txt"
TEXT = "Gary Kildall (May 19, 1942 – July 11, 1994) was an American. Naïve 日本語 text\n\nfoo bar.".encode()


def tiny(**kw) -> HAT:
    torch.manual_seed(0)
    cfg = dict(block_size=48, max_words=16, max_word_bytes=8, d_byte=16, n_head_byte=2, n_enc_layer=1,
               n_dec_layer=1, d_model=16, n_head=2, n_layer=2)
    return HAT(HATConfig(**{**cfg, **kw})).double().eval()


def windows(length: int) -> torch.Tensor:
    """Rows that start mid-word and mid-character, plus random bytes."""
    g = torch.Generator().manual_seed(0)
    rows = [list(TEXT[:length]), list(TEXT[7 : 7 + length]), list(TEXT[38 : 38 + length]),
            torch.randint(0, 256, (length,), generator=g).tolist()]
    return torch.tensor(rows)


def test_smoke_config_builds_a_hat():
    cfg = load_config(ROOT / "configs" / "smoke" / "hat.yaml")
    assert isinstance(build_model(cfg.model), HAT)
    with pytest.raises(ConfigError, match="max_words"):
        HAT(HATConfig(max_words=1))
    with pytest.raises(ConfigError, match="model.max_word_bytes"):
        HAT(HATConfig(max_word_bytes=3))


@pytest.mark.parametrize("byte_window", [0, 5])  # 5: local attention in the byte encoder and decoder
@pytest.mark.parametrize("max_words", [64, 6])  # 64: no overflow; 6: most of each window is in overflow
def test_causal(max_words, byte_window):
    model = tiny(max_words=max_words, byte_window=byte_window)
    idx = windows(49)
    with torch.no_grad():
        base = model(idx).nll
        for j in (1, 5, 17, 30, 48):
            other = idx.clone()
            other[:, j] = (other[:, j] + 101) % 256
            assert torch.equal(model(other).nll[:, : j - 1], base[:, : j - 1])


def test_byte_window_is_local_attention():
    """Same weights (the window adds none): predictions agree while each byte still sees every byte
    before it (the first `window` positions) and differ after."""
    idx = windows(49)
    with torch.no_grad():
        full, local = tiny()(idx).nll, tiny(byte_window=5)(idx).nll
    torch.testing.assert_close(local[:, :5], full[:, :5], rtol=0, atol=1e-12)
    assert (local[:, 5:] - full[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("byte_window", [0, 5])
@pytest.mark.parametrize("max_words", [64, 6])
def test_next_logprobs_proper_and_equal_teacher_forcing(max_words, byte_window):
    model = tiny(max_words=max_words, byte_window=byte_window)
    idx = windows(49)
    with torch.no_grad():
        out = model(idx)
        lp = model.next_logprobs(idx[:, :-1])
    assert lp.shape == (4, 48, 256)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 48, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(-lp.gather(2, idx[:, 1:, None]).squeeze(-1), out.nll, rtol=0, atol=1e-10)
    starts = word_starts(idx, 8)[:, 1:]
    assert starts.any() and (~starts).any()  # both word-starting and word-continuing targets are checked
    assert (out.metrics["overflow_frac"] > 0.5) == (max_words == 6)
    assert (out.metrics["overflow_frac"] == 0) == (max_words == 64)


@pytest.mark.parametrize("prefix", [b"an American", b"an American.", "Naïve 日".encode(), "日".encode()[:2], b"a  "])
def test_every_next_byte_equals_teacher_forcing(prefix):
    """p(b | prefix) from next_logprobs == exp(-nll) of prefix + b, for all 256 b: at word ends (EOW +
    first byte), inside words, inside a multi-byte character, and after a run of spaces."""
    model = tiny()
    x = torch.tensor([list(prefix)])
    ext = torch.cat([x.expand(256, -1), torch.arange(256)[:, None]], dim=1)
    with torch.no_grad():
        lp = model.next_logprobs(x)[0, -1]
        nll = model(ext).nll[:, -1]
    torch.testing.assert_close(lp, -nll, rtol=0, atol=1e-10)


class RowReference:
    """The per-row sampler HAT had before rows were decoded together (one row, its own caches,
    Python-level steps): the reference that batched sampling must reproduce at batch 1."""

    def __init__(self, model: HAT, ids: list[int]):
        cfg = model.cfg
        self.model = model
        x = torch.tensor([ids])
        word, word_first, _ = model._split(x, with_mask=False)
        self.enc_cache = model.encoder.new_cache(1, cfg.block_size, "cpu", torch.double)
        self.dec_cache = model.decoder.new_cache(1, cfg.block_size, "cpu", torch.double)
        self.backbone_cache = model.backbone.new_cache(1, cfg.max_words, "cpu", torch.double)
        h, h_norm = model._encode(x, self.enc_cache)
        self.n_words = int(word[0, -1])
        self.current = h_norm[:, int(word_first[0, -1]) :]
        self.table = model.first_word.to(h.dtype)
        if self.n_words:
            slot = torch.where(word < self.n_words, word, cfg.max_words)
            pooled = model.pool(h_norm, slot, cfg.max_words)[:, : self.n_words]
            self.table = torch.cat([self.table, model.backbone_norm(model.backbone(pooled, self.backbone_cache))], 1)
        self.logits = model.head(model._decode(h, self.table[:, word[0]], self.dec_cache)[0, -1])

    def end_word(self) -> torch.Tensor:
        m = self.model
        slot = torch.zeros(self.current.shape[:2], dtype=torch.long)
        out = m.backbone_norm(m.backbone(m.pool(self.current, slot, 1), self.backbone_cache))
        self.table = torch.cat([self.table, out], dim=1)
        self.n_words += 1
        self.current = None
        return m.head(m._first_state(out[0, 0]))[:256]

    def advance(self, byte: int) -> None:
        m = self.model
        h, h_norm = m._encode(torch.tensor([[byte]]), self.enc_cache)
        self.current = h_norm if self.current is None else torch.cat([self.current, h_norm], dim=1)
        self.logits = m.head(m._decode(h, self.table[:, self.n_words : self.n_words + 1], self.dec_cache)[0, -1])


@torch.no_grad()
def reference_stream(model: HAT, prompt: list[int], max_new: int, temperature: float, top_k, generator, utf8: bool):
    """(byte, log-prob) pairs of the per-row sampler, window restarts included."""
    cfg = model.cfg
    ids = model._fit_window(prompt[-cfg.block_size :])
    state = RowReference(model, ids)
    for _ in range(max_new):
        starts = next_byte_starts(torch.tensor([ids]), cfg.max_word_bytes)[0, -1]
        allowed = torch.tensor(utf8_allowed_next(bytes(ids))) if utf8 else torch.ones_like(starts)
        starts_ok = starts & allowed
        within = state.logits.masked_fill(torch.cat([starts | ~allowed, ~starts_ok.any()[None]]), float("-inf"))
        choice = int(sample_next(within[None], temperature, top_k, generator)[0])
        logp = float(torch.log_softmax(within, 0)[choice])
        if choice == EOW:
            first = state.end_word().masked_fill(~starts_ok, float("-inf"))
            choice = int(sample_next(first[None], temperature, top_k, generator)[0])
            logp += float(torch.log_softmax(first, 0)[choice])
        yield choice, logp
        ids.append(choice)
        if len(ids) > cfg.block_size:
            ids = model._fit_window(ids[-(cfg.block_size // 2) :])
            state = RowReference(model, ids)
        else:
            state.advance(choice)
            if state.n_words >= cfg.max_words - 1:
                ids = model._fit_window(ids[-(len(ids) // 2) :])
                state = RowReference(model, ids)


@pytest.mark.parametrize("byte_window, max_words, temperature, top_k, utf8, prompt", [
    (0, 16, 1.0, None, False, b"Gary Kildall was"),
    (5, 6, 0.8, 20, True, b"\xff\x80 ab\xc3"),  # invalid UTF-8; few word slots: restarts at the word cap
    (5, 16, 1.0, None, False, bytes(range(250, 256)) + b"\xe6\x97"),
    (0, 16, 0.0, None, True, "Naïve 日".encode()),
])
def test_batch_1_draws_as_the_per_row_sampler(byte_window, max_words, temperature, top_k, utf8, prompt):
    """One row through the batched sampler gives the per-row sampler's bytes and log-probs for the same
    random stream, over 110 bytes (window restarts at 48 bytes, and at the word cap)."""
    model = tiny(byte_window=byte_window, max_words=max_words)
    ref = list(reference_stream(model, list(prompt), 110, temperature, top_k, torch.Generator().manual_seed(3), utf8))
    new = list(model._sample(torch.tensor([list(prompt)]), 110, temperature, top_k,
                             torch.Generator().manual_seed(3), utf8))
    assert [b for b, _ in ref] == [int(b[0]) for b, _ in new]
    torch.testing.assert_close(torch.tensor([lp for _, lp in ref], dtype=torch.float64),
                               torch.cat([lp for _, lp in new]), rtol=0, atol=1e-9)
    assert len(set(b for b, _ in ref)) > 10  # a sampled stream, not one repeated byte


def decoder_logprobs(dec) -> torch.Tensor:
    """The next-byte log-probs [B, 256] of the batched decoder: p_dec(b) for a byte that continues the
    word, p_dec(EOW) * p_first(b) for one that starts the next (`close_words` writes no state)."""
    starts = dec.next_starts()
    within = dec.logits.masked_fill(torch.cat([starts, torch.zeros_like(starts[:, :1])], 1), float("-inf"))
    within = within.log_softmax(-1)
    rows = torch.arange(len(starts))
    first = dec.first_logits(dec.close_words(rows)).masked_fill(~starts, float("-inf")).log_softmax(-1)
    return torch.where(starts, within[:, EOW:] + first, within[:, :EOW])


@pytest.mark.parametrize("byte_window, max_words", [(0, 16), (5, 6)])
def test_batched_decoder_equals_teacher_forcing(byte_window, max_words):
    """At every step the batched decoder's distribution of each row equals next_logprobs of that row's
    own window (fp64, 1e-10), over 100 bytes of text and of random bytes: rows end words at different
    bytes and restart their windows at different bytes (past block_size, and at the word cap)."""
    model = tiny(byte_window=byte_window, max_words=max_words)
    g = torch.Generator().manual_seed(0)
    text = list(TEXT * 2)
    seq = torch.tensor([text[:110], text[38:148], torch.randint(0, 256, (110,), generator=g).tolist()])
    with torch.no_grad(), decoding_attention():
        dec = _WordDecoder(model, seq[:, :10])
        restarts, ends = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        for t in range(10, seq.size(1)):
            lp = decoder_logprobs(dec)
            for r in range(3):
                window = dec.ids[r : r + 1, : int(dec.n_bytes[r])]
                assert torch.equal(window[0], seq[r, t - window.size(1) : t])
                torch.testing.assert_close(lp[r], model.next_logprobs(window)[0, -1], rtol=0, atol=1e-10)
            ended = dec.next_starts().gather(1, seq[:, t, None]).squeeze(1)
            ends += ended
            if ended.any():
                dec.end_words(torch.nonzero(ended).flatten())
            before = dec.n_bytes.clone()
            dec.push(seq[:, t])
            restarts += dec.n_bytes <= before
    assert (restarts >= 2).all() and ends.min() > 10
    if max_words == 6:  # the word cap restarts rows at their own bytes
        assert len(set(restarts.tolist())) > 1


def close_and_decode(text: bytes) -> str:
    """Decode text as UTF-8 after closing its last character, if open."""
    while utf8_allowed_next(text) != utf8_allowed_next(b""):
        text += bytes([utf8_allowed_next(text).index(True)])
    return text.decode("utf-8")


def test_generated_text_is_utf8():
    """With utf8=True every continuation is a valid UTF-8 prefix (here from an untrained model, over
    window restarts: 120 new bytes with a 48-byte context), for every row of a batch, also after a
    prompt that is not UTF-8 (a prompt's invalid tail counts as a character boundary)."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    out = model.generate(b"Hello, w", 120, generator=g, utf8=True)
    assert len(out) == 120
    close_and_decode(b"Hello, w" + out)
    prompts = [b"ab cd", b"\xff\x80 ab", b"xy \xe6\x97"]  # valid; invalid bytes; an open character
    rows = model.generate(torch.tensor([list(p) for p in prompts]), 60, generator=g, utf8=True)
    assert rows.shape == (3, 65)
    close_and_decode(bytes(rows[0].tolist()))
    close_and_decode(b"\xe6\x97" + bytes(rows[2, 5:].tolist()))  # continues the open character
    close_and_decode(bytes(rows[1, 5:].tolist()))


def test_generation_under_bf16_autocast_keeps_the_caches_dtype():
    """Generation as eval.py and the benchmarks run it (fp32 weights and caches, bf16 activations under
    autocast): every cache and state write takes bf16 values into fp32 tensors (an index_put of another
    dtype raises). Past a window restart, at batch 3, sampling and greedy."""
    model = tiny(byte_window=8).float()
    prompt = windows(20)[:3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = model.generate(prompt, 40, generator=torch.Generator().manual_seed(0))
        greedy = model.generate(prompt, 40, temperature=0)
    assert sampled.shape == greedy.shape == (3, 60) and int(sampled.max()) < 256 and int(greedy.max()) < 256
    assert torch.equal(sampled[:, :20], prompt) and torch.equal(greedy[:, :20], prompt)


@pytest.mark.parametrize("byte_window", [0, 8])
def test_compile_matches_eager(byte_window):
    """One graph (fullgraph: no breaks, no host syncs) with the same outputs and gradients."""
    torch.manual_seed(0)
    model = HAT(HATConfig(block_size=32, max_words=12, max_word_bytes=8, d_byte=16, n_head_byte=2, n_enc_layer=1,
                          n_dec_layer=1, byte_window=byte_window, d_model=16, n_head=2, n_layer=1))
    idx = windows(33)
    eager = model(idx)
    eager.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(idx)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=0, atol=1e-5)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_loss_falls_on_fixture(tmp_path):
    data = tmp_path / "data"
    prepare_main(["--input", str(ENWIKI), "--out", str(data)])
    cfg = load_config(ROOT / "configs" / "smoke" / "hat.yaml",
                      [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=30",
                       "eval.interval=0", "log.tensorboard=false", "log.interval=5"])
    train(cfg)
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.75 * losses[0]
    assert all("overflow_frac" in r for r in records if r["kind"] == "train")


def oracle_logprobs(x: torch.Tensor) -> torch.Tensor:
    """Log-probs that put (almost) all mass on the true next byte; a space after the last byte."""
    nxt = torch.cat([x[:, 1:], torch.full_like(x[:, :1], 0x20)], dim=1)
    return torch.nn.functional.one_hot(nxt, 256).double().mul(10).log_softmax(-1)


def test_next_word_hits_counts_exact_greedy_words():
    text = b"Hello, world! The cat sat on it.\n\nEnd of story"
    x = torch.tensor([list(text)])
    words = split_words(text)
    n_scored = len(words) - 2  # not the first word (no known start), not the last (no known end)
    lp = oracle_logprobs(x)
    assert [int(v) for v in word_hits(lp, x)] == [n_scored, n_scored]
    # a wrong byte inside " cat" and a missing end after " sat" (greedy would continue the word)
    wrong = lp.clone()
    cat = text.index(b"cat")
    wrong[0, cat, ord("o")] = 20.0  # after " c" the model prefers "o"
    sat_end = text.index(b"sat") + 2
    wrong[0, sat_end, ord("s")] = 20.0  # after " sat" it prefers "s" (continues the word)
    assert [int(v) for v in word_hits(wrong, x)] == [n_scored - 2, n_scored]
    # an error in the first, unscored word changes nothing
    first = lp.clone()
    first[0, 1, ord("z")] = 20.0
    assert [int(v) for v in word_hits(first, x)] == [n_scored, n_scored]


def test_next_word_accuracy_ignores_fim_sentinels():
    """A FIM byte model (vocabulary 259) is scored on its next-byte distribution given that a byte
    follows: sentinels, however likely, neither crash the count nor win the greedy word."""
    class Oracle(torch.nn.Module):
        def __init__(self, sentinels: int):
            super().__init__()
            self.sentinels = sentinels

        def next_logprobs(self, x):
            lp = oracle_logprobs(x)
            return torch.cat([lp, torch.full((*lp.shape[:2], self.sentinels), 5.0, dtype=lp.dtype)], -1)

    ids = torch.tensor(list(b"The cat sat on the mat, and the dog sat on the log. " * 4))
    plain = next_word_accuracy(Oracle(0), ids, block=64)
    assert plain["next_word_acc"] == 1.0 and plain["words"] > 10
    assert next_word_accuracy(Oracle(3), ids, block=64) == plain


def test_next_word_cli(tmp_path, capsys):
    data = tmp_path / "data"
    prepare_main(["--input", str(ENWIKI), "--out", str(data)])
    cfg = load_config(ROOT / "configs" / "smoke" / "hat.yaml",
                      [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2",
                       "eval.interval=0", "log.tensorboard=false"])
    train(cfg)
    assert next_word_main([str(tmp_path / "run" / "ckpt.pt"), "--data", str(data), "--max-bytes", "2000"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert 0.0 <= float(row[2]) <= 1.0 and int(row[3].replace(",", "")) > 100
