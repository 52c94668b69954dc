"""Exact bits per byte of a token model in one batched tree pass (research/byte_conversion.md §2c).

In teacher-forced evaluation the whole text is known, so every exact node the byte-by-byte
recursion would query is known before the model runs (`plan_document`, no model). The nodes
form a token tree around the canonical encoding (the trunk). `exact_bpb` packs them into
windows of the model's context (trunk tokens plus the off-trunk nodes hanging from them, each
node attending to its ancestors, position = depth) and scores them with one forward per batch
of windows through `GPT.logits(ids, attn_mask=..., positions=...)`. Every next-byte term is
then a range sum over the sorted vocabulary (fp64 prefix sums of the masked next-token
probabilities), combined per byte with a scatter logsumexp. The same pass gives the canonical
token NLL on the same windows, so bpb_canon and bpb_conv differ only by the conversion.

Each document is scored from the start symbol with its end of text (counted as one byte, like
the separator of canonical eval). Windows of a long document are non-overlapping stretches of
the trunk; a node sees only its window.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hlm import HLMError
from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError

LN2 = math.log(2)


@dataclass
class DocPlan:
    """Nodes of one document (local ids, parents first) and the terms of every next-byte probability."""

    n_bytes: int
    parent: list[int] = field(default_factory=list)
    token: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    mask_key: list[tuple[int | None, bool]] = field(default_factory=list)
    trunk: list[int] = field(default_factory=list)  # canonical path, root first
    num: list[tuple[int, int, int, int]] = field(default_factory=list)  # (byte position, node, lo, hi)
    den: list[tuple[int, int, int, int]] = field(default_factory=list)
    eos: list[tuple[int, int]] = field(default_factory=list)  # (byte position, exact node)


def plan_document(x: bytes, rules: ConversionRules, start_id: int) -> DocPlan:
    """Walk the cover recursion over x without a model and record what each byte's probability needs."""
    tracker = CoverTracker(rules, start_id)
    index, trie = rules.index, tracker.trie
    plan = DocPlan(len(x), [-1], [start_id], [0], [(None, False)])
    local = {0: 0}

    def record(m: int, next_byte: int | None) -> None:
        for a in tracker.anchors:
            u = tracker.remainder(a)
            lo, hi = index.strict_range(u)
            if lo < hi:
                plan.den.append((m, local[a], lo, hi))
            if next_byte is not None:
                lo, hi = index.range(u + bytes([next_byte]))
                if lo < hi:
                    plan.num.append((m, local[a], lo, hi))
        plan.eos.extend((m, local[e]) for e in tracker.exact)

    for m, b in enumerate(x):
        record(m, b)
        for e in tracker.advance(b):
            local[e] = len(plan.parent)
            plan.parent.append(local[trie.parent[e]])
            plan.token.append(trie.token[e])
            plan.depth.append(plan.depth[local[trie.parent[e]]] + 1)
            plan.mask_key.append((trie.last_token(e), trie.mid[e]))
    record(len(x), None)
    child = {(p, t): i for i, (p, t) in enumerate(zip(plan.parent, plan.token, strict=True))}
    plan.trunk = [0]
    for t in rules.tok.encode(x):
        node = child.get((plan.trunk[-1], t))
        if node is None:
            raise MissingCoverError("the canonical encoding is not among the tracked exact nodes")
        plan.trunk.append(node)
    return plan


def _windows(plan: DocPlan, block: int) -> list[list[int]]:
    """Split the nodes into windows of at most `block` positions: stretches of the trunk with the
    off-trunk nodes that hang from them."""
    on_trunk = {node: k for k, node in enumerate(plan.trunk)}
    anchor = [0] * len(plan.parent)
    for v in range(1, len(plan.parent)):
        anchor[v] = on_trunk[v] if v in on_trunk else anchor[plan.parent[v]]
    spill = max(d - plan.depth[plan.trunk[a]] for d, a in zip(plan.depth, anchor, strict=True))
    stride = block - spill
    if stride < 1:
        raise MissingCoverError(f"off-trunk paths of {spill} tokens do not fit a context of {block}")
    groups: dict[int, list[int]] = {}
    for v, a in enumerate(anchor):
        groups.setdefault(a // stride, []).append(v)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def exact_bpb(model, tok, docs: list[bytes], start_id: int, device: str | torch.device = "cpu",
              batch_size: int = 8, chunk_rows: int = 2048, autocast=None) -> dict:
    """bpb_canon, bpb_conv (and their gap) of an hlm token GPT on documents; documents that do not
    round-trip through the tokenizer, or whose covers cannot be tracked, are skipped and counted."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    rules = ConversionRules(tok)
    index = rules.index
    perm = index.perm.to(device)
    block = model.cfg.block_size
    eos = tok.eos_id
    t0 = time.perf_counter()
    plans, skipped = [], 0
    for x in docs:
        try:
            if tok.decode(tok.encode(x)) != x:
                raise MissingCoverError("round trip")
            plans.append(plan_document(x, rules, start_id))
        except HLMError:  # no round trip, text the tokenizer cannot take, or untrackable covers
            skipped += 1
    t_plan = time.perf_counter() - t0
    windows = [(d, w) for d, plan in enumerate(plans) for w in _windows(plan, block)]
    # per document: next-token log-probs needed at each node
    point = [torch.zeros(len(p.parent), dtype=torch.float64) for p in plans]  # log q(token(v) | parent(v))
    eos_lp = [torch.zeros(len(p.parent), dtype=torch.float64) for p in plans]
    range_lp: list[dict[tuple[int, int, int], float]] = [{} for _ in plans]
    needs = []
    for plan in plans:
        want: dict[int, list[tuple[int, int]]] = {}
        for _, v, lo, hi in plan.num + plan.den:
            want.setdefault(v, []).append((lo, hi))
        needs.append(want)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        length = max(len(w) for _, w in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.int64)
        pos = torch.zeros(len(batch), length, dtype=torch.int64)
        mask = torch.zeros(len(batch), 1, length, length, dtype=torch.bool)
        rows = []  # (batch row, position, doc, node)
        for r, (d, nodes) in enumerate(batch):
            plan = plans[d]
            where = {v: k for k, v in enumerate(nodes)}
            base = plan.depth[nodes[0]]
            for k, v in enumerate(nodes):
                ids[r, k], pos[r, k] = plan.token[v], plan.depth[v] - base
                p = where.get(plan.parent[v])
                if p is not None:
                    mask[r, 0, k] = mask[r, 0, p]
                mask[r, 0, k, k] = True
                rows.append((r, k, d, v))
            mask[r, 0, len(nodes) :, :] = torch.eye(length, dtype=torch.bool)[len(nodes) :]
        with autocast:
            logits = model.logits(ids.to(device), attn_mask=mask.to(device), positions=pos.to(device))
        for c in range(0, len(rows), chunk_rows):
            chunk = rows[c : c + chunk_rows]
            r_idx = torch.tensor([r for r, _, _, _ in chunk], device=device)
            k_idx = torch.tensor([k for _, k, _, _ in chunk], device=device)
            rows_logits = logits[r_idx, k_idx]
            if rows_logits.dtype in (torch.bfloat16, torch.float16):
                rows_logits = rows_logits.float()
            lp = F.log_softmax(rows_logits, dim=-1)[:, : tok.vocab_size]
            valid = torch.stack([rules.next_mask(*plans[d].mask_key[v]) for _, _, d, v in chunk]).to(device)
            csum = F.pad((lp.double().exp() * valid)[:, perm].cumsum(dim=1), (1, 0))
            _gather_chunk(chunk, lp, csum, plans, needs, point, eos_lp, range_lp, eos)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return _combine(plans, point, eos_lp, range_lp, skipped, t_plan, time.perf_counter() - t0)


def _gather_chunk(chunk, lp, csum, plans, needs, point, eos_lp, range_lp, eos) -> None:
    """Pull the scalars each node contributes: its children's log-probs, its EOS, its range sums."""
    lp_cpu_rows = {}
    for j, (_, _, d, v) in enumerate(chunk):
        lp_cpu_rows.setdefault(d, []).append((j, v))
    for d, items in lp_cpu_rows.items():
        plan = plans[d]
        js = torch.tensor([j for j, _ in items], device=lp.device)
        eos_lp[d][[v for _, v in items]] = lp[js, eos].double().cpu() if eos is not None else float("-inf")
        for j, v in items:
            want = needs[d].get(v, ())
            if want:
                lo = torch.tensor([a for a, _ in want], device=csum.device)
                hi = torch.tensor([b for _, b in want], device=csum.device)
                sums = (csum[j, hi] - csum[j, lo]).clamp_min(1e-300).log().cpu().tolist()
                for (a, b), s in zip(want, sums, strict=True):
                    range_lp[d][(v, a, b)] = s
        children = [(c, v, j) for j, v in items for c in _children(plan, v)]
        if children:
            rows = torch.tensor([j for _, _, j in children], device=lp.device)
            toks = torch.tensor([plan.token[c] for c, _, _ in children], device=lp.device)
            point[d][[c for c, _, _ in children]] = lp[rows, toks].double().cpu()


def _children(plan: DocPlan, v: int) -> list[int]:
    kids = plan.__dict__.setdefault("_kids", None)
    if kids is None:
        kids = [[] for _ in plan.parent]
        for c, p in enumerate(plan.parent):
            if p >= 0:
                kids[p].append(c)
        plan._kids = kids
    return kids[v]


def _scatter_logsumexp(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    top = torch.full((size,), float("-inf"), dtype=torch.float64).scatter_reduce(0, index, values, "amax")
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, index, (values - safe[index]).exp())
    return total.log() + safe


def _combine(plans, point, eos_lp, range_lp, skipped, t_plan, seconds) -> dict:
    nll_canon = nll_conv = 0.0
    n_bytes = 0
    per_doc = []
    for d, plan in enumerate(plans):
        logq = torch.zeros(len(plan.parent), dtype=torch.float64)
        for v in range(1, len(plan.parent)):
            logq[v] = logq[plan.parent[v]] + point[d][v]
        n = plan.n_bytes
        size = n + 1
        num_idx = torch.tensor([m for m, _, _, _ in plan.num], dtype=torch.int64)
        num_val = torch.tensor([logq[v] + range_lp[d][(v, lo, hi)] for _, v, lo, hi in plan.num],
                               dtype=torch.float64)
        end = [(m, v) for m, v in plan.eos if m == n]
        num_idx = torch.cat([num_idx, torch.full((len(end),), n, dtype=torch.int64)])
        num_val = torch.cat([num_val, torch.stack([logq[v] + eos_lp[d][v] for _, v in end])])
        den_idx = torch.tensor([m for m, _, _, _ in plan.den] + [m for m, _ in plan.eos], dtype=torch.int64)
        den_val = torch.cat([torch.tensor([logq[v] + range_lp[d][(v, lo, hi)] for _, v, lo, hi in plan.den],
                                          dtype=torch.float64),
                             torch.stack([logq[v] + eos_lp[d][v] for _, v in plan.eos])])
        per_byte = _scatter_logsumexp(den_idx, den_val, size) - _scatter_logsumexp(num_idx, num_val, size)
        conv = float(per_byte.sum())
        canon = -float(logq[plan.trunk[-1]] + eos_lp[d][plan.trunk[-1]])
        nll_conv += conv
        nll_canon += canon
        n_bytes += n + 1
        per_doc.append({"bytes": n, "nll_canon": canon, "nll_conv": conv, "per_byte_nll": per_byte})
    bpb_canon = nll_canon / (LN2 * max(n_bytes, 1))
    bpb_conv = nll_conv / (LN2 * max(n_bytes, 1))
    return {"bpb_canon": bpb_canon, "bpb_conv": bpb_conv, "bpb_gap": bpb_canon - bpb_conv, "bytes": n_bytes,
            "docs": len(plans), "docs_skipped": skipped, "nodes": sum(len(p.parent) for p in plans),
            "tokens": sum(len(p.trunk) for p in plans), "seconds": seconds, "seconds_planning": t_plan,
            "bytes_per_s": n_bytes / max(seconds, 1e-9), "per_doc": per_doc}
