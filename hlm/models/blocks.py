"""Building blocks shared by every model family: RMSNorm, rotary embeddings, causal
attention through `F.scaled_dot_product_attention` (optionally local: a sliding window, via
FlexAttention on CUDA; or over token trees laid out trunk first), the MLP, a pre-norm block,
a stack of blocks, a KV cache, and GPT-2-style initialisation."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding tables; `forward(start, length)` returns (cos, sin) of shape [T, D/2]."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape [B, 1, T, D/2] for explicit positions [B, T] (tree-shaped inputs)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for softmax-like math, leaving fp64 (exactness tests) in fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is [..., T, D]: [B, H, T, D], or
    queries and keys stacked [2, B, H, T, D] (one pass, half the kernels when decoding eagerly)."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """Preallocated keys and values for incremental decoding: [layers, B, H, max_len, D]."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def view_rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own at position 0, sharing this one's memory."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = self.k[:, start:stop], self.v[:, start:stop], 0
        return view

    def advance(self, n: int) -> None:
        """The stack has written n more positions (every layer's `update`)."""
        self.pos += n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def window_keep(n_query: int, n_key: int, window: int, device) -> torch.Tensor:
    """Boolean mask [n_query, n_key] for the last `n_query` of `n_key` positions: query i sees
    key j iff j <= i and i - j < window (window 0: no window, plain causal)."""
    i = torch.arange(n_key - n_query, n_key, device=device)[:, None]
    j = torch.arange(n_key, device=device)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window > 0 else keep


FLEX_BLOCK = 128  # FlexAttention tile size; "auto" takes flex only for lengths that are a multiple of it


def sliding_window_block_mask(T: int, window: int, device, block: int = FLEX_BLOCK) -> BlockMask:
    """FlexAttention BlockMask for sliding-window causal attention over T positions, built from
    block-level arithmetic so torch.compile traces it without a graph break. Tiles entirely
    inside the window skip the mask function ("full" blocks); a last, incomplete key tile is
    always masked."""
    n = -(-T // block)
    qb = torch.arange(n, device=device)[:, None]
    kb = torch.arange(n, device=device)[None, :]
    lo, hi = (qb - kb) * block - (block - 1), (qb - kb) * block + (block - 1)  # range of q - k in the tile
    any_visible = (hi >= 0) & (lo <= window - 1)
    all_visible = (lo >= 0) & (hi <= window - 1) & (kb < T // block)
    partial = any_visible & ~all_visible

    def as_blocks(keep):
        count = keep.sum(-1, dtype=torch.int32)[None, None]
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return count, order

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    kv_num, kv_idx = as_blocks(partial)
    full_num, full_idx = as_blocks(all_visible)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=sliding_window,
                                    seq_lengths=(T, T))


# FlexAttention tiles for the sliding window on Hopper (sm90) at head dim 64, from a tile sweep
# (BENCHMARKS.md, "Kernel tuning"): the backward with 32x64 / 64x32 tiles takes 1.40 ms per layer at the
# hourglass's shape against 1.69 ms with inductor's default 64x128 / 128x64 tiles.
FLEX_SM90_HEAD64 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                    "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                    "bwd_num_warps": 4, "bwd_num_stages": 3}


def flex_kernel_options(device: torch.device, head_dim: int) -> dict:
    """Measured FlexAttention tile sizes where we have them (sm90, head dim 64); inductor's defaults elsewhere."""
    if device.type == "cuda" and head_dim == 64 and torch.cuda.get_device_capability(device) == (9, 0):
        return dict(FLEX_SM90_HEAD64)
    return {}


def local_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                           backend: str = "auto") -> torch.Tensor:
    """Causal attention where query i sees keys i-window+1..i; q, k, v are [B, H, T, D].

    backend "flex": FlexAttention with a block-sparse mask (only tiles inside the window are
    computed); "sdpa": an explicit boolean mask. "auto" takes flex inside torch.compile on
    CUDA when T is a multiple of 128 (eager FlexAttention would be slow), sdpa otherwise.
    Both compute the same function."""
    T = q.size(2)
    if window <= 0 or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend == "auto":
        compiled_cuda = q.device.type == "cuda" and torch.compiler.is_compiling()
        backend = "flex" if compiled_cuda and T % FLEX_BLOCK == 0 else "sdpa"
    if backend == "flex":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return flex_attention(q, k, v, block_mask=sliding_window_block_mask(T, window, q.device),
                              kernel_options=flex_kernel_options(q.device, q.size(-1)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_keep(T, T, window, q.device))


class AttentionPattern(Protocol):
    """A layout that computes its own attention (e.g. token trees laid out trunk first, cheaper than
    their dense mask), passed as `attn_mask` in place of a bool mask."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, T, D] for q, k, v [B, H, T, D] laid out as the pattern says."""


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with rotary positions; `window > 0` makes it local (each
    position sees itself and the window-1 positions before it)."""

    def __init__(self, d_model: int, n_head: int, window: int = 0):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.window = window
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, attn_mask: torch.Tensor | AttentionPattern | None = None) -> torch.Tensor:
        """`attn_mask` ([B, 1, T, T]: bool, True = may attend; or additive in the attention's dtype, 0 or
        -inf, which SDPA need not convert again; or an `AttentionPattern` that attends itself) replaces the
        causal mask, e.g. for a token tree where each node sees only its ancestors. With a cache, a tensor
        mask spans the cached keys too ([B, 1, T, past + T])."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:  # eager decoding: queries and keys in one rotary pass, half its kernels
            (q, k), v = apply_rotary(qkv[:2], cos, sin), qkv[2]
            past = cache.pos
            k, v = cache.update(layer, k, v)
        else:  # compiled training runs 3-4 % faster with them apart (BENCHMARKS.md, "Redesign")
            q, k, v = qkv
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(attn_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif attn_mask is not None:
            y = attn_mask.attend(q, k, v)
        elif cache is None or past == 0:  # a prefill attends within itself, as without a cache
            y = local_causal_attention(q, k, v, self.window)
        elif T == 1 and (self.window <= 0 or past < self.window):
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # query i may see keys 0..past+i (within the window)
            keep = window_keep(T, past + T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0, window: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, window)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0, attn_mask: torch.Tensor | AttentionPattern | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A stack of causal blocks with its own rotary table; positions start at `cache.pos`.
    `window > 0` gives every block local attention over that many positions."""

    def __init__(self, n_layer: int, d_model: int, n_head: int, max_len: int, mlp_ratio: float = 4.0,
                 rope_theta: float = 10000.0, window: int = 0):
        super().__init__()
        self.n_head = n_head
        self.rotary = Rotary(d_model // n_head, max_len, rope_theta)
        self.blocks = nn.ModuleList(Block(d_model, n_head, mlp_ratio, window) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | AttentionPattern | None = None) -> torch.Tensor:
        """Causal over x [B, T, D] by default. With `positions` [B, T] (rotary positions) and an
        `attn_mask` [B, 1, T, T] (see CausalSelfAttention) or an `AttentionPattern`, any attention pattern, e.g. a tree
        of token paths with position = depth (no cache)."""
        if positions is not None:
            cos, sin = self.rotary.at(positions)
        else:
            cos, sin = self.rotary(cache.pos if cache is not None else 0, x.size(1))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, attn_mask)
        if cache is not None:
            cache.advance(x.size(1))
        return x

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        head_dim = self.rotary.cos.size(1) * 2
        return KVCache(len(self.blocks), batch, self.n_head, max_len, head_dim, device, dtype)


def init_weights(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std) for linears and embeddings, and std/sqrt(2·n_layer) for
    the projections that write into the residual stream."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        scaled = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
        nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer) if scaled else std)
