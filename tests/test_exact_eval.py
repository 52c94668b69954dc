"""Batched tree evaluation equals the byte-by-byte recursion, on an hlm GPT with a
sentencepiece BPE tokenizer, in fp64; the KV-cached path equals recomputation; prompt-boundary sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_merges

from hlm.bytes import ByteLM, Ensemble, NativeByteLM, sample_bytes, sample_prompt_boundary
from hlm.bytes.exact_eval import exact_bpb
from hlm.bytes.plan import DocPlan
from hlm.models.gpt import GPT, GPTConfig
from hlm.tokenizers import SentencePieceTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = [b"The cat's  whiskers, 1234.\n", "Caf\u00e9 na\u00efve \u65e5\u672c \U0001f600 end".encode(), b"a"]


@pytest.fixture(scope="module")
def sp_bpe(tmp_path_factory):
    from data_prep.prepare import train_sentencepiece

    text = (FIXTURES / "enwiki_wv_test_head64k.txt").read_text()[:20000]
    path = tmp_path_factory.mktemp("sp") / "bpe.model"
    train_sentencepiece([text], "bpe", 500, path, 1)
    return SentencePieceTokenizer(path)


def tiny_gpt(vocab: int, block: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, d_model=32, init_std=0.5)
    return GPT(cfg).double().eval()


def test_batched_tree_pass_equals_sequential(sp_bpe):
    model = tiny_gpt(sp_bpe.vocab_size)
    res = exact_bpb(model, sp_bpe, DOCS + [b"\xff bad utf-8"], start_id=sp_bpe.eos_id, batch_size=2)
    assert res["docs_skipped"] == 1 and res["docs"] == len(DOCS)
    blm = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id)
    for doc, out in zip(DOCS, res["per_doc"], strict=True):
        rows = blm.prefix_logprobs(doc)
        seq = -rows[torch.arange(len(doc) + 1), torch.tensor(list(doc) + [256])]
        assert torch.allclose(out["per_byte_nll"], seq, atol=1e-9, rtol=0)
        ids = [sp_bpe.eos_id] + sp_bpe.encode(doc) + [sp_bpe.eos_id]
        with torch.no_grad():
            lp = torch.log_softmax(model.logits(torch.tensor([ids[:-1]]))[0], -1)
        canon = -float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        assert abs(out["nll_canon"] - canon) < 1e-9
        assert out["nll_conv"] <= canon + 1e-9
    assert res["bpb_gap"] > 0
    whole = exact_bpb(model, sp_bpe, DOCS, start_id=sp_bpe.eos_id, batch_size=3, workers=2, segment=False)
    assert abs(whole["bpb_conv"] - res["bpb_conv"]) < 1e-12 and whole["nodes"] == res["nodes"]
    repeats = [b"the cat and the cat and the  dog, the cat", b" the cat"]  # segments planned once, used often
    cached, alone = (exact_bpb(model, sp_bpe, repeats, start_id=sp_bpe.eos_id, segment=s) for s in (True, False))
    for a, b in zip(cached["per_doc"], alone["per_doc"], strict=True):
        assert torch.allclose(a["per_byte_nll"], b["per_byte_nll"], atol=1e-12, rtol=0)
    assert cached["nodes"] == alone["nodes"] and alone["planning"]["texts"] == 2
    assert cached["planning"]["texts"] == len({b"the", b" cat", b" and", b" the", b"  dog,"})
    small = exact_bpb(tiny_gpt(sp_bpe.vocab_size, block=8), sp_bpe, DOCS, start_id=sp_bpe.eos_id)
    assert all(d["nll_conv"] <= d["nll_canon"] + 1e-9 for d in small["per_doc"])  # many windows per document


def test_dummy_prefix_tokenizer():
    """A sentencepiece model that adds a leading '▁': the text is scored after that space, exactly."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((FIXTURES / "enwiki_wv_test_head64k.txt").read_text()[:20000].splitlines(True)),
        model_writer=proto, model_type="bpe", vocab_size=400, byte_fallback=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = SentencePieceTokenizer(model_proto=proto.getvalue())
    assert tok.add_dummy_prefix and tok.decode(tok.encode(b"Hello")) == b" Hello"
    model = tiny_gpt(tok.vocab_size, seed=4)
    res = exact_bpb(model, tok, DOCS[:2], start_id=tok.eos_id)
    blm = ByteLM(model, tok, start_id=tok.eos_id)
    assert res["docs_skipped"] == 0
    for doc, out in zip(DOCS[:2], res["per_doc"], strict=True):
        rows = blm.prefix_logprobs(doc)
        assert torch.allclose(rows.exp().sum(-1), torch.ones(len(doc) + 1, dtype=torch.float64), atol=1e-12)
        seq = -rows[torch.arange(len(doc) + 1), torch.tensor(list(doc) + [256])]
        assert torch.allclose(out["per_byte_nll"], seq, atol=1e-9, rtol=0)


def test_kv_cache_path_equals_recomputation(sp_bpe):
    model = tiny_gpt(sp_bpe.vocab_size, block=16, seed=1)
    cached = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id)
    plain = ByteLM(lambda ids: model.logits(ids[:, -16:]), sp_bpe, start_id=sp_bpe.eos_id)
    assert cached.runner.cached_gpt and not plain.runner.cached_gpt
    doc = DOCS[0]  # short enough that the context never slides
    assert torch.allclose(cached.prefix_logprobs(doc[:12]), plain.prefix_logprobs(doc[:12]), atol=1e-10)
    long_doc = doc * 3  # longer than the context: the cached path slides, and stays normalised
    rows = cached.prefix_logprobs(long_doc)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(len(long_doc) + 1, dtype=torch.float64), atol=1e-12)


def test_sampling(sp_bpe):
    model = tiny_gpt(sp_bpe.vocab_size)
    blm = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id)
    g = torch.Generator().manual_seed(0)
    out = bytes(sample_bytes(blm, b"The ca", 20, temperature=0.7, top_k=20, generator=g))
    assert len(out) <= 20
    greedy = bytes(sample_bytes(blm, b"The ca", 5, temperature=0))
    first = int(blm.next_byte_logprobs(b"The ca").argmax())
    assert first == 256 and greedy == b"" or greedy[:1] == bytes([first])
    pieces = list(sample_prompt_boundary(blm, b"The ca", 30, generator=torch.Generator().manual_seed(1)))
    assert sum(len(p) for p in pieces) <= 30 and all(isinstance(p, bytes) for p in pieces)


def test_prompt_boundary_cover_weights_sum_to_prefix_probability(sp_bpe):
    """The covers drawn by prompt-boundary sampling carry exactly P_v(prompt): their total equals the
    product of the unnormalised next-byte terms, i.e. log of Σ covers == Σ log (P(s[:i+1]) / P(s[:i]))."""
    import math

    model = tiny_gpt(sp_bpe.vocab_size, seed=3)
    blm = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id)
    total = None
    for prompt in [b"Th", b"The", b"The c"]:
        blm.goto(prompt)
        weights = torch.tensor([c[3] for c in blm.covers()], dtype=torch.float64)
        total = float(torch.logsumexp(weights, 0))
        assert math.isfinite(total)
    assert total < 0


def test_ensemble_of_token_and_byte_model(sp_bpe):
    class Bytes(torch.nn.Module):
        def next_logprobs(self, idx):
            return torch.log_softmax(torch.sin(idx.double()[..., None] * torch.arange(256)), -1)

    tok_lm = ByteLM(tiny_gpt(sp_bpe.vocab_size), sp_bpe, start_id=sp_bpe.eos_id)
    byte_lm = NativeByteLM(Bytes())
    ens = Ensemble([tok_lm, byte_lm], "mixture")
    x = DOCS[0][:10]
    expect = torch.logaddexp(tok_lm.prefix_logprobs(x), byte_lm.prefix_logprobs(x)) - torch.log(torch.tensor(2.0))
    assert torch.allclose(ens.prefix_logprobs(x), expect.double(), atol=1e-12)
    assert ens.logprob(x, eot=True) > min(tok_lm.logprob(x, eot=True), byte_lm.logprob(x, eot=True))


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_batched_equals_sequential_on_regex_tokenizers(name):
    """Batched equals sequential with a lookahead pretokenizer (several exact nodes per byte at times)
    on hard strings."""
    from hlm.tokenizers import load_tokenizer

    shared = FIXTURES / "tokenizers"
    tok = load_tokenizer(shared / "gpt2" if name == "gpt2" else shared / "tiktoken" / f"{name}.tiktoken")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=16, init_std=0.5)
    model = GPT(cfg).double().eval()
    docs = ["a  b\t\n\n  c", "I'VE 12345 caf\u00e9 \U0001f44d\u200d x", "x'r  \n"]
    docs = [d.encode() for d in docs]
    res = exact_bpb(model, tok, docs, start_id=tok.eos_id)
    blm = ByteLM(model, tok)
    for doc, out in zip(docs, res["per_doc"], strict=True):
        rows = blm.prefix_logprobs(doc)
        assert torch.allclose(rows.exp().sum(-1), torch.ones(len(doc) + 1, dtype=torch.float64), atol=1e-12)
        seq = -rows[torch.arange(len(doc) + 1), torch.tensor(list(doc) + [256])]
        assert torch.allclose(out["per_byte_nll"], seq, atol=1e-9, rtol=0)
        assert out["nll_conv"] <= out["nll_canon"] + 1e-9


def test_batched_full_distributions_equal_sequential(sp_bpe):
    """The batched pass also gives every full next-byte distribution (for ensembles), equal to ByteLM's."""
    from hlm.bytes.exact_eval import exact_prefix_logprobs

    model = tiny_gpt(sp_bpe.vocab_size, seed=5)
    docs = [DOCS[0], b"\xff", *DOCS[1:]]  # a document that does not round-trip, between two that do
    rows = exact_prefix_logprobs(model, sp_bpe, docs, start_id=sp_bpe.eos_id, batch_size=2)
    assert rows[1] is None
    blm = ByteLM(model, sp_bpe, start_id=sp_bpe.eos_id)
    for doc, got in zip(DOCS, rows[:1] + rows[2:], strict=True):
        ref = blm.prefix_logprobs(doc)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        # prefix sums lose relative precision on tiny masses: compare probabilities
        assert torch.allclose(got.exp(), ref.exp(), atol=1e-12, rtol=0)


def test_brute_force_on_sentencepiece(sp_bpe):
    """On a real sentencepiece BPE, each next-byte distribution equals brute force over every token
    sequence, with validity decided by sentencepiece itself (a sequence is valid if it is a prefix of the
    encoding of its text, completed to a whole character when it ends inside one)."""
    import itertools
    import math

    tok = sp_bpe
    model = tiny_gpt(tok.vocab_size, seed=6)
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if tok.token_bytes(i):
            by_bytes.setdefault(tok.token_bytes(i), []).append(i)

    def valid(seq: list[int]) -> bool:
        text = tok.decode(seq)
        try:
            text.decode("utf-8")
            return tok.encode(text) == seq
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                return False
            lead = text[e.start]
            need = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - (len(text) - e.start)
        for tail in itertools.product(range(0x80, 0xC0), repeat=need):
            completion = text + bytes(tail)
            try:
                completion.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if tok.encode(completion)[: len(seq)] == seq:
                return True
        return False

    def segmentations(data: bytes):
        if not data:
            yield []
            return
        for k in range(1, len(data) + 1):
            for t in by_bytes.get(data[:k], ()):
                for rest in segmentations(data[k:]):
                    yield [t] + rest

    def log_q(path: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model.logits(torch.tensor([[tok.eos_id] + path]))[0, -1], -1)

    blm = ByteLM(model, tok, start_id=tok.eos_id)
    for s in [b"", b"Th", b"of t", b"a  ", "\u00e9".encode(), "\u65e5".encode()[:2], "\u65e5".encode(), b"19"]:
        mass = torch.zeros(257, dtype=torch.float64)
        for i in range(len(s) + 1):
            for prefix in segmentations(s[:i]):
                if not valid(prefix):
                    continue
                lp = log_q(prefix)
                logq = sum(float(log_q(prefix[:k])[prefix[k]]) for k in range(len(prefix)))
                if i == len(s):
                    mass[256] += math.exp(logq + float(lp[tok.eos_id]))
                for t in range(tok.vocab_size):
                    b = tok.token_bytes(t)
                    if len(b) > len(s) - i and b.startswith(s[i:]) and valid(prefix + [t]):
                        mass[b[len(s) - i]] += math.exp(logq + float(lp[t]))
        assert torch.allclose(blm.next_byte_logprobs(s).exp(), mass / mass.sum(), atol=1e-12, rtol=0), s


def test_tree_windows_match_plain_causal_calls(sp_bpe):
    """With a context of 8 tokens each document spans many windows: every node's next-token distribution
    from the tree pass equals a plain causal call on its path inside its window."""
    from hlm.bytes.covers import ConversionRules
    from hlm.bytes.layout import Flat, windows_of
    from hlm.bytes.plan import plan_documents
    from hlm.bytes.score import tree_pass

    model = tiny_gpt(sp_bpe.vocab_size, block=8, seed=7)
    rules = ConversionRules(sp_bpe)
    plans, _ = plan_documents(DOCS[:2], rules, sp_bpe.eos_id)
    flat = Flat(plans)
    eos_lp = tree_pass(model, rules, flat, "cpu", 3, 7, None).eos_lp
    windows = windows_of(flat, 8)
    checked = 0
    for a, b in zip(windows.start[:-1], windows.start[1:], strict=True):
        window = windows.node[a:b].tolist()
        members = set(window)
        for v in window:
            path, u = [], v
            while u in members:
                path.append(int(flat.token[u]))
                u = flat.parent[u]
            with torch.no_grad():
                lp = torch.log_softmax(model.logits(torch.tensor([path[::-1]]))[0, -1], -1)
            assert abs(float(lp[sp_bpe.eos_id]) - float(eos_lp[v])) < 1e-10
            checked += 1
    assert checked == flat.n_nodes


@pytest.mark.parametrize("which", ["sentencepiece", "raw byte BPE"])
def test_single_token_validity_equals_the_mask(which, sp_bpe):
    """`ConversionRules.allows` (what the cover tracker asks per token) equals `next_mask` entry by entry."""
    import random

    from hlm.bytes.covers import ConversionRules
    from hlm.tokenizers import BPETokenizer

    rng = random.Random(1)
    if which == "sentencepiece":
        tok = sp_bpe
    else:
        tok = BPETokenizer.from_merges(random_merges(1, n=40, alphabet=b"abc "))
    rules = ConversionRules(tok)
    lasts = [None] + rng.sample([t for t in range(tok.vocab_size) if tok.token_bytes(t)], 60)
    checked = 0
    for last in lasts:
        for partial in (b"", b"\xc3") if which == "sentencepiece" else (b"",):
            mask = rules.next_mask(last, partial)
            for t in range(tok.vocab_size):
                assert rules.allows(last, partial, t) == bool(mask[t]), (last, partial, t)
            checked += int(mask.sum())
    assert checked > 0


@pytest.mark.parametrize("kind", ["sp", "sp_marginal", "merges", "gpt2"])
def test_invalid_mask_table_equals_per_key_masks(kind, sp_bpe):
    """The mask table built in batched steps equals the per-key masks of the byte-by-byte tracker
    (`~next_mask(*key)` in sorted-vocabulary order) for every (last token, partial character) key of real plans."""
    from hlm.bytes.covers import ConversionRules
    from hlm.bytes.layout import Flat
    from hlm.bytes.plan import mask_key, mask_key_code, plan_documents
    from hlm.bytes.score import invalid_masks
    from hlm.tokenizers import BPETokenizer, load_tokenizer

    docs = DOCS + [(FIXTURES / "enwiki_wv_test_head64k.txt").read_bytes()[:3000]]
    if kind == "merges":
        merges = [(b"a", b"b"), (b"b", b"a"), (b"ab", b"a"), (b"a", b"a"), (b"aa", b"b"), (b"ba", b"b"), (b"c", b"a")]
        tok, docs = BPETokenizer.from_merges(merges), [b"abaabcabbbaacaab", b"cabababa"]
    elif kind == "gpt2":  # (planning is slow with the regex check: short texts)
        tok, docs = load_tokenizer(FIXTURES / "tokenizers" / "gpt2"), DOCS
    else:
        tok = sp_bpe
    if kind == "sp_marginal":  # every tokenization is a node: short texts only
        docs = [b"The cat's  whiskers", "Caf\u00e9 \u65e5".encode()]
    rules = ConversionRules(tok, marginal=kind == "sp_marginal")
    plans, _ = plan_documents(docs, rules, tok.eos_id)
    flat = Flat(plans)
    codes = np.unique(flat.key)
    distinct = [mask_key(c) for c in codes.tolist()]
    assert [mask_key_code(*k) for k in distinct] == codes.tolist()
    assert len(distinct) > (100 if kind == "sp" else 5)
    if kind == "sp":
        assert any(partial for _, partial in distinct)
    table, key_row = invalid_masks(rules, flat.key, torch.device("cpu"))
    expect = torch.stack([~rules.next_mask(*k)[rules.index.perm] for k in distinct])
    assert torch.equal(table, expect)
    assert np.array_equal(codes[key_row.numpy()], flat.key)
    lasts = [distinct[r][0] for r in key_row.tolist()]  # a node's key holds its own token (none at a root)
    assert lasts == [None if p < 0 else t for p, t in zip(flat.parent.tolist(), flat.token.tolist(), strict=True)]
    if kind in ("sp", "merges"):  # (every GPT-2 token is reachable)
        assert 0 < int(table.sum()) < table.numel()


def random_plan(rng: np.random.Generator, n_trunk: int, max_height: int) -> DocPlan:
    """A token tree shaped like a cover plan: a trunk, with short off-trunk chains that may be created
    (get their ids) after later trunk nodes, so window order is not id order."""
    parent, depth, height, trunk = [-1], [0], [0], [0]
    while len(trunk) < n_trunk or rng.random() < 0.5:
        if len(trunk) < n_trunk and rng.random() < 0.3:
            p = trunk[-1]
        else:
            p = int(rng.integers(max(0, len(parent) - 12), len(parent)))
            if height[p] >= max_height:
                continue
        parent.append(p)
        depth.append(depth[p] + 1)
        on = p == trunk[-1] and len(trunk) < n_trunk and rng.random() < 0.5
        height.append(0 if on else height[p] + 1)
        if on:
            trunk.append(len(parent) - 1)
    n = len(parent)
    return DocPlan(0, np.array(parent), rng.integers(0, 50, n), np.array(depth), np.zeros(n, dtype=np.int64),
                   np.array(trunk), np.zeros((0, 4), dtype=np.int64), np.zeros((0, 5), dtype=np.int64),
                   np.zeros((0, 2), dtype=np.int64))


def naive_windows(plan: DocPlan, block: int) -> list[list[int]]:
    """Each node goes with the stretch of `block - spill` trunk tokens that holds its nearest trunk ancestor."""
    index = {int(v): k for k, v in enumerate(plan.trunk)}
    anchor = [0] * len(plan.parent)
    for v in range(1, len(plan.parent)):
        anchor[v] = index[v] if v in index else anchor[plan.parent[v]]
    stride = block - max(int(plan.depth[v]) - anchor[v] for v in range(len(anchor)))
    groups: dict[int, list[int]] = {}
    for v, a in enumerate(anchor):
        groups.setdefault(a // stride, []).append(v)
    return [groups[k] for k in sorted(groups)]


def dense_of(tree, width: int) -> torch.Tensor:
    """The bool [B, 1, width, width] mask that a `TreeMask` stands for (rows trunk first)."""
    t, c, s = tree.n_trunk, tree.chunk, tree.span
    n = (width - t) // c
    keep = tree.keep.view(-1, n, c, t + s + c)
    dense = torch.zeros(keep.size(0), 1, width, width, dtype=torch.bool)
    dense[:, 0, :t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    for chunk in range(n):
        q = slice(t + chunk * c, t + (chunk + 1) * c)
        dense[:, 0, q, :t] = keep[:, chunk, :, :t]
        for j in range(s + c):
            p = chunk * c - s + j  # off-trunk position of band key j
            if p >= 0:
                dense[:, 0, q, t + p] = keep[:, chunk, :, t + j]
            else:
                assert not keep[:, chunk, :, t + j].any()
    return dense


def check_windows_and_masks(plans: list[DocPlan], block: int, batch_size: int) -> None:
    """Windows hold what `naive_windows` says; in each packed row a node sees exactly its ancestors inside
    its window (and itself), at position depth - the window's first depth; padding sees only itself."""
    from hlm.bytes.layout import Flat, pack_windows, windows_of

    flat = Flat(plans)
    windows = windows_of(flat, block)
    expect = [[v + flat.offset[d] for v in w] for d, plan in enumerate(plans) for w in naive_windows(plan, block)]
    got = [windows.node[a:b].tolist() for a, b in zip(windows.start[:-1], windows.start[1:], strict=True)]
    assert got == expect
    assert sorted(v for w in got for v in w) == list(range(flat.n_nodes))  # every node once
    for window in got:  # a window holds each node's ancestors down to its first node
        members = set(window)
        for v in window:
            while v != window[0]:
                v = int(flat.parent[v])
                assert v in members
    width = windows.n_trunk + windows.n_off
    for i in range(0, len(got), batch_size):
        batch = got[i : i + batch_size]
        ids, pos, tree, rows, nodes = pack_windows(windows, i, i + len(batch), batch_size)
        assert ids.shape == pos.shape == (batch_size, width)
        assert nodes.tolist() == [v for w in batch for v in w]
        dense = dense_of(tree, width)
        col = {v: int(r) for v, r in zip(nodes.tolist(), rows.tolist(), strict=True)}
        real = set(col.values())
        for r, window in enumerate(batch):
            members = set(window)
            for v in window:
                assert r * width <= col[v] < (r + 1) * width
                j = col[v] - r * width
                assert ids[r, j] == flat.token[v] and pos[r, j] == flat.depth[v] - flat.depth[window[0]] < block
                sees, u = set(), v
                while u in members:
                    sees.add(col[u] - r * width)
                    u = int(flat.parent[u])
                assert set(torch.nonzero(dense[r, 0, j]).flatten().tolist()) == sees
        for q in range(windows.n_trunk, width):  # off-trunk padding
            for r in range(batch_size):
                if r * width + q not in real:
                    assert torch.nonzero(dense[r, 0, q]).flatten().tolist() == [q]


@pytest.mark.parametrize("seed", range(4))
def test_windows_and_masks_equal_ancestor_walks_on_random_trees(seed):
    rng = np.random.default_rng(seed)
    plans = [random_plan(rng, int(rng.integers(1, 60)), int(rng.integers(1, 5))) for _ in range(4)]
    check_windows_and_masks(plans, block=12, batch_size=int(rng.integers(1, 4)))


def test_windows_and_masks_equal_ancestor_walks_on_real_plans(sp_bpe):
    from hlm.bytes.covers import ConversionRules
    from hlm.bytes.plan import plan_documents

    text = (FIXTURES / "enwiki_wv_test_head64k.txt").read_bytes()[30000:32000]
    plans, _ = plan_documents([text, *DOCS], ConversionRules(sp_bpe), sp_bpe.eos_id)
    check_windows_and_masks(plans, block=16, batch_size=3)


def test_log_prefix_probs_equal_a_walk_down_the_tree():
    from hlm.bytes.layout import Flat
    from hlm.bytes.score import log_prefix_probs

    rng = np.random.default_rng(0)
    flat = Flat([random_plan(rng, int(rng.integers(1, 80)), 4) for _ in range(3)])
    step = torch.from_numpy(-rng.exponential(size=flat.n_nodes))
    expect = [0.0] * flat.n_nodes
    for v, p in enumerate(flat.parent.tolist()):
        if p >= 0:
            expect[v] = expect[p] + float(step[v])
    assert torch.equal(log_prefix_probs(flat, step), torch.tensor(expect, dtype=torch.float64))  # same sums


def test_next_byte_bounds_equal_searchsorted(sp_bpe):
    from hlm.bytes.covers import ConversionRules
    from hlm.bytes.layout import Flat
    from hlm.bytes.plan import plan_documents
    from hlm.bytes.score import next_byte_bounds

    rules = ConversionRules(sp_bpe)
    flat = Flat(plan_documents(DOCS, rules, sp_bpe.eos_id)[0])
    table, which = next_byte_bounds(rules.index, flat)
    columns = rules.index.byte_at.numpy()
    for j, (lo, hi, k) in enumerate(zip(flat.q_lo[flat.den_q].tolist(), flat.q_hi[flat.den_q].tolist(),
                                        flat.den_k.tolist(), strict=True)):
        edges = lo + np.searchsorted(columns[lo:hi, k], np.arange(257), side="left")
        assert table[which[j]].tolist() == edges.tolist()
    assert len(table) == len(set(zip(flat.q_lo[flat.den_q].tolist(), flat.q_hi[flat.den_q].tolist(),
                                     flat.den_k.tolist(), strict=True)))


def test_mask_key_codes_round_trip():
    from hlm.bytes.plan import mask_key, mask_key_code

    keys = [(None, b""), (0, b""), (16383, b""), (5, b"\xe6"), (5, b"\xe6\x97"), (7, b"\xf0\x9f\x98"), (7, b"\x00")]
    codes = [mask_key_code(*k) for k in keys]
    assert len(set(codes)) == len(keys) and [mask_key(c) for c in codes] == keys


@pytest.mark.parametrize("seed", range(3))
def test_tree_attention_equals_attention_under_the_dense_mask(seed):
    """`tree_attention` (trunk causal, off-trunk chunks over the trunk and a band) computes attention
    under the mask the TreeMask stands for, on every position including padding."""
    from hlm.bytes.tree_attention import TreeMask, tree_attention

    g = torch.Generator().manual_seed(seed)
    B, H, D, t, c, s, n = 2, 3, 8, 5, 4, 3 + seed, 3
    width = t + n * c
    keep = torch.rand(B * n, 1, c, t + s + c, generator=g) < 0.4
    keep[:, 0, torch.arange(c), t + s + torch.arange(c)] = True  # every query sees itself
    for chunk in range(n):
        for j in range(s + c):
            if chunk * c - s + j < 0:  # band keys before the first off-trunk position do not exist
                keep.view(B, n, 1, c, -1)[:, chunk, 0, :, t + j] = False
    tree = TreeMask(t, c, s, keep)
    q, k, v = (torch.randn(B, H, width, D, generator=g, dtype=torch.float64) for _ in range(3))
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_of(tree, width))
    assert torch.allclose(tree_attention(q, k, v, tree), expect, atol=1e-12, rtol=0)
