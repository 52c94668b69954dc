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
own ancestors (position = depth). The trunks need no plan, so the covers are laid out on the host
while the device runs them (or beforehand by `plan_cuts`, in worker processes if asked). With a
model that leaks nothing, P(s) equals the product of the conversion's next-byte conditionals up to the
cut, and log Q(encode(x) + EOS) - log P(s) is the exact log-probability of x[cut:] and its end given s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
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


def _text_tokens(rules: ConversionRules, request: CutRequest) -> list[int]:
    """The canonical tokens the request's covers hang from: its text's, or its prefix's own."""
    return request.text_tokens if request.text_tokens is not None else rules.tok.encode(request.prefix)


def _plan_one(request: CutRequest) -> CutPlan | MissingCoverError:
    rules, start_id = _PLANNER["rules"], _PLANNER["start_id"]
    try:
        return plan_cut(rules, start_id, request.prefix, _text_tokens(rules, request), request.context)
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


CHAIN_ROOM = 32  # cache slots kept after the trunks for the chain nodes before their count is known; grown if short


@torch.no_grad()
def cut_logprobs_batch(model: torch.nn.Module, rules: ConversionRules, start_id: int,
                       requests: Sequence[CutRequest], autocast: contextlib.AbstractContextManager | None = None,
                       slide: bool = False, plans: Sequence[CutPlan | MissingCoverError] | None = None,
                       batch_size: int = 32, cache_bytes: int = 2**32) -> list[dict]:
    """For each request, log-probabilities (nats, given its context + start symbol) from an hlm GPT:
    `prefix`: log P(prefix) over its covers; `canonical_prefix`: log Q of the canonical prefix T (the part
    every cover shares); `text`: log Q(text_tokens (+ end_id)), the canonical score of the longer text.
    The trunks run in batches of similar lengths into one KV cache of about `cache_bytes` at most, and the
    chain nodes of all its rows in one pass. The covers are planned on the host while the device runs the
    trunks, unless `plans` (`plan_cuts`, e.g. made in workers) are given. With `slide`, a layout longer than
    the model's context loses its first positions (at most up to T), and the three values are relative to
    the first position kept: differences between them stay exact. Raises the first MissingCoverError, or
    one for a layout that does not fit."""
    if not requests:
        return []
    block, param = model.cfg.block_size, next(model.parameters())
    if plans is not None or slide:  # given, or needed first (how many positions to drop depends on the covers)
        given = plans if plans is not None else plan_cuts(rules, start_id, requests)
        fitted = [_fitted(p, block, slide) for p in given]
        trunks, n_context = [p.ids[: p.n_trunk] for p in fitted], [p.n_context for p in fitted]
        plan_of = fitted.__getitem__
    else:
        tokens = [_text_tokens(rules, r) for r in requests]
        trunks = [[*r.context, start_id, *t] for r, t in zip(requests, tokens, strict=True)]
        n_context = [len(r.context) for r in requests]
        if max(map(len, trunks)) > block:
            raise MissingCoverError(f"{max(map(len, trunks))} positions do not fit the model's context of {block}")

        def plan_of(i: int) -> CutPlan:
            r = requests[i]
            return _fitted(plan_cut(rules, start_id, r.prefix, tokens[i], r.context), block, slide)

    order = sorted(range(len(trunks)), key=lambda i: len(trunks[i]))
    with autocast or contextlib.nullcontext():
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
    # keys and values of one row of the cache
    row_bytes = 2 * len(model.transformer.blocks) * model.cfg.d_model * (len(trunks[order[-1]]) + CHAIN_ROOM) \
        * dtype.itemsize
    group = max(batch_size, cache_bytes // row_bytes // batch_size * batch_size)
    pending = []
    for at in range(0, len(order), group):
        idx = order[at : at + group]
        cuts = _CutGroup([trunks[i] for i in idx], [n_context[i] for i in idx], [requests[i].end_id for i in idx],
                         batch_size)
        with autocast or contextlib.nullcontext():
            values = cuts.launch(model, param.device, dtype, lambda r, idx=idx: plan_of(idx[r]))
        pending.append((idx, cuts, values))
    out: list[dict] = [{}] * len(trunks)
    for idx, cuts, values in pending:
        for i, res in zip(idx, cuts.finish(values.tolist()), strict=True):
            out[i] = res
    return out


def _fitted(plan: CutPlan | MissingCoverError, block: int, slide: bool) -> CutPlan:
    """The plan within the model's context: as it is, without its first positions (`slide`), or an error."""
    if isinstance(plan, MissingCoverError):
        raise plan
    drop = max(plan.positions) + 1 - block
    if drop > 0 and (not slide or drop > plan.prefix_pos):
        raise MissingCoverError(f"{len(plan.ids)} positions do not fit the model's context of {block}")
    return _slide(plan, drop) if drop > 0 else plan


class _CutGroup:
    """Cuts (sorted by trunk length) scored together. On the device: the trunks in batches into one KV cache,
    then every chain node against it in one pass, and the reductions. On the host, while the device runs a
    trunk batch: its cuts' plans and the rows of its output they need; after the last batch, the chain
    pass's layout (one int64 and one bool copy). A few floats per cut come back; the covers' sums are added
    up on the host."""

    def __init__(self, trunks: list[list[int]], n_context: list[int], end_ids: list[int | None], batch_size: int):
        self.trunks, self.n_context, self.end_ids = trunks, n_context, end_ids
        self.batches = [range(at, min(at + batch_size, len(trunks))) for at in range(0, len(trunks), batch_size)]
        self.plans: list[CutPlan] = []
        self.sum_at: list[dict[int, int]] = []  # per cut: trunk position -> its running sum's index in the values

    def launch(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
               plan_of: Callable[[int], CutPlan]) -> torch.Tensor:
        """Queue the passes and the reductions, planning cut r by `plan_of(r)` meanwhile; returns the values
        on the device: the running log Q at the trunk positions the covers need, the ends [N], the chain
        nodes' terms, then the straddling covers' masses."""
        N, L = len(self.trunks), max(map(len, self.trunks))  # chain nodes go to cache slots L..L+C-1
        cache = model.transformer.new_cache(N, L + CHAIN_ROOM, device, dtype)
        sums, ends, rows, row_counts = [], [], [], []
        # per log-softmax row a chain node's term or a straddling cover's mass needs: (trunk batch, index in the
        # rows taken from it) or (-1, index in chain_rows), which holds (cut, chain node)
        picked: list[tuple[int, int]] = []
        straddling: list[tuple[int, int]] = []
        chain_rows: list[tuple[int, int]] = []
        allowed: list[np.ndarray] = []
        n_sums = 0
        for k, batch in enumerate(self.batches):
            arrays = _trunk_arrays([self.trunks[r] for r in batch],
                                   [max(self.n_context[r] + 1, 1) for r in batch],  # the first position with a term
                                   [self.end_ids[r] for r in batch])
            Lk = arrays.shape[2]
            running, end, logits = _trunk_pass(model, _to_device(arrays, device), cache.view_rows(batch.start,
                                                                                                  batch.stop))
            rows_k, sums_k = [], []
            for j, r in enumerate(batch):  # the host's share, while the device runs the batch
                p = plan_of(r)
                self.plans.append(p)
                needed = {p.prefix_pos, p.n_trunk - 1} | {pos for pos, _, _ in p.covers if pos < p.n_trunk}
                needed |= {p.parent[i] for i in range(p.n_trunk, len(p.ids)) if p.parent[i] < p.n_trunk}
                self.sum_at.append({pos: n_sums + m for m, pos in enumerate(sorted(needed))})
                n_sums += len(needed)
                sums_k += [j * Lk + pos for pos in sorted(needed)]

                wanted = [(p.parent[i], picked) for i in range(p.n_trunk, len(p.ids))]
                wanted += [(pos, straddling) for pos, lo, hi in p.covers if lo < hi]
                allowed += [p.allowed[pos] for pos, lo, hi in p.covers if lo < hi]
                for pos, into in wanted:
                    if pos < p.n_trunk:
                        into.append((k, len(rows_k)))
                        rows_k.append(j * Lk + pos)
                    else:
                        into.append((-1, len(chain_rows)))
                        chain_rows.append((r, pos - p.n_trunk))
            taken = _to_device(np.asarray(sums_k + rows_k, dtype=np.int64), device)
            sums.append(running.flatten()[taken[: len(sums_k)]])
            ends.append(end)
            rows.append(logits.flatten(0, 1)[taken[len(sums_k) :]])
            row_counts.append(len(rows_k))
        values = [torch.cat(sums).double(), torch.cat(ends).double()]
        self.n_picked, self.n_straddling = len(picked), len(straddling)
        if not (picked or straddling):
            return torch.cat(values)
        C = max(len(p.ids) - p.n_trunk for p in self.plans)
        chain = np.zeros((2, N, C), dtype=np.int64)  # ids, rotary positions
        keep = np.zeros((N, 1, C, L + C), dtype=bool)  # which keys each chain node sees
        keep[:, 0, :, 0] = True  # padding rows see one key (an empty row would give NaN)
        targets = []
        for r, p in enumerate(self.plans):
            for i in range(p.n_trunk, len(p.ids)):
                c, parent = i - p.n_trunk, p.parent[i]
                chain[:, r, c] = p.ids[i], p.positions[i]
                if parent < p.n_trunk:
                    keep[r, 0, c, : parent + 1] = True
                else:
                    keep[r, 0, c] = keep[r, 0, parent - p.n_trunk]
                keep[r, 0, c, L + c] = True
                targets.append(p.ids[i])
        # where each needed row lands in cat(trunk batch 0's rows, batch 1's, ..., the chain pass's)
        offset = np.cumsum([0, *row_counts])
        order = [offset[k] + i if k >= 0 else offset[-1] + i for k, i in picked + straddling]
        ints = [chain.ravel(), *(np.asarray(t, dtype=np.int64) for t in
                                 ([r * C + c for r, c in chain_rows], order, targets))]
        chain_ids, flat_rows, order_d, targets_d = _to_device(np.concatenate(ints), device).split(
            [t.size for t in ints])
        mask = np.zeros((len(allowed), model.cfg.vocab_size), dtype=bool)
        for a, ids in enumerate(allowed):
            mask[a, ids] = True
        keep_d, mask_d = _to_device(np.concatenate([keep.ravel(), mask.ravel()]), device).split([keep.size, mask.size])
        if C:
            cache = _with_room(cache, L + C)
            cache.pos = L
            bias = torch.zeros(N, 1, C, L + C, device=device, dtype=dtype).masked_fill_(
                ~keep_d.view(N, 1, C, L + C), float("-inf"))
            chain_ids = chain_ids.view(2, N, C)
            with decoding_attention():
                chain_logits = model.logits(chain_ids[0], cache, attn_mask=bias, positions=chain_ids[1])
            rows.append(at_least_fp32(chain_logits).flatten(0, 1)[flat_rows])
        lp = F.log_softmax(torch.cat(rows)[order_d].double(), dim=-1)
        values.append(lp[: self.n_picked].gather(1, targets_d[:, None]).squeeze(1))
        if self.n_straddling:
            values.append(lp[self.n_picked :].masked_fill(~mask_d.view(mask.shape), float("-inf")).logsumexp(-1))
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


def _with_room(cache: KVCache, max_len: int) -> KVCache:
    """`cache`, or a copy of its filled positions in a larger one when it has fewer than `max_len` slots."""
    if cache.k.size(3) >= max_len:
        return cache
    grown = KVCache.__new__(KVCache)
    pad = (0, 0, 0, max_len - cache.k.size(3))
    grown.k, grown.v, grown.pos = F.pad(cache.k, pad), F.pad(cache.v, pad), cache.pos
    return grown


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
