"""Attention over token trees laid out trunk first, the layout of the exact evaluation's windows
(`hlm/bytes/layout.py`). A `TreeMask` is an `hlm.models.blocks.AttentionPattern`: passed as
`attn_mask` to a GPT, its `attend` replaces the dense mask attention of every layer."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TreeMask(NamedTuple):
    """Attention of token trees laid out trunk first, for `tree_attention`.
    Positions [0, n_trunk) of each row are one causal sequence, the trunk. The others, in chunks of
    `chunk` queries, each see keys by `keep` [B * chunks, 1, chunk, n_trunk + span + chunk]: the
    trunk, then the `span + chunk` off-trunk positions that end with the chunk's own (a node's
    off-trunk ancestors are at most `span` positions before its chunk)."""

    n_trunk: int
    chunk: int
    span: int
    keep: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return tree_attention(q, k, v, self)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: TreeMask) -> torch.Tensor:
    """Attention over q, k, v [B, H, T, D] laid out as `tree` says. The trunk runs as plain causal
    attention; each chunk of off-trunk queries attends to the trunk and a short band of off-trunk keys,
    so the masked work is (T - n_trunk) x (n_trunk + span + chunk), not T x T."""
    t, c, s = tree.n_trunk, tree.chunk, tree.span
    B, H, T, D = q.shape
    n = (T - t) // c
    trunk = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], is_causal=True)

    def keys(x: torch.Tensor) -> torch.Tensor:  # [B * n, H, t + s + c, D]: the trunk, then each chunk's band
        band = F.pad(x[:, :, t:], (0, 0, s, 0)).unfold(2, s + c, c).permute(0, 2, 1, 4, 3)
        return torch.cat([x[:, None, :, :t].expand(B, n, H, t, D), band], dim=3).reshape(B * n, H, t + s + c, D)

    queries = q[:, :, t:].reshape(B, H, n, c, D).transpose(1, 2).reshape(B * n, H, c, D)
    off = F.scaled_dot_product_attention(queries, keys(k), keys(v), attn_mask=tree.keep)
    return torch.cat([trunk, off.reshape(B, n, H, c, D).transpose(1, 2).reshape(B, H, n * c, D)], dim=2)
