"""The locally canonical model (hlm/bytes/canonical.py), prefix probabilities at a cut and canonical
sampling, against brute force in fp64 on toy BPEs, a small sentencepiece BPE and the GPT-2 / cl100k
regex pretokenizers."""

from pathlib import Path

import pytest
import torch
from conftest import random_merges

from hlm import LN2
from hlm.bytes import ByteLM
from hlm.bytes.canonical import canonicalized_stream, incomplete_char, open_end_correction, stream_keys
from hlm.bytes.covers import ConversionRules
from hlm.bytes.plan import mask_key_code
from hlm.evaluate import encode_stream, score_stream
from hlm.models.gpt import GPT, GPTConfig
from hlm.tokenizers import BPETokenizer, SentencePieceTokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOY_DOCS = [b"abcabcaab", b"cccbbaac", b"a", b"bacabbbacca"]
SP_DOCS = [b"The cat's  whiskers, 1234.\n", "Caf\u00e9 \u65e5\u672c \U0001f600 x\u0416".encode(), b"a  b"]


@pytest.fixture(scope="module")
def sp_bpe(tmp_path_factory):
    from data_prep.prepare import train_sentencepiece

    text = (FIXTURES / "enwiki_wv_test_head64k.txt").read_text()[:20000]
    path = tmp_path_factory.mktemp("sp") / "bpe.model"
    train_sentencepiece([text], "bpe", 400, path, 1)
    return SentencePieceTokenizer(path)


def tiny_gpt(vocab: int, block: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, d_model=16, init_std=0.5)
    return GPT(cfg).double().eval()


def brute_incomplete_char(data: bytes) -> bytes:
    """The trailing incomplete UTF-8 character of data (b"" on a boundary), by brute force."""
    for k in (1, 2, 3):
        tail = data[-k:]
        if len(tail) == k:
            try:
                tail.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.start == 0 and e.reason == "unexpected end of data":
                    return tail
    return b""


class MaskedModel:
    """`ids -> logits` of a GPT with the tokens that may not follow the path masked out (its end of
    text always allowed): a model that leaks nothing to the rules' invalid next tokens."""

    def __init__(self, model: GPT, tok, end_id: int):
        self.model, self.tok, self.end_id = model, tok, end_id
        self.rules = ConversionRules(tok)

    def allowed(self, path: list[int]) -> torch.Tensor:
        last = None if len(path) == 1 or path[-1] == self.end_id else path[-1]
        mask = self.rules.next_mask(last, brute_incomplete_char(self.tok.decode(path[1:]))).clone()
        mask[self.end_id] = True
        return mask

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(ids)[0, -1]
        return logits.masked_fill(~self.allowed(ids[0].tolist()), float("-inf"))[None, None]


def per_doc_canonicalized(model, tok, doc: bytes, end_id: int) -> dict:
    ids = torch.tensor([end_id] + tok.encode(doc) + [end_id])
    nbytes = torch.tensor([max(len(tok.token_bytes(i)), 1) for i in range(tok.vocab_size)])
    return canonicalized_stream(model, ids, tok, end_id, nbytes, model.cfg.block_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canonicalized_equals_conv_of_the_masked_model_on_toy_bpes(seed):
    tok = BPETokenizer.from_merges(random_merges(seed, n=9))
    model = tiny_gpt(tok.vocab_size, seed=seed)
    masked = MaskedModel(model, tok, tok.eos_id)
    below = 0
    for doc in TOY_DOCS:
        res = per_doc_canonicalized(model, tok, doc, tok.eos_id)
        conv = -ByteLM(masked, tok, start_id=tok.eos_id).logprob(doc, eot=True)
        assert abs(res["nll_canonicalized"] - conv) < 1e-9
        assert res["nll_canonicalized"] <= res["nll_canon"] + 1e-12 and res["masked_targets"] == 0
        below += res["nll_canonicalized"] < res["nll_canon"] - 1e-6
    assert below == len(TOY_DOCS)  # a random model leaks at every position


def test_canonicalized_equals_conv_of_the_masked_model_on_sentencepiece(sp_bpe):
    """Byte-fallback pieces make keys with an incomplete character (日本😀Ж are not pieces)."""
    model = tiny_gpt(sp_bpe.vocab_size, seed=3)
    masked = MaskedModel(model, sp_bpe, sp_bpe.eos_id)
    for doc in SP_DOCS:
        res = per_doc_canonicalized(model, sp_bpe, doc, sp_bpe.eos_id)
        conv = -ByteLM(masked, sp_bpe, start_id=sp_bpe.eos_id).logprob(doc, eot=True)
        assert abs(res["nll_canonicalized"] - conv) < 1e-9
        assert res["nll_canonicalized"] < res["nll_canon"] and res["masked_targets"] == 0


def test_stream_keys_carry_the_incomplete_character(sp_bpe):
    ids = encode_stream(SP_DOCS + [b"\xd0\x96\xd0\x96 \xf0\x9f\x98\x80"], sp_bpe, sp_bpe.eos_id)
    codes = stream_keys(ids.numpy(), sp_bpe, sp_bpe.eos_id, ConversionRules(sp_bpe))
    text, expect = b"", []
    for t in ids.tolist():
        text = b"" if t == sp_bpe.eos_id else text + sp_bpe.token_bytes(t)
        expect.append(mask_key_code(None if t == sp_bpe.eos_id else t, brute_incomplete_char(text)))
    assert codes.tolist() == expect
    assert sum(c & 0xFFFFFFFF != 0 for c in expect) >= 5  # 日, 本, 😀 (twice the first bytes), Ж...


def test_stream_windows_and_bpb_match_plain_scoring(sp_bpe):
    """On the windows of eval's canonical scoring (several per document), bpb_canon is its bpb."""
    model = tiny_gpt(sp_bpe.vocab_size, block=8, seed=1)
    ids = encode_stream(SP_DOCS + [b"in th"], sp_bpe, sp_bpe.eos_id)
    nbytes = torch.tensor([max(len(sp_bpe.token_bytes(i)), 1) for i in range(sp_bpe.vocab_size)])
    for stride in (None, 3):
        plain = score_stream(model, ids, nbytes, 8, stride)
        res = canonicalized_stream(model, ids, sp_bpe, sp_bpe.eos_id, nbytes, 8, stride, batch_size=3, chunk_rows=5)
        assert res["tokens"] == plain["tokens"] and res["bytes"] == plain["bytes"]
        assert abs(res["bpb_canon"] - plain["nll"] / (LN2 * plain["bytes"])) < 1e-9
        assert 0 < res["bpb_leak"] == pytest.approx(res["bpb_canon"] - res["bpb_canonicalized"])
        assert 0 < res["mean_leak"] < 1 and 0 < res["share_leak_above_1pct"] <= 1
    model = tiny_gpt(sp_bpe.vocab_size, block=64, seed=1)  # one window: the last document sees the others
    sep = len(ids) - 1 - ids.tolist()[::-1].index(sp_bpe.eos_id)
    blm = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id, context=ids[:sep].tolist())
    blm.goto(b"in th")
    expect = cover_total(blm) - blm._logq[blm.tracker.exact[0]]
    assert open_end_correction(model, ids, sp_bpe, sp_bpe.eos_id, 64) == pytest.approx(expect, abs=1e-9)
    assert expect > 0  # "in th" ends inside a word: longer tokens starting with " th" count too


@pytest.fixture(scope="module", params=["gpt2", "cl100k_base"])
def regex_tok(request):
    shared = FIXTURES / "tokenizers"
    return load_tokenizer(shared / "gpt2" if request.param == "gpt2" else shared / "tiktoken" / "cl100k_base.tiktoken")


def test_gpt2_never_masks_a_canonical_token():
    tok = load_tokenizer(FIXTURES / "tokenizers" / "gpt2")
    model = tiny_gpt(tok.vocab_size, seed=2)
    for doc in ["a  b\t\n\n  c", "I'VE 12345 caf\u00e9 \U0001f44d\u200d x"]:
        res = per_doc_canonicalized(model, tok, doc.encode(), tok.eos_id)
        assert res["masked_targets"] == 0 and res["nll_canonicalized"] <= res["nll_canon"]


class MaskedGPT(torch.nn.Module):
    """`MaskedModel` with the hlm GPT interface `cut_logprobs` calls (a KV cache, then nodes with an attention
    mask over it and positions): a trunk row's path is its prefix; a chain node's is read off its mask."""

    def __init__(self, model: GPT, tok, end_id: int):
        super().__init__()
        self.model, self.cfg, self.transformer = model, model.cfg, model.transformer
        self.masked = MaskedModel(model, tok, end_id)

    def logits(self, ids, cache, attn_mask=None, positions=None):
        out = self.model.logits(ids, cache, attn_mask=attn_mask, positions=positions)
        if attn_mask is None:  # the trunks
            self.trunk = ids
            paths = [[ids[b, : i + 1] for i in range(ids.size(1))] for b in range(ids.size(0))]
        else:
            keys, keep = torch.cat([self.trunk, ids], 1), attn_mask[:, 0] == 0  # additive: 0 where it may attend
            paths = [[keys[b, keep[b, i]] for i in range(ids.size(1))] for b in range(ids.size(0))]
        return torch.stack([torch.stack([out[b, i].masked_fill(~self.masked.allowed(path.tolist()), float("-inf"))
                                         for i, path in enumerate(row)]) for b, row in enumerate(paths)])


def check_cut_equals_conversion(tok, model, docs):
    """At every cut of every document: log P(prefix) from `cut_logprobs` == the sum of the conversion's
    next-byte log-probs up to the cut, for a model that leaks nothing; and canonical(doc + end) minus
    it == the conversion's log-prob of the rest and the end."""
    from hlm.bytes.cut import cut_logprobs

    end = tok.eos_id
    masked, rules = MaskedGPT(model, tok, end), ConversionRules(tok)
    for doc in docs:
        rows = ByteLM(MaskedModel(model, tok, end), tok, start_id=end).prefix_logprobs(doc)
        per_byte = rows[torch.arange(len(doc) + 1), torch.tensor(list(doc) + [256])]
        full = tok.encode(doc)
        for cut in range(1, len(doc) + 1):
            res = cut_logprobs(masked, rules, end, doc[:cut], full, end)
            assert abs(res["prefix"] - float(per_byte[:cut].sum())) < 1e-9
            assert abs(res["text"] - res["prefix"] - float(per_byte[cut:].sum())) < 1e-9
            assert res["canonical_prefix"] >= res["text"] - 1e-12  # a prefix of the canonical path


def test_prefix_at_a_cut_equals_the_conversion_on_toy_bpes():
    for seed in (0, 1):
        tok = BPETokenizer.from_merges(random_merges(seed, n=9))
        check_cut_equals_conversion(tok, tiny_gpt(tok.vocab_size, seed=seed), TOY_DOCS[:2])


def test_prefix_at_a_cut_equals_the_conversion_on_sentencepiece(sp_bpe):
    """Cuts inside multi-byte characters (byte-fallback pieces) included."""
    check_cut_equals_conversion(sp_bpe, tiny_gpt(sp_bpe.vocab_size, seed=4), [SP_DOCS[1], b"a cat's"])


def cover_total(blm: ByteLM) -> float:
    """log of the total weight of `blm.covers()` (per anchor range, not token by token)."""
    n, terms = len(blm.tracker.text), []
    for a in blm.tracker.anchors:
        lo, hi = blm.index.strict_range(blm.tracker.remainder(a))
        if blm.tracker.trie.pos[a] == n:
            terms.append(torch.tensor(blm._logq[a], dtype=torch.float64))
        elif lo < hi:
            terms.append(blm._logq[a] + blm._sorted_probs(a)[lo:hi].sum().log())
    return float(torch.logsumexp(torch.stack(terms), 0))


def test_prefix_at_a_cut_on_regex_tokenizers(regex_tok):
    """Lookahead pretokenizers (several exact nodes at some cuts): log P(prefix) from one forward equals
    the total weight of the covers the byte-by-byte tracker finds (those prompt-boundary sampling draws
    from), on any model."""
    from hlm.bytes.cut import cut_logprobs

    tok = regex_tok
    model = tiny_gpt(tok.vocab_size, seed=2)
    rules, blm = ConversionRules(tok), ByteLM(model, tok, start_id=tok.eos_id)
    doc = "a  b\t\n\n  c caf\u00e9".encode()
    several = 0
    for cut in (3, 4, 7, 9, len(doc) - 3, len(doc) - 1, len(doc)):  # mid-word, whitespace runs, mid-character
        res = cut_logprobs(model, rules, tok.eos_id, doc[:cut], tok.encode(doc), tok.eos_id)
        blm.goto(doc[:cut])
        assert abs(res["prefix"] - cover_total(blm)) < 1e-9
        several += len(blm.tracker.exact) > 1
    assert several >= 1


def test_prefix_at_a_cut_under_autocast(sp_bpe):
    """The cut under bf16 autocast (its additive mask in the attention's dtype) stays within bf16 rounding of
    the fp32 result (0.05 nats over a dozen tokens; a mask that let a node see the wrong positions is off by
    far more on this sharp model)."""
    from hlm.bytes.cut import cut_logprobs

    tok = sp_bpe
    model = tiny_gpt(tok.vocab_size, seed=3).float()
    rules = ConversionRules(tok)
    doc = b"the cat sat on the mat"
    for cut in (5, 9, len(doc) - 2):
        exact = cut_logprobs(model, rules, tok.eos_id, doc[:cut], tok.encode(doc), tok.eos_id)
        bf16 = cut_logprobs(model, rules, tok.eos_id, doc[:cut], tok.encode(doc), tok.eos_id,
                            autocast=torch.autocast("cpu", torch.bfloat16))
        for key in ("prefix", "canonical_prefix", "text"):
            assert abs(bf16[key] - exact[key]) < 0.05


def test_fim_cut_nll_is_the_telescoped_ratio(sp_bpe):
    """TokenFIM.cut_nll == log P_v(prefix) - log P_v(prefix + middle, end) from the byte-by-byte cover state
    after the FIM prompt; never below the conversion's renormalised NLL (exact method); the batched
    `cut_nlls` of all cuts gives the same values."""
    from hlm.infilling import Cut, TokenFIM, exact_byte_lm, exact_fill_and_nll

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=sp_bpe.vocab_size + 3, block_size=128, n_layer=1, n_head=2, d_model=16,
                          init_std=0.3)).double().eval()
    fim = TokenFIM(model, sp_bpe, sp_bpe.eos_id, sp_bpe.vocab_size)
    text = "def area(w):\n    return w * w  # caf\u00e9\n".encode()
    cuts = [Cut(0, text[:k], text[k:m], text[m:], text[:k], text[m:])  # inside words, tokens and a character
            for k, m in ((9, 15), (20, 21), (35, 38), (36, len(text)))]
    for cut, batched in zip(cuts, fim.cut_nlls(cuts, batch_size=3), strict=True):
        blm = exact_byte_lm(fim, cut)
        blm.goto(cut.prefix)
        at_prefix = cover_total(blm)
        blm.goto(cut.prefix + cut.middle)
        expect = at_prefix - float(blm.unnormalized_scores()[256])
        assert abs(fim.cut_nll(cut) - expect) < 1e-9
        assert abs(batched - expect) < 1e-9
        assert fim.cut_nll(cut) >= exact_fill_and_nll(exact_byte_lm(fim, cut), cut, 0)[1] - 1e-9


def test_cuts_in_a_batch_equal_cuts_alone(sp_bpe, monkeypatch):
    """Cuts of different lengths scored together (right-padded trunks in batches sharing one KV cache, or
    one cache per batch; chains of different counts; contexts; with and without an end; planned between
    the trunk batches or given; a cache grown for the chains) give each cut's values alone, to fp64
    rounding; `text` equals canonical scoring of the same tokens; plans made in two worker processes equal
    plans made here."""
    from hlm.bytes import cut
    from hlm.bytes.cut import CutRequest, canonical_logprobs_batch, cut_logprobs, cut_logprobs_batch, plan_cuts

    tok, end = sp_bpe, sp_bpe.eos_id
    model = tiny_gpt(tok.vocab_size, block=96, seed=6)
    rules = ConversionRules(tok)
    doc = SP_DOCS[0] + SP_DOCS[1]
    requests = [CutRequest(doc[:cut], tok.encode(doc[: cut + extra]), end if extra else None, context)
                for cut, extra, context in ((4, 0, []), (2, 5, [7, 8]), (len(SP_DOCS[0]) + 3, 3, [5]),
                                            (len(doc), 0, [9, 10, 11]), (11, 21, []), (17, 3, [6]))]
    plans = plan_cuts(rules, end, requests, workers=2)
    assert [p.ids for p in plans] == [p.ids for p in plan_cuts(rules, end, requests)]
    batch = cut_logprobs_batch(model, rules, end, requests, plans=plans, batch_size=3)  # two batches, one cache
    groups = cut_logprobs_batch(model, rules, end, requests, plans=plans, batch_size=2, cache_bytes=1)  # 3 caches
    planned_inline = cut_logprobs_batch(model, rules, end, requests, batch_size=4)
    monkeypatch.setattr(cut, "CHAIN_ROOM", 0)  # no slots for the chains until their count is known
    grown = cut_logprobs_batch(model, rules, end, requests, batch_size=3)
    assert len({r["extra_positions"] for r in batch}) > 1
    canonical = canonical_logprobs_batch(model, [[*r.context, end, *r.text_tokens] for r in requests],
                                         [len(r.context) + 1 for r in requests], [r.end_id for r in requests],
                                         batch_size=2)
    monkeypatch.undo()
    for r, text, *got in zip(requests, canonical, batch, groups, planned_inline, grown, strict=True):
        alone = cut_logprobs(model, rules, end, r.prefix, r.text_tokens, r.end_id, r.context)
        for key in ("prefix", "canonical_prefix", "text"):
            assert all(abs(g[key] - alone[key]) < 1e-9 for g in got)
        assert abs(got[0]["text"] - text) < 1e-9


def draw(blm: ByteLM, canonical: bool, n_tokens: int, seed: int) -> list[int]:
    from hlm.bytes.sampling import canonical_token_stream
    from hlm.models.generation import sample_next

    gen = torch.Generator().manual_seed(seed)
    path = [blm.start_id]
    stream = canonical_token_stream(blm, path, 1.0, None, gen) if canonical else iter(
        lambda: int(sample_next(blm.runner.logprobs(path)[None], 1.0, None, gen)[0]), None)
    ids = []
    for t in stream:
        if t == blm.eos_id or len(ids) == n_tokens:
            break
        ids.append(t)
        path.append(t)
    return ids


def test_canonical_sampling_gives_canonical_sequences_on_a_toy_bpe():
    tok = BPETokenizer.from_merges(random_merges(3, n=12))
    model = tiny_gpt(tok.vocab_size, seed=5)
    support = torch.tensor([set(tok.token_bytes(i)) <= set(b"abc") for i in range(tok.vocab_size)])
    support[tok.eos_id] = True  # the tokens over the merges' alphabet: their pairs are often not canonical
    blm = ByteLM(lambda ids: model.logits(ids).masked_fill(~support, float("-inf")), tok, start_id=tok.eos_id)
    for seed in range(30):
        ids = draw(blm, True, 12, seed)
        assert tok.encode(tok.decode(ids)) == ids
    assert any(tok.encode(tok.decode(ids)) != ids for ids in (draw(blm, False, 12, s) for s in range(30)))


def test_canonical_sampling_gives_canonical_sequences_on_sentencepiece(sp_bpe):
    """Byte pieces only where a character needs them, completed before the end (or cut at the limit)."""
    blm = ByteLM(tiny_gpt(sp_bpe.vocab_size, seed=6), sp_bpe, start_id=sp_bpe.eos_id)
    for seed in range(10):
        ids = draw(blm, True, 15, seed)
        while ids and incomplete_char(sp_bpe.decode(ids)):  # stopped inside a character by the limit
            ids.pop()
        assert sp_bpe.encode(sp_bpe.decode(ids)) == ids


def test_canonical_sampling_from_a_prompt_ending_mid_word(sp_bpe):
    from hlm.bytes import sample_prompt_boundary

    blm = ByteLM(tiny_gpt(sp_bpe.vocab_size, seed=7), sp_bpe, start_id=sp_bpe.eos_id)
    for seed in range(5):
        out = b"".join(sample_prompt_boundary(blm, b"The hist", 40, generator=torch.Generator().manual_seed(seed),
                                              canonical=True))
        assert len(out) <= 40


def test_canonical_sampling_on_gpt2_stays_a_prefix_of_an_encoding():
    from hlm.bytes.covers import PROBES

    tok = load_tokenizer(FIXTURES / "tokenizers" / "gpt2")
    blm = ByteLM(tiny_gpt(tok.vocab_size, seed=8), tok, start_id=tok.eos_id)
    for seed in range(4):
        ids = draw(blm, True, 8, seed)
        while ids and incomplete_char(tok.decode(ids)):
            ids.pop()
        text = tok.decode(ids)
        assert any(tok.encode(text + z.encode())[: len(ids)] == ids for z in PROBES)


def test_ids_past_the_tokenizer_are_masked(sp_bpe):
    """A model with more ids than the tokenizer (FIM sentinels, padding): their mass counts as leak."""
    model = tiny_gpt(sp_bpe.vocab_size + 3, seed=9)
    with torch.no_grad():
        model.head.weight[sp_bpe.vocab_size :] *= 40  # most of the mass on the three extra ids
    res = per_doc_canonicalized(model, sp_bpe, SP_DOCS[0], sp_bpe.eos_id)
    assert res["masked_targets"] == 0 and res["mean_leak"] > 0.5
    assert res["nll_canonicalized"] < res["nll_canon"] - 10
