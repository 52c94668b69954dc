"""Upsampling: what each byte reads back from the network over groups.

The causality rule: no byte reads a group vector computed from a later byte. In the ends
convention (hlm/models/parts/boundaries.py) byte t reads slot sum(ends[:t+1]) of a table
[null, group 0, group 1, ...]: the last group completed at or before t (`read_slots`).

  last completed group   `upsample_groups` (+ the byte's own residual, added by the model);
                         `feed_back_at_boundaries`: only the byte that closes a group reads it
                         (SpaceByte; the decoder layers carry it on).
  EMA smoothing + STE    H-Net's dechunk: `smooth` (an exact two-level EMA scan), `dechunk`
                         (each position reads its chunk), times `ste(confidence(p, starts))`.
  cross-attention        BLT: `PatchReader` / `CrossAttendingDecoder`, each byte attends to the
                         k slots of the group it reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm.models.blocks import KVCache, RMSNorm, Transformer, at_least_fp32

SMOOTH_BLOCK = 64  # block length of the two-level smoothing scan


def read_slots(ends: torch.Tensor, cap: int) -> torch.Tensor:
    """The table slot each byte reads [B, T]: min(sum(ends[:t+1]), cap), slot 0 being the null group."""
    return ends.detach().round().long().cumsum(1).clamp(max=cap)


def upsample_groups(short: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    """Byte t takes short[:, read_slots(ends)[t]]: short is [B, cap + 1, D] with the null group at 0,
    so each byte sees the last group completed at or before it."""
    index = read_slots(ends, cap)
    return short.gather(1, index[..., None].expand(*index.shape, short.size(-1)))


def feed_back_at_boundaries(short: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    """Like `upsample_groups`, but only a byte that closes a group (within the cap) takes it;
    every other byte takes zero."""
    kept = ends * (ends.detach().round().cumsum(1) <= cap)
    return upsample_groups(short, ends, cap) * kept[..., None].to(short.dtype)


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """S[..., j, i] = sum of log_a[..., i+1 .. j] for i <= j, -inf above the diagonal; summed
    from masked copies, so no large cumulative sums are subtracted."""
    n = log_a.size(-1)
    x = log_a[..., :, None].expand(*log_a.shape, n)
    x = x.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1), 0).cumsum(-2)
    return x.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(0), float("-inf"))


def ema_scan(x: torch.Tensor, log_a: torch.Tensor, block: int = SMOOTH_BLOCK) -> torch.Tensor:
    """y_j = x_j + a_j y_{j-1} (y_{-1} = 0) over dim 1 for x [B, M, D], log a [B, M] <= 0.
    Two levels: exact decay matrices inside blocks of `block`, then the same scan over the
    blocks' final states (recursively) carried into each block. Every exponent is <= 0."""
    B, M, D = x.shape
    pad = -M % block
    xb = F.pad(x, (0, 0, 0, pad)).view(B, -1, block, D)
    lb = F.pad(log_a, (0, pad)).view(B, -1, block)
    y = torch.exp(segsum(lb)) @ xb  # [B, blocks, block, D] from a zero state at each block start
    if xb.size(1) > 1:
        into = lb.cumsum(-1)  # decay from the state before the block to each position
        ends = ema_scan(y[:, :, -1], into[..., -1], block)  # true state at the end of each block
        carry = F.pad(ends[:, :-1], (0, 0, 1, 0))
        y = y + torch.exp(into)[..., None] * carry[:, :, None]
    return y.reshape(B, -1, D)[:, :M]


def smooth(z: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """H-Net's smoothing: zbar_j = P_j z_j + (1 - P_j) zbar_{j-1}, P clamped to [1e-4, 1 - 1e-4];
    computed in fp32 (or fp64) outside autocast."""
    with torch.autocast(z.device.type, enabled=False):
        P = at_least_fp32(P).clamp(1e-4, 1 - 1e-4)
        return ema_scan(at_least_fp32(z) * P[..., None], torch.log1p(-P)).to(z.dtype)


def smooth_step(zbar: torch.Tensor, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """One step of `smooth` for cached decoding: zbar [n, 1, D] (fp32 or wider), new chunk z, its p [n, 1]."""
    P = at_least_fp32(p).clamp(1e-4, 1 - 1e-4)[..., None]
    return P * at_least_fp32(z) + (1 - P) * zbar


def dechunk(zbar: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Each position t reads its chunk: zbar[min(cumsum(starts)_t, M) - 1]."""
    index = (starts.long().cumsum(1) - 1).clamp(0, zbar.size(1) - 1)
    return zbar.gather(1, index[..., None].expand(-1, -1, zbar.size(-1)))


def ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through: exactly 1 forward, identity gradient."""
    return (x - x.detach()) + 1.0


def confidence(p: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """c_t = p_t where t starts a chunk, 1 - p_t elsewhere."""
    return torch.where(starts, p, 1 - p)


class PatchReader(nn.Module):
    """Cross-attention of each byte to the `k` slots of the group it reads."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, slots: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """h [B, T, D], slots [B, S, k, D], read [B, T] in 0..S-1 -> the update [B, T, D]."""
        B, T, D = h.shape
        H = self.n_head
        kv = self.kv(slots).view(B, slots.size(1), slots.size(2), 2, H, D // H)
        k, v = kv[torch.arange(B, device=h.device)[:, None], read].unbind(3)  # [B, T, k, H, Dh]
        q = self.q(self.norm(h)).view(B, T, H, D // H)
        w = torch.softmax(at_least_fp32(torch.einsum("bthd,btjhd->bthj", q, k)) / math.sqrt(D // H), dim=-1)
        return self.proj(torch.einsum("bthj,btjhd->bthd", w.to(v.dtype), v).reshape(B, T, D))


class CrossAttendingDecoder(nn.Module):
    """Byte layers, each preceded by a cross-attention to the group the byte reads (BLT)."""

    def __init__(self, n_layer: int, d: int, n_head: int, max_len: int, mlp_ratio: float, rope_theta: float,
                 window: int):
        super().__init__()
        self.stack = Transformer(n_layer, d, n_head, max_len, mlp_ratio, rope_theta, window)
        self.readers = nn.ModuleList(PatchReader(d, n_head) for _ in range(n_layer))

    def forward(self, h: torch.Tensor, slots: torch.Tensor, read: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        cos, sin = self.stack.rotary(cache.pos if cache is not None else 0, h.size(1))
        for i, (reader, block) in enumerate(zip(self.readers, self.stack.blocks, strict=True)):
            h = block(h + reader(h, slots, read), cos, sin, cache, i)
        if cache is not None:
            cache.advance(h.size(1))
        return h
