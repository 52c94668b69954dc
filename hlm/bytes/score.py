"""Scoring the exact evaluation's windows: `tree_pass` runs the model over every window (one forward per
batch, `GPT.logits(ids, attn_mask=TreeMask, positions=depth)`) and turns each node's next-token
distribution into the terms the plan asked for: every next-byte term is a range sum over the sorted
vocabulary (fp64 prefix sums of the masked next-token probabilities). `combine` adds the terms up per byte
with a scatter logsumexp; the same pass gives the canonical token NLL on the same windows. Timing is
left to the caller: the passes call an optional `timer(phase)` around their phases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from hlm import LN2, HLMError
from hlm.bytes.covers import ConversionRules
from hlm.bytes.layout import Flat, csr_select, pack_windows, windows_of
from hlm.bytes.plan import DocPlan, mask_key
from hlm.models.blocks import at_least_fp32

Timer = Callable[[str], contextlib.AbstractContextManager]  # timer(phase) wraps each run of that phase


def _untimed(phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class TreeScores(NamedTuple):
    """What `tree_pass` gives: log q(token | parent) and log q(EOS | node) per node, the log of each range
    query's mass, with `full` the 256 next-byte bins of each normaliser query, and the number of windows."""

    point_lp: torch.Tensor
    eos_lp: torch.Tensor
    range_lp: torch.Tensor
    bins_lp: torch.Tensor | None
    windows: int


@torch.no_grad()
def tree_pass(model, rules: ConversionRules, flat: Flat, device, batch_size: int, chunk_rows: int | None, autocast,
              full: bool = False, timer: Timer | None = None) -> TreeScores:
    """Score every node (see `TreeScores`). `timer` wraps the phases "masks" (validity masks), "windows",
    "packing" (on a GPU: queuing its kernels) and "forward" (each batch's model forward)."""
    timer = timer or _untimed
    if not hasattr(model, "logits") or not hasattr(getattr(model, "cfg", None), "block_size"):
        raise HLMError("exact byte-level eval needs an hlm token GPT (logits with attn_mask/positions)")
    tok = rules.tok
    autocast = autocast or contextlib.nullcontext()
    device = torch.device(device)
    chunk_rows = chunk_rows or (8192 if device.type == "cuda" else 2048)  # rows per vocabulary-wide scoring step
    perm = rules.index.perm.to(device)
    with timer("masks"):
        invalid, key_row = invalid_masks(rules, flat.key, device)
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
        table, which = next_byte_bounds(rules.index, flat)
        bounds, which = table.to(device), which.to(device)
        den_of_query = torch.full((len(flat.q_node),), -1, dtype=torch.int64)
        den_of_query[flat.den_q] = torch.arange(len(flat.den_q))
        den_of_query = den_of_query.to(device)
        bins_lp = torch.full((len(flat.den_q), 256), float("-inf"), dtype=torch.float64, device=device)
    with timer("windows"):
        windows = windows_of(flat, model.cfg.block_size).to(device)
    n_windows = len(windows.start) - 1
    sorted_lp = sorted_p = None
    for i in range(0, n_windows, batch_size):
        with timer("packing"):
            ids, pos, tree, rows, nodes = pack_windows(windows, i, min(i + batch_size, n_windows), batch_size)
        with autocast, timer("forward"):
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
            sel = csr_select(by_node, g)
            j = row_of[q_node[sel]]
            range_lp[sel] = (_prefix_sum(csum, j, q_hi[sel]) - _prefix_sum(csum, j, q_lo[sel])).clamp_min(1e-300).log()
            if full:
                dq = den_of_query[sel]
                has = dq >= 0
                edges = _prefix_sum(csum, j[has, None], bounds[which[dq[has]]])
                bins_lp[dq[has]] = (edges[:, 1:] - edges[:, :-1]).clamp_min(0).log()
            k = csr_select(by_parent, g)
            kids = kids_all[k]
            point_lp[kids] = lp[row_of[kid_parent[k]], child_token[kids]].double()
            row_of[g] = -1
    return TreeScores(point_lp.cpu(), eos_lp.cpu(), range_lp.cpu(), None if bins_lp is None else bins_lp.cpu(),
                      n_windows)


@torch.no_grad()
def trunk_pass(model, flat: Flat, eos_id: int | None, device, batch_size: int, autocast,
               timer: Timer | None = None) -> float:
    """Canonical scoring on the tree pass's windows: each window's trunk stretch alone, in plain causal
    attention, rows padded as in the tree pass (the like-for-like denominator of the exact pass's cost).
    Returns the canonical NLL in nats; `timer` wraps each "forward"."""
    timer = timer or _untimed
    autocast = autocast or contextlib.nullcontext()
    device = torch.device(device)
    windows = windows_of(flat, model.cfg.block_size)
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
    for i in range(0, n_windows, batch_size):
        j = min(i + batch_size, n_windows)
        x = ids[i:j]
        if len(x) < batch_size:  # every batch has the tree pass's shape (padding comes after the real rows)
            x = F.pad(x, (0, 0, 0, batch_size - len(x)))
        with autocast, timer("forward"):
            logits = model.logits(x, positions=positions)
        sel = (win >= i) & (win < j) & (targets >= 0)
        rows = logits.flatten(0, 1)[flat_pos[sel] - i * width]
        nll -= F.log_softmax(at_least_fp32(rows), -1).gather(1, targets[sel, None]).double().sum()
    return float(nll)


def next_byte_bounds(index, flat) -> tuple[torch.Tensor, torch.Tensor]:
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


def invalid_masks(rules: ConversionRules, keys: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool[distinct keys, sorted vocab]: the tokens that may NOT follow a node (in sorted-vocabulary order,
    like the prefix sums), built once on the device; and the row of every node's key (`mask_key_code`)."""
    distinct, key_row = np.unique(keys, return_inverse=True)
    table = rules.invalid_table([mask_key(c) for c in distinct.tolist()], device)
    return table, torch.from_numpy(key_row.reshape(-1).astype(np.int64)).to(device)


def scatter_logsumexp(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    top = torch.full((size,), float("-inf"), dtype=torch.float64).scatter_reduce(0, index, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, index, (values - safe[index]).exp())
    return total.log() + safe


def log_prefix_probs(flat: Flat, point_lp: torch.Tensor) -> torch.Tensor:
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


def combine(plans: list[DocPlan], flat: Flat, scores: TreeScores, skipped: int) -> tuple[dict, list[dict]]:
    """bpb_canon, bpb_conv, their gap and counts over all documents; and each document's NLLs (per byte:
    the normaliser's log-sum minus the numerator's, both over the covers at that byte)."""
    point_lp, eos_lp, range_lp = scores.point_lp, scores.eos_lp, scores.range_lp
    logq = log_prefix_probs(flat, point_lp)
    num = scatter_logsumexp(torch.cat([flat.num_pos, flat.end_pos]),
                             torch.cat([logq[flat.q_node[flat.num_q]] + range_lp[flat.num_q],
                                        logq[flat.end_node] + eos_lp[flat.end_node]]), flat.n_pos)
    den = scatter_logsumexp(torch.cat([flat.den_pos, flat.eos_pos]),
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
            "tokens": sum(len(p.trunk) for p in plans)}, per_doc


def next_byte_distributions(flat: Flat, scores: TreeScores) -> torch.Tensor:
    """[positions, 257] next-byte log-probabilities at every byte position of every document (bytes, then
    end of text), from a `full` tree pass: each normaliser query's 256 bins and the EOS terms, summed over
    the covers at that position and normalised."""
    logq = log_prefix_probs(flat, scores.point_lp)
    out = torch.full((flat.n_pos, 257), float("-inf"), dtype=torch.float64)
    values = logq[flat.q_node[flat.den_q]][:, None] + scores.bins_lp
    index = flat.den_pos[:, None].expand(-1, 256)
    top = out[:, :256].scatter_reduce(0, index, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = (values - safe.gather(0, index)).exp()
    total = torch.zeros(flat.n_pos, 256, dtype=torch.float64).scatter_add_(0, index, shifted)
    out[:, :256] = total.log() + safe
    eos_lp = scores.eos_lp
    out[:, 256] = scatter_logsumexp(flat.eos_pos, logq[flat.eos_node] + eos_lp[flat.eos_node], flat.n_pos)
    return out - torch.logsumexp(out, dim=1, keepdim=True)
