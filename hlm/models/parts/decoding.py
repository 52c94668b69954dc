"""The cached decoder of "byte stack -> groups -> byte stack" models, for B rows at once.

Each new byte costs one position of every byte stack for all rows together; the rows whose
group closes at that byte (and have room under the cap) then run the main network one
position each, at their own group count: rows close groups at different bytes, so the main
network's KV cache holds every row at its own length (`rows_step`). A family subclasses
`GroupedDecoder` with its prefill and the steps of `push`:

    encode(t)                  the new byte through the encoder stacks -> its state
    closes(h, t)               the boundary source: which rows' group the byte closes [B]
    pool_open(rows, h, t)      those rows' finished groups, as main-network inputs [n, 1, D]
    main_step(x, rows, pos)    the main network, one position per closing row (`rows_step`)
    take_groups(rows, out)     keep what the main network said for them
    close_open(closes, t)      start new open groups
    decode(h, new)             the decoder stacks -> next-byte logits [B, V]

In H-Net's convention the byte that *starts* a chunk is the one whose state enters the main
network and that reads it back, which is the same event seen from the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.blocks import KVCache, Transformer, apply_rotary
from hlm.models.generation import decoding_attention


def rows_step(stack: Transformer, cache: KVCache, x: torch.Tensor, rows: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """A causal stack on x [n, T, D] of cache rows `rows` [n] (sorted, distinct) at their own positions
    [n, T]: each row's keys and values go to its slots of `cache`, and a position attends to that row's
    keys at positions <= its own (and, in a stack with a local window, within the window: HAT's byte
    stacks, whose rows restart their windows at different bytes). Attention reads only the slots some
    position can see (one host sync for their range), and reads every row of the cache in place when
    all of them step. Slots past a row's length may hold stale keys from a padded prefill or an earlier
    window; they are rewritten before any position can see them."""
    n, T, C = x.shape
    cos, sin = stack.rotary.at(positions)
    window = stack.blocks[0].attn.window
    first, last = torch.stack([positions.min(), positions.max()]).tolist()
    lo = max(first - window + 1, 0) if window > 0 else 0
    back = positions[..., None] - torch.arange(lo, last + 1, device=x.device)  # [n, T, keys lo..last]
    keep = ((back >= 0) & (back < window if window > 0 else True))[:, None]  # [n, 1, T, keys]
    every_row = n == cache.k.size(1)
    for i, block in enumerate(stack.blocks):
        attn = block.attn
        qkv = attn.qkv(block.attn_norm(x)).view(n, T, 3, attn.n_head, attn.head_dim).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rotary(qkv[:2], cos, sin), qkv[2]
        cache.k[i, rows[:, None], :, positions] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[i, rows[:, None], :, positions] = v.transpose(1, 2).to(cache.v.dtype)
        keys, values = cache.k[i, :, :, lo : last + 1], cache.v[i, :, :, lo : last + 1]
        if not every_row:
            keys, values = keys[rows], values[rows]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep)
        x = x + attn.proj(y.transpose(1, 2).reshape(n, T, C))
        x = x + block.mlp(block.mlp_norm(x))
    return x


class GroupSteps:
    """The group part of one decoding step, for B rows: which rows' group the new byte closes,
    their pooled groups through the main network (one position per row, at its own count), and
    what each row reads afterwards. Used by `GroupedDecoder` and by H-Net's per-stage decoders.

    Needs `cap`, `n_groups` [B] (groups in the main network per row) and either `main` and
    `main_cache` (a causal stack and its batched cache, stepped by `rows_step`) or an own
    `main_step`; `main_offset` is the main-network position of a row's first group (1 where a
    null group sits at 0)."""

    cap: int
    n_groups: torch.Tensor
    main_offset: int = 0

    def step_groups(self, h: torch.Tensor, t: int) -> torch.Tensor:
        """After byte t (state h [B, 1, D]) went through the encoder: close groups, step the main
        network for the rows that have room, start new open groups. Returns which rows took a new
        group [B]."""
        closes = self.closes(h, t)
        new = closes & (self.n_groups < self.cap)
        rows = torch.nonzero(new).flatten()
        if len(rows):
            positions = self.main_offset + self.n_groups[rows, None]
            self.take_groups(rows, self.main_step(self.pool_open(rows, h, t), rows, positions))
            self.n_groups[rows] += 1
        self.close_open(closes, t)
        return new

    def main_step(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The main network on groups x [n, 1, D] of `rows` at `positions` [n, 1]."""
        return rows_step(self.main, self.main_cache, x, rows, positions)

    def closes(self, h: torch.Tensor, t: int) -> torch.Tensor:
        """The boundary source: which rows' group byte t closes [B] (bool)."""
        raise NotImplementedError

    def pool_open(self, rows: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        """The finished groups of `rows`, as main-network inputs [n, 1, D]."""
        raise NotImplementedError

    def take_groups(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Keep the main network's outputs [n, 1, D] for `rows`."""
        raise NotImplementedError

    def close_open(self, closes: torch.Tensor, t: int) -> None:
        """Start new open groups in the rows that closed one (whether or not it fit under the cap)."""


class GroupedDecoder(GroupSteps):
    """Incremental decoding of B rows (the module docstring): `logits` [B, V] predicts each row's
    next byte, equal to the full forward on the bytes since the last (re)start of the window.
    When the window is full, the caches are rebuilt from its last half, as in gpt.py.

    A subclass gives `prefill(ids)` (setting `ids` [B, T], `logits`, `n_groups`, and what
    `GroupSteps` needs), `encode(t)` (byte t = ids[:, -1] through the encoder stacks -> its state
    [B, 1, D]) and `decode(h, new)` (the decoder stacks -> logits [B, V]); or its own `step`."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, block_size: int, cap: int,
                 error: type[HLMError] = HLMError):
        if not ids.size(1):
            raise error("decoding needs a non-empty prompt (start with the separator byte 0x00)")
        self.model, self.block_size, self.cap = model, block_size, cap
        with decoding_attention():
            self.prefill(ids[:, -block_size:])

    def new_cache(self, stack: Transformer, batch: int, length: int) -> KVCache:
        p = next(self.model.parameters())
        return stack.new_cache(batch, length, p.device, p.dtype)

    def push(self, nxt: torch.Tensor) -> None:
        """Append one byte per row (nxt [B]) and update `logits`."""
        ids = torch.cat([self.ids, nxt.view(-1, 1).to(self.ids)], dim=1)
        with decoding_attention():
            if self.ids.size(1) >= self.block_size:
                self.prefill(ids[:, -(self.block_size // 2) :])
                return
            t, self.ids = self.ids.size(1), ids
            self.logits = self.step(t)

    def step(self, t: int) -> torch.Tensor:
        """Logits [B, V] after byte t, the last of `ids`."""
        h = self.encode(t)
        return self.decode(h, self.step_groups(h, t))

    def prefill(self, ids: torch.Tensor) -> None:
        raise NotImplementedError

    def encode(self, t: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
