"""Prefix probability of a text that ends mid-token, at about the cost of canonical scoring.

For a byte string s the probability that the generated text starts with s is the total of
Q(c) over the valid covers c of s (the BTR lemma; hlm/bytes/covers.py): the exact nodes that
end at |s| (`encode(s)`, a few under regex lookahead) and the anchors a that end before |s|
followed by any allowed token whose bytes start with, and extend, the rest of s. All covers
share the path from the start symbol to their deepest common ancestor T, the *canonical prefix*:
the canonical tokens of s up to the last position where every cover agrees (for sentencepiece,
at least every pretoken before the last). So

    log P(s) = log Q(T) + log Σ_c Q(c) / Q(T)

where the second term sums over short chains below T (a token or two: the partial last word).
`cut_logprobs_batch` scores a batch of cuts in two passes: the *trunks* (context, start symbol and
the canonical tokens of a text x with s = x[:cut]) as one causal batch that fills a KV cache, which
is canonical scoring of x (`canonical_logprobs_batch` runs that pass alone); then the chain nodes of
every cut in one small pass against that cache, each node seeing the trunk up to its anchor and its
own ancestors (position = depth). `plan_cuts` lays the chains out, in worker processes if asked,
off the device's critical path. With a model that leaks nothing, P(s) equals the product of the
conversion's next-byte conditionals up to the cut, and log Q(encode(x) + EOS) - log P(s) is the
exact log-probability of x[cut:] and its end given s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError
from hlm.bytes.plan import forked_pool, segment_points
from hlm.models.blocks import KVCache, at_least_fp32
from hlm.models.generation import decoding_attention


@dataclass
class CutRequest:
    """A text that ends mid-token: `prefix`, the bytes up to the cut, and `text_tokens`, the canonical tokens
    of a text that starts with it (None: of prefix itself), scored after `context` and the start symbol, then
    `end_id` (None: no end)."""

    prefix: bytes
    text_tokens: list[int] | None = None
    end_id: int | None = None
    context: list[int] = field(default_factory=list)


@dataclass
class CutPlan:
    """One cut's layout: `ids` = context, start symbol, canonical tokens of the text (the trunk), then the
    chain nodes; `parent[i]` the position whose logits predict position i (-1 where no term is needed);
    the covers as (position, sorted-vocabulary lo, hi; lo == hi for a cover ending at the cut); the
    canonical prefix's position; and for each straddling cover's anchor, the ids of the tokens in its range
    that may follow it."""

    ids: list[int]
    positions: list[int]
    parent: list[int]
    n_trunk: int  # context + start + text tokens: the trunk, causal
    n_context: int
    covers: list[tuple[int, int, int]]
    prefix_pos: int
    allowed: dict[int, np.ndarray]


def plan_cut(rules: ConversionRules, start_id: int, prefix: bytes, text_tokens: list[int],
             context: Sequence[int] = ()) -> CutPlan:
    """Model-free layout for the covers of `prefix` hanging from `text_tokens` (the canonical encoding of
    a text that starts with prefix, or of prefix itself). Sentencepiece: covers are tracked from the
    prefix's last `segment_points` cut only, where every cover has a token boundary and the tokens
    before it are the canonical ones (as in hlm/infilling.py's `exact_tail`)."""
    tok = rules.tok
    head, head_bytes = _head_tokens(rules, prefix, text_tokens)
    tracker = CoverTracker(rules, head[-1] if head else start_id)
    if getattr(tok, "add_dummy_prefix", False) and not head:
        tracker.advance(0x20)
    for b in prefix[head_bytes:]:
        tracker.advance(b)
    trie, n = tracker.trie, len(tracker.text)
    covers = [(a, *rules.index.strict_range(tracker.remainder(a))) for a in tracker.anchors if trie.pos[a] < n]
    covers = [(a, lo, hi) for a, lo, hi in covers if lo < hi] + [(e, 0, 0) for e in tracker.exact]
    trunk = [0]  # trie nodes along the text's canonical tokens, as far as the trie has them
    for t in text_tokens[len(head) :]:
        nxt = trie.children[trunk[-1]].get(t)
        if nxt is None:
            break
        trunk.append(nxt)
    n_context = len(context)
    root = n_context + len(head)  # the position of the trie's root
    pos_of = {node: root + i for i, node in enumerate(trunk)}
    ids = list(context) + [start_id] + list(text_tokens)
    positions = list(range(len(ids)))
    parent = [-1] * n_context + [-1] + list(range(n_context, len(ids) - 1))
    n_trunk = len(ids)
    for c, _, _ in covers:
        chain = []
        node = c
        while node not in pos_of:
            chain.append(node)
            node = trie.parent[node]
        for node in reversed(chain):
            pos_of[node] = len(ids)
            ids.append(trie.token[node])
            parent.append(pos_of[trie.parent[node]])
            positions.append(root + len(trie.path(node)) - 1)
    paths = [trie.path(c) for c, _, _ in covers]
    depth = 0
    while all(len(p) > depth + 1 and p[depth + 1] == paths[0][depth + 1] for p in paths):
        depth += 1
    common = paths[0][: depth + 1]
    node = 0
    for t in common[1:]:
        node = trie.children[node][t]
    if node not in pos_of or pos_of[node] >= n_trunk:
        raise MissingCoverError("the canonical prefix of the cut is not on the text's canonical encoding")
    allowed = {}
    for a, lo, hi in covers:
        if lo < hi:  # numpy views of the tables: torch's per-op cost would dominate on these few ids
            in_range = rules.index.perm.numpy()[lo:hi]
            allowed[pos_of[a]] = in_range[tracker.mask(a).numpy()[in_range]]
    return CutPlan(ids, positions, parent, n_trunk, n_context, [(pos_of[c], lo, hi) for c, lo, hi in covers],
                   pos_of[node], allowed)


def _head_tokens(rules: ConversionRules, prefix: bytes, text_tokens: list[int]) -> tuple[list[int], int]:
    """The canonical tokens of prefix before its last sentencepiece `segment_points` cut (empty without one)
    and their length in bytes: the text's own tokens up to that byte, where one of them ends there.
    Sentencepiece encodes each whitespace piece on its own and a segment point starts a piece, so they are
    the encoding of prefix[:cut] without encoding it again."""
    points = segment_points(prefix, rules)
    if not points or not text_tokens:
        return [], 0
    ends = np.cumsum(rules.token_lengths[np.asarray(text_tokens)])
    k = int(np.searchsorted(ends, points[-1]))
    if k < len(ends) and ends[k] == points[-1]:
        return list(text_tokens[: k + 1]), points[-1]
    return [], 0


_PLANNER: dict = {}


def _plan_one(request: CutRequest) -> CutPlan | MissingCoverError:
    rules, start_id = _PLANNER["rules"], _PLANNER["start_id"]
    tokens = request.text_tokens if request.text_tokens is not None else rules.tok.encode(request.prefix)
    try:
        return plan_cut(rules, start_id, request.prefix, tokens, request.context)
    except MissingCoverError as e:
        return e


def plan_cuts(rules: ConversionRules, start_id: int, requests: Sequence[CutRequest],
              workers: int = 1) -> list[CutPlan | MissingCoverError]:
    """`plan_cut` of every request (the error in place of a cut whose covers cannot be tracked); with
    workers > 1, in that many forked processes, in order."""
    _PLANNER.update(rules=rules, start_id=start_id)
    if workers <= 1 or len(requests) < 2:
        return [_plan_one(r) for r in requests]
    with forked_pool(workers) as pool:
        return pool.map(_plan_one, requests, chunksize=max(1, len(requests) // (4 * workers)))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for the work queued there (pinned, non-blocking, on CUDA):
    the next batch is laid out while the device still runs the last."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _trunk_arrays(trunks: list[list[int]], scored_from: list[int], end_ids: list[int | None]) -> np.ndarray:
    """[3, B, L] int64, right-padded: the ids; the target each position predicts (the next id, the end at
    the last); 1 where that target is scored (from position `scored_from` on), 2 for a scored end."""
    B, L = len(trunks), max(map(len, trunks))
    rows = np.zeros((3, B, L), dtype=np.int64)
    for b, (t, first, end) in enumerate(zip(trunks, scored_from, end_ids, strict=True)):
        n = len(t)
        rows[0, b, :n] = t
        rows[1, b, : n - 1] = t[1:]
        rows[2, b, max(first, 1) - 1 : n - 1] = 1
        if end is not None:
            rows[1, b, n - 1], rows[2, b, n - 1] = end, 2
    return rows


def _trunk_pass(model: torch.nn.Module, arrays: torch.Tensor, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical scoring of a batch of trunks (`_trunk_arrays` on the device), causally, filling `cache` if
    given: the running log Q [B, L] (position i: the scored terms of the tokens at positions <= i), the
    scored end's log-probability [B] (0 without one) and the logits [B, L, V] (at least fp32). Attention
    without cuDNN, which plans every new shape anew (`decoding_attention`)."""
    ids, targets, kind = arrays.unbind(0)
    with decoding_attention():
        logits = at_least_fp32(model.logits(ids, cache))
    picked = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    zero = picked.new_zeros(())
    running = torch.cat([picked.new_zeros(ids.size(0), 1), torch.where(kind == 1, picked, zero).cumsum(1)[:, :-1]],
                        dim=1)
    return running, torch.where(kind == 2, picked, zero).sum(1), logits


@torch.no_grad()
def canonical_logprobs_batch(model: torch.nn.Module, sequences: Sequence[list[int]], scored_from: Sequence[int],
                             end_ids: Sequence[int | None], autocast: contextlib.AbstractContextManager | None = None,
                             batch_size: int = 32) -> list[float]:
    """log Q of each sequence's tokens from position `scored_from` on (and of its end id), in batches of
    similar lengths: the trunk pass of `cut_logprobs_batch` alone, the canonical scoring a cut is measured
    against."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pending = []
    for at in range(0, len(order), batch_size):
        idx = order[at : at + batch_size]
        arrays = _trunk_arrays([sequences[i] for i in idx], [scored_from[i] for i in idx], [end_ids[i] for i in idx])
        last = torch.tensor([len(sequences[i]) - 1 for i in idx])
        with autocast or contextlib.nullcontext():
            running, end, _ = _trunk_pass(model, _to_device(arrays, device))
        pending.append((idx, running.gather(1, last[:, None].to(device)).squeeze(1) + end))
    out = [0.0] * len(sequences)
    for idx, values in pending:
        for i, v in zip(idx, values.tolist(), strict=True):
            out[i] = v
    return out


@torch.no_grad()
def cut_logprobs_batch(model: torch.nn.Module, rules: ConversionRules, start_id: int,
                       requests: Sequence[CutRequest], autocast: contextlib.AbstractContextManager | None = None,
                       slide: bool = False, plans: Sequence[CutPlan | MissingCoverError] | None = None,
                       batch_size: int = 32, cache_bytes: int = 2**32) -> list[dict]:
    """For each request, log-probabilities (nats, given its context + start symbol) from an hlm GPT:
    `prefix`: log P(prefix) over its covers; `canonical_prefix`: log Q of the canonical prefix T (the part
    every cover shares); `text`: log Q(text_tokens (+ end_id)), the canonical score of the longer text.
    The trunks run in batches of similar lengths into one KV cache of about `cache_bytes` at most, and the
    chain nodes of all its rows in one pass; `plans` (`plan_cuts`, e.g. made in workers) saves planning
    here. With `slide`, a layout longer than the model's context loses its first positions (at most up to
    T), and the three values are relative to the first position kept: differences between them stay exact.
    Raises the first MissingCoverError, or one for a layout that does not fit."""
    if not requests:
        return []
    if plans is None:
        plans = plan_cuts(rules, start_id, requests)
    block, param = model.cfg.block_size, next(model.parameters())
    ready = []
    for plan in plans:
        if isinstance(plan, MissingCoverError):
            raise plan
        drop = max(plan.positions) + 1 - block
        if drop > 0 and (not slide or drop > plan.prefix_pos):
            raise MissingCoverError(f"{len(plan.ids)} positions do not fit the model's context of {block}")
        ready.append(_slide(plan, drop) if drop > 0 else plan)
    order = sorted(range(len(ready)), key=lambda i: ready[i].n_trunk)
    with autocast or contextlib.nullcontext():
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
    # keys and values of one row of the cache
    row_bytes = 2 * len(model.transformer.blocks) * model.cfg.d_model * max(len(p.ids) for p in ready) * dtype.itemsize
    group = max(batch_size, cache_bytes // row_bytes // batch_size * batch_size)
    pending = []
    for at in range(0, len(order), group):
        idx = order[at : at + group]
        cuts = _CutGroup([ready[i] for i in idx], [requests[i].end_id for i in idx], model.cfg.vocab_size, batch_size)
        with autocast or contextlib.nullcontext():
            pending.append((idx, cuts, cuts.launch(model, param.device, dtype)))
    out: list[dict] = [{}] * len(ready)
    for idx, cuts, values in pending:
        for i, res in zip(idx, cuts.finish(values.tolist()), strict=True):
            out[i] = res
    return out


class _CutGroup:
    """Cut plans (sorted by trunk length) scored together: the host layout, built before anything is queued on
    the device and sent in two copies; on the device, the trunks in batches into one KV cache, then every
    chain node against it in one pass, and the reductions; a few floats per cut back; the covers' sums on
    the host."""

    def __init__(self, plans: list[CutPlan], end_ids: list[int | None], vocab_size: int, batch_size: int):
        self.plans, self.end_ids = plans, end_ids
        N = len(plans)
        L = self.L = max(p.n_trunk for p in plans)  # the cache's trunk positions; chain nodes at L..L+C-1
        C = self.C = max(len(p.ids) - p.n_trunk for p in plans)
        self.batches = [range(at, min(at + batch_size, N)) for at in range(0, N, batch_size)]
        trunks = [_trunk_arrays([plans[r].ids[: plans[r].n_trunk] for r in rows],
                                [max(plans[r].n_context + 1, 1) for r in rows],  # the first position with a term
                                [end_ids[r] for r in rows]) for rows in self.batches]
        self.lengths = [t.shape[2] for t in trunks]
        chain = np.zeros((2, N, C), dtype=np.int64)  # ids, rotary positions
        keep = np.zeros((N, 1, C, L + C), dtype=bool)  # which keys each chain node sees
        keep[:, 0, :, 0] = True  # padding rows see one key (an empty row would give NaN)
        # the rows whose log-softmax a chain node or a straddling cover needs (flat in a trunk batch's logits
        # or in the chain pass's), and the running sums the covers need (flat in a trunk batch's)
        trunk_rows: list[list[int]] = [[] for _ in self.batches]
        trunk_sums: list[list[int]] = [[] for _ in self.batches]
        chain_rows: list[int] = []
        slots: list[tuple[int, int]] = []  # per needed row: (trunk batch, or -1 for the chain pass; index there)
        targets, allowed = [], []
        self.sum_at: list[dict[int, int]] = []  # per cut: trunk position -> its running sum's index in the values
        for k, rows in enumerate(self.batches):
            for j, r in enumerate(rows):
                p = plans[r]
                needed = {p.prefix_pos, p.n_trunk - 1} | {pos for pos, _, _ in p.covers if pos < p.n_trunk}
                needed |= {p.parent[i] for i in range(p.n_trunk, len(p.ids)) if p.parent[i] < p.n_trunk}
                first = sum(map(len, trunk_sums))
                self.sum_at.append({pos: first + m for m, pos in enumerate(sorted(needed))})
                trunk_sums[k] += [j * self.lengths[k] + pos for pos in sorted(needed)]

        def need(r: int, pos: int) -> None:
            p = plans[r]
            if pos < p.n_trunk:
                k, j = divmod(r, batch_size)
                slots.append((k, len(trunk_rows[k])))
                trunk_rows[k].append(j * self.lengths[k] + pos)
            else:
                slots.append((-1, len(chain_rows)))
                chain_rows.append(r * C + pos - p.n_trunk)

        for r, p in enumerate(plans):
            for i in range(p.n_trunk, len(p.ids)):
                c, parent = i - p.n_trunk, p.parent[i]
                chain[:, r, c] = p.ids[i], p.positions[i]
                if parent < p.n_trunk:
                    keep[r, 0, c, : parent + 1] = True
                else:
                    keep[r, 0, c] = keep[r, 0, parent - p.n_trunk]
                keep[r, 0, c, L + c] = True
                need(r, parent)
                targets.append(p.ids[i])
        self.n_picked = len(targets)
        for r, p in enumerate(plans):
            for pos, lo, hi in p.covers:
                if lo < hi:
                    need(r, pos)
                    allowed.append(p.allowed[pos])
        # where each needed row lands in cat(trunk batch 0's rows, batch 1's, ..., the chain pass's)
        offset = np.cumsum([0] + [len(t) for t in trunk_rows])
        order = np.array([offset[k] + i if k >= 0 else offset[-1] + i for k, i in slots], dtype=np.int64)
        lists = [*trunk_rows, chain_rows, order, targets, *trunk_sums]
        self.sizes = [t.size for t in trunks] + [chain.size] + [len(t) for t in lists]
        self.n_straddling = len(allowed)
        # one int64 copy, and one bool copy (the chain's keys, the straddling covers' allowed tokens)
        self.ints = np.concatenate([*(t.ravel() for t in trunks), chain.ravel(),
                                    *(np.asarray(t, dtype=np.int64) for t in lists)])
        mask = np.zeros((len(allowed), vocab_size), dtype=bool)
        for k, ids in enumerate(allowed):
            mask[k, ids] = True
        self.bools = np.concatenate([keep.ravel(), mask.ravel()])

    def launch(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Queue the passes and the reductions; returns the values on the device: the running log Q at the
        trunk positions the covers need, the ends [N], the chain nodes' terms, then the straddling covers'
        masses."""
        N, L, C, K = len(self.plans), self.L, self.C, len(self.batches)
        parts = _to_device(self.ints, device).split(self.sizes)
        trunks, chain, trunk_rows = parts[:K], parts[K].view(2, N, C), parts[K + 1 : 2 * K + 1]
        chain_rows, order, targets = parts[2 * K + 1 : 2 * K + 4]
        trunk_sums = parts[2 * K + 4 :]
        V = model.cfg.vocab_size
        keep, allowed = _to_device(self.bools, device).split([N * C * (L + C), self.n_straddling * V])
        cache = model.transformer.new_cache(N, L + C, device, dtype)
        sums, ends, rows = [], [], []
        for batch, Lk, arrays, rows_k, sums_k in zip(self.batches, self.lengths, trunks, trunk_rows, trunk_sums,
                                                     strict=True):
            running, end, logits = _trunk_pass(model, arrays.view(3, len(batch), Lk),
                                               cache.view_rows(batch.start, batch.stop))
            sums.append(running.flatten()[sums_k])
            ends.append(end)
            rows.append(logits.flatten(0, 1)[rows_k])
        values = [torch.cat(sums).double(), torch.cat(ends).double()]
        if len(order):
            if C:
                cache.pos = L
                bias = torch.zeros(N, 1, C, L + C, device=device, dtype=dtype).masked_fill_(
                    ~keep.view(N, 1, C, L + C), float("-inf"))
                with decoding_attention():
                    chain_logits = model.logits(chain[0], cache, attn_mask=bias, positions=chain[1])
                rows.append(at_least_fp32(chain_logits).flatten(0, 1)[chain_rows])
            lp = F.log_softmax(torch.cat(rows)[order].double(), dim=-1)
            values.append(lp[: self.n_picked].gather(1, targets[:, None]).squeeze(1))
            if self.n_straddling:
                mask = allowed.view(self.n_straddling, -1)
                values.append(lp[self.n_picked :].masked_fill(~mask, float("-inf")).logsumexp(-1))
        return torch.cat(values)

    def finish(self, host: list[float]) -> list[dict]:
        """The covers' sums from the values `launch` returned (as floats)."""
        N, m = len(self.plans), sum(map(len, self.sum_at))
        ends, values = host[m : m + N], host[m + N :]
        masses = iter(values[self.n_picked :])
        results, k = [], 0
        for r, (p, end_id, at) in enumerate(zip(self.plans, self.end_ids, self.sum_at, strict=True)):
            logq = {pos: host[i] for pos, i in at.items()}
            for i in range(p.n_trunk, len(p.ids)):  # chain nodes follow their parents
                logq[i] = logq[p.parent[i]] + values[k]
                k += 1
            terms = [logq[pos] + next(masses) if lo < hi else logq[pos] for pos, lo, hi in p.covers]
            results.append({"prefix": _logsumexp(terms), "canonical_prefix": logq[p.prefix_pos],
                            "text": logq[p.n_trunk - 1] + (ends[r] if end_id is not None else 0.0),
                            "positions": len(p.ids), "extra_positions": len(p.ids) - p.n_trunk})
        return results


def cut_logprobs(model: torch.nn.Module, rules: ConversionRules, start_id: int, prefix: bytes,
                 text_tokens: list[int] | None = None, end_id: int | None = None, context: Sequence[int] = (),
                 autocast: contextlib.AbstractContextManager | None = None, slide: bool = False) -> dict:
    """`cut_logprobs_batch` of one cut."""
    return cut_logprobs_batch(model, rules, start_id, [CutRequest(prefix, text_tokens, end_id, list(context))],
                              autocast, slide)[0]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in values))


def _slide(plan: CutPlan, drop: int) -> CutPlan:
    """The plan without its first `drop` trunk positions (all positions shift down by `drop`)."""
    def shift(i: int) -> int:
        return i - drop if i >= drop else -1

    return CutPlan(plan.ids[drop:], [p - drop for p in plan.positions[drop:]], [shift(p) for p in plan.parent[drop:]],
                   plan.n_trunk - drop, plan.n_context - drop if plan.n_context >= drop else -1,
                   [(p - drop, lo, hi) for p, lo, hi in plan.covers], plan.prefix_pos - drop,
                   {p - drop: ids for p, ids in plan.allowed.items()})
