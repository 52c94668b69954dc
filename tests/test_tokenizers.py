"""Tokenizers for exact byte conversion: loaders agree with the reference libraries, validity helpers
agree with re-encoding, and cover invariants hold on real tokenizers over hard strings."""

import random
from pathlib import Path

import pytest
import torch
from conftest import random_merges

from hlm import HLMError
from hlm.bytes import ConversionRules, CoverTracker
from hlm.bytes.merge_tables import merge_tables
from hlm.tokenizers import BPETokenizer, SentencePieceTokenizer, load_tokenizer, round_trip_failures

SHARED = Path(__file__).parent / "fixtures" / "tokenizers"  # GPT-2 and tiktoken files (licences beside them)
FIXTURES = Path(__file__).parent / "fixtures"
HARD = ["Hello  world", "a  b\t\tc \n\n  d\r\n\r\n e", "I've can't can’t they'll WE'LL it'S x'r x're",
        "1234567 12 123 ٣٤٥ １２３", "日本語のテキスト 한국어 ภาษาไทย हिन्दी क्षि",
        "emoji 👩‍👩‍👧 🇫🇷 e\u0301 \u200f\ufeffx\x01\x7f",
        "if (x->y) {\n    s += '\\n';\n}\n", "<|endoftext|> literal", "   \n\n\n   x  ", "a.\n\nb", "trailing   "]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(SHARED / "gpt2")


@pytest.fixture(scope="module")
def cl100k():
    return load_tokenizer(SHARED / "tiktoken" / "cl100k_base.tiktoken")


@pytest.fixture(scope="module")
def sp_bpe(tmp_path_factory):
    from data_prep.prepare import train_sentencepiece

    text = (FIXTURES / "enwiki_wv_test_head64k.txt").read_text()[:30000] + "".join(HARD)
    path = tmp_path_factory.mktemp("sp") / "bpe.model"
    train_sentencepiece([text], "bpe", 600, path, 1)
    return SentencePieceTokenizer(path)


def sample_text() -> list[bytes]:
    lines = (FIXTURES / "enwiki_wv_test_head64k.txt").read_bytes().split(b"\n")[:120]
    return [line + b"\n" for line in lines] + [s.encode() for s in HARD]


def test_gpt2_folder_and_tiktoken_files_match_tiktoken(gpt2, cl100k):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    gpt2_file = load_tokenizer(SHARED / "tiktoken" / "gpt2.tiktoken")
    for tok, name in ((gpt2, "gpt2"), (cl100k, "cl100k_base")):
        ref = tiktoken.Encoding(name, pat_str=tok.pattern, special_tokens=tok.specials,
                                mergeable_ranks=load_tiktoken_bpe(str(SHARED / "tiktoken" / f"{name}.tiktoken")))
        for x in sample_text():
            ids = tok.encode(x)
            assert ids == ref.encode_ordinary(x.decode()) and tok.decode(ids) == x
            if tok is gpt2:
                assert gpt2_file.encode(x) == ids
    assert gpt2.eos_id == 50256 and cl100k.eos_id == 100257 and gpt2.bos_id is None


def test_sentencepiece_reimplementation_matches_sentencepiece(sp_bpe):
    assert sp_bpe.model_type == "bpe" and not sp_bpe.add_dummy_prefix
    for x in sample_text():
        assert sp_bpe.encode_pieces_exact(x) == sp_bpe.encode(x), x


def test_unigram_is_refused_for_exact_conversion(tmp_path):
    from data_prep.prepare import train_sentencepiece

    train_sentencepiece([(FIXTURES / "tinyshakespeare_head32k.txt").read_text()[:20000]], "unigram", 600,
                        tmp_path / "u.model", 1)
    tok = load_tokenizer(tmp_path / "u.model")
    assert tok.encode(b"hello") and tok.model_type == "unigram"
    with pytest.raises(HLMError, match="Unigram"):
        ConversionRules(tok)


def test_from_merges_layout_and_errors():
    tok = BPETokenizer.from_merges([(b"a", b"b"), (b"ab", b"c")], bos=True)
    assert tok.token_bytes(256) == b"ab" and tok.token_bytes(257) == b"abc"
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (258, 259, 260)
    assert tok.encode(b"xabcab") == [ord("x"), 257, 256]
    with pytest.raises(HLMError):
        BPETokenizer.from_merges([(b"ab", b"c")])


@pytest.mark.parametrize("which", ["toy", "sp"])
def test_pair_masks_agree_with_re_encoding(which, sp_bpe):
    """The merge-history rule behind `pair_valid_mask` equals re-encoding the pair, for reachable tokens."""
    rng = random.Random(0)
    if which == "toy":
        tok = BPETokenizer.from_merges(random_merges(0, n=30))
    else:
        tok = sp_bpe
    reach = merge_tables(tok).reachable_mask()
    ids = [i for i in range(tok.vocab_size) if reach[i]]
    for a in rng.sample(ids, min(40, len(ids))):
        mask = merge_tables(tok).pair_valid_mask(a)
        for b in rng.sample(ids, min(150, len(ids))):
            assert bool(mask[b]) == merge_tables(tok).pair_valid(a, b), (tok.token_bytes(a), tok.token_bytes(b))
            assert merge_tables(tok).pair_valid_by_merges(a, b) == bool(mask[b])


def toy_merges(seed: int, n: int) -> BPETokenizer:
    rng = random.Random(seed)
    toks, merges = [b"a", b"b", b"c"], []
    while len(merges) < n:
        left, right = rng.choice(toks), rng.choice(toks)
        if left + right not in toks:
            merges.append((left, right))
            toks.append(left + right)
    return BPETokenizer.from_merges(merges)


@pytest.mark.parametrize("which", ["toy", "sp", "gpt2"])
def test_reachable_mask_is_re_encoding(which, sp_bpe, gpt2):
    """Reachability from the one BPE per token behind the merge tables equals encoding each token alone."""
    tok = {"toy": toy_merges(2, 40), "sp": sp_bpe, "gpt2": gpt2}[which]
    expect = [bool(b) and tok.encode_piece(b) == [i] for i, b in enumerate(map(tok.token_bytes, range(tok.vocab_size)))]
    if which == "sp":  # byte pieces of bytes that never occur in UTF-8 are left out
        for b, i in tok.byte_pieces.items():
            expect[i] = expect[i] and b[0] not in (0xC0, 0xC1) and b[0] < 0xF5
    assert merge_tables(tok).reachable_mask().tolist() == expect
    assert 0 < sum(expect) < tok.vocab_size


@pytest.mark.parametrize("which", ["toy", "sp"])
def test_batched_pair_masks(which, sp_bpe):
    """`pair_valid_masks` of a batch (shuffled, with repeats and a token without bytes) equals `pair_valid_mask`
    row by row, and re-encoding the pair for reachable tokens (every pair of the toy, a sample of sp's)."""
    rng = random.Random(3)
    tok = toy_merges(4, 40) if which == "toy" else sp_bpe
    lasts = list(range(tok.vocab_size)) + rng.choices(range(tok.vocab_size), k=50)
    rng.shuffle(lasts)
    masks = merge_tables(tok).pair_valid_masks(torch.tensor(lasts))
    assert masks.shape == (len(lasts), tok.vocab_size) and masks.dtype == torch.bool
    for row, a in zip(masks, lasts, strict=True):
        assert torch.equal(row, merge_tables(tok).pair_valid_mask(a)), a
    has_bytes = torch.tensor([bool(tok.token_bytes(i)) for i in range(tok.vocab_size)])
    assert not masks[:, ~has_bytes].any() and torch.equal(masks[lasts.index(tok.eos_id)], has_bytes)
    reach = torch.nonzero(merge_tables(tok).reachable_mask()).flatten().tolist()
    pairs = [(a, b) for a in reach for b in reach]
    checked = pairs if which == "toy" else rng.sample(pairs, 4000)
    tables = merge_tables(tok)
    for a, b in checked:
        assert bool(masks[lasts.index(a), b]) == tables.pair_valid(a, b), (tok.token_bytes(a), tok.token_bytes(b))
    assert 0 < sum(tables.pair_valid(a, b) for a, b in checked) < len(checked)


def test_round_trip_gate(sp_bpe, gpt2):
    docs = [b"plain text", "caf\u00e9 \u2581 literal".encode(), b"\xff\xfe not utf-8"]
    assert round_trip_failures(gpt2, docs) == [2]
    assert 2 in round_trip_failures(sp_bpe, docs)


@pytest.mark.parametrize("which", ["gpt2", "cl100k", "sp"])
def test_cover_invariants_on_hard_strings(which, gpt2, cl100k, sp_bpe):
    """At every byte, every exact node decodes to the prefix, the canonical encoding of the whole text
    passes through the exact nodes, and the nodes all anchors share are a prefix of the canonical encoding."""
    tok = {"gpt2": gpt2, "cl100k": cl100k, "sp": sp_bpe}[which]
    rules = ConversionRules(tok)
    for s in HARD + ["The quick brown fox's 42 jumps\n"]:
        x = s.encode()
        canon = tok.encode(x)
        ends, pos = {}, 0
        for k, t in enumerate(canon):
            pos += len(tok.token_bytes(t))
            ends[pos] = k + 1
        tracker = CoverTracker(rules, tok.eos_id)
        for m, b in enumerate(x, 1):
            paths = [tracker.trie.path(e)[1:] for e in tracker.advance(b)]
            assert all(tok.decode(p) == x[:m] for p in paths)
            if m in ends:
                assert canon[: ends[m]] in paths, (s, m)
            anchor_paths = [tracker.trie.path(a)[1:] for a in tracker.anchors]
            shared = 0
            while all(len(p) > shared and p[shared] == anchor_paths[0][shared] for p in anchor_paths):
                shared += 1
            assert canon[:shared] == anchor_paths[0][:shared]
        assert torch.is_tensor(tracker.mask(tracker.exact[0]))


def test_hf_tokenizer_json(tmp_path, gpt2):
    """A byte-level BPE tokenizer.json (built here from GPT-2's files) encodes like the GPT-2 folder."""
    import json

    vocab = json.loads((SHARED / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
    merges = [line for line in (SHARED / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": [{"id": 50256, "content": "<|endoftext|>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 50256 and tok.token_bytes(50256) == b""
    for x in sample_text()[:40]:
        assert tok.encode(x) == gpt2.encode(x)
    spec["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(HLMError, match="pretokenizer"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.mark.parametrize("which", ["toy", "sp"])
def test_pairwise_valid_sequences_are_canonical(which, sp_bpe):
    """Bigram criterion: reachable tokens with pair-valid neighbours inside one pretoken form
    exactly the BPE encoding of their bytes."""
    rng = random.Random(1)
    if which == "toy":
        tok = BPETokenizer.from_merges([(b"a", b"b"), (b"b", b"a"), (b"ab", b"a"), (b"a", b"a"), (b"aa", b"b"),
                                        (b"ba", b"b"), (b"ab", b"ab"), (b"b", b"b"), (b"aab", b"a")])
    else:
        tok = sp_bpe
    reach = merge_tables(tok).reachable_mask()
    inner = reach & torch.tensor([tok.token_bytes(i)[:1] != b" " for i in range(tok.vocab_size)])
    for _ in range(300):
        seq = [rng.choice(torch.nonzero(reach).flatten().tolist())]
        for _ in range(rng.randint(1, 4)):
            options = torch.nonzero(inner & merge_tables(tok).pair_valid_mask(seq[-1])).flatten().tolist()
            if not options:
                break
            seq.append(rng.choice(options))
        assert tok.encode_piece(tok.decode(seq)) == seq, [tok.token_bytes(t) for t in seq]
