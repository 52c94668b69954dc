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

Boundary sources (`boundaries`; the rules and predictors live in hlm/models/parts/boundaries.py):
  fixed       every `fixed_stride` bytes of the window.
  whitespace  ASCII whitespace after a non-whitespace byte, or the separator 0x00 (a group never
              splits a UTF-8 character; a run of whitespace closes once).
  spacebyte   SpaceByte's rule (Slagle 2024, arXiv 2404.14408): the first of a run of "spacelike"
              bytes (not an ASCII letter or digit or a UTF-8 continuation byte), or 0x00.
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

Generation (`CachedDecoder`, on the shared hlm/models/parts/decoding.py) keeps KV caches for
the pre, shortened and post layers and a running sum of each row's open group; a group enters
the shortened layers when its last byte arrives, so a new byte costs one position of each byte
stack for the whole batch (plus one shortened position for the rows whose group it closes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.parts.boundaries import (
    RULE_BOUNDARIES,
    BoundaryPredictor,
    binomial_prior_loss,
    fixed_ends,
    gumbel_ends,
    target_loss,
)
from hlm.models.parts.decoding import GroupedDecoder, rows_step
from hlm.models.parts.downsample import cap_metrics, pool_last, pool_mean
from hlm.models.parts.static_decoding import (
    GroupKeyBound,
    StaticDecoder,
    fill_static_cache,
    static_cache,
    static_stack_step,
)
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

    def boundaries(self, x: torch.Tensor, h: torch.Tensor, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Boundaries b [B, L] (float 0/1; straight-through for gumbel in training) of the last
        L = h.size(1) bytes of x, whose pre-layer states are h, and the predictor's logits (None for
        the rules on bytes). Bytes of x before those L are context (the rules read the previous
        byte); `offset` is the window position of the first of the L (fixed boundaries)."""
        cfg, L = self.cfg, h.size(1)
        if cfg.boundaries == "fixed":
            return fixed_ends(x[:, -L:], cfg.fixed_stride, offset), None
        if cfg.boundaries in RULE_BOUNDARIES:
            return RULE_BOUNDARIES[cfg.boundaries](x)[:, -L:].float(), None
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

    def new_decoder(self, prompt: torch.Tensor) -> CachedDecoder:
        """All rows decode together with KV caches (`CachedDecoder`); rows close groups at different bytes."""
        return CachedDecoder(self, prompt)

    def new_static_decoder(self, prompt: torch.Tensor, graphs: bool = True) -> StaticCachedDecoder:
        """`CachedDecoder` with fixed-shape steps, replayed as CUDA graphs (`StaticCachedDecoder`)."""
        return StaticCachedDecoder(self, prompt, graphs)


class CachedDecoder(GroupedDecoder):
    """Incremental decoding of B rows (`GroupedDecoder`): KV caches for the pre and post layers
    (all rows together) and the shortened layers (each row at its own group count, after the null
    group at position 0), and a running sum of each row's open group; a group enters the
    shortened layers the moment its last byte arrives."""

    main_offset = 1  # the null group sits at position 0

    def __init__(self, model: Hourglass, ids: torch.Tensor):
        super().__init__(model, ids, model.cfg.block_size, model.max_groups, HourglassError)

    def prefill(self, ids: torch.Tensor) -> None:
        m, G = self.model, self.model.max_groups
        B, T = ids.shape
        self.ids = ids
        self.pre = self.new_cache(m.pre, B, m.cfg.block_size)
        self.post = self.new_cache(m.post, B, m.cfg.block_size)
        self.main, self.main_cache = m.short, self.new_cache(m.short, B, G + 1)
        residual = m.pre(m.embed(ids), self.pre)
        b = m.boundaries(ids, residual)[0].round()
        short_in = torch.cat([m.null_group.expand(B, 1, -1), m.pool(residual, b)], dim=1)
        rows = torch.arange(B, device=ids.device)
        short = rows_step(m.short, self.main_cache, m.down_norm(short_in), rows,
                          torch.arange(G + 1, device=ids.device).expand(B, G + 1))
        self.n_groups = b.sum(1).long().clamp(max=G)
        self.last_group = short[rows, self.n_groups][:, None]
        pos = torch.arange(T, device=ids.device)
        open_from = torch.where(b > 0, pos + 1, 0).amax(1)  # the first byte after each row's last boundary
        is_open = (pos >= open_from[:, None])[..., None]
        self.open_sum = (at_least_fp32(residual) * is_open).sum(1, keepdim=True)
        self.open_len = T - open_from
        h = m.post(m.feed_back(short, b) + residual, self.post)
        self.logits = m.head(m.norm(h[:, -1]))

    def encode(self, t: int) -> torch.Tensor:
        h = self.model.pre(self.model.embed(self.ids[:, -1:]), self.pre)
        self.open_sum = self.open_sum + at_least_fp32(h)
        self.open_len = self.open_len + 1
        return h

    def closes(self, h: torch.Tensor, t: int) -> torch.Tensor:
        return self.model.boundaries(self.ids[:, -2:], h, offset=t)[0][:, 0] > 0  # the previous byte is context

    def pool_open(self, rows: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        if self.model.cfg.pooling == "last":
            group = h[rows]
        else:
            group = (self.open_sum[rows] / self.open_len[rows, None, None]).to(h.dtype)
        return self.model.down_norm(group)

    def take_groups(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.last_group[rows] = out

    def close_open(self, closes: torch.Tensor, t: int) -> None:
        self.open_sum = self.open_sum.masked_fill(closes[:, None, None], 0)
        self.open_len = self.open_len.masked_fill(closes, 0)

    def decode(self, h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        m = self.model
        fed_back = self.last_group
        if m.cfg.feedback == "boundary":  # only the byte that closes a group reads it
            fed_back = fed_back * new[:, None, None].to(fed_back.dtype)
        return m.head(m.norm(m.post(fed_back + h, self.post)[:, -1]))


class StaticCachedDecoder(StaticDecoder):
    """`CachedDecoder` with fixed-shape steps (hlm/models/parts/static_decoding.py): every row runs the
    shortened layers at every byte, at the slot of its next group, and only the rows whose group closed
    (under the cap) keep the result and move to the next slot. A row at the cap writes to a spare slot
    past the last group."""

    def __init__(self, model: Hourglass, prompt: torch.Tensor, graphs: bool = True):
        super().__init__(model, prompt, model.cfg.block_size, graphs, HourglassError)

    def eager(self, ids: torch.Tensor) -> CachedDecoder:
        return CachedDecoder(self.model, ids)

    def adopt(self, eager: CachedDecoder) -> None:
        m, B, G = self.model, eager.ids.size(0), self.model.max_groups
        if not hasattr(self, "pre"):
            like = eager.pre.k
            self.pre = static_cache(m.pre, B, self.block_size, like)
            self.post = static_cache(m.post, B, self.block_size, like)
            self.main = static_cache(m.short, B, G + 2, like)  # the null group, G groups, the spare slot
            self.prev_id = torch.empty_like(self.next_id)
            self.n_groups, self.open_len = torch.empty_like(eager.n_groups), torch.empty_like(eager.open_len)
            self.last_group, self.open_sum = torch.empty_like(eager.last_group), torch.empty_like(eager.open_sum)
        T = eager.ids.size(1)
        fill_static_cache(self.pre, eager.pre, T)
        fill_static_cache(self.post, eager.post, T)
        fill_static_cache(self.main, eager.main_cache, G + 1)
        for mine, theirs in ((self.prev_id, eager.ids[:, -1]), (self.n_groups, eager.n_groups),
                             (self.open_len, eager.open_len), (self.last_group, eager.last_group),
                             (self.open_sum, eager.open_sum)):
            mine.copy_(theirs)
        self.main_bound = GroupKeyBound(self.n_groups, CachedDecoder.main_offset, G + 2)

    def bucket(self) -> tuple[int, int]:
        """(byte-stack keys, main-network keys) of the next step, from counts the host keeps."""
        return self.byte_bucket(self.pre), self.main_bound.next_bucket(self.n_groups)

    def step(self, bucket: tuple[int, int]) -> None:
        m, (byte_keys, main_keys) = self.model, bucket
        B, G = self.next_id.size(0), m.max_groups
        byte_pos = self.t.expand(B)
        h = static_stack_step(m.pre, self.pre, m.embed(self.next_id[:, None]), byte_pos, byte_keys)
        self.open_sum += at_least_fp32(h)
        self.open_len += 1
        if m.cfg.boundaries == "fixed":
            closes = ((self.t + 1) % m.cfg.fixed_stride == 0).expand(B)
        else:
            closes = m.boundaries(torch.stack([self.prev_id, self.next_id], 1), h)[0][:, 0] > 0
        new = closes & (self.n_groups < G)
        group = h if m.cfg.pooling == "last" else (self.open_sum / self.open_len[:, None, None]).to(h.dtype)
        slot = self.n_groups + CachedDecoder.main_offset  # G + 1, the spare slot, for a row at the cap
        out = static_stack_step(m.short, self.main, m.down_norm(group), slot.clamp(max=G), main_keys, slot)
        self.last_group.copy_(torch.where(new[:, None, None], out, self.last_group))
        self.n_groups += new
        self.open_sum.masked_fill_(closes[:, None, None], 0)
        self.open_len.masked_fill_(closes, 0)
        fed_back = self.last_group
        if m.cfg.feedback == "boundary":
            fed_back = fed_back * new[:, None, None].to(fed_back.dtype)
        y = static_stack_step(m.post, self.post, fed_back + h, byte_pos, byte_keys)
        self.logits.copy_(m.head(m.norm(y[:, -1])))
        self.prev_id.copy_(self.next_id)
        self.t += 1
