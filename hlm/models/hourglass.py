"""Hourglass transformer with dynamic token pooling (Nawrot et al. 2023, "Efficient
Transformers with Dynamic Token Pooling").

    bytes -> embedding -> n_pre byte layers -> boundaries -> mean of each group
          -> [null group] + groups -> n_short shortened layers -> upsample -> + residual
          -> n_post byte layers -> byte head

Boundary convention: `b[t] = 1` means byte t is the LAST byte of its group. Byte t belongs
to group `sum(b[:t])` (exclusive count) and reads back shortened position `sum(b[:t+1])`
(inclusive count), where position 0 is the learned null group and position k the k-th
completed group: the most recent group that ends at or before t. No byte ever reads a group
holding a later byte, which is the autoregressive shift.

Boundary sources (`boundaries`):
  fixed       every `fixed_stride` bytes of the window.
  whitespace  byte t closes a group iff it is ASCII whitespace (0x09-0x0D, 0x20) and byte t-1
              is not, or it is the document separator 0x00. UTF-8 continuation and lead bytes
              are >= 0x80, so a group never splits a multi-byte character; a run of
              whitespace closes once (its later bytes open the next word).
  spacebyte   SpaceByte's rule (Slagle 2024, arXiv 2404.14408): a byte is "spacelike" unless it is
              an ASCII letter or digit or a UTF-8 continuation byte (0x80-0xBF); so ASCII
              punctuation, whitespace and control bytes and every UTF-8 lead byte (>= 0xC0) are
              spacelike. Byte t closes a group iff it is spacelike and byte t-1 is not (a run of
              spacelike bytes closes once, at its first byte; a window's first byte counts as
              following a letter), or it is the separator 0x00 (as SpaceByte's BOS).
              SpaceByte's patch *starts* at that byte and its global block reads the byte's
              state, so in this module's convention the group *ends* there.
  unigram,    an MLP on the pre-layer states predicts b[t] (logit > 0); it is trained with
  entropy     BCE toward per-byte targets written by data_prep/boundaries.py (a sentencepiece
              Unigram segmentation / spikes of a small byte GPT's next-byte entropy). The
              predicted boundaries drive pooling in training and evaluation alike: the
              targets look ahead and are never a model input.
  gumbel      the same MLP, trained end to end: relaxed Bernoulli sample with temperature,
              hard threshold with a straight-through gradient, and a Binomial(T, prior) prior
              on the number of boundaries per window. Evaluation uses the mode (p > 0.5).

Pooling and feedback: by default (`pooling: mean`, `feedback: group`, as in the dynamic-pooling
paper) a group enters the shortened layers as the mean of its bytes, and every byte adds the
output of the last group completed at or before it. SpaceByte's way is `pooling: last` (the
group is the state of its last byte, the boundary byte) and `feedback: boundary` (a group's
output is added at its boundary byte only; the post layers carry it to the following bytes).

Static shapes: the shortened layers always see `max_groups + 1` positions. Boundaries past
the `max_groups`-th of a window are dropped, so later bytes keep reading the last group that
fits (causal: it only depends on the count so far); `group_cap_hit` logs how often it happens.
Pooling is `index_add_` into [B, max_groups + 1] slots (the last one collects the bytes that
do not fit); upsampling is `gather`. Nothing of size [B, T, S] is ever built.

Generation (`CachedDecoder`) keeps KV caches for the pre, shortened and post layers and a
running sum of the open group; a group enters the shortened layers when its last byte
arrives, so a new byte costs one position of each byte stack (plus one shortened position
when it closes a group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.generation import PerRowDecoder
from hlm.models.parts.boundaries import (
    RULE_BOUNDARIES,
    BoundaryPredictor,
    binomial_prior_loss,
    fixed_ends,
    gumbel_ends,
    target_loss,
)
from hlm.models.parts.downsample import cap_metrics, pool_last, pool_mean
from hlm.models.parts.upsample import feed_back_at_boundaries, upsample_groups

BOUNDARY_TYPES = ("fixed", "whitespace", "spacebyte", "unigram", "entropy", "gumbel")
TARGET_BOUNDARIES = ("unigram", "entropy")  # learned from per-byte target files


class HourglassError(HLMError):
    """An hourglass config or input that cannot be used."""


@dataclass
class HourglassConfig:
    family: str = "hourglass"
    vocab_size: int = 256
    block_size: int = 2048  # context length in bytes
    n_pre: int = 2  # byte layers before pooling
    n_short: int = 8  # layers on the shortened sequence
    n_post: int = 2  # byte layers after upsampling
    n_head: int = 12
    d_model: int = 768
    mlp_ratio: float = 4.0
    byte_window: int = 0  # local attention window of the byte layers (0: full causal)
    boundaries: str = "whitespace"  # fixed | whitespace | spacebyte | unigram | entropy | gumbel
    pooling: str = "mean"  # mean (of the group's bytes) | last (the boundary byte's state, as SpaceByte)
    feedback: str = "group"  # group (every byte adds its last completed group) | boundary (only the boundary byte)
    fixed_stride: int = 4  # fixed: bytes per group
    max_groups: int = 0  # groups per window the shortened layers see (0: block_size // 4)
    boundary_targets: str = ""  # unigram/entropy: target files <split>.boundaries.<name>.bin ("": boundaries)
    predictor_ratio: float = 4.0  # boundary MLP width / d_model
    aux_weight: float = 1.0  # weight of the BCE or prior loss in `loss`
    gumbel_temperature: float = 0.5
    prior: float = 0.2  # gumbel: target boundary rate (bytes per group = 1 / prior)
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def describe(self) -> str:
        """The model column of eval.py: shape and boundaries, and pooling/feedback where not the default."""
        text = f"hourglass {self.n_pre}+{self.n_short}+{self.n_post}L/{self.d_model}d {self.boundaries}"
        if (self.pooling, self.feedback) != ("mean", "group"):
            text += f" (pooling {self.pooling}, feedback {self.feedback})"
        return text


class Hourglass(LanguageModel):
    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        if cfg.boundaries not in BOUNDARY_TYPES:
            raise HourglassError(f"model.boundaries: unknown '{cfg.boundaries}' (one of {', '.join(BOUNDARY_TYPES)})")
        if cfg.boundaries == "fixed" and cfg.fixed_stride < 1:
            raise HourglassError("model.fixed_stride must be >= 1")
        if cfg.pooling not in ("mean", "last"):
            raise HourglassError(f"model.pooling: unknown '{cfg.pooling}' (mean, last)")
        if cfg.feedback not in ("group", "boundary"):
            raise HourglassError(f"model.feedback: unknown '{cfg.feedback}' (group, boundary)")
        if cfg.boundaries == "gumbel" and not 0 < cfg.prior < 1:
            raise HourglassError("model.prior must be in (0, 1)")
        self.cfg = cfg
        self.max_groups = cfg.max_groups or max(1, cfg.block_size // 4)
        d, h = cfg.d_model, cfg.n_head
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.pre = Transformer(cfg.n_pre, d, h, cfg.block_size, cfg.mlp_ratio, cfg.rope_theta, cfg.byte_window)
        self.short = Transformer(cfg.n_short, d, h, self.max_groups + 1, cfg.mlp_ratio, cfg.rope_theta)
        self.post = Transformer(cfg.n_post, d, h, cfg.block_size, cfg.mlp_ratio, cfg.rope_theta, cfg.byte_window)
        self.null_group = nn.Parameter(torch.zeros(d))
        self.down_norm = RMSNorm(d)
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.learned = cfg.boundaries in TARGET_BOUNDARIES + ("gumbel",)
        if self.learned:
            self.predictor = BoundaryPredictor(d, int(cfg.predictor_ratio * d))
        init_weights(self, cfg.n_pre + cfg.n_short + cfg.n_post, cfg.init_std)
        nn.init.normal_(self.null_group, std=cfg.init_std)
        if self.learned:  # start at p = 0.5 everywhere
            self.predictor.reset_bias()

    @property
    def side_inputs(self) -> dict[str, str]:
        """Per-byte files the trainer reads beside each split (`<split>.<stem>.bin`, aligned with
        the split) and passes to forward under the given keyword, for training only."""
        if self.cfg.boundaries not in TARGET_BOUNDARIES:
            return {}
        return {"boundary_targets": f"boundaries.{self.cfg.boundary_targets or self.cfg.boundaries}"}

    def boundaries(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Boundaries b [B, T] (float 0/1; straight-through for gumbel in training) for byte ids x
        and pre-layer states h, and the predictor's logits (None for fixed / whitespace)."""
        cfg = self.cfg
        if cfg.boundaries == "fixed":
            return fixed_ends(x, cfg.fixed_stride), None
        if cfg.boundaries in RULE_BOUNDARIES:
            return RULE_BOUNDARIES[cfg.boundaries](x).float(), None
        logits = self.predictor.logits(h)
        if cfg.boundaries == "gumbel" and self.training:
            return gumbel_ends(logits, cfg.gumbel_temperature), logits
        return (logits > 0).float(), logits

    def pool(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Group vectors [B, max_groups, D] under `pooling`."""
        return (pool_last if self.cfg.pooling == "last" else pool_mean)(h, b, self.max_groups)

    def feed_back(self, short: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """What each byte adds to its residual from the shortened outputs, under `feedback`."""
        up = feed_back_at_boundaries if self.cfg.feedback == "boundary" else upsample_groups
        return up(short, b, self.max_groups)

    def _run(self, x: torch.Tensor, boundary_targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [B, T, V] for byte ids x [B, T], the auxiliary loss and the metrics."""
        cfg, G = self.cfg, self.max_groups
        B, T = x.shape
        residual = self.pre(self.embed(x))
        b, logits = self.boundaries(x, residual)
        pooled = self.pool(residual, b)
        short = torch.cat([self.null_group.to(pooled.dtype).expand(B, 1, -1), pooled], dim=1)
        short = self.short(self.down_norm(short))
        h = self.post(self.feed_back(short, b) + residual)
        out_logits = self.head(self.norm(h))

        hard = b.detach().round()  # straight-through values are 0/1 only up to rounding
        per_group, cap_hit, past_cap = cap_metrics(hard.sum(1), hard.cumsum(1) - 1, G, B * T)
        aux = torch.zeros((), device=x.device)
        metrics = {"boundary_rate": hard.mean(), "bytes_per_group": per_group, "group_cap_hit": cap_hit,
                   "bytes_past_cap": past_cap}
        if cfg.boundaries == "gumbel":
            aux = binomial_prior_loss(b, cfg.prior)
        elif cfg.boundaries in TARGET_BOUNDARIES and boundary_targets is not None:
            aux, predictor_metrics = target_loss(logits, hard, boundary_targets)
            metrics |= predictor_metrics
        if self.learned:
            metrics["aux_loss"] = aux.detach()
        return out_logits, aux, metrics

    def forward(self, idx: torch.Tensor, boundary_targets: torch.Tensor | None = None) -> ModelOutput:
        """idx [B, T+1] byte ids; boundary_targets [B, T+1] 0/1 (unigram / entropy training only:
        a BCE target for the predictor, never an input to the LM path)."""
        inputs, targets = idx[:, :-1], idx[:, 1:]
        if self.training and self.cfg.boundaries in TARGET_BOUNDARIES and boundary_targets is None:
            raise HourglassError(f"boundaries '{self.cfg.boundaries}' trains on per-byte targets: prepare them with "
                                 "data_prep/boundaries.py and train through hlm's trainer")
        if boundary_targets is not None:
            boundary_targets = boundary_targets[:, :-1]
        logits, aux, metrics = self._run(inputs, boundary_targets)
        nll = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten(), reduction="none")
        nll = nll.view_as(targets)
        return ModelOutput(nll.mean() + self.cfg.aux_weight * aux, nll, metrics)

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, 256] of the next byte after each position of idx [B, T]."""
        return F.log_softmax(at_least_fp32(self._run(idx)[0]), dim=-1)

    def new_decoder(self, prompt: torch.Tensor) -> PerRowDecoder:
        """Each row decodes with its own KV caches for the three stacks (`CachedDecoder`): rows close
        groups at different bytes. When the context fills up, the caches are rebuilt from the last
        half of the window, as in gpt.py."""
        return PerRowDecoder([CachedDecoder(self, prompt[r : r + 1]) for r in range(prompt.size(0))])


class CachedDecoder:
    """Incremental decoding of one sequence: the byte layers and the shortened layers keep KV
    caches, the open group keeps a running sum, and a group enters the shortened layers the
    moment its last byte arrives. `logits` [1, V] always predicts the next byte, equal to the
    full forward on the bytes since the last (re)start of the window."""

    def __init__(self, model: Hourglass, ids: torch.Tensor):
        if not ids.size(1):
            raise HourglassError("decoding needs a non-empty prompt (start with the separator byte 0x00)")
        self.model = model
        self.prefill(ids[:, -model.cfg.block_size :])

    def prefill(self, ids: torch.Tensor) -> None:
        m, G = self.model, self.model.max_groups
        p = next(m.parameters())
        self.ids = ids
        self.pre = m.pre.new_cache(1, m.cfg.block_size, p.device, p.dtype)
        self.post = m.post.new_cache(1, m.cfg.block_size, p.device, p.dtype)
        self.short = m.short.new_cache(1, G + 1, p.device, p.dtype)
        residual = m.pre(m.embed(ids), self.pre)
        b = m.boundaries(ids, residual)[0].round()
        n_groups = min(int(b.sum()), G)
        short_in = torch.cat([m.null_group.expand(1, 1, -1), m.pool(residual, b)[:, :n_groups]], dim=1)
        short = m.short(m.down_norm(short_in), self.short)
        self.last_group = short[:, -1:]
        self.n_groups = n_groups
        closed = torch.nonzero(b[0]).flatten()
        open_from = int(closed[-1]) + 1 if len(closed) else 0
        self.open_sum = at_least_fp32(residual[:, open_from:]).sum(1, keepdim=True)
        self.open_len = ids.size(1) - open_from
        h = m.post(m.feed_back(short, b) + residual, self.post)
        self.logits = m.head(m.norm(h[:, -1]))

    def push(self, byte: int) -> None:
        """Append one byte and update `logits`."""
        m, cfg = self.model, self.model.cfg
        if self.pre.pos >= cfg.block_size:
            self.prefill(torch.cat([self.ids, self.ids.new_tensor([[byte]])], dim=1)[:, -(cfg.block_size // 2) :])
            return
        x = self.ids.new_tensor([[byte]])
        self.ids = torch.cat([self.ids, x], dim=1)
        h = m.pre(m.embed(x), self.pre)
        if cfg.boundaries == "fixed":
            closes = self.pre.pos % cfg.fixed_stride == 0
        elif cfg.boundaries in RULE_BOUNDARIES:  # the rules read the previous byte
            closes = bool(RULE_BOUNDARIES[cfg.boundaries](self.ids[:, -2:])[0, -1])
        else:
            closes = bool(m.boundaries(x, h)[0][0, 0])
        self.open_sum = self.open_sum + at_least_fp32(h)
        self.open_len += 1
        new_group = closes and self.n_groups < m.max_groups
        if new_group:
            group = h if cfg.pooling == "last" else (self.open_sum / self.open_len).to(h.dtype)
            self.last_group = m.short(m.down_norm(group), self.short)
            self.n_groups += 1
        if closes:
            self.open_sum, self.open_len = torch.zeros_like(self.open_sum), 0
        fed_back = self.last_group if cfg.feedback == "group" or new_group else torch.zeros_like(h)
        out = m.post(fed_back + h, self.post)
        self.logits = m.head(m.norm(out[:, -1]))
