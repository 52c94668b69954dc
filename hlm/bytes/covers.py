"""Model-free bookkeeping of cover encodings (Phan et al. 2024).

For a byte prefix s, every valid cover is `E + [t]`: E is a valid token path decoding to
s[:i] (an *exact node* at i) and t's bytes start with s[i:]. `CoverTracker` follows s byte by
byte and keeps, in a token trie, the exact nodes of every position and the *anchors*: exact
nodes at i whose next token may still straddle the end of s. Which nodes exist depends only on
the tokenizer and the text, never on the model, so evaluation can enumerate all nodes first
and score them in one batched pass.

Validity ("which t may follow E") comes from `ConversionRules`:
- raw byte BPE (`from_merges`): reachable tokens and pair-valid neighbours: exact;
- sentencepiece BPE: the same inside a whitespace pretoken, a free start after a space that
  follows a non-space; inside a character only the byte-fallback pieces that continue it into
  valid UTF-8 and do not complete a character that is a piece. A byte piece may start any
  character with a legal lead byte (a valid prefix as long as some character with those bytes
  is not a piece, practically always): exact;
- regex pretokenizers (GPT-2, cl100k): the last token is checked for reachability only, and
  every node ending on a character boundary is checked against the tokenizer itself (the
  tail since the last stable pretoken, continued by a set of probe characters that stand for
  any lookahead). Exact on the nodes; for a model that leaks mass to non-canonical last tokens
  the next-byte distribution keeps that leaked mass (like ByteSampler's default).
`marginal=True` allows every token and keeps every exact path: the all-tokenizations model.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from hlm import HLMError
from hlm.bytes.merge_tables import merge_tables

PROBES = ("", " ", "a", "A", "0", ".", "\n", "\r", "\t", "e", "l", "s", "E", "L", "S", "'")


class MissingCoverError(HLMError):
    """The canonical encoding of a prefix is not among its tracked covers: conversion cannot be exact."""


class VocabIndex:
    """Non-special tokens sorted by bytes: the tokens starting with u form one range [lo, hi)."""

    def __init__(self, tok):
        ids = [i for i in range(tok.vocab_size) if tok.token_bytes(i)]
        ids.sort(key=tok.token_bytes)
        self.perm = torch.tensor(ids, dtype=torch.int64)
        self.sorted_bytes = [tok.token_bytes(i) for i in ids]
        lens = torch.tensor([len(b) for b in self.sorted_bytes])
        self.max_len = int(lens.max())
        row = torch.repeat_interleave(torch.arange(len(ids)), lens)
        col = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        self.byte_at = torch.zeros(len(ids), self.max_len, dtype=torch.uint8)
        self.byte_at[row, col] = torch.frombuffer(bytearray(b"".join(self.sorted_bytes)), dtype=torch.uint8)
        self._ranges: dict[bytes, tuple[int, int]] = {}
        self._strict: dict[bytes, tuple[int, int]] = {}

    def range(self, u: bytes) -> tuple[int, int]:
        hit = self._ranges.get(u)
        if hit is None:
            lo = bisect.bisect_left(self.sorted_bytes, u)
            succ = u.rstrip(b"\xff")
            if succ:
                succ = succ[:-1] + bytes([succ[-1] + 1])
            hi = bisect.bisect_left(self.sorted_bytes, succ, lo) if succ else len(self.sorted_bytes)
            if len(self._ranges) > 1_000_000:
                self._ranges.clear()
            hit = self._ranges[u] = (lo, hi)
        return hit

    def strict_range(self, u: bytes) -> tuple[int, int]:
        """Tokens whose bytes start with u and are longer than u."""
        hit = self._strict.get(u)
        if hit is None:
            lo, hi = self.range(u)
            if len(self._strict) > 1_000_000:
                self._strict.clear()
            hit = self._strict[u] = (bisect.bisect_right(self.sorted_bytes, u, lo, hi), hi)
        return hit


class ConversionRules:
    """Which tokens may follow an exact node, and which candidate nodes are exact (see module doc)."""

    def __init__(self, tok, marginal: bool = False, index: VocabIndex | None = None):
        if hasattr(tok, "check_exact"):
            tok.check_exact()
        self.tok = tok
        self.marginal = marginal
        self.rule = tok.boundary_rule
        self.tables = merge_tables(tok)
        self.index = index or VocabIndex(tok)
        self.has_bytes = torch.tensor([bool(tok.token_bytes(i)) for i in range(tok.vocab_size)])
        self.token_lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
        self._masks: dict[tuple[int | None, bytes], torch.Tensor] = {}
        self._allowed_alone: list[bool] | None = None
        if self.rule in ("none", "whitespace") and not marginal:  # build the merge tables now, not mid-stream
            self.tables.prepare()
        if self.rule == "whitespace" and not marginal:
            first = [tok.token_bytes(i)[:1] for i in range(tok.vocab_size)]
            self.starts_space = torch.tensor([f == b" " for f in first])
            self._starts_space = self.starts_space.tolist()
            self.ends_space = torch.tensor([tok.token_bytes(i)[-1:] == b" " for i in range(tok.vocab_size)])
            byte_piece = torch.zeros(tok.vocab_size, dtype=torch.bool)
            byte_piece[list(tok.byte_pieces.values())] = True
            cont = torch.tensor([bool(f) and 0x80 <= f[0] < 0xC0 for f in first])
            self.continuation_pieces = byte_piece & cont & self.tables.reachable_mask()

    def allows(self, last: int | None, partial: bytes, t: int) -> bool:
        """`next_mask(last, partial)[t]` without building the mask: the tracker asks about one token per
        anchor and byte, and a fresh V-wide pair mask per distinct last token would dominate planning."""
        tok = self.tok
        if self.marginal or self.rule == "regex" or partial:
            return bool(self.next_mask(last, partial)[t])
        if self._allowed_alone is None:
            alone = self.tables.reachable_mask()
            if self.rule == "whitespace":
                alone = alone & ~self.continuation_pieces
            self._allowed_alone = alone.tolist()
        if not self._allowed_alone[t]:
            return False
        if last is None:
            return True
        if self.rule == "whitespace" and self._starts_space[t] and tok.token_bytes(last)[-1:] != b" ":
            return True
        return self.tables.pair_valid_by_merges(last, t)

    def next_mask(self, last: int | None, partial: bytes) -> torch.Tensor:
        """Bool[V]: tokens t such that (node + [t]) may be valid, for a node ending in token `last` whose
        text ends with the incomplete character `partial` (b"" on a character boundary)."""
        key = (last, partial)
        mask = self._masks.get(key)
        if mask is not None:
            return mask
        tok = self.tok
        if self.marginal:
            mask = self.has_bytes
        elif self.rule == "regex":
            mask = self.tables.reachable_mask()
        elif self.rule == "none":
            mask = self.tables.reachable_mask()
            if last is not None:
                mask = mask & self.tables.pair_valid_mask(last)
        elif partial:
            mask = self.continuation_pieces.clone()
            for b, t in tok.byte_pieces.items():
                if mask[t] and not _continues_char(partial + b, tok):
                    mask[t] = False
        else:
            mask = self.tables.reachable_mask() & ~self.continuation_pieces
            if last is not None:
                new_piece = self.starts_space & (tok.token_bytes(last)[-1:] != b" ")
                mask = mask & (self.tables.pair_valid_mask(last) | new_piece)
        if len(self._masks) > 8192:
            self._masks.clear()
        self._masks[key] = mask
        return mask

    def invalid_table(self, keys: list[tuple[int | None, bytes]], device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool[len(keys), sorted vocab]: `~next_mask(*key)[index.perm]` for every key, built on `device` in a
        few batched steps rather than key by key: the row of a node without a last token, then the pair
        conflicts of all last tokens from sparse joins. Keys inside a character keep the per-key path."""
        perm = self.index.perm
        table = ~self.next_mask(None, b"")[perm].to(device).repeat(len(keys), 1)
        if self.marginal or self.rule == "regex":  # the last token changes nothing
            return table
        spaces = self.rule == "whitespace"
        rows = [i for i, (last, partial) in enumerate(keys) if last is not None and not (spaces and partial)]
        lasts = torch.tensor([keys[i][0] for i in rows], dtype=torch.int64)
        rows = torch.tensor(rows, dtype=torch.int64)
        pos = torch.empty(self.tok.vocab_size, dtype=torch.int64)
        pos[perm] = torch.arange(len(perm))
        pos = pos.to(device)
        if spaces:
            starts_space, ends_space = self.starts_space.to(device), self.ends_space.to(device)
        for c in range(0, len(rows), 1024):  # bounds the join's memory
            row, last = rows[c : c + 1024].to(device), lasts[c : c + 1024].to(device)
            k, t = self.tables.pair_conflicts(last)
            if spaces:  # after a non-space, a token starting with a space starts a new pretoken: no conflict
                keep = ~(starts_space[t] & ~ends_space[last[k]])
                k, t = k[keep], t[keep]
            table[row[k], pos[t]] = True
        for i, (last, partial) in enumerate(keys):
            if spaces and partial:
                table[i] = ~self.next_mask(last, partial)[perm].to(device)
        return table


def _continues_char(data: bytes, tok) -> bool:
    """Is data a valid UTF-8 character or prefix of one, and if complete, a character that is not a piece?"""
    try:
        return data.decode("utf-8") and tok.piece_id(data) is None
    except UnicodeDecodeError as e:
        return e.start == 0 and e.reason == "unexpected end of data"


class CoverTrie:
    """Token paths as a trie; node 0 is the start symbol. Each node records where its text ends."""

    def __init__(self, start_id: int):
        self.parent, self.token, self.pos, self.mid = [-1], [start_id], [0], [b""]
        self.children: list[dict[int, int]] = [{}]

    def child(self, node: int, token: int, pos: int, mid: bytes) -> int:
        """The node for `node + [token]`; `mid` is the incomplete character its text ends with (or b"")."""
        hit = self.children[node].get(token)
        if hit is None:
            hit = len(self.parent)
            self.parent.append(node)
            self.token.append(token)
            self.pos.append(pos)
            self.mid.append(mid)
            self.children.append({})
            self.children[node][token] = hit
        return hit

    def last_token(self, node: int) -> int | None:
        return None if node == 0 else self.token[node]

    def path(self, node: int) -> list[int]:
        """Token ids from the start symbol to `node`, inclusive."""
        out = []
        while node >= 0:
            out.append(self.token[node])
            node = self.parent[node]
        return out[::-1]

    def tail(self, node: int, ancestor: int) -> tuple[int, ...] | None:
        """Tokens below `ancestor` down to `node`, or None if `ancestor` is not on its path."""
        out = []
        while node != ancestor:
            if node <= 0 or self.pos[node] < self.pos[ancestor]:
                return None
            out.append(self.token[node])
            node = self.parent[node]
        return tuple(out[::-1])

    def ancestor_at(self, node: int, pos: int) -> int | None:
        while node > 0 and self.pos[node] > pos:
            node = self.parent[node]
        return node if self.pos[node] == pos else None


class CoverTracker:
    """Follows a byte string one byte at a time: `exact` are the exact nodes at the current end,
    `anchors` the exact nodes (here or earlier) whose next token may still straddle the end."""

    def __init__(self, rules: ConversionRules, start_id: int):
        self.rules = rules
        self.tok = rules.tok
        self.index = rules.index
        self.trie = CoverTrie(start_id)
        self.text = bytearray()
        self.exact: list[int] = [0]
        self.anchors: list[int] = [0]
        self._char_start, self._char_need = 0, 0
        self._stable_pos, self._stable_node = 0, 0

    def mask(self, node: int) -> torch.Tensor:
        return self.rules.next_mask(self.trie.last_token(node), self.trie.mid[node])

    def remainder(self, node: int) -> bytes:
        """The text after `node`'s end: its next token must start with these bytes."""
        return bytes(self.text[self.trie.pos[node] :])

    def advance(self, b: int) -> list[int]:
        """Append byte b; returns the new exact nodes (raises MissingCoverError if there are none)."""
        m = len(self.text) + 1
        self.text.append(b)
        at_boundary = self._scan_utf8(b)
        anchors, candidates = [], []
        for a in self.anchors:
            u = self.remainder(a)
            lo, hi = self.index.range(u)
            if lo == hi:
                continue
            t = self.tok.token_id(u)
            if t is not None and self.rules.allows(self.trie.last_token(a), self.trie.mid[a], t):
                partial = b"" if at_boundary else bytes(self.text[self._char_start :])
                candidates.append(self.trie.child(a, t, m, partial))
            if self.index.strict_range(u)[0] < hi:
                anchors.append(a)
        exact = self._filter(candidates, at_boundary)
        if not exact:
            raise MissingCoverError(f"no valid token path ends at byte {m} of {bytes(self.text[-40:])!r}: "
                                    "the tokenizer's encoding is not tracked (normalization, special-token "
                                    "text or an unsupported pretokenizer?)")
        self.exact = exact
        self.anchors = anchors + exact
        return exact

    def _scan_utf8(self, b: int) -> bool:
        """Update the UTF-8 scanner; True if the text now ends on a character boundary. A byte that
        cannot continue the current character starts a new one (malformed input stays byte-wise)."""
        if self._char_need > 0 and 0x80 <= b < 0xC0:
            self._char_need -= 1
            return self._char_need == 0
        self._char_start = len(self.text) - 1
        self._char_need = 1 if 0xC0 <= b < 0xE0 else 2 if 0xE0 <= b < 0xF0 else 3 if 0xF0 <= b < 0xF8 else 0
        return self._char_need == 0

    def _filter(self, candidates: list[int], at_boundary: bool) -> list[int]:
        """Regex pretokenizers: keep the candidates the tokenizer itself produces (others are exact already)."""
        if self.rules.marginal or not at_boundary or self.rules.rule != "regex":
            return candidates
        return self._regex_filter(candidates)

    def _regex_filter(self, candidates: list[int]) -> list[int]:
        p, anchor = self._stable_pos, self._stable_node
        try:
            w = bytes(self.text[p:]).decode("utf-8")
        except UnicodeDecodeError:
            return candidates  # malformed UTF-8: the tokenizer cannot encode it; keep the superset
        allowed = set()
        for z in PROBES:
            out, used = [], 0
            for piece in self.tok.pretokenize(w + z):
                if used >= len(w):
                    break
                piece = piece[: len(w) - used]
                used += len(piece)
                out.extend(self.tok.encode_piece(piece.encode("utf-8")))
            allowed.add(tuple(out))
        keep = [c for c in candidates if self.trie.tail(c, anchor) in allowed]
        if len(keep) != len(allowed):
            missing = allowed - {self.trie.tail(c, anchor) for c in keep}
            raise MissingCoverError(f"valid encodings {sorted(missing)[:2]} of {w[-20:]!r} are not among the covers")
        pieces = self.tok.pretokenize(w)
        if len(pieces) >= 3:
            q = p + len("".join(pieces[:-2]).encode("utf-8"))
            stable = {self.trie.ancestor_at(c, q) for c in keep}
            if len(stable) == 1 and None not in stable:
                self._stable_pos, self._stable_node = q, stable.pop()
        return keep
