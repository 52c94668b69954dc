"""Layout of the exact evaluation's nodes for the model: `Flat` joins every document's plan into flat
arrays over global node ids and byte positions; `windows_of` cuts them into windows of the model's
context (stretches of the trunk with the off-trunk nodes that hang from them, position = depth); and
`pack_windows` lays a batch of windows out as token rows with a `TreeMask`: each row's trunk first, run
as plain causal attention, then its off-trunk nodes in chunks over the trunk and a short band of keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from hlm import HLMError
from hlm.bytes.plan import DocPlan
from hlm.bytes.tree_attention import TreeMask


class Flat:
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


def csr_select(csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor], nodes: torch.Tensor) -> torch.Tensor:
    """Indices of the items of every node in `nodes` (all tensors on one device)."""
    order, start, count = csr
    lens = count[nodes]
    total = int(lens.sum())
    first = torch.repeat_interleave(start[nodes] - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
    return order[first + torch.arange(total, device=nodes.device)]


@dataclass
class Windows:
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

    def to(self, device: torch.device) -> Windows:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("node", "token", "pos", "anchor_pos", "back")})


TREE_CHUNK = 128  # off-trunk queries per attention chunk (fewer when no window has that many)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def windows_of(flat: Flat, block: int) -> Windows:
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
    return Windows(start, chain, np.where(off, n_trunk + rank, pos), n_trunk, _round_up(most_off, chunk), chunk,
                    span, *(torch.from_numpy(a) for a in (
                        order, flat.token[order], pos, flat.depth[flat.anchor[order]] - base, back)))


def pack_windows(windows: Windows, first: int, last: int, n_win: int):
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
