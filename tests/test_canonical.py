"""The locally canonical model (hlm/bytes/canonical.py), prefix probabilities at a cut and canonical
sampling, against brute force in fp64 on toy BPEs, a small sentencepiece BPE and the GPT-2 / cl100k
regex pretokenizers."""

from pathlib import Path

import pytest
import torch
from conftest import random_merges

from hlm import LN2
from hlm.bytes import ByteLM
from hlm.bytes.canonical import canonicalized_stream, stream_keys
from hlm.bytes.covers import ConversionRules
from hlm.bytes.exact_eval import mask_key_code
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


def incomplete_char(data: bytes) -> bytes:
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
        mask = self.rules.next_mask(last, incomplete_char(self.tok.decode(path[1:]))).clone()
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
        expect.append(mask_key_code(None if t == sp_bpe.eos_id else t, incomplete_char(text)))
    assert codes.tolist() == expect
    assert sum(c & 0xFFFFFFFF != 0 for c in expect) >= 5  # 日, 本, 😀 (twice the first bytes), Ж...


def test_stream_windows_and_bpb_match_plain_scoring(sp_bpe):
    """On the windows of eval's canonical scoring (several per document), bpb_canon is its bpb."""
    model = tiny_gpt(sp_bpe.vocab_size, block=8, seed=1)
    ids = encode_stream(SP_DOCS, sp_bpe, sp_bpe.eos_id)
    nbytes = torch.tensor([max(len(sp_bpe.token_bytes(i)), 1) for i in range(sp_bpe.vocab_size)])
    for stride in (None, 3):
        plain = score_stream(model, ids, nbytes, 8, stride)
        res = canonicalized_stream(model, ids, sp_bpe, sp_bpe.eos_id, nbytes, 8, stride, batch_size=3, chunk_rows=5)
        assert res["tokens"] == plain["tokens"] and res["bytes"] == plain["bytes"]
        assert abs(res["bpb_canon"] - plain["nll"] / (LN2 * plain["bytes"])) < 1e-9
        assert 0 < res["bpb_leak"] == pytest.approx(res["bpb_canon"] - res["bpb_canonicalized"])
        assert 0 < res["mean_leak"] < 1 and 0 < res["share_leak_above_1pct"] <= 1


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_regex_tokenizers_never_mask_a_canonical_token(name):
    shared = FIXTURES / "tokenizers"
    tok = load_tokenizer(shared / "gpt2" if name == "gpt2" else shared / "tiktoken" / f"{name}.tiktoken")
    model = tiny_gpt(tok.vocab_size, seed=2)
    for doc in ["a  b\t\n\n  c", "I'VE 12345 caf\u00e9 \U0001f44d\u200d x"]:
        res = per_doc_canonicalized(model, tok, doc.encode(), tok.eos_id)
        assert res["masked_targets"] == 0 and res["nll_canonicalized"] <= res["nll_canon"]
