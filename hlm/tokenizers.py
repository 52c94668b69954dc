"""Tokenizers as byte-exact maps between bytes and ids.

Every tokenizer here exposes `encode(bytes) -> list[int]`, `decode(ids) -> bytes`,
`token_bytes(i) -> bytes`, `vocab_size`, `eos_id` and `bos_id`. For exact
byte-level conversion (hlm.bytes) they also expose `encode_piece` (the BPE of one pretoken,
without pretokenization), `reachable_mask`, `pair_valid` / `pair_valid_mask` / `pair_valid_masks`
(canonical adjacency inside one pretoken: of one pair, after one token, after each of a batch)
and `boundary_rule`, which says how pretoken boundaries are decided: "none" (one pretoken: raw
byte BPE), "whitespace" (sentencepiece: a new piece starts at a space that follows a non-space)
or "regex" (GPT-2 / cl100k pretokenizer with lookahead).

Three BPE flavours share one merge loop: pair ranks (`from_merges`), concatenation ranks
(tiktoken, GPT-2 folders) and sentencepiece piece scores over characters with byte fallback.
In every flavour the lowest-ranked mergeable adjacent pair merges first, leftmost on ties.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import torch

from hlm import HLMError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
TIKTOKEN_SPECIALS = {
    "gpt2": (GPT2_PATTERN, {"<|endoftext|>": 50256}),
    "cl100k_base": (CL100K_PATTERN, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                     "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
}


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


class _ConversionMixin:
    """Validity helpers shared by the BPE tokenizers (Phan et al. 2024)."""

    vocab_size: int
    _bytes: list[bytes]
    _id_of: dict[bytes, int]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def token_id(self, data: bytes) -> int | None:
        """The non-special token whose bytes are exactly `data`, if any."""
        return self._id_of.get(data)

    def reachable_mask(self) -> torch.Tensor:
        """Tokens the BPE can emit: `encode_piece(token_bytes(t)) == [t]` (special tokens: False)."""
        if getattr(self, "_reachable", None) is None:
            self._reachable = self._histories()[0]
        return self._reachable

    def pair_valid(self, a: int, b: int) -> bool:
        """Is `[a, b]` the BPE of `bytes(a) + bytes(b)` inside one pretoken? (reachability aside)"""
        return self.encode_piece(self._bytes[a] + self._bytes[b]) == [a, b]

    def pair_valid_mask(self, a: int) -> torch.Tensor:
        """`pair_valid(a, t)` for every t: one row of `pair_valid_masks`, cached for the byte-by-byte tracker."""
        cache = self.__dict__.setdefault("_pair_masks", {})
        if a not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[a] = self.pair_valid_masks(torch.tensor([a]))[0]
        return cache[a]

    def pair_valid_by_merges(self, a: int, t: int) -> bool:
        """`pair_valid_mask(a)[t]` for one pair, memoised (the cover tracker asks one token at a time), from
        the same tables as the batched join: [a, t] fails iff a merge (x, y) that can fire across a's right
        edge meets a node y on t's left spine that is still unfinished at the merge's rank."""
        memo = self.__dict__.setdefault("_pair_memo", {})
        hit = memo.get((a, t))
        if hit is None:
            crossing, left = self._crossing_merges(a), self._left_spine_lists()[t]
            hit = bool(left) and not any((r := crossing.get(y)) is not None and r <= limit for y, limit in left)
            if len(memo) > 4_000_000:
                memo.clear()
            memo[(a, t)] = hit
        return hit

    def _crossing_merges(self, a: int) -> dict[int, float]:
        """{y: earliest rank} of the merges (x, y) that can fire across a's right edge (`_pair_tables`' rows of a)."""
        cache = self.__dict__.setdefault("_crossing_cache", {})
        if a not in cache:
            (right, rank, start, count), _ = self._pair_tables()
            lo, hi = int(start[a]), int(start[a] + count[a])
            merges: dict[int, float] = {}
            for y, r in zip(right[lo:hi].tolist(), rank[lo:hi].tolist(), strict=True):
                merges[y] = min(r, merges.get(y, r))
            cache[a] = merges
        return cache[a]

    def _left_spine_lists(self) -> list[list[tuple[int, float]]]:
        """Every token's left spine as (node, rank that merges it away) pairs (empty for tokens without bytes)."""
        if getattr(self, "_left_lists", None) is None:
            _, left, _, rank = self._histories()
            nodes, limits = _spines(left, rank, self._has_bytes())
            self._left_lists = [[(n, r) for n, r in zip(row_n, row_r, strict=True) if n < self.vocab_size]
                                for row_n, row_r in zip(nodes.tolist(), limits.tolist(), strict=True)]
        return self._left_lists

    def pair_valid_masks(self, lasts: torch.Tensor) -> torch.Tensor:
        """Bool[K, V]: `pair_valid(lasts[k], t)` for every t, from the merge histories of the right edge of
        lasts[k] and the left edge of t: [a, t] fails only if some merge across the boundary fires before
        both sides finish (a's side wins ties, being further left). Exact when every merge ranks after the
        merges that built its parts, as in trained vocabularies; tests check it against `pair_valid`."""
        row, t = self._pair_conflicts(lasts)
        mask = self._has_bytes().to(lasts.device).repeat(len(lasts), 1)
        mask[row, t] = False
        return mask

    def _pair_conflicts(self, lasts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, t) of every pair [lasts[k], t] that is not valid (some more than once), as one sparse join over
        all k: the merges (x, y) that can fire across the right edge of lasts[k] -> the tokens t with y on
        their left spine that are still unfinished at the merge's rank."""
        (b_right, b_rank, b_start, b_count), (s_owner, s_key, s_levels, s_start) = self._pair_tables(lasts.device)
        entry, row = _ranges(b_start[lasts], b_count[lasts])
        y = b_right[entry]
        unfinished = _count_below(s_key, s_levels, s_start, y, -b_rank[entry], right=True)  # limit >= rank
        entry, src = _ranges(s_start[y], unfinished)
        return row[src], s_owner[entry]

    def _pair_tables(self, device: torch.device | str = "cpu") -> tuple:
        """The tables `_pair_conflicts` joins, built once (and copied once to each device): for each token, the
        merges (x, y) across its right edge: x on its right spine, ranked before x is merged away (right
        token y, rank, start, count); and the left-spine entries of each node, latest limit first (token,
        then `_sort_groups`' keys, levels and starts)."""
        cache = self.__dict__.setdefault("_pair_table_cache", {})
        device, cpu = torch.device(device), torch.device("cpu")
        if cpu not in cache:
            _, left, right, rank = self._histories()
            v, has_bytes = self.vocab_size, self._has_bytes()
            m_left, m_right, m_rank = self._merges()
            order, m_key, m_levels, m_start = _sort_groups(m_left, m_rank, v)  # each x's merges, earliest first
            nodes, limits = _spines(right, rank, has_bytes)
            real = nodes < v
            owner = torch.arange(v)[:, None].expand_as(nodes)[real]
            x, limit = nodes[real], limits[real]
            entry, src = _ranges(m_start[x], _count_below(m_key, m_levels, m_start, x, limit))  # rank < limit
            count = torch.bincount(owner[src], minlength=v)  # owners stay in order
            boundary = (m_right[order][entry], m_rank[order][entry], torch.cumsum(count, 0) - count, count)
            nodes, limits = _spines(left, rank, has_bytes)
            real = nodes < v
            owner = torch.arange(v)[:, None].expand_as(nodes)[real]
            order, s_key, s_levels, s_start = _sort_groups(nodes[real], -limits[real], v)
            cache[cpu] = (boundary, (owner[order], s_key, s_levels, s_start))
        if device not in cache:
            cache[device] = tuple(tuple(x.to(device) for x in part) for part in cache[cpu])
        return cache[device]

    def _has_bytes(self) -> torch.Tensor:
        if getattr(self, "_nonempty", None) is None:
            self._nonempty = torch.tensor([bool(b) for b in self._bytes])
        return self._nonempty

    def _merges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every merge of two tokens into a token, from every split of every token's bytes: (left, right, rank)."""
        if getattr(self, "_merge_rows", None) is None:
            rows, find = [], self._id_of.get  # byte-fallback pieces never merge: they need not be found
            for data in dict.fromkeys(self._bytes):  # distinct bytes, in id order
                for k in range(1, len(data)):
                    left = find(data[:k])
                    right = None if left is None else find(data[k:])
                    r = None if right is None else self._rank(data[:k], data[k:])
                    if r is not None:
                        rows.append((left, right, r))
            left, right, rank = zip(*rows, strict=True) if rows else ((), (), ())
            self._merge_rows = (torch.tensor(left, dtype=torch.int64), torch.tensor(right, dtype=torch.int64),
                                torch.tensor(rank, dtype=torch.float64))
        return self._merge_rows

    def _histories(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One BPE of every token's own bytes: whether it yields the token itself (reachability) and, when it
        yields one part, its last merge (left child, right child, rank; -1 children for atoms and tokens the
        BPE cannot build). These are the merge trees the pair rule walks."""
        if getattr(self, "_hist", None) is None:
            v = self.vocab_size
            reach, lchild, rchild, ranks = [False] * v, [-1] * v, [-1] * v, [0.0] * v
            for t, data in enumerate(self._bytes):
                parts, last = bpe_merge(self._atoms(data), self._rank)
                if len(parts) == 1:
                    reach[t] = self.token_id(parts[0]) == t
                    if last is not None:
                        lchild[t], rchild[t], ranks[t] = self.token_id(last[0]), self.token_id(last[1]), last[2]
            self._hist = (torch.tensor(reach), torch.tensor(lchild), torch.tensor(rchild),
                          torch.tensor(ranks, dtype=torch.float64))
        return self._hist


def _spines(child: torch.Tensor, rank: torch.Tensor, has_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, D] nodes on each token's left (or right) edge, following `child` down its merge tree (padded
    with V; no row for tokens without bytes), and the rank that merges each node away (inf at the top)."""
    v = len(child)
    child = torch.cat([torch.where(child >= 0, child, v), torch.tensor([v])])
    rank = torch.cat([rank, torch.zeros(1, dtype=torch.float64)])
    node = torch.where(has_bytes, torch.arange(v), v)
    limit = torch.full((v,), float("inf"), dtype=torch.float64)
    nodes, limits = [], []
    while not nodes or (node < v).any():
        nodes.append(node)
        limits.append(torch.where(node < v, limit, -float("inf")))
        node, limit = child[node], rank[node]
    return torch.stack(nodes, 1), torch.stack(limits, 1)


def _ranges(start: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices start[i] .. start[i] + count[i] - 1 for every i, concatenated, and the i each came from."""
    src = torch.repeat_interleave(torch.arange(len(start), device=start.device), count)
    entry = torch.arange(len(src), device=start.device) - (torch.cumsum(count, 0) - count - start)[src]
    return entry, src


def _sort_groups(group: torch.Tensor, value: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Entries sorted by (group, value), so that the entries of a group below any bound are a prefix of it:
    the order, the sorted keys (group and value level in one int), the distinct values, each group's start."""
    levels = torch.unique(value)
    key = group * len(levels) + torch.searchsorted(levels, value)
    order = torch.argsort(key)
    count = torch.bincount(group, minlength=n)
    return order, key[order], levels, torch.cumsum(count, 0) - count


def _count_below(key: torch.Tensor, levels: torch.Tensor, start: torch.Tensor, group: torch.Tensor,
                 bound: torch.Tensor, right: bool = False) -> torch.Tensor:
    """How many entries of each group (of `_sort_groups`) have a value < bound (<= bound with right=True)."""
    level = torch.searchsorted(levels, bound, right=right)
    return torch.searchsorted(key, group * len(levels) + level) - start[group]


class BPETokenizer(_ConversionMixin):
    """Byte-level BPE: ids of the base bytes and merged tokens, then special tokens (no bytes).

    `pattern` (a `regex` pattern) splits text into pretokens first, as GPT-2 and cl100k do;
    without it the whole text is one pretoken."""

    def __init__(self, token_bytes: list[bytes], rank: Callable[[bytes, bytes], int | None],
                 pattern: str | None = None, specials: dict[str, int] | None = None,
                 eos_id: int | None = None, bos_id: int | None = None, name: str = "bpe"):
        self._bytes = list(token_bytes)
        self.vocab_size = len(self._bytes)
        self._rank = rank
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
        self._reachable = None
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
        tok._ranks = ranks
        return tok

    def reachable_mask(self) -> torch.Tensor:
        """As for any BPE; with `ignore_merges` every token is its own encoding (duplicates: the first id)."""
        if self.ignore_merges and self._reachable is None:
            self._reachable = torch.tensor([bool(b) and self._id_of.get(b) == i for i, b in enumerate(self._bytes)])
        return super().reachable_mask()

    def _atoms(self, data: bytes) -> list[bytes]:
        return [data[i : i + 1] for i in range(len(data))]

    def encode_piece(self, data: bytes) -> list[int]:
        """BPE of one pretoken (no pretokenizer, no special tokens). With `ignore_merges` (Llama-3 style
        tokenizer.json) a pretoken that is itself a token is emitted whole."""
        hit = self._piece_cache.get(data)
        if hit is None and self.ignore_merges and data in self._id_of:
            hit = [self._id_of[data]]
        if hit is None:
            hit = [self._id_of[p] for p in bpe_merge(self._atoms(data), self._rank)[0]]
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


class SentencePieceTokenizer(_ConversionMixin):
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
        self._id_of, self._byte_piece = {}, {}
        self._score: dict[bytes, float] = {}
        for i, b in enumerate(self._bytes):
            if self.sp.is_byte(i):
                self._byte_piece[b] = i
            elif b and not self.sp.is_unused(i):
                self._id_of.setdefault(b, i)
                self._score[b] = self.sp.get_score(i)
        self._reachable = None
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
        return hit if hit is not None or len(data) != 1 else self._byte_piece.get(data)

    def reachable_mask(self) -> torch.Tensor:
        """As for any BPE, minus byte pieces for bytes that never occur in UTF-8 (C0, C1, F5-FF)."""
        if getattr(self, "_reachable", None) is None:
            mask = super().reachable_mask().clone()
            for b, t in self._byte_piece.items():
                if b[0] in (0xC0, 0xC1) or b[0] >= 0xF5:
                    mask[t] = False
            self._reachable = mask
        return self._reachable

    def check_exact(self) -> None:
        """Refuse tokenizers whose encoding the cover recursion cannot follow exactly."""
        if self.model_type != "bpe":
            raise TokenizerError(f"sentencepiece {self.model_type} model: exact byte conversion needs a BPE model "
                                 "(Unigram segmentations are not prefix-closed)")

    def _atoms(self, data: bytes) -> list[bytes]:
        """Characters that are pieces stay whole; other characters (and stray bytes) become bytes."""
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

    def _rank(self, a: bytes, b: bytes) -> float | None:
        s = self._score.get(a + b)  # looked up first: most pairs make no piece
        return None if s is None or self._is_fallback(a) or self._is_fallback(b) else -s

    def _is_fallback(self, part: bytes) -> bool:
        return len(part) == 1 and part not in self._id_of

    def encode_piece(self, data: bytes) -> list[int]:
        hit = self._piece_cache.get(data)
        if hit is None:
            hit = [self._byte_piece[p] if self._is_fallback(p) else self._id_of[p]
                   for p in bpe_merge(self._atoms(data), self._rank)[0]]
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer by its kind: sentencepiece `.model`, GPT-2 folder (encoder.json + vocab.bpe),
    a tiktoken `.tiktoken` rank file, or a Hugging Face `tokenizer.json` (file or folder)."""
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
