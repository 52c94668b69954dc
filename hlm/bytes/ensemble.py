"""Ensembles of byte LMs over the shared 257-symbol alphabet."""

from __future__ import annotations

import math

import torch

from hlm import HLMError
from hlm.bytes.byte_lm import ByteLMBase, as_byte_lm


class Ensemble(ByteLMBase):
    """Combine next-byte distributions step by step.

    mode="mixture": p = Σ w_m p_m (weights normalised to sum 1, default uniform).
    mode="product": log p ∝ Σ w_m log p_m, renormalised (default w_m = 1/M: a geometric mean).
    Members are byte LMs, native byte models, or anything `as_byte_lm` accepts."""

    def __init__(self, members: list, mode: str = "mixture", weights: list[float] | None = None):
        if mode not in ("mixture", "product"):
            raise HLMError(f"ensemble mode must be 'mixture' or 'product', not {mode!r}")
        if not members:
            raise HLMError("an ensemble needs at least one member")
        self.members = [as_byte_lm(m) for m in members]
        weights = list(weights) if weights is not None else [1.0 / len(members)] * len(members)
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise HLMError(f"need {len(members)} non-negative weights with a positive sum, got {weights}")
        self.mode = mode
        if mode == "mixture":
            weights = [w / sum(weights) for w in weights]
        self.weights = weights

    def combine(self, logprobs: list[torch.Tensor]) -> torch.Tensor:
        """Combine members' log-probs [..., 257] (zero-weight members are left out)."""
        pairs = [(w, lp.double()) for w, lp in zip(self.weights, logprobs, strict=True) if w > 0]
        if self.mode == "mixture":
            return torch.logsumexp(torch.stack([lp + math.log(w) for w, lp in pairs]), dim=0)
        return torch.log_softmax(sum(w * lp for w, lp in pairs), dim=-1)

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        return self.combine([m.next_byte_logprobs(prefix) for m in self.members])

    def prefix_logprobs(self, text: bytes) -> torch.Tensor:
        return self.combine([m.prefix_logprobs(text) for m in self.members])
