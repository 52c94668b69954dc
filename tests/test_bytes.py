"""Exactness of the byte-level conversion on toy BPEs, brute force in fp64."""

import itertools
import math
import random

import pytest
import torch
from conftest import random_merges

from hlm.bytes import ByteLM, Ensemble, MissingCoverError, NativeByteLM, as_byte_lm
from hlm.bytes.merge_tables import merge_tables
from hlm.tokenizers import BPETokenizer

ALPHABET = b"abc"
MAX_LEN = 6


def markov_source(seed: int) -> dict[bytes, float]:
    """p(x) over strings of length <= MAX_LEN: a Markov chain with stop probability 0.15 (forced at MAX_LEN)."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.rand(len(ALPHABET) + 1, len(ALPHABET), generator=g, dtype=torch.float64) + 0.2
    trans = trans / trans.sum(1, keepdim=True)
    probs = {}
    for n in range(MAX_LEN + 1):
        for x in itertools.product(range(len(ALPHABET)), repeat=n):
            p, prev = 1.0, len(ALPHABET)
            for c in x:
                p *= 0.85 * float(trans[prev, c])
                prev = c
            probs[bytes(ALPHABET[c] for c in x)] = p * (0.15 if n < MAX_LEN else 1.0)
    return probs


class OracleLM(torch.nn.Module):
    """q(t | context) from the token trie of encode(x) + [EOS] weighted by p(x); `leak` mixes in uniform mass."""

    def __init__(self, tok: BPETokenizer, source: dict[bytes, float], leak: float = 0.0):
        super().__init__()
        self.tok, self.leak = tok, leak
        self.mass: dict[tuple[int, ...], float] = {}
        for x, p in source.items():
            seq = tuple(tok.encode(x)) + (tok.eos_id,)
            for k in range(len(seq) + 1):
                self.mass[seq[:k]] = self.mass.get(seq[:k], 0.0) + p
        self.support = torch.tensor([set(tok.token_bytes(i)) <= set(ALPHABET) for i in range(tok.vocab_size)])
        self.support[[i for i in range(tok.vocab_size) if not tok.token_bytes(i)]] = False
        self.support[tok.eos_id] = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ctx = tuple(ids[0, 1:].tolist())
        total = self.mass.get(ctx, 0.0)
        q = torch.zeros(self.tok.vocab_size, dtype=torch.float64)
        if total > 0:
            for t in range(self.tok.vocab_size):
                q[t] = self.mass.get(ctx + (t,), 0.0) / total
        uniform = self.support.double() / self.support.sum()
        q = (1 - self.leak) * q + self.leak * uniform if total > 0 else uniform
        return q.log().expand(1, ids.size(1), -1)


def source_conditional(source: dict[bytes, float], s: bytes) -> torch.Tensor:
    """p(b | s) for b in the alphabet and end, from the source (indexed like next_byte_logprobs)."""
    out = torch.zeros(257, dtype=torch.float64)
    for x, p in source.items():
        if x.startswith(s):
            out[x[len(s)] if len(x) > len(s) else 256] += p
    return out / out.sum()


def canonical_nll(lm: OracleLM, tok: BPETokenizer, x: bytes) -> float:
    seq = [tok.eos_id] + tok.encode(x) + [tok.eos_id]
    return -sum(float(lm(torch.tensor([seq[: k + 1]]))[0, -1, seq[k + 1]]) for k in range(len(seq) - 1))


def marginal_nll(lm: OracleLM, tok: BPETokenizer, x: bytes) -> float:
    """-log Σ over every segmentation of x into tokens, brute force."""
    def segmentations(rest: bytes):
        if not rest:
            yield []
            return
        for k in range(1, len(rest) + 1):
            t = tok.token_id(rest[:k])
            if t is not None:
                for tail in segmentations(rest[k:]):
                    yield [t] + tail
    total = 0.0
    for seg in segmentations(x):
        seq = [tok.eos_id] + seg + [tok.eos_id]
        total += math.exp(sum(float(lm(torch.tensor([seq[: k + 1]]))[0, -1, seq[k + 1]]) for k in range(len(seq) - 1)))
    return -math.log(total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_recovery_of_the_source(seed):
    """With a canonical oracle LM the conversion recovers every byte conditional of the source."""
    tok = BPETokenizer.from_merges(random_merges(seed))
    source = markov_source(seed)
    blm = ByteLM(OracleLM(tok, source), tok)
    for n in range(MAX_LEN):
        for s in itertools.product(ALPHABET, repeat=n):
            s = bytes(s)
            got = blm.next_byte_logprobs(s).exp()
            assert torch.allclose(got, source_conditional(source, s), atol=1e-12, rtol=0)
    blm.reset()
    before = blm.model_calls
    blm.logprob(b"abcab", eot=True)
    assert blm.model_calls - before == len(b"abcab")  # one model call per byte


@pytest.mark.parametrize("seed", [3, 4])
def test_inequalities_with_a_leaky_model(seed):
    """NLL_conv <= NLL_canon <= NLL_marg for a model that leaks mass to non-canonical sequences;
    marginal=True equals the brute-force marginal; distributions are normalised."""
    tok = BPETokenizer.from_merges(random_merges(seed))
    lm = OracleLM(tok, markov_source(seed), leak=0.05)
    conv, marg = ByteLM(lm, tok), ByteLM(lm, tok, marginal=True)
    rng = random.Random(seed)
    gaps = []
    for _ in range(6):
        x = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, MAX_LEN)))
        canon = canonical_nll(lm, tok, x)
        nll_conv = -conv.logprob(x, eot=True)
        nll_marg = -marg.logprob(x, eot=True)
        assert nll_conv <= canon + 1e-12
        gaps.append(canon - nll_conv)
        assert abs(nll_marg - marginal_nll(lm, tok, x)) < 1e-10
        assert -marginal_nll(lm, tok, x) >= -canon - 1e-12
        for d in conv.prefix_logprobs(x):
            assert abs(float(d.exp().sum()) - 1) < 1e-12 and not d.isnan().any()
    assert max(gaps) > 1e-3  # the leak is really removed somewhere


def test_gap_is_the_leaked_mass():
    """NLL_canon - NLL_conv = -Σ_i log(1 - λ_i), λ_i the share of P_v(x[:i]) leaked to invalid tokens."""
    tok = BPETokenizer.from_merges(random_merges(6))
    lm = OracleLM(tok, markov_source(6), leak=0.1)
    blm = ByteLM(lm, tok)
    for x in [b"abcab", b"cc", b"bacab"]:
        leak = 0.0
        for i in range(len(x) + 1):
            blm.next_byte_logprobs(x[:i])
            prefix = torch.logsumexp(torch.tensor([c[3] for c in blm.covers()], dtype=torch.float64), 0)
            kept = torch.logsumexp(blm.unnormalized_scores(), 0)
            leak -= float(kept - prefix)  # log(1 - λ_i) = log(kept mass / prefix mass)
        gap = canonical_nll(lm, tok, x) + blm.logprob(x, eot=True)
        assert abs(gap - leak) < 1e-10 and gap > 1e-3


def test_canonical_model_all_three_agree():
    """A model with canonical-only support has NLL_conv == NLL_canon == NLL_marg."""
    tok = BPETokenizer.from_merges(random_merges(5))
    lm = OracleLM(tok, markov_source(5))
    for x in [b"abcabc", b"aab", b"c", b"bbbb"]:
        canon = canonical_nll(lm, tok, x)
        assert abs(-ByteLM(lm, tok).logprob(x, eot=True) - canon) < 1e-10
        assert abs(-ByteLM(lm, tok, marginal=True).logprob(x, eot=True) - canon) < 1e-10


def test_shared_rules_give_the_same_byte_lm():
    """ByteLMs sharing one tokenizer's rules score alike; rules of another conversion are refused."""
    from hlm.bytes.covers import ConversionRules

    tok = BPETokenizer.from_merges(random_merges(5))
    lm = OracleLM(tok, markov_source(5), leak=0.1)
    rules = ConversionRules(tok)
    for x in [b"abcabc", b"cab"]:
        assert ByteLM(lm, tok, rules=rules).logprob(x, eot=True) == ByteLM(lm, tok).logprob(x, eot=True)
    with pytest.raises(ValueError, match="shared rules"):
        ByteLM(lm, tok, marginal=True, rules=rules)


def test_canonical_bigram_model_all_three_agree():
    """A bigram LM whose support is reachable tokens with pair-valid neighbours (plus EOS) puts no mass
    on non-canonical sequences, so NLL_conv == NLL_canon == NLL_marg (brute force)."""
    tok = BPETokenizer.from_merges(random_merges(7, n=9))
    g = torch.Generator().manual_seed(7)
    weights = torch.rand(tok.vocab_size, tok.vocab_size, generator=g, dtype=torch.float64)
    alphabet = torch.tensor([set(tok.token_bytes(i)) <= set(ALPHABET) for i in range(tok.vocab_size)])
    alphabet &= torch.tensor([bool(tok.token_bytes(i)) for i in range(tok.vocab_size)])
    table = torch.full_like(weights, float("-inf"))
    for prev in range(tok.vocab_size):
        ok = alphabet & merge_tables(tok).reachable_mask()
        if prev != tok.eos_id:
            ok = ok & merge_tables(tok).pair_valid_mask(prev)
        ok[tok.eos_id] = prev != tok.eos_id
        table[prev] = torch.where(ok, weights[prev], torch.tensor(float("-inf"), dtype=torch.float64))

    class Bigram(torch.nn.Module):
        def forward(self, ids):
            return table[ids]

    lm = Bigram()
    for x in [b"abcabc", b"aab", b"cbacc", b"b"]:
        seq = [tok.eos_id] + tok.encode(x) + [tok.eos_id]
        lp = torch.log_softmax(table, -1)
        canon = -sum(float(lp[seq[k], seq[k + 1]]) for k in range(len(seq) - 1))
        assert abs(-ByteLM(lm, tok).logprob(x, eot=True) - canon) < 1e-10
        assert abs(marginal_nll(_Wrapped(lm), tok, x) - canon) < 1e-10
        assert abs(-ByteLM(lm, tok, marginal=True).logprob(x, eot=True) - canon) < 1e-10


class _Wrapped(torch.nn.Module):
    """Log-probs of a logits model, as `marginal_nll` expects."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return torch.log_softmax(self.inner(ids), -1)


def test_single_tokenization_agrees_with_token_nll():
    """Without merges every string has one tokenization: all NLLs equal the plain token NLL."""
    tok = BPETokenizer.from_merges([])
    g = torch.Generator().manual_seed(0)
    table = torch.randn(tok.vocab_size, tok.vocab_size, generator=g, dtype=torch.float64)

    def bigram(ids):
        return table[ids]

    x = b"hello, world"
    seq = [tok.eos_id] + list(x) + [tok.eos_id]
    lp = torch.log_softmax(table, -1)
    token_nll = -sum(float(lp[seq[k], seq[k + 1]]) for k in range(len(seq) - 1))
    assert abs(-ByteLM(bigram, tok).logprob(x, eot=True) - token_nll) < 1e-10
    assert abs(-ByteLM(bigram, tok, marginal=True).logprob(x, eot=True) - token_nll) < 1e-10


def test_missing_exact_cover_raises():
    """A validity oracle that rejects the canonical token must fail loudly, not fall back."""
    tok = BPETokenizer.from_merges(random_merges(0))
    blm = ByteLM(OracleLM(tok, markov_source(0)), tok)
    canonical = tok.encode(b"ab")
    wrong = torch.ones(tok.vocab_size, dtype=torch.bool)
    wrong[canonical[0]] = False
    blm.rules.next_mask = lambda last, mid: wrong
    blm.rules.allows = lambda last, mid, t: bool(wrong[t])
    blm.reset()
    with pytest.raises(MissingCoverError):
        blm.next_byte_logprobs(tok.token_bytes(canonical[0]))


class TinyByteModel(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(256, 256, generator=g, dtype=torch.float64)

    def next_logprobs(self, idx):
        return torch.log_softmax(self.table[idx], -1)


def test_ensemble_sanity():
    """An ensemble of a model with itself is the model; with native byte models it mixes raw distributions."""
    tok = BPETokenizer.from_merges(random_merges(1))
    blm = ByteLM(OracleLM(tok, markov_source(1), leak=0.1), tok)
    x = b"abcab"
    for mode in ("mixture", "product"):
        assert torch.allclose(Ensemble([blm, blm], mode).prefix_logprobs(x), blm.prefix_logprobs(x), atol=1e-12)
    a, b = NativeByteLM(TinyByteModel(0)), as_byte_lm(TinyByteModel(1))
    la, lb = a.next_byte_logprobs(x), b.next_byte_logprobs(x)
    mix = Ensemble([a, b], "mixture", [0.25, 0.75]).next_byte_logprobs(x)
    assert torch.allclose(mix.exp(), 0.25 * la.exp() + 0.75 * lb.exp(), atol=1e-12)
    prod = Ensemble([a, b], "product").next_byte_logprobs(x)
    assert torch.allclose(prod, torch.log_softmax(0.5 * la + 0.5 * lb, -1), atol=1e-12)
    assert torch.allclose(Ensemble([a, blm], "product", [1.0, 0.0]).next_byte_logprobs(x), la, atol=1e-12)


def test_native_byte_model_matches_teacher_forcing():
    """A native byte model's next-byte log-prob is its teacher-forced log-prob; 0x00 is the end of text."""
    model = TinyByteModel(2)
    blm = NativeByteLM(model)
    x = b"abc"
    lp = model.next_logprobs(torch.tensor([[0] + list(x)]))[0]
    rows = blm.prefix_logprobs(x)
    assert torch.allclose(rows[:, 1:256], lp[:, 1:], atol=0) and torch.isneginf(rows[:, 0]).all()
    assert torch.allclose(rows[:, 256], lp[:, 0], atol=0)
    assert abs(blm.logprob(x, eot=True) - float(lp[torch.arange(4), torch.tensor(list(x) + [0])].sum())) < 1e-12


def test_prompt_boundary_covers_give_the_exact_next_byte():
    """Drawing a cover ∝ Q and continuing with token sampling yields the exact next-byte distribution
    (canonical model): checked analytically from the covers and the model's next-token distributions."""
    tok = BPETokenizer.from_merges(random_merges(2))
    blm = ByteLM(OracleLM(tok, markov_source(2)), tok)
    for prompt in [b"", b"a", b"ab", b"cab", b"bca"]:
        expect = blm.next_byte_logprobs(prompt).exp()
        covers = blm.covers()
        weights = torch.softmax(torch.tensor([c[3] for c in covers], dtype=torch.float64), 0)
        got = torch.zeros(257, dtype=torch.float64)
        for (node, token, consumed, _), w in zip(covers, weights, strict=True):
            if token is not None:
                got[tok.token_bytes(token)[consumed]] += w
                continue
            q = blm.runner.logprobs(blm.tracker.trie.path(node)).exp()
            for t in range(tok.vocab_size):
                if tok.token_bytes(t):
                    got[tok.token_bytes(t)[0]] += w * q[t]
            got[256] += w * q[tok.eos_id]
        assert torch.allclose(got, expect, atol=1e-12), prompt
