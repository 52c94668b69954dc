"""Exact bits per byte of a token model in one batched tree pass (Phan et al. 2024).

In teacher-forced evaluation the whole text is known, so every exact node the byte-by-byte
recursion would query is known before the model runs (`plan_document`, no model). The nodes
form a token tree around the canonical encoding (the trunk). `exact_bpb` packs them into
windows of the model's context (trunk tokens plus the off-trunk nodes hanging from them, each
node attending to its ancestors, position = depth) and scores them with one forward per batch
of windows through `GPT.logits(ids, attn_mask=TreeMask(...), positions=...)`: each window's trunk
runs as plain causal attention, its off-trunk nodes in chunks over the trunk and a short band of
keys (`hlm.models.blocks.tree_attention`). Every next-byte term is
then a range sum over the sorted vocabulary (fp64 prefix sums of the masked next-token
probabilities), combined per byte with a scatter logsumexp. The same pass gives the canonical
token NLL on the same windows, so bpb_canon and bpb_conv differ only by the conversion.

Each document is scored from the start symbol with its end of text (counted as one byte, like
the separator of canonical eval). Windows of a long document are non-overlapping stretches of
the trunk; a node sees only its window. Planning is Python, in parallel worker processes; for
sentencepiece tokenizers documents are cut at every pretoken boundary (a space after a non-space,
where the cover state is a single node) and each distinct segment is planned once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from hlm import LN2, HLMError
from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError
from hlm.bytes.tree_attention import TreeMask
from hlm.models.blocks import at_least_fp32
from hlm.tokenizers import Tokenizer, round_trips


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
        one_thread = {"initializer": torch.set_num_threads, "initargs": (1,)}  # workers x threads would oversubscribe
        with multiprocessing.get_context("fork").Pool(workers, **one_thread) as pool:
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


@dataclass
class _Windows:
    """Windows of the model's context over all nodes, as arrays in window order (a window's nodes
    ascending, its first trunk node first), to move to the device once and slice per batch. Each window
    is one row of `n_trunk + n_off` positions for `TreeMask` attention: its trunk stretch in order, then
    its off-trunk nodes (an ancestor before its descendants) in chunks of `chunk`."""

    start: np.ndarray  # [windows + 1] (host): window w holds entries start[w] : start[w + 1]
    chain: np.ndarray  # [windows] (host): the longest off-trunk chain above a node of the window
    col: np.ndarray  # (host) position of each entry in its window's row
    n_trunk: int  # trunk positions of a row (the longest trunk stretch, rounded up)
    n_off: int  # off-trunk positions of a row (a multiple of chunk)
    chunk: int
    span: int  # how far (in off-trunk positions) a node's off-trunk ancestors may lie before its chunk
    node: torch.Tensor  # global node id
    token: torch.Tensor
    pos: torch.Tensor  # depth within the window
    anchor_pos: torch.Tensor  # depth of the node's anchor within the window (pos on the trunk)
    back: torch.Tensor  # entries back to the node's parent when that parent is off the trunk, else 0

    def to(self, device: torch.device) -> _Windows:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("node", "token", "pos", "anchor_pos", "back")})


TREE_CHUNK = 128  # off-trunk queries per attention chunk (fewer when no window has that many)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _windows(flat: _Flat, block: int) -> _Windows:
    """Split each document's nodes into windows of at most `block` positions: stretches of the trunk
    with the off-trunk nodes that hang from them (a node goes with its anchor)."""
    sizes = np.diff(np.append(flat.offset, flat.n_nodes)).astype(np.int64)
    spill = np.maximum.reduceat(flat.height, flat.offset) if len(sizes) else sizes
    stride = block - spill
    if np.any(stride < 1):
        raise HLMError(f"off-trunk paths of {spill[np.argmax(stride < 1)]} tokens do not fit a context of {block}")
    trunk_len = np.diff(flat.trunk_start)
    n_windows = (trunk_len - 1) // stride + 1  # every stretch of the trunk holds a trunk node
    doc = np.repeat(np.arange(len(sizes)), sizes)
    trunk_index = np.empty(flat.n_nodes, dtype=np.int64)
    trunk_index[flat.trunk] = np.arange(len(flat.trunk)) - np.repeat(flat.trunk_start[:-1], trunk_len)
    window = (np.cumsum(n_windows) - n_windows)[doc] + trunk_index[flat.anchor] // stride[doc]
    order = np.argsort(window, kind="stable")
    start = np.append(0, np.cumsum(np.bincount(window, minlength=n_windows.sum())))
    count = np.diff(start)
    base = np.repeat(flat.depth[order[start[:-1]]], count)
    entry = np.empty_like(order)  # of each node
    entry[order] = np.arange(len(order))
    height = flat.height[order]
    back = np.where(height > 1, np.arange(len(order)) - entry[flat.parent[order]], 0)
    chain = np.maximum.reduceat(height, start[:-1]) - 1 if len(count) else count
    # rows: trunk entries at their depth in the window, off-trunk ones after the trunk in entry order
    off = ~flat.on_trunk[order]
    n_off = np.add.reduceat(off.astype(np.int64), start[:-1]) if len(count) else count
    rank = np.cumsum(off) - 1 - np.repeat(np.cumsum(n_off) - n_off, count)  # among the window's off entries
    top = np.arange(len(order))  # each entry's topmost off-trunk ancestor (itself on the trunk)
    for _ in range(int(chain.max(initial=0))):
        top = top - back[top]
    most_off = int(n_off.max(initial=1))
    chunk = min(TREE_CHUNK, _round_up(most_off, 16))
    n_trunk = _round_up(int((count - n_off).max(initial=1)), 64)
    span = _round_up(int(np.max(np.where(off, rank - rank[top], 0), initial=0)), 16)
    pos = flat.depth[order] - base
    return _Windows(start, chain, np.where(off, n_trunk + rank, pos), n_trunk, _round_up(most_off, chunk), chunk,
                    span, *(torch.from_numpy(a) for a in (
                        order, flat.token[order], pos, flat.depth[flat.anchor[order]] - base, back)))


class _Flat:
    """All documents' nodes and terms as flat tensors over global node ids and global byte positions.
    Queries are the num terms then the den terms (each a range of the sorted vocabulary at a node).
    Node arrays (numpy) also give each node's anchor, the trunk node it hangs from (itself on the trunk),
    and its height above it: the off-trunk chains that windows, masks and path sums walk."""

    def __init__(self, plans: list[DocPlan]):
        self.offset, keys = [], []
        parents, tokens, depths, trunks, nums, dens, eoss, trunk_end = [], [], [], [], [], [], [], []
        n_nodes = n_pos = 0
        for plan in plans:
            self.offset.append(n_nodes)
            parents.append(np.where(plan.parent >= 0, plan.parent + n_nodes, -1))
            tokens.append(plan.token)
            depths.append(plan.depth)
            trunks.append(plan.trunk + n_nodes)
            keys.append(plan.key)
            shift = torch.tensor([n_pos, n_nodes], dtype=torch.int64)
            nums.append(torch.from_numpy(plan.num) + torch.cat([shift, torch.zeros(2, dtype=torch.int64)]))
            dens.append(torch.from_numpy(plan.den) + torch.cat([shift, torch.zeros(3, dtype=torch.int64)]))
            eos = torch.from_numpy(plan.eos)
            eoss.append(torch.cat([eos + shift, (eos[:, :1] == plan.n_bytes).long()], dim=1))
            trunk_end.append(int(plan.trunk[-1]) + n_nodes)
            n_nodes += len(plan.parent)
            n_pos += plan.n_bytes + 1
        self.n_nodes, self.n_pos = n_nodes, n_pos
        num = torch.cat(nums) if nums else torch.zeros(0, 4, dtype=torch.int64)
        den = torch.cat(dens) if dens else torch.zeros(0, 5, dtype=torch.int64)
        eos = torch.cat(eoss) if eoss else torch.zeros(0, 3, dtype=torch.int64)
        self.q_node = torch.cat([num[:, 1], den[:, 1]])
        self.q_lo = torch.cat([num[:, 2], den[:, 2]])
        self.q_hi = torch.cat([num[:, 3], den[:, 3]])
        self.num_pos, self.num_q = num[:, 0], torch.arange(len(num))
        self.den_pos, self.den_q, self.den_k = den[:, 0], torch.arange(len(num), len(num) + len(den)), den[:, 4]
        self.eos_pos, self.eos_node = eos[:, 0], eos[:, 1]
        at_end = eos[:, 2].bool()
        self.end_pos, self.end_node = eos[at_end, 0], eos[at_end, 1]
        self.trunk_end = torch.tensor(trunk_end, dtype=torch.int64)

        def join(arrays: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

        self.parent, self.depth, self.token, self.trunk = join(parents), join(depths), join(tokens), join(trunks)
        self.key = join(keys)
        self.trunk_start = np.cumsum([0] + [len(t) for t in trunks])  # document d's trunk: trunk[start[d]:start[d+1]]
        self.on_trunk = np.zeros(n_nodes, dtype=bool)
        self.on_trunk[self.trunk] = True
        self.anchor = _anchors(self.parent, self.on_trunk)
        self.height = self.depth - self.depth[self.anchor]
        parent = torch.from_numpy(self.parent)
        self.child_token = torch.from_numpy(self.token)
        self.by_node = _csr(self.q_node, n_nodes)  # queries of each node
        self.kids = torch.nonzero(parent >= 0).flatten()
        self.kid_parent = parent[self.kids]
        self.by_parent = _csr(self.kid_parent, n_nodes)  # children of each node


def _anchors(parent: np.ndarray, on_trunk: np.ndarray) -> np.ndarray:
    """The nearest trunk node at or above every node, by pointer jumping (every root is on the trunk):
    off-trunk chains are at most as long as the longest token, so this takes a few array passes."""
    hop = np.where(on_trunk, np.arange(len(parent)), parent)
    while True:
        up = hop[hop]
        if np.array_equal(up, hop):
            return hop
        hop = up


def _csr(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, start, count): the items with key k are order[start[k] : start[k] + count[k]]."""
    order = torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))  # timsort: keys come nearly sorted
    count = torch.bincount(keys, minlength=n)
    start = torch.cumsum(count, 0) - count
    return order, start, count


def _select(csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor], nodes: torch.Tensor) -> torch.Tensor:
    """Indices of the items of every node in `nodes` (all tensors on one device)."""
    order, start, count = csr
    lens = count[nodes]
    total = int(lens.sum())
    first = torch.repeat_interleave(start[nodes] - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
    return order[first + torch.arange(total, device=nodes.device)]


@torch.no_grad()
def exact_bpb(model: torch.nn.Module, tok: Tokenizer, docs: list[bytes], start_id: int,
              device: str | torch.device = "cpu", batch_size: int = 8, chunk_rows: int | None = None,
              autocast: contextlib.AbstractContextManager | None = None, workers: int = 1,
              segment: bool = True, time_canonical: bool = False) -> dict:
    """bpb_canon, bpb_conv (and their gap) of an hlm token GPT on documents; documents that do not
    round-trip through the tokenizer, or whose covers cannot be tracked, are skipped and counted.
    `time_canonical`: also run canonical scoring alone on the same windows (`canonical_seconds`,
    `canonical_forward_seconds`, and its `bpb_canon_trunk`, equal to bpb_canon up to rounding)."""
    t0 = time.perf_counter()
    rules = ConversionRules(tok)
    split = {"rules": time.perf_counter() - t0}
    t1 = time.perf_counter()
    info: dict = {"planning": {}}
    plans, kept = plan_documents(docs, rules, start_id, workers, segment, stats=info["planning"])
    skipped = len(docs) - len(kept)
    split["planning"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    flat = _Flat(plans)
    split["flattening"] = time.perf_counter() - t1
    point_lp, eos_lp, range_lp, _ = _tree_pass(model, rules, flat, device, batch_size, chunk_rows, autocast,
                                               split=split, info=info)
    seconds = time.perf_counter() - t0
    if time_canonical:
        nll, wall, fwd = _trunk_pass(model, flat, tok.eos_id, device, batch_size, autocast)
        info.update(canonical_seconds=wall, canonical_forward_seconds=fwd,
                    bpb_canon_trunk=nll / (LN2 * max(flat.n_pos, 1)))
    return _combine(plans, flat, point_lp, eos_lp, range_lp, skipped, split, seconds) | info


@torch.no_grad()
def exact_prefix_logprobs(model: torch.nn.Module, tok: Tokenizer, docs: list[bytes], start_id: int,
                          device: str | torch.device = "cpu", batch_size: int = 8, chunk_rows: int | None = None,
                          autocast: contextlib.AbstractContextManager | None = None,
                          workers: int = 1) -> list[torch.Tensor | None]:
    """For each document, the full next-byte distributions [len+1, 257] after each of its prefixes (what
    `ByteLM.prefix_logprobs` gives byte by byte), from one batched tree pass; None for documents that do
    not round-trip or cannot be tracked. Memory grows with 256 values per cover and byte: meant for
    ensembles on modest text."""
    rules = ConversionRules(tok)
    plans, keep = plan_documents(docs, rules, start_id, workers)
    flat = _Flat(plans)
    point_lp, eos_lp, _, bins_lp = _tree_pass(model, rules, flat, device, batch_size, chunk_rows, autocast,
                                              full=True)
    logq = _log_prefix_probs(flat, point_lp)
    scores = torch.full((flat.n_pos, 257), float("-inf"), dtype=torch.float64)
    values = logq[flat.q_node[flat.den_q]][:, None] + bins_lp
    index = flat.den_pos[:, None].expand(-1, 256)
    top = scores[:, :256].scatter_reduce(0, index, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = (values - safe.gather(0, index)).exp()
    total = torch.zeros(flat.n_pos, 256, dtype=torch.float64).scatter_add_(0, index, shifted)
    scores[:, :256] = total.log() + safe
    scores[:, 256] = _scatter_logsumexp(flat.eos_pos, logq[flat.eos_node] + eos_lp[flat.eos_node], flat.n_pos)
    scores = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    out: list[torch.Tensor | None] = [None] * len(docs)
    start = 0
    for d, plan in zip(keep, plans, strict=True):
        out[d] = scores[start : start + plan.n_bytes + 1]
        start += plan.n_bytes + 1
    return out


@torch.no_grad()
def _tree_pass(model, rules: ConversionRules, flat: _Flat, device, batch_size: int, chunk_rows: int | None, autocast,
               full: bool = False, split: dict | None = None, info: dict | None = None):
    """Score every node; returns (log q(token | parent) per node, log q(EOS | node) per node,
    log of each range query's mass, and with `full` the 256 next-byte bins of each normaliser query).
    `split` receives the seconds of its host phases: validity masks, windows, and packing (on a GPU: queuing
    its kernels); `info` the device time of the model's forward passes (`forward_seconds`, CUDA events on a
    GPU) and the number of windows and batches."""
    split = {} if split is None else split
    t0 = time.perf_counter()
    if not hasattr(model, "logits") or not hasattr(getattr(model, "cfg", None), "block_size"):
        raise HLMError("exact byte-level eval needs an hlm token GPT (logits with attn_mask/positions)")
    tok = rules.tok
    autocast = autocast or contextlib.nullcontext()
    device = torch.device(device)
    chunk_rows = chunk_rows or (8192 if device.type == "cuda" else 2048)  # rows per vocabulary-wide scoring step
    perm = rules.index.perm.to(device)
    invalid, key_row = _invalid_masks(rules, flat.key, device)
    split["masks"] = time.perf_counter() - t0
    q_node, q_lo, q_hi = flat.q_node.to(device), flat.q_lo.to(device), flat.q_hi.to(device)
    by_node = tuple(x.to(device) for x in flat.by_node)
    by_parent = tuple(x.to(device) for x in flat.by_parent)
    kids_all, kid_parent, child_token = flat.kids.to(device), flat.kid_parent.to(device), flat.child_token.to(device)
    range_lp = torch.full((len(flat.q_node),), float("-inf"), dtype=torch.float64, device=device)
    point_lp = torch.zeros(flat.n_nodes, dtype=torch.float64, device=device)
    eos_lp = torch.full((flat.n_nodes,), float("-inf"), dtype=torch.float64, device=device)
    row_of = torch.full((flat.n_nodes,), -1, dtype=torch.int64, device=device)
    bins_lp = bounds = den_of_query = None
    if full:
        table, which = _next_byte_bounds(rules.index, flat)
        bounds, which = table.to(device), which.to(device)
        den_of_query = torch.full((len(flat.q_node),), -1, dtype=torch.int64)
        den_of_query[flat.den_q] = torch.arange(len(flat.den_q))
        den_of_query = den_of_query.to(device)
        bins_lp = torch.full((len(flat.den_q), 256), float("-inf"), dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    windows = _windows(flat, model.cfg.block_size).to(device)
    n_windows = len(windows.start) - 1
    split["windows"] = time.perf_counter() - t0
    split["packing"] = 0.0
    sorted_lp = sorted_p = None
    forward = _ForwardTimer(device)
    for i in range(0, n_windows, batch_size):
        t0 = time.perf_counter()
        ids, pos, tree, rows, nodes = _pack(windows, i, min(i + batch_size, n_windows), batch_size)
        split["packing"] += time.perf_counter() - t0
        with autocast, forward:
            logits = model.logits(ids, attn_mask=tree, positions=pos)
        logits = logits.flatten(0, 1)
        for c in range(0, len(rows), chunk_rows):
            g = nodes[c : c + chunk_rows]
            span = rows[c : c + chunk_rows]
            first, last = int(span[0]), int(span[-1])
            out = logits[first : last + 1] if last - first == len(span) - 1 else logits[span.to(device)]  # no copy
            lp = F.log_softmax(at_least_fp32(out), dim=-1)
            lp = lp[:, : tok.vocab_size]
            if sorted_lp is None or len(sorted_lp) < len(g):  # reused buffers: one chunk of the sorted vocab
                sorted_lp = lp.new_empty(len(g), len(perm))
                sorted_p = torch.empty(len(g), len(perm), dtype=torch.float64, device=device)
            probs = torch.index_select(lp, 1, perm, out=sorted_lp[: len(g)]).exp_().masked_fill_(invalid[key_row[g]], 0)
            csum = torch.cumsum(probs, 1, dtype=torch.float64, out=sorted_p[: len(g)])  # fp64: ranges are differences
            row_of[g] = torch.arange(len(g), device=device)
            if tok.eos_id is not None:
                eos_lp[g] = lp[:, tok.eos_id].double()
            sel = _select(by_node, g)
            j = row_of[q_node[sel]]
            range_lp[sel] = (_prefix_sum(csum, j, q_hi[sel]) - _prefix_sum(csum, j, q_lo[sel])).clamp_min(1e-300).log()
            if full:
                dq = den_of_query[sel]
                has = dq >= 0
                edges = _prefix_sum(csum, j[has, None], bounds[which[dq[has]]])
                bins_lp[dq[has]] = (edges[:, 1:] - edges[:, :-1]).clamp_min(0).log()
            k = _select(by_parent, g)
            kids = kids_all[k]
            point_lp[kids] = lp[row_of[kid_parent[k]], child_token[kids]].double()
            row_of[g] = -1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if info is not None:
        info.update(forward_seconds=forward.seconds(), windows=n_windows, batches=-(-n_windows // batch_size))
    return point_lp.cpu(), eos_lp.cpu(), range_lp.cpu(), None if bins_lp is None else bins_lp.cpu()


@torch.no_grad()
def _trunk_pass(model, flat: _Flat, eos_id: int | None, device, batch_size: int,
                autocast) -> tuple[float, float, float]:
    """Canonical scoring on the tree pass's windows: each window's trunk stretch alone, in plain causal
    attention, rows padded as in the tree pass. Returns (canonical NLL in nats, wall seconds, device
    seconds of the forwards): the like-for-like denominator of the exact pass's cost."""
    autocast = autocast or contextlib.nullcontext()
    device = torch.device(device)
    t0 = time.perf_counter()
    windows = _windows(flat, model.cfg.block_size)
    n_windows, width = len(windows.start) - 1, windows.n_trunk
    target = np.full(flat.n_nodes, -1, dtype=np.int64)  # the next trunk token of each trunk node (EOS last)
    for a, b in zip(flat.trunk_start[:-1], flat.trunk_start[1:], strict=True):
        target[flat.trunk[a : b - 1]] = flat.token[flat.trunk[a + 1 : b]]
        target[flat.trunk[b - 1]] = -1 if eos_id is None else eos_id
    on_trunk = windows.col < width
    win = np.repeat(np.arange(n_windows), np.diff(windows.start))[on_trunk]
    flat_pos = torch.from_numpy(win * width + windows.col[on_trunk]).to(device)
    node = windows.node[torch.from_numpy(on_trunk)]
    ids = torch.zeros(n_windows * width, dtype=torch.int64).index_put_((flat_pos.cpu(),), windows.token[
        torch.from_numpy(on_trunk)]).to(device).view(n_windows, width)
    targets = torch.from_numpy(target)[node].to(device)
    win, nll = torch.from_numpy(win).to(device), torch.zeros((), dtype=torch.float64, device=device)
    positions = torch.arange(width, device=device).clamp_max(model.cfg.block_size - 1).expand(batch_size, -1)
    forward = _ForwardTimer(device)
    for i in range(0, n_windows, batch_size):
        j = min(i + batch_size, n_windows)
        x = ids[i:j]
        if len(x) < batch_size:  # every batch has the tree pass's shape (padding comes after the real rows)
            x = F.pad(x, (0, 0, 0, batch_size - len(x)))
        with autocast, forward:
            logits = model.logits(x, positions=positions)
        sel = (win >= i) & (win < j) & (targets >= 0)
        rows = logits.flatten(0, 1)[flat_pos[sel] - i * width]
        nll -= F.log_softmax(at_least_fp32(rows), -1).gather(1, targets[sel, None]).double().sum()
    nll = float(nll)  # (syncs the device)
    return nll, time.perf_counter() - t0, forward.seconds()


class _ForwardTimer:
    """Time spent in a repeated block: CUDA events on a GPU (device time, no sync until `seconds`),
    wall time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.wall = 0.0

    def __enter__(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.wall += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.wall


def _next_byte_bounds(index, flat) -> tuple[torch.Tensor, torch.Tensor]:
    """For each distinct normaliser range (tokens longer than a remainder u), the 257 sorted-vocabulary
    edges that split it by the byte after u (rows in order of first use); and which edge row each
    normaliser query uses. In a range, byte k of the tokens ascends, so edge e = lo + #{byte k < e}:
    one bincount over the distinct ranges (disjoint for one k: at most vocab x longest token entries)."""
    lo, hi, k = flat.q_lo[flat.den_q].numpy(), flat.q_hi[flat.den_q].numpy(), flat.den_k.numpy()
    n_vocab, width = len(index.byte_at) + 1, index.byte_at.shape[1]
    _, first, which = np.unique((lo * n_vocab + hi) * width + k, return_index=True, return_inverse=True)
    by_use = np.argsort(first)
    rank = np.empty_like(by_use)
    rank[by_use] = np.arange(len(by_use))
    lo, hi, k = lo[first[by_use]], hi[first[by_use]], k[first[by_use]]
    size = hi - lo
    seg = np.repeat(np.arange(len(size)), size)
    token = np.repeat(lo - (np.cumsum(size) - size), size) + np.arange(size.sum())
    byte = index.byte_at.numpy()[token, k[seg]]
    count = np.bincount(seg * 256 + byte, minlength=len(size) * 256).reshape(-1, 256)
    edges = lo[:, None] + np.concatenate([np.zeros((len(size), 1), dtype=np.int64), np.cumsum(count, 1)], 1)
    return torch.from_numpy(edges), torch.from_numpy(rank[which])


def _prefix_sum(csum: torch.Tensor, row: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """Sum of the first `edge` entries of each row (csum holds inclusive prefix sums, so edge 0 gives 0)."""
    value = csum[row, (edge - 1).clamp_min(0)]
    return torch.where(edge > 0, value, torch.zeros_like(value))


def mask_key_code(last: int | None, partial: bytes) -> int:
    """One int64 per (last token, incomplete character) validity key, so that nodes carry arrays, not
    tuples: (last + 1) in the high bits, the partial character (at most 3 bytes, after a 1 marker) below."""
    return (0 if last is None else last + 1) << 32 | (int.from_bytes(b"\x01" + partial, "big") if partial else 0)


def _mask_key(code: int) -> tuple[int | None, bytes]:
    last, low = code >> 32, code & 0xFFFFFFFF
    return (None if last == 0 else last - 1), (low.to_bytes(4, "big").lstrip(b"\x00")[1:] if low else b"")


def _invalid_masks(rules: ConversionRules, keys: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool[distinct keys, sorted vocab]: the tokens that may NOT follow a node (in sorted-vocabulary order,
    like the prefix sums), built once on the device; and the row of every node's key (`mask_key_code`)."""
    distinct, key_row = np.unique(keys, return_inverse=True)
    table = rules.invalid_table([_mask_key(c) for c in distinct.tolist()], device)
    return table, torch.from_numpy(key_row.reshape(-1).astype(np.int64)).to(device)


def _pack(windows: _Windows, first: int, last: int, n_win: int):
    """Token ids and positions [n_win, n_trunk + n_off], the `TreeMask` (built on the windows' device),
    the flat rows (host) and global nodes (device) of the real positions of windows first..last-1. An
    off-trunk node sees the window's trunk up to its anchor plus its own short off-trunk chain, found by
    walking parents. Every batch has the same shape (padding sees only itself): a new shape costs the
    attention kernel a new plan, ~0.7 s on an H100-class GPU, more than the padded work."""
    start = windows.start[first : last + 1]
    count = np.diff(start)
    a, b = int(start[0]), int(start[-1])
    t, c, s, n_off = windows.n_trunk, windows.chunk, windows.span, windows.n_off
    width = t + n_off
    rows = torch.from_numpy(np.repeat(np.arange(len(count)) * width, count) + windows.col[a:b])
    device = windows.node.device
    r = rows.to(device)
    pos, anchor_pos, back = windows.pos[a:b], windows.anchor_pos[a:b], windows.back[a:b]
    ids = torch.zeros(n_win * width, dtype=torch.int64, device=device).index_put_((r,), windows.token[a:b])
    pos_all = torch.zeros(n_win * width, dtype=torch.int64, device=device).index_put_((r,), pos)
    row_of = torch.from_numpy(np.repeat(np.arange(len(count)), count)).to(device)
    slot = r - row_of * width - t  # position among the row's off-trunk entries (negative on the trunk)
    e = torch.nonzero(slot >= 0).flatten()
    w, o = row_of[e], slot[e]
    anchor = torch.full((n_win, n_off), -1, dtype=torch.int64, device=device).index_put_((w, o), anchor_pos[e])
    trunk_keep = torch.arange(t, device=device) <= anchor[:, :, None]  # trunk keys up to the query's anchor
    band = torch.zeros(n_win, n_off, s + c, dtype=torch.bool, device=device)
    every = torch.arange(n_off, device=device)
    band[:, every, s + every % c] = True  # itself
    base = s - o // c * c  # band key of off-trunk position p is base + p
    up = e
    for _ in range(int(windows.chain[first:last].max(initial=0))):  # up the off-trunk chains; at a chain's
        up = up - back[up]  # top `up` stays, marking an entry already True
        band[w, o, base + slot[up]] = True
    keep = torch.cat([trunk_keep, band], dim=2).view(n_win * (n_off // c), 1, c, t + s + c)
    tree = TreeMask(t, c, s, keep)
    return ids.view(n_win, width), pos_all.view(n_win, width), tree, rows, windows.node[a:b]


def _scatter_logsumexp(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    top = torch.full((size,), float("-inf"), dtype=torch.float64).scatter_reduce(0, index, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, index, (values - safe[index]).exp())
    return total.log() + safe


def _log_prefix_probs(flat: _Flat, point_lp: torch.Tensor) -> torch.Tensor:
    """log Q(node): the sum of token log-probs along each node's path, accumulated from the root in
    the same order as a walk down the tree (so bitwise the same): a running sum down each document's
    trunk, then the off-trunk nodes one height at a time, each on its parent's sum."""
    step = point_lp.numpy()
    logq = np.zeros(flat.n_nodes)
    for a, b in zip(flat.trunk_start[:-1], flat.trunk_start[1:], strict=True):
        logq[flat.trunk[a + 1 : b]] = np.cumsum(step[flat.trunk[a + 1 : b]])
    for h in range(1, int(flat.height.max(initial=0)) + 1):
        v = np.flatnonzero(flat.height == h)
        logq[v] = logq[flat.parent[v]] + step[v]
    return torch.from_numpy(logq)


def _combine(plans, flat: _Flat, point_lp, eos_lp, range_lp, skipped, split: dict, seconds) -> dict:
    logq = _log_prefix_probs(flat, point_lp)
    num = _scatter_logsumexp(torch.cat([flat.num_pos, flat.end_pos]),
                             torch.cat([logq[flat.q_node[flat.num_q]] + range_lp[flat.num_q],
                                        logq[flat.end_node] + eos_lp[flat.end_node]]), flat.n_pos)
    den = _scatter_logsumexp(torch.cat([flat.den_pos, flat.eos_pos]),
                             torch.cat([logq[flat.q_node[flat.den_q]] + range_lp[flat.den_q],
                                        logq[flat.eos_node] + eos_lp[flat.eos_node]]), flat.n_pos)
    per_byte = den - num
    canon = -(logq[flat.trunk_end] + eos_lp[flat.trunk_end])
    per_doc, start = [], 0
    for d, plan in enumerate(plans):
        doc_bytes = per_byte[start : start + plan.n_bytes + 1]
        per_doc.append({"bytes": plan.n_bytes, "nll_canon": float(canon[d]), "nll_conv": float(doc_bytes.sum()),
                        "per_byte_nll": doc_bytes})
        start += plan.n_bytes + 1
    n_bytes = flat.n_pos
    bpb_canon = float(canon.sum()) / (LN2 * max(n_bytes, 1))
    bpb_conv = float(per_byte.sum()) / (LN2 * max(n_bytes, 1))
    return {"bpb_canon": bpb_canon, "bpb_conv": bpb_conv, "bpb_gap": bpb_canon - bpb_conv, "bytes": n_bytes,
            "docs": len(plans), "docs_skipped": skipped, "nodes": flat.n_nodes,
            "tokens": sum(len(p.trunk) for p in plans), "seconds": seconds,
            "seconds_split": {**split, "model_and_scoring": seconds - sum(split.values())},
            "bytes_per_s": n_bytes / max(seconds, 1e-9), "per_doc": per_doc}
