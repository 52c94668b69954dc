"""GPT decoder over bytes (vocab 256) or subword tokens: the baseline of every comparison."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import (
    AttentionPattern,
    KVCache,
    RMSNorm,
    Transformer,
    at_least_fp32,
    init_weights,
)
from hlm.models.generation import decoding_attention
from hlm.models.parts.static_decoding import (
    StaticDecoder,
    fill_static_cache,
    static_cache,
    static_stack_step,
)


@dataclass
class GPTConfig:
    family: str = "gpt"
    vocab_size: int = 256  # 256 for bytes; the tokenizer's vocabulary for token corpora
    block_size: int = 1024  # context length in tokens (bytes for byte models)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    mlp_ratio: float = 4.0
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def describe(self) -> str:
        return f"{self.family} {self.n_layer}L/{self.d_model}d V={self.vocab_size}"


class GPT(LanguageModel):
    supports_patch_training = True

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.transformer = Transformer(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.block_size,
                                       cfg.mlp_ratio, cfg.rope_theta)
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer, cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None,
               attn_mask: torch.Tensor | AttentionPattern | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed states for input embeddings x [B, T, D]."""
        return self.norm(self.transformer(x, cache, positions, attn_mask))

    def logits(self, idx: torch.Tensor, cache: KVCache | None = None,
               attn_mask: torch.Tensor | AttentionPattern | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [B, T, V] for ids [B, T] (continuing `cache` when given; `attn_mask` and
        `positions` score a token tree in one pass, see Transformer.forward)."""
        return self.head(self.hidden(self.embed(idx), cache, attn_mask, positions))

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, V] of the next id after each position of idx [B, T]."""
        return F.log_softmax(at_least_fp32(self.logits(idx)), dim=-1)

    def patch_embeddings(self, idx: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Patch inputs [B, L/K, D] for ids [B, L]: the mean of K consecutive token embeddings."""
        B, L = idx.shape
        return self.embed(idx).view(B, L // patch_size, patch_size, -1).mean(dim=2)

    def forward(self, idx: torch.Tensor, patch_size: int = 1) -> ModelOutput:
        """Token mode (patch_size 1): the model contract. Patch mode (patch-level training, Shao
        et al. 2024): idx [B, K*(T+1)] is read as T+1 patches of K tokens; patch i (positions
        0..T-1) gives one distribution that scores every token of patch i+1. Returns loss = mean
        NLL and nll [B, T*K] for the targets idx[:, K:]."""
        if patch_size > 1:
            return self._patch_forward(idx, patch_size)
        inputs, targets = idx[:, :-1], idx[:, 1:]
        logits = self.logits(inputs)
        nll = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten(), reduction="none")
        nll = nll.view_as(targets)
        return ModelOutput(nll.mean(), nll, {})

    def _patch_forward(self, idx: torch.Tensor, patch_size: int) -> ModelOutput:
        B, L = idx.shape
        if L % patch_size or L < 2 * patch_size:
            raise ValueError(f"patch mode needs a length that is a multiple of {patch_size} and at least two "
                             f"patches, got {L}")
        n_patches = L // patch_size - 1
        logits = self.head(self.hidden(self.patch_embeddings(idx[:, :-patch_size], patch_size)))
        logprobs = F.log_softmax(at_least_fp32(logits), dim=-1)
        targets = idx[:, patch_size:].view(B, n_patches, patch_size)
        nll = -logprobs.gather(-1, targets).view(B, n_patches * patch_size)
        return ModelOutput(nll.mean(), nll, {})

    def new_decoder(self, prompt: torch.Tensor) -> GPTDecoder:
        return GPTDecoder(self, prompt)

    def new_static_decoder(self, prompt: torch.Tensor, graphs: bool = True) -> GPTStaticDecoder:
        return GPTStaticDecoder(self, prompt, graphs)


class KVWalk:
    """The one walk of a GPT's KV cache, for B rows fed in lockstep: `feed(ids)` appends ids and returns
    their logits; `rewind(n)` keeps only the first n cached positions; `follow(path)` (one row) continues
    from the longest prefix `path` shares with the path it followed last. Holds up to the model's context."""

    def __init__(self, model: GPT, batch: int = 1):
        param = next(model.parameters())
        self.model = model
        self.cache = model.transformer.new_cache(batch, model.cfg.block_size, param.device, param.dtype)
        self.path: list[int] = []  # the ids at the first len(path) cached positions (those `follow` fed)

    def __len__(self) -> int:
        return self.cache.pos

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T] fed after the cached positions (every call is a new key length:
        `decoding_attention`)."""
        with decoding_attention():
            return self.model.logits(ids, self.cache)

    def rewind(self, n: int) -> None:
        """Forget every cached position from n on (0 <= n <= len(self))."""
        if not 0 <= n <= self.cache.pos:
            raise ValueError(f"cannot rewind a walk of {self.cache.pos} positions to {n}")
        self.cache.pos = n
        del self.path[n:]

    def follow(self, path: list[int]) -> torch.Tensor:
        """Next-id logits [V] after one row's non-empty `path`: the cached positions it shares with the last
        path are kept and the rest is fed (at least its last id, whose logits are needed)."""
        shared = 0
        for a, b in zip(path, self.path, strict=False):
            if a != b:
                break
            shared += 1
        self.rewind(min(shared, len(path) - 1))
        logits = self.model.logits(torch.tensor([path[len(self) :]], device=self.cache.k.device), self.cache)[0, -1]
        self.path = list(path)
        return logits


class GPTDecoder:
    """KV-cached decoding of B rows (`hlm.models.generation.IncrementalDecoder`). When the context
    fills up, the cache is rebuilt from the last half of the window."""

    def __init__(self, model: GPT, prompt: torch.Tensor):
        self.model = model
        self.prefill(prompt[:, -model.cfg.block_size :])

    def prefill(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.walk = KVWalk(self.model, ids.size(0))
        self.logits = self.walk.feed(ids)[:, -1]

    def push(self, nxt: torch.Tensor) -> None:
        T = self.model.cfg.block_size
        self.ids = torch.cat([self.ids, nxt[:, None]], dim=1)
        if len(self.walk) >= T:
            self.prefill(self.ids[:, -(T // 2) :])
        else:
            self.logits = self.walk.feed(nxt[:, None])[:, -1]


class GPTStaticDecoder(StaticDecoder):
    """`GPTDecoder` with fixed-shape steps, replayed as CUDA graphs (hlm/models/parts/static_decoding.py)."""

    def __init__(self, model: GPT, prompt: torch.Tensor, graphs: bool = True):
        super().__init__(model, prompt, model.cfg.block_size, graphs)

    def eager(self, ids: torch.Tensor) -> GPTDecoder:
        return GPTDecoder(self.model, ids)

    def adopt(self, eager: GPTDecoder) -> None:
        if not hasattr(self, "cache"):
            self.cache = static_cache(self.model.transformer, eager.ids.size(0), self.block_size, eager.walk.cache.k)
        fill_static_cache(self.cache, eager.walk.cache, len(eager.walk))

    def bucket(self) -> int:
        return self.byte_bucket(self.cache)

    def step(self, n_keys: int) -> None:
        m = self.model
        x = m.embed(self.next_id[:, None])
        h = static_stack_step(m.transformer, self.cache, x, self.t.expand(x.size(0)), n_keys)
        self.logits.copy_(m.head(m.norm(h[:, 0])))
        self.t += 1
