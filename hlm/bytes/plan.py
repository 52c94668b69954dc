"""Planning the exact evaluation (Phan et al. 2024), without a model: in teacher-forced evaluation the
whole text is known, so every exact node the byte-by-byte cover recursion would query is known before
the model runs. `plan_document` walks one text and records its nodes (a token tree around the canonical
encoding, the trunk) and the terms of every next-byte probability; `plan_documents` plans many, in
parallel worker processes, and for sentencepiece tokenizers cuts documents at every pretoken boundary (a
space after a non-space, where the cover state is a single node) so that each distinct segment is
planned once.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from hlm import HLMError
from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError
from hlm.tokenizers import round_trips


@dataclass
class DocPlan:
    """Nodes of one document (local ids, parents first) and the terms of every next-byte probability.
    Int64 arrays: compact to send back from the planning workers, and to join and flatten."""

    n_bytes: int
    parent: np.ndarray  # [nodes], -1 at the root
    token: np.ndarray  # [nodes]
    depth: np.ndarray  # [nodes]
    key: np.ndarray  # [nodes]: `mask_key_code` of each node's (last token, incomplete character)
    trunk: np.ndarray  # canonical path, root first
    num: np.ndarray  # [n, 4]: (byte position, node, lo, hi)
    den: np.ndarray  # [n, 5]: (..., len of the remainder)
    eos: np.ndarray  # [n, 2]: (byte position, exact node)


def _rows(rows: list[tuple], width: int) -> np.ndarray:
    """Int64 array [len(rows), width] of a list of tuples (also when the list is empty)."""
    return np.array(rows, dtype=np.int64).reshape(-1, width)


def plan_document(x: bytes, rules: ConversionRules, start_id: int) -> DocPlan:
    """Walk the cover recursion over x without a model and record what each byte's probability needs:
    numerator terms (covers of x[:m+1]) and normaliser terms (all continuations of x[:m], and EOS).
    With a dummy-prefix tokenizer, x must start with that space."""
    tracker = CoverTracker(rules, start_id)
    index, trie = rules.index, tracker.trie
    parent, token, depth, key = [-1], [start_id], [0], [0]
    num: list[tuple[int, int, int, int]] = []
    den: list[tuple[int, int, int, int, int]] = []
    eos: list[tuple[int, int]] = []
    local = {0: 0}

    def record(m: int, next_byte: int | None) -> None:
        for a in tracker.anchors:
            u = tracker.remainder(a)
            lo, hi = index.strict_range(u)
            if lo < hi:
                den.append((m, local[a], lo, hi, len(u)))
            if next_byte is not None:
                lo, hi = index.range(u + bytes([next_byte]))
                if lo < hi:
                    num.append((m, local[a], lo, hi))
        eos.extend((m, local[e]) for e in tracker.exact)

    for m, b in enumerate(x):
        record(m, b)
        for e in tracker.advance(b):
            p = local[trie.parent[e]]
            local[e] = len(parent)
            parent.append(p)
            token.append(trie.token[e])
            depth.append(depth[p] + 1)
            key.append(mask_key_code(trie.last_token(e), trie.mid[e]))
    record(len(x), None)
    child = {(p, t): i for i, (p, t) in enumerate(zip(parent, token, strict=True))}
    trunk = [0]
    dummy = getattr(rules.tok, "add_dummy_prefix", False)  # x starts with the space the tokenizer adds
    for t in rules.tok.encode(x[1:] if dummy else x):
        node = child.get((trunk[-1], t))
        if node is None:
            raise MissingCoverError("the canonical encoding is not among the tracked exact nodes")
        trunk.append(node)
    return DocPlan(len(x), np.array(parent, dtype=np.int64), np.array(token, dtype=np.int64),
                   np.array(depth, dtype=np.int64), np.array(key, dtype=np.int64), np.array(trunk, dtype=np.int64),
                   _rows(num, 4), _rows(den, 5), _rows(eos, 2))


def segment_points(x: bytes, rules: ConversionRules) -> list[int]:
    """Positions where every cover restarts (sentencepiece: a space after a non-space)."""
    if rules.rule != "whitespace" or rules.marginal or getattr(rules.tok, "add_dummy_prefix", False):
        return []
    b = np.frombuffer(x, dtype=np.uint8)
    return (np.flatnonzero((b[1:] == 0x20) & (b[:-1] != 0x20)) + 1).tolist()


@dataclass
class _PlanTable:
    """Plans of many texts in one set of arrays (local node ids): plan p's nodes are
    `parent[node_at[p] : node_at[p + 1]]`, and likewise for the trunk and the num, den and eos rows.
    Planning workers send one table per chunk of texts; `None` plans (untrackable texts) are empty
    and marked in `ok`."""

    n_bytes: np.ndarray
    ok: np.ndarray
    parent: np.ndarray
    token: np.ndarray
    depth: np.ndarray
    key: np.ndarray
    trunk: np.ndarray
    num: np.ndarray
    den: np.ndarray
    eos: np.ndarray
    at: dict[str, np.ndarray]  # offsets [P + 1] of "node", "trunk", "num", "den", "eos"

    @staticmethod
    def of(plans: list[DocPlan | None]) -> _PlanTable:
        real = [p for p in plans if p is not None]
        sizes = {"node": [], "trunk": [], "num": [], "den": [], "eos": []}
        for p in plans:
            sizes["node"].append(0 if p is None else len(p.parent))
            for k in ("trunk", "num", "den", "eos"):
                sizes[k].append(0 if p is None else len(getattr(p, k)))

        def cat(field: str, width: int | None = None) -> np.ndarray:
            arrays = [getattr(p, field) for p in real]
            if arrays:
                return np.concatenate(arrays)
            return np.zeros((0,) if width is None else (0, width), dtype=np.int64)

        return _PlanTable(
            n_bytes=np.array([0 if p is None else p.n_bytes for p in plans], dtype=np.int64),
            ok=np.array([p is not None for p in plans], dtype=bool),
            parent=cat("parent"), token=cat("token"), depth=cat("depth"),
            key=cat("key"), trunk=cat("trunk"),
            num=cat("num", 4), den=cat("den", 5), eos=cat("eos", 2),
            at={k: np.concatenate([[0], np.cumsum(v, dtype=np.int64)]) for k, v in sizes.items()})

    @staticmethod
    def join(tables: list[_PlanTable]) -> _PlanTable:
        at = {}
        for k in tables[0].at:
            parts, base = [np.zeros(1, dtype=np.int64)], 0
            for t in tables:
                parts.append(t.at[k][1:] + base)
                base += int(t.at[k][-1])
            at[k] = np.concatenate(parts)
        return _PlanTable(
            **{f: np.concatenate([getattr(t, f) for t in tables])
               for f in ("n_bytes", "ok", "parent", "token", "depth", "key", "trunk", "num", "den", "eos")}, at=at)

    def _owner(self, field: str) -> np.ndarray:
        return np.repeat(np.arange(len(self.n_bytes)), np.diff(self.at[field]))

    def _rows_at_byte0(self, field: str) -> np.ndarray:
        """How many rows of each plan are at its byte 0 (rows are in byte order, so these come first).
        A later segment leaves them out: they are the previous segment's rows at its end."""
        key = f"_byte0_{field}"
        if key not in self.__dict__:
            table = getattr(self, field)
            self.__dict__[key] = np.bincount(self._owner(field)[table[:, 0] == 0], minlength=len(self.n_bytes))
        return self.__dict__[key]

    def _ends_on_trunk(self) -> np.ndarray:
        """Per plan: its only exact node at its last byte is its last trunk node (so a next segment can
        start from that node alone)."""
        if "_clean" not in self.__dict__:
            owner = self._owner("eos")
            last = self.at["trunk"][owner + 1] - 1
            at_end = self.eos[:, 0] == self.n_bytes[owner]
            off = at_end & (self.eos[:, 1] != self.trunk[last])
            self.__dict__["_clean"] = np.bincount(owner[off], minlength=len(self.n_bytes)) == 0
        return self.__dict__["_clean"]

    def rows(self, field: str, plans: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices into `field` of the rows of `plans` in order, each plan's first `skip` rows left out;
        and which entry of `plans` every row belongs to."""
        start = self.at[field][plans] + skip
        count = self.at[field][plans + 1] - start
        total = int(count.sum())
        owner = np.repeat(np.arange(len(plans)), count)
        first = np.repeat(start - (np.cumsum(count) - count), count)
        return first + np.arange(total), owner

    def assemble(self, seq: np.ndarray) -> DocPlan | None:
        """The plan of a text cut into segments whose plans are `seq` (ids into this table): each segment's
        root is the previous segment's last trunk node. None if a cut has several exact nodes."""
        seq = np.asarray(seq, dtype=np.int64)
        if not self.ok[seq].all():
            return None
        n_nodes = self.at["node"][seq + 1] - self.at["node"][seq]
        trunk_end = self.trunk[self.at["trunk"][seq + 1] - 1]  # local id of each segment's last trunk node
        if not self._ends_on_trunk()[seq[:-1]].all():
            return None
        later = np.arange(len(seq)) > 0
        added = n_nodes - later  # segments after the first share their root with the previous one
        shift = np.cumsum(added) - added - later  # global id = local id + shift (local ids >= 1)
        root = np.zeros(len(seq), dtype=np.int64)
        root[1:] = trunk_end[:-1] + shift[:-1]
        node_depth = self.depth[self.at["node"][seq[:-1]] + trunk_end[:-1]]
        root_depth = np.concatenate([[0], np.cumsum(node_depth)])
        byte_at = np.concatenate([[0], np.cumsum(self.n_bytes[seq])[:-1]])

        def glob(local: np.ndarray, owner: np.ndarray) -> np.ndarray:
            out = local + shift[owner]
            at_root = local == 0
            out[at_root] = root[owner[at_root]]
            return out

        idx, owner = self.rows("node", seq, later.astype(np.int64))
        parent = self.parent[idx]
        parent = np.where(parent < 0, -1, glob(parent, owner))
        depth = self.depth[idx] + root_depth[owner]
        t_idx, t_owner = self.rows("trunk", seq, later.astype(np.int64))
        tables = {}
        for field, skip_first_byte in (("num", False), ("den", True), ("eos", True)):
            skip = np.where(later, self._rows_at_byte0(field)[seq], 0) if skip_first_byte else later * 0
            r_idx, r_owner = self.rows(field, seq, skip)
            table = getattr(self, field)[r_idx]  # (a copy)
            table[:, 0] += byte_at[r_owner]
            table[:, 1] = glob(table[:, 1], r_owner)
            tables[field] = table
        return DocPlan(int(self.n_bytes[seq].sum()), parent, self.token[idx], depth,
                       self.key[idx], glob(self.trunk[t_idx], t_owner), **tables)


_WORKER: dict = {}


def forked_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of forked planning processes (they inherit the conversion rules), one torch thread each:
    workers x threads would oversubscribe the cores."""
    return multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads, initargs=(1,))


def _plan_chunk(texts: list[bytes]) -> tuple[_PlanTable, float]:
    """Plans of a chunk of texts as one table (None for texts that do not round-trip through the tokenizer
    or whose covers cannot be tracked). A document round-trips iff its segments do, as the tokenizer
    encodes them apart; checking segments here keeps the whole-document encode off the main process."""
    t0 = time.perf_counter()
    rules, plans = _WORKER["rules"], []
    for x in texts:
        try:
            if not round_trips(rules.tok, x[len(_WORKER["dummy"]) :]):
                raise HLMError("no round trip")
            plans.append(plan_document(x, rules, _WORKER["start_id"]))
        except HLMError:
            plans.append(None)
    return _PlanTable.of(plans), time.perf_counter() - t0


def plan_documents(docs: list[bytes], rules: ConversionRules, start_id: int, workers: int = 1,
                   segment: bool = True, stats: dict | None = None) -> tuple[list[DocPlan], list[int]]:
    """Plans of the documents that round-trip and can be tracked, and their indices in `docs`.
    With `segment` (sentencepiece BPE), documents are cut at every `segment_points` position and each
    distinct segment (mostly a word with its leading space) is planned once: text repeats words, so this
    plans a fraction of the bytes. `stats` receives the number of distinct texts planned, the number of
    chunks sent to the workers, and the sum and maximum of the chunks' seconds."""
    dummy = b" " if getattr(rules.tok, "add_dummy_prefix", False) else b""
    distinct: dict[bytes, int] = {}
    layouts: dict[int, np.ndarray] = {}
    for d, x in enumerate(docs):
        cuts = [0] + (segment_points(x, rules) if segment else []) + [len(x)]
        layouts[d] = np.array([distinct.setdefault(dummy + x[a:b], len(distinct))
                               for a, b in zip(cuts[:-1], cuts[1:], strict=True)], dtype=np.int64)
    texts = list(distinct)
    _WORKER.update(rules=rules, start_id=start_id, dummy=dummy)
    n_chunks = max(1, min(len(texts), 8 * workers)) if workers > 1 else 1
    size = -(-len(texts) // n_chunks) if texts else 1
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    if workers > 1 and len(chunks) > 1:
        with forked_pool(workers) as pool:
            results = pool.map(_plan_chunk, chunks)
    else:
        results = [_plan_chunk(c) for c in chunks]
    if stats is not None:
        chunk_s = [s for _, s in results]
        stats.update(texts=len(texts), text_bytes=sum(map(len, texts)), chunks=len(chunk_s),
                     chunk_seconds_sum=sum(chunk_s), chunk_seconds_max=max(chunk_s, default=0.0))
    plans, kept = [], []
    if not results:
        return plans, kept
    table = _PlanTable.join([t for t, _ in results])
    for d, seq in layouts.items():
        plan = table.assemble(seq)
        if plan is not None:
            plans.append(_drop_first_byte(plan) if dummy else plan)
            kept.append(d)
    return plans, kept


def _drop_first_byte(plan: DocPlan) -> DocPlan:
    """Condition on the dummy-prefix space the tokenizer adds: the text's bytes start after it."""
    def shifted(table: np.ndarray) -> np.ndarray:
        table = table[table[:, 0] > 0].copy()
        table[:, 0] -= 1
        return table

    return replace(plan, n_bytes=plan.n_bytes - 1, num=shifted(plan.num), den=shifted(plan.den),
                   eos=shifted(plan.eos))


def mask_key_code(last: int | None, partial: bytes) -> int:
    """One int64 per (last token, incomplete character) validity key, so that nodes carry arrays, not
    tuples: (last + 1) in the high bits, the partial character (at most 3 bytes, after a 1 marker) below."""
    return (0 if last is None else last + 1) << 32 | (int.from_bytes(b"\x01" + partial, "big") if partial else 0)


def mask_key(code: int) -> tuple[int | None, bytes]:
    last, low = code >> 32, code & 0xFFFFFFFF
    return (None if last == 0 else last - 1), (low.to_bytes(4, "big").lstrip(b"\x00")[1:] if low else b"")
