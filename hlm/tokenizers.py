"""Tokenizers as byte-exact maps between bytes and ids.

Every tokenizer here exposes `encode(bytes) -> list[int]`, `decode(ids) -> bytes`,
`token_bytes(i) -> bytes`, `vocab_size`, `eos_id` and `bos_id`. For exact
byte-level conversion (hlm.bytes, whose `merge_tables` derives reachability and canonical adjacency
from them) they also expose the BPE itself: `encode_piece` (the BPE of one pretoken, without
pretokenization), `atoms` (the parts it starts from), `merge_rank`, `piece_id`, `token_id`, and
`boundary_rule`, which says how pretoken boundaries are decided: "none" (one pretoken: raw
byte BPE), "whitespace" (sentencepiece: a new piece starts at a space that follows a non-space)
or "regex" (GPT-2 / cl100k pretokenizer with lookahead).

Three BPE flavours share one merge loop: pair ranks (`from_merges`), concatenation ranks
(tiktoken, GPT-2 folders) and sentencepiece piece scores over characters with byte fallback.
In every flavour the lowest-ranked mergeable adjacent pair merges first, leftmost on ties.
`load_tokenizer` reads any of them; the GPT-2, tiktoken and tokenizer.json readers are in
hlm/tokenizer_files.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from hlm import HLMError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

class TokenizerError(HLMError):
    """Input a text tokenizer cannot take, or a tokenizer file that cannot be used."""


def bpe_merge(parts: list[bytes], rank: Callable[[bytes, bytes], float | None]) -> tuple[list[bytes], tuple | None]:
    """Merge adjacent parts, lowest rank first and leftmost on ties, until no pair merges. Returns the parts
    and the last merge (left, right, rank): for a token's own bytes, the top of its merge tree."""
    parts, last = list(parts), None
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = rank(parts[i], parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        last = (parts[at], parts[at + 1], best)
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts, last


class _ByteTable:
    """Bytes of every id, and the reverse map for tokens that are not special or byte fallback."""

    vocab_size: int
    _bytes: list[bytes]
    _id_of: dict[bytes, int]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def piece_id(self, data: bytes) -> int | None:
        """The token whose bytes are exactly `data`, if any, special tokens and byte-fallback pieces aside."""
        return self._id_of.get(data)

    def token_id(self, data: bytes) -> int | None:
        """The non-special token whose bytes are exactly `data`, if any."""
        return self._id_of.get(data)


class BPETokenizer(_ByteTable):
    """Byte-level BPE: ids of the base bytes and merged tokens, then special tokens (no bytes).

    `pattern` (a `regex` pattern) splits text into pretokens first, as GPT-2 and cl100k do;
    without it the whole text is one pretoken."""

    def __init__(self, token_bytes: list[bytes], rank: Callable[[bytes, bytes], int | None],
                 pattern: str | None = None, specials: dict[str, int] | None = None,
                 eos_id: int | None = None, bos_id: int | None = None, name: str = "bpe"):
        self._bytes = list(token_bytes)
        self.vocab_size = len(self._bytes)
        self.merge_rank = rank  # (left bytes, right bytes) -> rank of their merge, None if they never merge
        self.pattern = pattern
        self._regex = None
        if pattern is not None:
            import regex

            self._regex = regex.compile(pattern)
        self.specials = dict(specials or {})
        self.eos_id, self.bos_id = eos_id, bos_id
        self.name = name
        self.boundary_rule = "regex" if pattern else "none"
        self.add_dummy_prefix = False
        self.ignore_merges = False
        self._id_of = {}
        for i, b in enumerate(self._bytes):
            if b and b not in self._id_of:
                self._id_of[b] = i
        self._piece_cache: dict[bytes, list[int]] = {}

    @classmethod
    def from_merges(cls, merges: list[tuple[bytes, bytes]], eos: bool = True, bos: bool = False) -> BPETokenizer:
        """Byte-level BPE without a pretokenizer: ids 0..255 are bytes, 256+i is merges[i], then eos (and bos)."""
        token_bytes = [bytes([i]) for i in range(256)]
        pair_rank: dict[tuple[bytes, bytes], int] = {}
        known = set(token_bytes)
        for i, (left, right) in enumerate(merges):
            left, right = bytes(left), bytes(right)
            if left not in known or right not in known:
                raise TokenizerError(f"merge {i} ({left!r}, {right!r}) uses a token not made by earlier merges")
            if left + right in known:
                raise TokenizerError(f"merge {i} makes {left + right!r}, which is already a token")
            pair_rank[(left, right)] = i
            token_bytes.append(left + right)
            known.add(left + right)
        ids = len(token_bytes)
        eos_id = ids if eos else None
        bos_id = ids + int(eos) if bos else None
        token_bytes += [b""] * (int(eos) + int(bos))
        return cls(token_bytes, lambda a, b: pair_rank.get((a, b)), eos_id=eos_id, bos_id=bos_id, name="merges")

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str | None, specials: dict[str, int],
                   name: str, eos: str | None = "<|endoftext|>") -> BPETokenizer:
        """Concatenation-ranked BPE (tiktoken): any adjacent pair whose bytes form a token merges, by its rank."""
        size = max(list(ranks.values()) + list(specials.values())) + 1
        token_bytes = [b""] * size
        for b, i in ranks.items():
            token_bytes[i] = b
        tok = cls(token_bytes, lambda a, b: ranks.get(a + b), pattern, specials,
                  eos_id=specials.get(eos) if eos else None, name=name)
        return tok

    def atoms(self, data: bytes) -> list[bytes]:
        """The parts BPE starts from: single bytes."""
        return [data[i : i + 1] for i in range(len(data))]

    def encode_piece(self, data: bytes) -> list[int]:
        """BPE of one pretoken (no pretokenizer, no special tokens). With `ignore_merges` (Llama-3 style
        tokenizer.json) a pretoken that is itself a token is emitted whole."""
        hit = self._piece_cache.get(data)
        if hit is None and self.ignore_merges and data in self._id_of:
            hit = [self._id_of[data]]
        if hit is None:
            hit = [self._id_of[p] for p in bpe_merge(self.atoms(data), self.merge_rank)[0]]
            if len(self._piece_cache) > 200_000:
                self._piece_cache.clear()
            self._piece_cache[data] = hit
        return hit

    def pretokenize(self, text: str) -> list[str]:
        return self._regex.findall(text) if self._regex is not None else [text]

    def encode(self, data: bytes) -> list[int]:
        """Ordinary text encoding: special-token strings in the text are encoded as plain text."""
        if self.add_dummy_prefix:
            data = b" " + data
        if self._regex is None:
            return self.encode_piece(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"invalid UTF-8 at byte {e.start}: a pretokenizing tokenizer needs text") from None
        return [t for piece in self.pretokenize(text) for t in self.encode_piece(piece.encode("utf-8"))]


class SentencePieceTokenizer(_ByteTable):
    """A sentencepiece `.model` seen as bytes: pieces map to their UTF-8 bytes ('▁' is a space),
    byte-fallback pieces `<0xAB>` to one byte, control pieces to no bytes.

    For exact conversion the BPE is re-implemented over characters (highest score first,
    characters missing from the pieces fall back to byte pieces); tests check it against
    sentencepiece. Unigram models load but cannot be converted exactly."""

    def __init__(self, path: str | Path | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is not None:
                self.sp.LoadFromSerializedProto(model_proto)
            else:
                self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {path}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self.model_type, self.add_dummy_prefix, self.normalization = self._trainer_facts(model_proto, path)
        self.boundary_rule = "whitespace"
        self._id_of, self.byte_pieces = {}, {}  # byte_pieces: the byte-fallback piece of each byte
        self._score: dict[bytes, float] = {}
        for i, b in enumerate(self._bytes):
            if self.sp.is_byte(i):
                self.byte_pieces[b] = i
            elif b and not self.sp.is_unused(i):
                self._id_of.setdefault(b, i)
                self._score[b] = self.sp.get_score(i)
        self._piece_cache: dict[bytes, list[int]] = {}

    @staticmethod
    def _trainer_facts(model_proto: bytes | None, path) -> tuple[str, bool, str]:
        """(model type, add_dummy_prefix, normalization) read from the serialized ModelProto directly,
        so that protobuf need not be installed."""
        proto = model_proto if model_proto is not None else Path(path).read_bytes()
        top = _proto_fields(proto)
        trainer = _proto_fields(top.get(2, [b""])[-1])
        norm = _proto_fields(top.get(3, [b""])[-1])
        kind = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer.get(3, [1])[-1], "unknown")
        name = norm.get(1, [b"nmt_nfkc"])[-1].decode("utf-8", "replace")
        dummy = bool(norm.get(3, [1])[-1])
        if norm.get(4, [1])[-1]:
            name += "+remove_extra_whitespaces"
        return kind, dummy, name

    def _piece_bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        piece = self.sp.id_to_piece(i)
        m = _BYTE_PIECE.match(piece)
        if m and self.sp.is_byte(i):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_id(self, data: bytes) -> int | None:
        hit = self._id_of.get(data)
        return hit if hit is not None or len(data) != 1 else self.byte_pieces.get(data)

    def check_exact(self) -> None:
        """Refuse tokenizers whose encoding the cover recursion cannot follow exactly."""
        if self.model_type != "bpe":
            raise TokenizerError(f"sentencepiece {self.model_type} model: exact byte conversion needs a BPE model "
                                 "(Unigram segmentations are not prefix-closed)")

    def atoms(self, data: bytes) -> list[bytes]:
        """The parts BPE starts from: characters that are pieces stay whole; other characters (and stray
        bytes) become bytes."""
        out, i = [], 0
        while i < len(data):
            n = _utf8_len(data[i])
            ch = data[i : i + n]
            if n > 1 and len(ch) == n and _is_utf8(ch) and ch in self._id_of:
                out.append(ch)
                i += n
            elif n == 1 and ch in self._id_of:
                out.append(ch)
                i += 1
            else:
                good = n > 1 and len(ch) == n and _is_utf8(ch)
                out.extend(data[j : j + 1] for j in range(i, i + (n if good else 1)))
                i += n if good else 1
        return out

    def merge_rank(self, a: bytes, b: bytes) -> float | None:
        """Rank of merging two parts (the negated piece score), None if they make no piece or one is a byte."""
        s = self._score.get(a + b)  # looked up first: most pairs make no piece
        return None if s is None or self._is_fallback(a) or self._is_fallback(b) else -s

    def _is_fallback(self, part: bytes) -> bool:
        return len(part) == 1 and part not in self._id_of

    def encode_piece(self, data: bytes) -> list[int]:
        hit = self._piece_cache.get(data)
        if hit is None:
            hit = [self.byte_pieces[p] if self._is_fallback(p) else self._id_of[p]
                   for p in bpe_merge(self.atoms(data), self.merge_rank)[0]]
            if len(self._piece_cache) > 200_000:
                self._piece_cache.clear()
            self._piece_cache[data] = hit
        return hit

    def encode_pieces_exact(self, data: bytes) -> list[int]:
        """The re-implemented encoding (whitespace pretokens, then BPE); equals `encode` on BPE models."""
        out, start = [], 0
        for i in range(1, len(data) + 1):
            if i == len(data) or (data[i] == 0x20 and data[i - 1] != 0x20):
                out.extend(self.encode_piece(data[start:i]))
                start = i
        return out

    def encode(self, data: bytes) -> list[int]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"invalid UTF-8 at byte {e.start}: a text tokenizer needs text") from None
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)


Tokenizer = BPETokenizer | SentencePieceTokenizer  # what load_tokenizer returns and checkpoints hold


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message: number -> values (ints for varints, bytes otherwise)."""
    out: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise TokenizerError(f"unreadable sentencepiece model (protobuf wire type {wire})")
        out.setdefault(number, []).append(value)
    return out


def _utf8_len(lead: int) -> int:
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1


@lru_cache(maxsize=65536)
def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer by its kind: sentencepiece `.model`, GPT-2 folder (encoder.json + vocab.bpe),
    a tiktoken `.tiktoken` rank file, or a Hugging Face `tokenizer.json` (file or folder)."""
    from hlm.tokenizer_files import load_gpt2_folder, load_hf_tokenizer_json, load_tiktoken_file

    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() and (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        return load_gpt2_folder(path)
    if path.suffix == ".tiktoken":
        return load_tiktoken_file(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return load_hf_tokenizer_json(path / "tokenizer.json")
    if path.suffix == ".json":
        return load_hf_tokenizer_json(path)
    raise TokenizerError(f"unknown tokenizer format: {path}")


def round_trips(tok: Tokenizer, x: bytes) -> bool:
    """`decode(encode(x)) == x`, up to the space a dummy-prefix sentencepiece model adds in front."""
    dummy = b" " if getattr(tok, "add_dummy_prefix", False) else b""
    try:
        return tok.decode(tok.encode(x)) == dummy + x
    except HLMError:
        return False


def round_trip_failures(tok: Tokenizer, docs: Iterable[bytes]) -> list[int]:
    """Indices of documents that do not round-trip (exact byte conversion is defined only on the others)."""
    return [i for i, doc in enumerate(docs) if not round_trips(tok, doc)]
