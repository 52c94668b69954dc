"""Readers for byte-level BPE tokenizer files: a GPT-2 folder (encoder.json + vocab.bpe), a tiktoken
rank file and a Hugging Face tokenizer.json, each as an `hlm.tokenizers.BPETokenizer` with its
pretokenizer pattern and special tokens."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from hlm.tokenizers import BPETokenizer, TokenizerError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
TIKTOKEN_SPECIALS = {
    "gpt2": (GPT2_PATTERN, {"<|endoftext|>": 50256}),
    "cl100k_base": (CL100K_PATTERN, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                     "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
}



def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in encoder.json / vocab.bpe."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_gpt2_folder(folder: Path) -> BPETokenizer:
    """encoder.json + vocab.bpe: ranks are the merge order (checked against encoder.json's ids)."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def raw(s: str) -> bytes:
        return bytes(decoder[c] for c in s)

    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    ranks = {raw(c): encoder[c] for c in bytes_to_unicode().values()}
    for left, right in merges:
        b = raw(left) + raw(right)
        if encoder.get(left + right) is None:
            raise TokenizerError(f"{folder}: merge {left} {right} is not in encoder.json")
        ranks[b] = encoder[left + right]
    specials = {k: v for k, v in encoder.items() if k.startswith("<|")}
    return BPETokenizer.from_ranks(ranks, GPT2_PATTERN, specials, name="gpt2")


def load_tiktoken_file(path: Path) -> BPETokenizer:
    """A tiktoken rank file (base64 token, rank per line); the pretokenizer comes from its name."""
    name = path.name.removesuffix(".tiktoken")
    if name not in TIKTOKEN_SPECIALS:
        raise TokenizerError(f"{path}: unknown tiktoken encoding '{name}' (known: {', '.join(TIKTOKEN_SPECIALS)})")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    pattern, specials = TIKTOKEN_SPECIALS[name]
    return BPETokenizer.from_ranks(ranks, pattern, specials, name=name)


def load_hf_tokenizer_json(path: Path) -> BPETokenizer:
    """A Hugging Face `tokenizer.json` holding a byte-level BPE (GPT-2, Llama-3 style): vocab, merges,
    a ByteLevel or Split+ByteLevel pretokenizer, added tokens as specials. Normalizers and
    Metaspace/Unigram/WordPiece models are refused: they do not map bytes to ids exactly."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json is supported, not {model.get('type')}")
    if spec.get("normalizer") is not None:
        raise TokenizerError(f"{path}: a normalizer changes the bytes; exact byte conversion needs none")
    pattern, prefix_space = _hf_pretokenizer(spec.get("pre_tokenizer"), path)
    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def raw(s: str) -> bytes:
        try:
            return bytes(decoder[c] for c in s)
        except KeyError:
            raise TokenizerError(f"{path}: token {s!r} is not in GPT-2's byte-level alphabet") from None

    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    size = max(list(model["vocab"].values()) + list(specials.values())) + 1
    token_bytes = [b""] * size
    for s, i in model["vocab"].items():
        if s not in specials:
            token_bytes[i] = raw(s)
    pair_rank = {}
    for k, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        pair_rank[(raw(left), raw(right))] = k
    eos = next((specials[s] for s in ("<|endoftext|>", "<|end_of_text|>", "</s>") if s in specials), None)
    bos = next((specials[s] for s in ("<|begin_of_text|>", "<s>") if s in specials), None)
    tok = BPETokenizer(token_bytes, lambda a, b: pair_rank.get((a, b)), pattern, specials, eos, bos, name="hf")
    tok.ignore_merges = bool(model.get("ignore_merges"))
    tok.add_dummy_prefix = prefix_space
    return tok


def _hf_pretokenizer(spec: dict | None, path: Path) -> tuple[str, bool]:
    """(regex, add_prefix_space) of a ByteLevel or Sequence[Split(regex), ByteLevel] pretokenizer."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return GPT2_PATTERN, bool(spec.get("add_prefix_space"))
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and "Regex" in parts[0].get("pattern", {})
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
            return parts[0]["pattern"]["Regex"], bool(parts[1].get("add_prefix_space"))
    kind = spec.get("type") if spec else None
    raise TokenizerError(f"{path}: unsupported pretokenizer {kind!r} (need ByteLevel, or Split + ByteLevel)")
