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
`cut_logprobs` scores T, the chains and, optionally, the canonical encoding of a longer text x
(with s = x[:cut]) in ONE forward: the chain nodes go after x's tokens, each seeing the context up
to T and its own ancestors (a dense attention mask, position = depth), so the cut costs a few
positions more than scoring x canonically. With a model that leaks nothing, P(s) equals the
product of the conversion's next-byte conditionals up to the cut, and
log Q(encode(x) + EOS) - log P(s) is the exact log-probability of x[cut:] and its end given s.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError


@dataclass
class CutPlan:
    """One forward's layout: `ids` = context, start symbol, canonical tokens of the text, then the chain
    nodes; `parent[i]` the position whose logits predict position i (-1 where no term is needed);
    the covers as (position, sorted-vocabulary lo, hi; lo == hi for a cover ending at the cut); the
    canonical prefix's position; and the mask rows of the straddling covers' anchors."""

    ids: list[int]
    positions: list[int]
    parent: list[int]
    n_trunk: int  # context + start + text tokens: the trunk, causal
    n_context: int
    covers: list[tuple[int, int, int]]
    prefix_pos: int
    masks: dict[int, torch.Tensor]


def plan_cut(rules: ConversionRules, start_id: int, prefix: bytes, text_tokens: list[int],
             context: list[int] = ()) -> CutPlan:
    """Model-free layout for the covers of `prefix` hanging from `text_tokens` (the canonical encoding of
    a text that starts with prefix, or of prefix itself). Sentencepiece: covers are tracked from the
    prefix's last `segment_points` cut only, where every cover has a token boundary and the tokens
    before it are the canonical ones (as in hlm/infilling.py's `exact_tail`)."""
    tok = rules.tok
    head = _head_tokens(rules, prefix, text_tokens)
    tracker = CoverTracker(rules, head[-1] if head else start_id)
    if getattr(tok, "add_dummy_prefix", False) and not head:
        tracker.advance(0x20)
    for b in prefix[len(tok.decode(head)) :]:
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
    masks = {pos_of[a]: tracker.mask(a) for a, lo, hi in covers if lo < hi}
    return CutPlan(ids, positions, parent, n_trunk, n_context, [(pos_of[c], lo, hi) for c, lo, hi in covers],
                   pos_of[node], masks)


def _head_tokens(rules: ConversionRules, prefix: bytes, text_tokens: list[int]) -> list[int]:
    """The canonical tokens of prefix before its last sentencepiece `segment_points` cut (empty without one):
    the text's own tokens up to that byte, where one of them ends there. Sentencepiece encodes each
    whitespace piece on its own and a segment point starts a piece, so they are the encoding of
    prefix[:cut] without encoding it again."""
    from hlm.bytes.plan import segment_points

    points = segment_points(prefix, rules)
    if not points:
        return []
    n = 0
    for k, t in enumerate(text_tokens):
        if n >= points[-1]:
            return text_tokens[:k] if n == points[-1] else []
        n += len(rules.tok.token_bytes(t))
    return list(text_tokens) if n == points[-1] else []


@torch.no_grad()
def cut_logprobs(model: torch.nn.Module, rules: ConversionRules, start_id: int, prefix: bytes,
                 text_tokens: list[int] | None = None, end_id: int | None = None, context: list[int] = (),
                 autocast: contextlib.AbstractContextManager | None = None, slide: bool = False) -> dict:
    """Log-probabilities (nats, given `context` + start symbol) from one forward of an hlm GPT:
    `prefix`: log P(prefix) over its covers; `canonical_prefix`: log Q of the canonical prefix T (the
    part every cover shares); `text`: log Q(text_tokens (+ end_id)), the canonical score of the longer
    text (default: the canonical encoding of prefix itself). With `slide`, a layout longer than the
    model's context loses its first positions (at most up to T), and the three values are relative to
    the first position kept: differences between them stay exact."""
    tok = rules.tok
    if text_tokens is None:
        text_tokens = tok.encode(prefix)
    plan = plan_cut(rules, start_id, prefix, text_tokens, context)
    drop = max(plan.positions) + 1 - model.cfg.block_size
    if drop > 0 and (not slide or drop > plan.prefix_pos):
        raise MissingCoverError(f"{len(plan.ids)} positions do not fit the model's context of {model.cfg.block_size}")
    if drop > 0:
        plan = _slide(plan, drop)
    n = len(plan.ids)
    param = next(model.parameters())
    # Everything the device needs goes over before the forward (a copy queued behind it would wait for it):
    # the ids and positions; for each scored position the row of its parent and its id, then the straddling
    # covers' anchor rows, then the last trunk position (scored for end_id); the mask; the allowed tokens.
    scored = [i for i in range(n) if plan.parent[i] >= 0]
    straddling = [(p, lo, hi) for p, lo, hi in plan.covers if lo < hi]
    rows = [plan.parent[i] for i in scored] + [p for p, _, _ in straddling] + [plan.n_trunk - 1]
    targets = [plan.ids[i] for i in scored] + [0] * len(straddling) + [end_id if end_id is not None else 0]
    index = torch.tensor(plan.ids + plan.positions + rows + targets).to(param.device)
    ids, positions, rows_dev, targets_dev = index.split([n, n, len(rows), len(rows)])
    keep = np.tri(n, dtype=bool)
    keep[plan.n_trunk :] = False
    for i in range(plan.n_trunk, n):  # a chain node sees what its parent sees, and itself
        keep[i] = keep[plan.parent[i]]
        keep[i, i] = True
    allowed = torch.zeros(len(straddling), model.cfg.vocab_size, dtype=torch.bool)
    for k, (p, lo, hi) in enumerate(straddling):  # the allowed next tokens: in the range and valid after the anchor
        ids_range = rules.index.perm[lo:hi]
        allowed[k, ids_range] = plan.masks[p][ids_range]
    allowed = allowed.to(param.device)
    with autocast or contextlib.nullcontext():
        # an additive mask in the attention's dtype: a bool one is converted again in every layer
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
        bias = torch.from_numpy(np.where(keep, 0.0, -np.inf)).to(param.device, dtype)
        logits = model.logits(ids[None], attn_mask=bias[None, None], positions=positions[None])[0]
    # Reduced on the device; one copy brings back a float per row (not the [rows, V] log-probabilities).
    lp = F.log_softmax(logits[rows_dev].double(), dim=-1)
    picked = lp.gather(1, targets_dev[:, None]).squeeze(1)
    mass = lp[len(scored) : -1].masked_fill(~allowed, float("-inf")).logsumexp(-1)
    values = torch.cat([picked, mass]).tolist()
    # host arithmetic on floats: the path sums and the covers' total
    logq = [0.0] * n
    total = 0.0
    for i, value in zip(scored, values[: len(scored)], strict=True):  # the trunk first (a running sum), then chains
        if i < plan.n_trunk:
            total += value
            logq[i] = total
        else:
            logq[i] = logq[plan.parent[i]] + value
    masses = dict(zip([p for p, _, _ in straddling], values[len(rows) :], strict=True))
    terms = [logq[p] if lo == hi else logq[p] + masses[p] for p, lo, hi in plan.covers]
    end = values[len(rows) - 1] if end_id is not None else 0.0
    return {"prefix": _logsumexp(terms), "canonical_prefix": logq[plan.prefix_pos],
            "text": logq[plan.n_trunk - 1] + end, "positions": n, "extra_positions": n - plan.n_trunk}


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
                   {p - drop: m for p, m in plan.masks.items()})
