"""Which tokens a BPE can emit, and which may follow each other inside one pretoken, from the merge
histories of the vocabulary (Phan et al. 2024): the validity tables behind `ConversionRules`.

`merge_tables(tok)` gives one `MergeTables` per tokenizer (built on first use, shared by every
ConversionRules of it). It reads the tokenizer's BPE through `token_bytes`, `token_id`, `piece_id`,
`atoms`, `merge_rank` and `encode_piece`; the tables never change the tokenizer.
"""

from __future__ import annotations

import weakref

import torch

from hlm.tokenizers import SentencePieceTokenizer, Tokenizer, bpe_merge

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merge_tables(tok: Tokenizer) -> MergeTables:
    """The tokenizer's tables, made once (and inherited by forked planning workers)."""
    tables = _TABLES.get(tok)
    if tables is None:
        tables = _TABLES[tok] = MergeTables(tok)
    return tables


class MergeTables:
    """Reachability and canonical adjacency of a BPE tokenizer's tokens."""

    def __init__(self, tok: Tokenizer):
        self._tok = weakref.ref(tok)  # a strong reference would keep `_TABLES`' weak key alive forever
        self.vocab_size = tok.vocab_size
        self.token_bytes = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.has_bytes = torch.tensor([bool(b) for b in self.token_bytes])
        self._reachable: torch.Tensor | None = None
        self._pair_masks: dict[int, torch.Tensor] = {}
        self._pair_memo: dict[tuple[int, int], bool] = {}
        self._crossing: dict[int, dict[int, float]] = {}
        self._left_lists: list[list[tuple[int, float]]] | None = None
        self._tables: dict[torch.device, tuple] = {}
        self._merge_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._hist: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def tok(self) -> Tokenizer:
        return self._tok()

    def prepare(self) -> None:
        """Build the tables the pair rules read now (not mid-stream, and before planning workers fork)."""
        self._pair_tables()
        self._left_spine_lists()

    def reachable_mask(self) -> torch.Tensor:
        """Tokens the BPE can emit: `encode_piece(token_bytes(t)) == [t]` (special tokens: False). With
        `ignore_merges` every token is its own encoding (duplicates: the first id); sentencepiece byte
        pieces of bytes that never occur in UTF-8 (C0, C1, F5-FF) are left out."""
        if self._reachable is None:
            tok = self.tok
            if getattr(tok, "ignore_merges", False):
                mask = torch.tensor([bool(b) and tok.piece_id(b) == i for i, b in enumerate(self.token_bytes)])
            else:
                mask = self._histories()[0]
            if isinstance(tok, SentencePieceTokenizer):
                mask = mask.clone()
                for b, t in tok.byte_pieces.items():
                    if b[0] in (0xC0, 0xC1) or b[0] >= 0xF5:
                        mask[t] = False
            self._reachable = mask
        return self._reachable

    def pair_valid(self, a: int, b: int) -> bool:
        """Is `[a, b]` the BPE of `bytes(a) + bytes(b)` inside one pretoken? (reachability aside)"""
        return self.tok.encode_piece(self.token_bytes[a] + self.token_bytes[b]) == [a, b]

    def pair_valid_mask(self, a: int) -> torch.Tensor:
        """`pair_valid(a, t)` for every t: one row of `pair_valid_masks`, cached for the byte-by-byte tracker."""
        cache = self._pair_masks
        if a not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[a] = self.pair_valid_masks(torch.tensor([a]))[0]
        return cache[a]

    def pair_valid_by_merges(self, a: int, t: int) -> bool:
        """`pair_valid_mask(a)[t]` for one pair, memoised (the cover tracker asks one token at a time), from
        the same tables as the batched join: [a, t] fails iff a merge (x, y) that can fire across a's right
        edge meets a node y on t's left spine that is still unfinished at the merge's rank."""
        memo = self._pair_memo
        hit = memo.get((a, t))
        if hit is None:
            crossing, left = self._crossing_merges(a), self._left_spine_lists()[t]
            hit = bool(left) and not any((r := crossing.get(y)) is not None and r <= limit for y, limit in left)
            if len(memo) > 4_000_000:
                memo.clear()
            memo[(a, t)] = hit
        return hit

    def pair_valid_masks(self, lasts: torch.Tensor) -> torch.Tensor:
        """Bool[K, V]: `pair_valid(lasts[k], t)` for every t, from the merge histories of the right edge of
        lasts[k] and the left edge of t: [a, t] fails only if some merge across the boundary fires before
        both sides finish (a's side wins ties, being further left). Exact when every merge ranks after the
        merges that built its parts, as in trained vocabularies; tests check it against `pair_valid`."""
        row, t = self.pair_conflicts(lasts)
        mask = self.has_bytes.to(lasts.device).repeat(len(lasts), 1)
        mask[row, t] = False
        return mask

    def pair_conflicts(self, lasts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, t) of every pair [lasts[k], t] that is not valid (some more than once), as one sparse join over
        all k: the merges (x, y) that can fire across the right edge of lasts[k] -> the tokens t with y on
        their left spine that are still unfinished at the merge's rank."""
        (b_right, b_rank, b_start, b_count), (s_owner, s_key, s_levels, s_start) = self._pair_tables(lasts.device)
        entry, row = _ranges(b_start[lasts], b_count[lasts])
        y = b_right[entry]
        unfinished = _count_below(s_key, s_levels, s_start, y, -b_rank[entry], right=True)  # limit >= rank
        entry, src = _ranges(s_start[y], unfinished)
        return row[src], s_owner[entry]

    def _crossing_merges(self, a: int) -> dict[int, float]:
        """{y: earliest rank} of the merges (x, y) that can fire across a's right edge (`_pair_tables`' rows of a)."""
        cache = self._crossing
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
        if self._left_lists is None:
            _, left, _, rank = self._histories()
            nodes, limits = _spines(left, rank, self.has_bytes)
            self._left_lists = [[(n, r) for n, r in zip(row_n, row_r, strict=True) if n < self.vocab_size]
                                for row_n, row_r in zip(nodes.tolist(), limits.tolist(), strict=True)]
        return self._left_lists

    def _pair_tables(self, device: torch.device | str = "cpu") -> tuple:
        """The tables `pair_conflicts` joins, built once (and copied once to each device): for each token, the
        merges (x, y) across its right edge: x on its right spine, ranked before x is merged away (right
        token y, rank, start, count); and the left-spine entries of each node, latest limit first (token,
        then `_sort_groups`' keys, levels and starts)."""
        cache = self._tables
        device, cpu = torch.device(device), torch.device("cpu")
        if cpu not in cache:
            _, left, right, rank = self._histories()
            v, has_bytes = self.vocab_size, self.has_bytes
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

    def _merges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every merge of two tokens into a token, from every split of every token's bytes: (left, right, rank)."""
        if self._merge_rows is None:
            tok, rows = self.tok, []
            find = tok.piece_id  # byte-fallback pieces never merge: they need not be found
            for data in dict.fromkeys(self.token_bytes):  # distinct bytes, in id order
                for k in range(1, len(data)):
                    left = find(data[:k])
                    right = None if left is None else find(data[k:])
                    r = None if right is None else tok.merge_rank(data[:k], data[k:])
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
        if self._hist is None:
            tok, v = self.tok, self.vocab_size
            reach, lchild, rchild, ranks = [False] * v, [-1] * v, [-1] * v, [0.0] * v
            for t, data in enumerate(self.token_bytes):
                parts, last = bpe_merge(tok.atoms(data), tok.merge_rank)
                if len(parts) == 1:
                    reach[t] = tok.token_id(parts[0]) == t
                    if last is not None:
                        lchild[t], rchild[t], ranks[t] = tok.token_id(last[0]), tok.token_id(last[1]), last[2]
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
