"""Boundary sources: which bytes close (or open) a chunk, from the prefix only.

One convention inside hlm's parts: `ends[t] = 1` means byte t is the LAST byte of its group
(the hourglass and SpaceByte). H-Net and BLT think in `starts[t] = 1` (byte t OPENS a chunk,
with starts[0] = 1); `starts_from_ends` / `ends_from_starts` convert, and `group_index` /
`group_first` turn either into per-byte indices, so no family keeps a second copy of the
counting logic. Every source here is causal: its decision at t reads bytes (or states) <= t.

Sources:
  fixed       every `stride` bytes of the window (`fixed_ends`).
  whitespace  ASCII whitespace after a non-whitespace byte, or the separator 0x00.
  spacebyte   SpaceByte's "spacelike" bytes after a non-spacelike one, or 0x00.
  predictor   an MLP on encoder states (`BoundaryPredictor`): trained by BCE toward per-byte
              targets (unigram / entropy files, `target_loss`) or end to end with a relaxed
              Bernoulli and a Binomial prior (`gumbel_ends`, `binomial_prior_loss`).
  cosine      H-Net's router: p_t = (1 - cos(q_t, k_{t-1})) / 2 (`CosineRouter`, `ratio_loss`).
  entropy     BLT's frozen byte LM over a threshold: hlm/models/entropy_patcher.py.
  words       HAT's causal word splitter: hlm/splitter.py (`PrefixState.starts`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm.models.blocks import RMSNorm, at_least_fp32

WHITESPACE_BYTES = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20)


# ----- conventions -----

def starts_from_ends(ends: torch.Tensor) -> torch.Tensor:
    """starts [B, T] (bool) from ends [B, T]: byte 0 opens a group, and so does every byte after a
    group's last byte."""
    return F.pad(ends[:, :-1].bool(), (1, 0), value=True)


def ends_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """ends [B, T - 1] (bool) of the first T - 1 bytes from starts [B, T]: byte t ends its group
    exactly when byte t + 1 opens one (so the last byte's end needs one start past it)."""
    return starts[:, 1:].bool()


def group_index(starts: torch.Tensor) -> torch.Tensor:
    """The group of every byte [B, T] (0 for the group byte 0 opens) from starts [B, T]."""
    return starts.long().cumsum(1) - 1


def group_first(starts: torch.Tensor) -> torch.Tensor:
    """The position of the first byte of every byte's group [B, T] from starts [B, T]."""
    pos = torch.arange(starts.size(1), device=starts.device).expand_as(starts)
    return torch.cummax(torch.where(starts.bool(), pos, 0), dim=1).values


# ----- rules on bytes -----

def is_whitespace(x: torch.Tensor) -> torch.Tensor:
    """Which byte ids of x are ASCII whitespace (WHITESPACE_BYTES)."""
    ws = torch.zeros_like(x, dtype=torch.bool)
    for byte in WHITESPACE_BYTES:
        ws |= x == byte
    return ws


def whitespace_boundaries(x: torch.Tensor) -> torch.Tensor:
    """ends [B, T] for byte ids x: whitespace after a non-whitespace byte (a window's first byte
    counts as following a word), or 0x00. UTF-8 bytes are >= 0x80, so a character never splits."""
    ws = is_whitespace(x)
    after_word = F.pad(~ws[:, :-1], (1, 0), value=True)
    return (ws & after_word) | (x == 0)


def spacebyte_boundaries(x: torch.Tensor) -> torch.Tensor:
    """ends [B, T] under SpaceByte's rule (Slagle 2024): a byte is spacelike unless it is an ASCII
    letter or digit or a UTF-8 continuation byte; a spacelike byte after a non-spacelike one (or
    the window's start) ends a group, as does 0x00. SpaceByte's patch starts at that byte and its
    global block reads the byte's state, so in the ends convention the group ends there."""
    letter_or_digit = ((x >= 0x30) & (x <= 0x39)) | ((x >= 0x41) & (x <= 0x5A)) | ((x >= 0x61) & (x <= 0x7A))
    spacelike = ~(letter_or_digit | ((x >= 0x80) & (x <= 0xBF)))
    after_other = F.pad(~spacelike[:, :-1], (1, 0), value=True)
    return (spacelike & after_other) | (x == 0)


def whitespace_starts(x: torch.Tensor) -> torch.Tensor:
    """A word-start rule in the starts convention (H-Net's whitespace metric): byte t starts a chunk
    iff byte t-1 is whitespace or 0x00 and byte t is not (never at t = 0, which always starts one)."""
    ws = is_whitespace(x) | (x == 0)
    return F.pad(ws[:, :-1] & ~ws[:, 1:], (1, 0), value=False)


def fixed_ends(x: torch.Tensor, stride: int, offset: int = 0) -> torch.Tensor:
    """ends [B, T] (float) every `stride` bytes; `offset` is the window position of x[:, 0]."""
    t = torch.arange(offset, offset + x.size(1), device=x.device)
    return ((t + 1) % stride == 0).float().expand(x.shape)


RULE_BOUNDARIES = {"whitespace": whitespace_boundaries, "spacebyte": spacebyte_boundaries}  # fixed rules on bytes


# ----- learned predictors -----

class BoundaryPredictor(nn.Sequential):
    """ends logits [B, T] from encoder states: norm, MLP, one logit (p = 0.5 at initialisation once
    `reset_bias` ran). A Sequential so the parameter names are the plain layer indices."""

    def __init__(self, d: int, width: int):
        super().__init__(RMSNorm(d), nn.Linear(d, width), nn.GELU(), nn.Linear(width, 1))

    def reset_bias(self) -> None:
        nn.init.zeros_(self[1].bias)
        nn.init.zeros_(self[3].bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(self(h).squeeze(-1))


def gumbel_ends(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A relaxed Bernoulli sample thresholded at 0.5, with a straight-through gradient: values 0/1,
    gradient of the soft sample (Nawrot et al. 2023)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).float()
    return hard + soft - soft.detach()


def binomial_log_prob(k: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """log Binomial(n, p) at (possibly fractional, differentiable) counts k."""
    k = k.float()
    return (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_prior_loss(ends: torch.Tensor, prior: float) -> torch.Tensor:
    """-log Binomial(T, prior) of each window's boundary count, per byte: pulls the rate to `prior`."""
    T = ends.size(1)
    return -binomial_log_prob(ends.sum(1), T, prior).mean() / T


def target_loss(logits: torch.Tensor, hard: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE of the predictor toward per-byte 0/1 targets, and precision / recall of its decisions."""
    target = target.float()
    hits = (hard * target).sum()
    metrics = {"predictor_precision": hits / hard.sum().clamp(min=1),
               "predictor_recall": hits / target.sum().clamp(min=1),
               "target_rate": target.mean()}
    return F.binary_cross_entropy_with_logits(logits, target), metrics


# ----- H-Net's cosine router -----

def boundary_prob(q: torch.Tensor, k_prev: torch.Tensor) -> torch.Tensor:
    """p = (1 - cos(q_t, k_{t-1})) / 2 clamped to [0, 1], in fp32 or wider."""
    cos = F.cosine_similarity(at_least_fp32(q), at_least_fp32(k_prev), dim=-1)
    return ((1 - cos) / 2).clamp(0, 1)


class CosineRouter(nn.Module):
    """starts from the cosine of consecutive projected states (W_q = W_k = I at initialisation, so
    p_t = (1 - cos(h_t, h_{t-1})) / 2 then); p_0 = 1; starts_t = 1[p_t >= 0.5]."""

    def __init__(self, d: int):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(self.q.in_features))
            self.k.weight.copy_(torch.eye(self.k.in_features))

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities p [B, L] and starts [B, L] (bool, False at invalid positions)."""
        p = boundary_prob(self.q(h[:, 1:]), self.k(h[:, :-1]))
        p = F.pad(p, (1, 0), value=1.0)
        return p, (p >= 0.5) & valid

    def step(self, h: torch.Tensor, k_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p [B, 1] of one new position h [B, 1, D] after the key `k_last`, and the key to keep."""
        return boundary_prob(self.q(h), k_last), self.k(h)


def ratio_loss(b: torch.Tensor, p: torch.Tensor, n: float, valid: torch.Tensor) -> torch.Tensor:
    """N/(N-1) ((N-1) F G + (1-F)(1-G)), F = boundary fraction, G = mean p, over valid positions
    (1 at the target F = G = 1/N): H-Net's pull toward N positions per chunk."""
    count = valid.sum().clamp(min=1).to(p.dtype)
    f = (b & valid).sum().to(p.dtype) / count
    g = (p * valid).sum() / count
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))
