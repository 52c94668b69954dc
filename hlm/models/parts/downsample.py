"""Downsampling: one vector per group from the byte states of that group.

Every pooling here works in static shapes: a window has `cap` group slots and one overflow
slot (index `cap`) that collects the bytes of groups past the cap and is then dropped, so
the network above sees a fixed number of positions. Pooling is `index_add_` / scatter into
[B, cap + 1] slots; nothing of size [B, T, groups] is built.

  mean            `pool_mean`: the mean of the group's bytes (dynamic token pooling), with a
                  straight-through path from the boundaries into the counts.
  boundary byte   `pool_last`: the state of the group's last byte (SpaceByte);
                  `pool_first`: the state at each chunk start (H-Net's ChunkLayer).
  learned query   `WordPooling`: per head a learned query attends over the group's bytes (HAT).
  cross-attention `PatchPooling`: the query is the max over the group's bytes, attending to
                  them (BLT). Both attend within a group through `segment_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hlm.models.blocks import RMSNorm, at_least_fp32


def flat_slots(group: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Row-major slot of every byte [B * T] in a flattened [B * n_slots] table, group [B, T] < n_slots."""
    return (group + torch.arange(group.size(0), device=group.device)[:, None] * n_slots).flatten()


def pool_mean(h: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    """Mean of each group's byte vectors: h [B, T, D], ends [B, T] (0/1 values, may carry a
    straight-through gradient) -> [B, cap, D]. Group g holds the bytes with sum(ends[:t]) == g;
    bytes of group >= cap are dropped; empty groups are zero.

    Each byte enters with weight 1 + (c - c.detach()), c = its exclusive boundary count: the
    value is 1, and the gradient reaches the boundaries through the count (as in the dynamic
    pooling paper's pooling matrix), which is how gumbel boundaries learn from the LM loss."""
    B, T, D = h.shape
    acc = at_least_fp32(h).dtype  # sums in fp32 even under bf16 autocast
    count = ends.to(acc).cumsum(1) - ends.to(acc)
    weight = 1 + (count - count.detach())
    slot = flat_slots(count.detach().round().long().clamp(max=cap), cap + 1)
    sums = h.new_zeros(B * (cap + 1), D, dtype=acc)
    sums.index_add_(0, slot, (h.to(acc) * weight[..., None]).flatten(0, 1))
    sizes = weight.new_zeros(B * (cap + 1)).index_add_(0, slot, weight.flatten())
    means = sums.view(B, cap + 1, D) / sizes.view(B, cap + 1, 1).clamp(min=1)
    return means[:, :cap].to(h.dtype)


def pool_last(h: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    """The state of each group's last byte: h [B, T, D], ends [B, T] -> [B, cap, D] (groups not
    yet closed are zero). Multiplying by `ends` passes a straight-through gradient."""
    B, T, D = h.shape
    hard = ends.detach().round().long()
    slot = flat_slots((hard.cumsum(1) - hard).clamp(max=cap), cap + 1)
    out = h.new_zeros(B * (cap + 1), D)
    out.index_add_(0, slot, (h * ends[..., None].to(h.dtype)).flatten(0, 1))
    return out.view(B, cap + 1, D)[:, :cap]


def pool_first(h: torch.Tensor, starts: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states at chunk starts: h [B, L, D], starts [B, L] bool -> chunks [B, cap, D] (empty
    slots zero), their positions [B, cap] and validity [B, cap]."""
    count = starts.long().cumsum(1)
    slots = torch.arange(1, cap + 1, device=h.device).expand(h.size(0), cap).contiguous()
    pos = torch.searchsorted(count, slots).clamp(max=h.size(1) - 1)  # first t with count_t = j + 1
    valid = slots <= count[:, -1:]
    chunks = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1))) * valid[..., None]
    return chunks, pos, valid


def segment_attention(scores: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, n_slots: int,
                      max_grad: bool = False) -> torch.Tensor:
    """Softmax attention within segments: scores [N, H] and values [N, H, Dv] of N items, each in
    segment slot [N] < n_slots -> [n_slots, H, Dv], every segment's values weighted by the softmax
    of its own items' scores (empty segments zero). Scatter ops only.

    The segment max only keeps exp() in range; its gradient is zero in exact arithmetic and
    differs from zero by rounding only. `max_grad` lets it through (HAT's pooling always did),
    so each family trains bit for bit as before."""
    H = scores.size(1)
    top = scores.new_full((n_slots, H), -torch.inf).scatter_reduce(
        0, slot[:, None].expand(-1, H), scores if max_grad else scores.detach(), "amax")
    w = torch.exp(scores - top[slot])
    denom = w.new_zeros(n_slots, H).index_add_(0, slot, w)
    mixed = w.new_zeros(n_slots, H, values.size(-1)).index_add_(0, slot, w[..., None] * values)
    return mixed / denom.clamp(min=1e-30)[..., None]


class WordPooling(nn.Module):
    """HAT's pooling: per head, a learned query attends over the bytes of one word only."""

    def __init__(self, d_byte: int, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.key = nn.Linear(d_byte, d_byte, bias=False)
        self.value = nn.Linear(d_byte, d_model, bias=False)
        self.query = nn.Parameter(torch.zeros(n_head, d_byte // n_head))
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def scores_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B, T, H] of every byte against the query, and values [B, T, H, Dv], fp32 or wider."""
        B, T, _ = h.shape
        k = self.key(h).view(B, T, self.n_head, -1)
        scores = at_least_fp32((k * self.query.to(k.dtype)).sum(-1)) / math.sqrt(k.size(-1))
        return scores, at_least_fp32(self.value(h).view(B, T, self.n_head, -1))

    def forward(self, h: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
        """Pool byte states h [B, T, d_byte] into [B, n_slots, d_model]; slot [B, T] in 0..n_slots,
        where slot n_slots collects bytes that are dropped. Empty slots are zero."""
        scores, values = self.scores_values(h)
        B = h.size(0)
        pooled = segment_attention(scores.flatten(0, 1), values.flatten(0, 1), flat_slots(slot, n_slots + 1),
                                   B * (n_slots + 1), max_grad=True)
        return self.proj(pooled.view(B, n_slots + 1, -1)[:, :n_slots].to(h.dtype))

    def prefixes(self, h: torch.Tensor, word_first: torch.Tensor, max_len: int) -> torch.Tensor:
        """For every t, the pooled vector of bytes word_first[t]..t (the word so far) [B, T, d_model];
        words are at most `max_len` bytes. Online softmax over the look-back."""
        scores, values = self.scores_values(h)
        pos = torch.arange(h.size(1), device=h.device)
        smax = torch.full_like(scores, float("-inf"))
        den = torch.zeros_like(scores)
        num = torch.zeros_like(values)
        for back in range(max_len):
            src = pos - back
            valid = (src >= word_first)[..., None]  # [B, T, 1]
            s = torch.where(valid, scores[:, src.clamp(min=0)], float("-inf"))
            new_max = torch.maximum(smax, s)
            keep, add = torch.exp(smax - new_max).nan_to_num(0.0), torch.exp(s - new_max).nan_to_num(0.0)
            den = den * keep + add
            num = num * keep[..., None] + add[..., None] * values[:, src.clamp(min=0)]
            smax = new_max
        return self.proj((num / den[..., None]).flatten(2).to(h.dtype))


class PatchPooling(nn.Module):
    """BLT's cross-attention pooling: each patch's query starts as the max of its bytes' states
    and attends (multi-head) to the bytes of that patch only; output = that max + attention."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_norm, self.kv_norm = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, pid: torch.Tensor, n_slots: int) -> torch.Tensor:
        """h [B, T, D], patch of each byte pid [B, T] in 0..n_slots-1 -> [B, n_slots, D] (empty slots 0)."""
        B, T, D = h.shape
        H = self.n_head
        slot = flat_slots(pid, n_slots)
        hf = h.flatten(0, 1)
        pooled = hf.new_zeros(B * n_slots, D).scatter_reduce(0, slot[:, None].expand(-1, D), hf, "amax",
                                                             include_self=False)
        q = self.q(self.q_norm(pooled)).view(-1, H, D // H)
        k, v = self.kv(self.kv_norm(hf)).view(-1, 2, H, D // H).unbind(1)
        score = (at_least_fp32(q[slot]) * at_least_fp32(k)).sum(-1) / math.sqrt(D // H)  # [B*T, H]
        mixed = segment_attention(score, at_least_fp32(v), slot, B * n_slots)
        return (pooled + self.proj(mixed.to(h.dtype).view(B * n_slots, D))).view(B, n_slots, D)


def cap_metrics(n_groups: torch.Tensor, group: torch.Tensor, cap: int, n_bytes: int,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the static group cap costs: bytes per kept group, the fraction of windows with more
    than `cap` groups (n_groups [B]) and the fraction of (valid) positions whose group index
    (group [B, T]) is past the cap, i.e. that read a stale group."""
    per_group = n_bytes / n_groups.clamp(max=cap).sum().clamp(min=1)
    past = group >= cap
    past_frac = past.float().mean() if valid is None else (past & valid).sum() / valid.sum().clamp(min=1)
    return per_group, (n_groups > cap).float().mean(), past_frac
