"""H-Net: dynamic chunking learned end to end (Hwang, Wang, Gu 2025, "Dynamic Chunking for
End-to-End Hierarchical Sequence Modeling", arXiv 2507.07955), in plain PyTorch.

One stage s maps a sequence x [B, L, d_s] to y [B, L, d_s]:

    encoder (local attention) -> routing p_t, b_t -> chunk: keep h_t where b_t = 1
      -> widen to d_{s+1} -> main network (a stage again, or the causal Transformer)
      -> narrow to d_s -> dechunk: EMA over chunks, each position reads its chunk
      -> * STE(confidence) + W_res h -> decoder (local attention)

Boundary convention: `b[t] = 1` means position t STARTS a chunk (the opposite of the
hourglass, whose b[t] = 1 ends a group; hlm/models/parts/boundaries.py converts). p_0 = 1,
so position 0 always starts chunk 0 and every position t reads chunk cumsum(b)_t - 1, the
latest chunk starting at or before t: its main-network state depends on positions <= t only,
so no shift is needed.

Static shapes: a stage keeps at most `max_chunks` chunks per window. Chunk starts past the
cap are dropped (the positions after keep reading the last chunk that fits, which is causal);
`chunk_cap_hit` and `past_cap` log how often. Empty chunk slots are zero and never read.

Widths: when d_{s+1} > d_s a learned vector of d_{s+1} - d_s values is appended to each
chunk, and the main network's output is cut back to its first d_s values (as the reference).

The router, chunking, smoothing and dechunking are hlm/models/parts; this file composes them.

Generation (`CachedDecoder`: a `StageDecoder` for the bytes on the shared group step of
hlm/models/parts/decoding.py, an `InnerStageDecoder` per inner stage) keeps KV caches for every
stack, the router's last key and the last smoothed chunk; a chunk enters the inner stage the
moment its first position arrives, so a byte costs one position of each byte stack (batched over
rows) plus, for the rows that start a chunk, one position of the inner network: the innermost
Transformer steps all those rows in one call, each at its own chunk count (`rows_step`), and so
do an inner stage's encoder and decoder, each row at its own count of outer chunks.
`StaticCachedDecoder` is the same with fixed-shape steps for CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import KVCache, RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.parts.boundaries import CosineRouter, ratio_loss, whitespace_starts
from hlm.models.parts.decoding import GroupedDecoder, GroupSteps, rows_step
from hlm.models.parts.downsample import cap_metrics, pool_first
from hlm.models.parts.static_decoding import (
    GroupKeyBound,
    StaticDecoder,
    fill_static_cache,
    static_cache,
    static_stack_step,
)
from hlm.models.parts.upsample import confidence, dechunk, smooth, smooth_step, ste


class HNetError(HLMError):
    """An H-Net config or input that cannot be used."""


@dataclass
class HNetConfig:
    family: str = "hnet"
    vocab_size: int = 256
    block_size: int = 4096  # context in bytes
    d_model: list[int] = field(default_factory=lambda: [768, 768])  # widths, bytes first; stages + 1
    n_enc: list[int] = field(default_factory=lambda: [2])  # encoder layers per stage
    n_dec: list[int] = field(default_factory=lambda: [2])  # decoder layers per stage
    n_main: int = 12  # layers of the innermost, full causal Transformer
    head_dim: int = 64
    mlp_ratio: float = 4.0
    byte_window: int = 512  # local attention of stage 0's encoder and decoder (0: causal over the window)
    inner_window: int = 0  # local attention of the inner stages' encoders and decoders
    max_chunks: list[int] = field(default_factory=list)  # chunk cap per stage (empty or 0: see chunk_caps)
    ratio_target: list[float] = field(default_factory=lambda: [6.0])  # N per stage: positions per chunk
    ratio_weight: float = 0.03  # alpha: loss = LM loss + alpha * sum of the stages' ratio losses
    lr_scale: list[float] = field(default_factory=list)  # per stage then main network (empty: all 1)
    residual_init: str = "zero"  # W_res at initialisation: "zero" (the paper's) or "identity" (the hourglass's skip)
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def n_stages(self) -> int:
        return len(self.d_model) - 1

    def chunk_caps(self) -> list[int]:
        """Chunk slots per stage: `max_chunks`, or by default twice the target count rounded up
        to a multiple of 8, never more than the stage's length."""
        caps, length = [], self.block_size
        for s in range(self.n_stages):
            given = self.max_chunks[s] if s < len(self.max_chunks) else 0
            default = -(-int(-(-2 * length // self.ratio_target[s])) // 8) * 8
            caps.append(min(length, given or default))
            length = caps[-1]
        return caps

    def describe(self) -> str:
        layers = "+".join(map(str, [*self.n_enc, self.n_main, *reversed(self.n_dec)]))
        ratios = ",".join(f"{n:g}" for n in self.ratio_target)
        return f"hnet {self.n_stages}-stage {layers}L/{'-'.join(map(str, self.d_model))}d N={ratios}"


# ----- one stage and the model -----

class StageOutput(NamedTuple):
    """What a stage hands up for the losses and metrics, all [B, L_s] but the last two."""

    p: torch.Tensor  # boundary probabilities
    b: torch.Tensor  # chunk starts (bool, only at valid positions)
    valid: torch.Tensor  # real positions (stage 0: all; inner stages: the real chunks of the outer one)
    pos: torch.Tensor  # [B, max_chunks]: the position each chunk starts at
    n_starts: torch.Tensor  # [B]: chunk starts, before the cap


def transformer(cfg: HNetConfig, n_layer: int, width: int, length: int, window: int = 0) -> Transformer:
    return Transformer(n_layer, width, width // cfg.head_dim, length, cfg.mlp_ratio, cfg.rope_theta, window)


class HNetStage(nn.Module):
    """Stage s: encoder, routing, chunking, the main network (stage s + 1 or the innermost
    Transformer), dechunking and decoder, as in the module docstring."""

    def __init__(self, cfg: HNetConfig, s: int):
        super().__init__()
        self.cap = cfg.chunk_caps()[s]
        d, d_in = cfg.d_model[s], cfg.d_model[s + 1]
        self.length = cfg.block_size if s == 0 else cfg.chunk_caps()[s - 1]
        window = cfg.byte_window if s == 0 else cfg.inner_window
        self.encoder, self.enc_norm = transformer(cfg, cfg.n_enc[s], d, self.length, window), RMSNorm(d)
        self.routing = CosineRouter(d)
        self.pad = nn.Parameter(torch.zeros(d_in - d)) if d_in > d else None
        if s + 1 < cfg.n_stages:
            self.main = HNetStage(cfg, s + 1)
        else:
            self.main = transformer(cfg, cfg.n_main, d_in, self.cap)
        self.inner_norm = RMSNorm(d_in)
        self.residual = nn.Linear(d, d, bias=False)
        self.decoder, self.dec_norm = transformer(cfg, cfg.n_dec[s], d, self.length, window), RMSNorm(d)

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pad is None else torch.cat([x, self.pad.to(x.dtype).expand(*x.shape[:-1], -1)], -1)

    def run_main(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[StageOutput]]:
        if isinstance(self.main, HNetStage):
            return self.main(x, valid)
        return self.main(x), []

    def narrow(self, z: torch.Tensor, d: int) -> torch.Tensor:
        """The main network's output normed and cut back to this stage's width d."""
        return self.inner_norm(z)[..., :d]

    def encode(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.enc_norm(self.encoder(x, cache))

    def decoder_input(self, h: torch.Tensor, read: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """What each position read, scaled by STE(confidence), plus W_res h."""
        return read * ste(conf).to(h.dtype)[..., None] + self.residual(h)

    def step_input(self, h: torch.Tensor, zbar: torch.Tensor) -> torch.Tensor:
        """`decoder_input` of one decoding step: the last smoothed chunk plus W_res h (STE(c) is 1 forward)."""
        return zbar.to(h.dtype) + self.residual(h)

    def decode(self, h: torch.Tensor, read: torch.Tensor, conf: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        return self.dec_norm(self.decoder(self.decoder_input(h, read, conf), cache))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[StageOutput]]:
        """x [B, L, d_s] -> [B, L, d_s] and this stage's and inner stages' routing."""
        h = self.encode(x)
        p, b = self.routing(h, valid)
        chunks, pos, chunk_valid = pool_first(h, b, self.cap)
        z, inner = self.run_main(self.widen(chunks), chunk_valid)
        read = dechunk(smooth(self.narrow(z, h.size(-1)), p.gather(1, pos)), b)
        return self.decode(h, read, confidence(p, b)), [StageOutput(p, b, valid, pos, b.sum(1)), *inner]


class ChunkState(GroupSteps):
    """What a stage's decoder keeps for B rows: batched KV caches of its encoder and decoder, the inner
    network's state (an `InnerStageDecoder`, or the innermost Transformer's batched cache, each row at its
    own chunk count), the count of chunks and the last smoothed chunk (fp32 or wider). A chunk's first
    position is the one that enters the inner network and reads it."""

    def __init__(self, stage: HNetStage, batch: int, device, dtype):
        self.stage, self.cap = stage, stage.cap
        self.enc = stage.encoder.new_cache(batch, stage.length, device, dtype)
        self.dec = stage.decoder.new_cache(batch, stage.length, device, dtype)
        if isinstance(stage.main, HNetStage):
            self.inner = InnerStageDecoder(stage.main, batch, device, dtype)
        else:
            self.inner, self.main = None, stage.main
            self.main_cache = stage.main.new_cache(batch, stage.cap, device, dtype)
        d = stage.residual.in_features
        self.zbar = torch.zeros(batch, 1, d, device=device, dtype=torch.promote_types(dtype, torch.float32))
        self.n_groups = torch.zeros(batch, dtype=torch.long, device=device)

    def prefill_inward(self, h: torch.Tensor, p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Every row's real chunks of a prefill (h, p, b [B, L]) through the inner network in one call,
        padded to the longest row's count (padding after a row's chunks: causal attention and the forward
        smoothing scan leave its chunks alone, and its padded cache slots are rewritten before anything
        reads them), then smoothed and dechunked: what each position reads [B, L, d]."""
        st = self.stage
        chunks, pos, _ = pool_first(h, b, self.cap)
        n = b.sum(1).clamp(max=self.cap)
        N = int(n.max())
        rows, slots = torch.arange(b.size(0), device=b.device), torch.arange(N, device=b.device)
        x = st.widen(chunks[:, :N])
        if self.inner is None:
            z = rows_step(self.main, self.main_cache, x, rows, slots.expand(b.size(0), N))
        else:
            z = self.inner.prefill(x, slots < n[:, None])
        zbar = smooth(st.narrow(z, h.size(-1)), p.gather(1, pos)[:, :N])
        self.zbar, self.n_groups = zbar[rows, n - 1, None].to(self.zbar.dtype), n
        return dechunk(zbar, b)

    def main_step(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            return super().main_step(x, rows, positions)
        return self.inner.step(x, rows)


class StageDecoder(ChunkState):
    """The outermost stage's decoder: every row at the same byte, so its byte stacks step all rows
    together on plain KV caches; the rows whose byte starts a chunk step the inner network."""

    def prefill(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The stage's forward on x [B, L, d_s] that fills the caches."""
        st = self.stage
        h = st.encode(x, self.enc)
        p, b = st.routing(h, valid)
        read = self.prefill_inward(h, p, b)
        self.k_last = st.routing.k(h[:, -1:])
        return st.decode(h, read, confidence(p, b), self.dec)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One new position x [B, 1, d_s] after a prefill: same result as the full forward."""
        st = self.stage
        h = st.encode(x, self.enc)
        self.step_groups(h, self.enc.pos - 1)
        return st.dec_norm(st.decoder(st.step_input(h, self.zbar), self.dec))

    def closes(self, h: torch.Tensor, t: int) -> torch.Tensor:
        self.p, self.k_last = self.stage.routing.step(h, self.k_last)
        return self.p[:, 0] >= 0.5

    def pool_open(self, rows: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        return self.stage.widen(h[rows])

    def take_groups(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.zbar[rows] = smooth_step(self.zbar[rows], self.stage.narrow(out, self.zbar.size(-1)), self.p[rows])


class InnerStageDecoder(ChunkState):
    """An inner stage's decoder for B rows, each at its own position (its count of outer chunks): a
    row steps only when its outer chunk starts, so the encoder and decoder stacks step just the rows
    that do, in one call (`rows_step`), as the innermost Transformer does. `prefill` sets each row's
    position (`length`) and router key before any `step`."""

    def prefill(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The stage's forward on x [B, N, d_s] whose first valid.sum(1) positions per row are real."""
        st = self.stage
        rows = torch.arange(x.size(0), device=x.device)
        positions = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)
        h = st.enc_norm(rows_step(st.encoder, self.enc, x, rows, positions))
        p, b = st.routing(h, valid)
        read = self.prefill_inward(h, p, b)
        self.length = valid.sum(1)
        self.k_last = st.routing.k(h[rows, self.length - 1, None])
        out = st.decoder_input(h, read, confidence(p, b))
        return st.dec_norm(rows_step(st.decoder, self.dec, out, rows, positions))

    def step(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One new position x [n, 1, d_s] for each of `rows` [n] (sorted, distinct): same result as the
        full forward."""
        st = self.stage
        positions = self.length[rows, None]
        h = st.enc_norm(rows_step(st.encoder, self.enc, x, rows, positions))
        p, self.k_last[rows] = st.routing.step(h, self.k_last[rows])
        new = torch.nonzero((p[:, 0] >= 0.5) & (self.n_groups[rows] < self.cap)).flatten()
        if len(new):
            sub = rows[new]
            out = self.main_step(st.widen(h[new]), sub, self.n_groups[sub, None])
            self.zbar[sub] = smooth_step(self.zbar[sub], st.narrow(out, self.zbar.size(-1)), p[new])
            self.n_groups[sub] += 1
        self.length[rows] += 1
        y = st.step_input(h, self.zbar[rows])
        return st.dec_norm(rows_step(st.decoder, self.dec, y, rows, positions))


class HNet(LanguageModel):
    def __init__(self, cfg: HNetConfig):
        super().__init__()
        S = cfg.n_stages
        if S < 1 or len(cfg.n_enc) != S or len(cfg.n_dec) != S or len(cfg.ratio_target) != S:
            raise HNetError("model.d_model needs stages + 1 widths and n_enc, n_dec, ratio_target one per stage")
        if any(b < a for a, b in pairwise(cfg.d_model)) or any(d % cfg.head_dim for d in cfg.d_model):
            raise HNetError("model.d_model: widths must not shrink inward and must be multiples of head_dim")
        if any(n <= 1 for n in cfg.ratio_target):
            raise HNetError("model.ratio_target: each N must be > 1")
        if cfg.lr_scale and len(cfg.lr_scale) != S + 1:
            raise HNetError("model.lr_scale: one multiplier per stage and one for the main network")
        if cfg.residual_init not in ("zero", "identity"):
            raise HNetError(f"model.residual_init must be zero or identity, not {cfg.residual_init!r}")
        self.cfg = cfg
        d = cfg.d_model[0]
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.stage = HNetStage(cfg, 0)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        init_weights(self, sum(cfg.n_enc) + sum(cfg.n_dec) + cfg.n_main, cfg.init_std)
        for m in self.modules():
            if isinstance(m, HNetStage):
                m.routing.reset_parameters()
                (nn.init.zeros_ if cfg.residual_init == "zero" else nn.init.eye_)(m.residual.weight)
                if m.pad is not None:
                    nn.init.normal_(m.pad, std=cfg.init_std)

    def param_groups_lr_scale(self) -> list[tuple[float, list[nn.Parameter]]]:
        """(lr multiplier, parameters) per stage, outer first, then the main network. A parameter
        belongs to the stage whose `main` attributes lead to it (embedding and head: stage 0)."""
        scales = self.cfg.lr_scale or [1.0] * (self.cfg.n_stages + 1)
        groups: list[list[nn.Parameter]] = [[] for _ in scales]
        for name, p in self.named_parameters():
            groups[name.split(".").count("main")].append(p)
        return list(zip(scales, groups, strict=True))

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Logits [B, T, V] for byte ids x [B, T], the weighted ratio loss and the metrics."""
        cfg = self.cfg
        y, stages = self.stage(self.embed(x), torch.ones_like(x, dtype=torch.bool))
        aux, metrics = torch.zeros((), device=x.device), {}
        byte_pos, ws = torch.arange(x.size(1), device=x.device).expand_as(x), whitespace_starts(x)
        for s, (st, n, cap) in enumerate(zip(stages, cfg.ratio_target, cfg.chunk_caps(), strict=True)):
            loss = ratio_loss(st.b, st.p, n, st.valid)
            aux = aux + loss
            starts = torch.zeros_like(x, dtype=torch.float).scatter_add(1, byte_pos, (st.b & st.valid).float())
            starts[:, 0] = 0  # byte 0 always starts a chunk
            hits = (starts * ws).sum()
            valid = st.valid.sum().clamp(min=1)
            per_chunk, cap_hit, past_cap = cap_metrics(st.n_starts, st.b.long().cumsum(1) - 1, cap, x.numel(), st.valid)
            metrics |= {
                f"bytes_per_chunk_s{s}": per_chunk,
                f"boundary_rate_s{s}": (st.b & st.valid).sum() / valid,
                f"rate_vs_target_s{s}": (st.b & st.valid).sum() / valid * n,
                f"mean_prob_s{s}": (st.p * st.valid).sum() / valid,
                f"ratio_loss_s{s}": loss.detach(),
                f"chunk_cap_hit_s{s}": cap_hit,
                f"past_cap_s{s}": past_cap,
                f"ws_precision_s{s}": hits / starts.sum().clamp(min=1),
                f"ws_recall_s{s}": hits / ws.sum().clamp(min=1),
            }
            byte_pos = byte_pos.gather(1, st.pos)
        return self.head(y), cfg.ratio_weight * aux, {k: v.detach().float() for k, v in metrics.items()}

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        """idx [B, T+1] byte ids; `loss` adds the weighted ratio losses, `nll` does not."""
        inputs, targets = idx[:, :-1], idx[:, 1:]
        logits, aux, metrics = self._run(inputs)
        nll = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), targets.flatten(), reduction="none")
        nll = nll.view_as(targets)
        return ModelOutput(nll.mean() + aux, nll, metrics)

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, 256] of the next byte after each position of idx [B, T]."""
        return F.log_softmax(at_least_fp32(self._run(idx)[0]), dim=-1)

    def new_decoder(self, prompt: torch.Tensor) -> CachedDecoder:
        """One `CachedDecoder` for the batch. When the context fills up, the caches are rebuilt from
        the last half of the window, as in gpt.py."""
        return CachedDecoder(self, prompt)

    def has_static_decoder(self) -> bool:
        """Every H-Net whose inner stages attend over all their positions or a window at least that long."""
        w = self.cfg.inner_window
        return not any(0 < w <= cap for cap in self.cfg.chunk_caps()[:-1])

    def new_static_decoder(self, prompt: torch.Tensor, graphs: bool = True) -> StaticCachedDecoder:
        """`CachedDecoder` with fixed-shape steps, replayed as CUDA graphs."""
        if not self.has_static_decoder():
            raise HNetError("this H-Net has no CUDA-graph decoder: model.inner_window is shorter than an inner "
                            "stage's positions (use 0, full attention, or more than the outer max_chunks)")
        return StaticCachedDecoder(self, prompt, graphs)


class CachedDecoder(GroupedDecoder):
    """Incremental decoding of B rows; `logits` [B, V] predicts each row's next byte, equal to
    the full forward on the bytes since the last (re)start of the window. The byte stacks run
    batched; a row's inner network runs when that row starts a chunk (`StageDecoder`)."""

    def __init__(self, model: HNet, ids: torch.Tensor):
        super().__init__(model, ids, model.cfg.block_size, model.stage.cap, HNetError)

    def prefill(self, ids: torch.Tensor) -> None:
        m, p = self.model, next(self.model.parameters())
        self.ids, self.stage = ids, StageDecoder(m.stage, ids.size(0), p.device, p.dtype)
        self.logits = m.head(self.stage.prefill(m.embed(ids), torch.ones_like(ids, dtype=torch.bool))[:, -1])

    def step(self, t: int) -> torch.Tensor:
        return self.model.head(self.stage.step(self.model.embed(self.ids[:, -1:]))[:, -1])


class StaticCachedDecoder(StaticDecoder):
    """A `CachedDecoder` with fixed-shape steps (hlm/models/parts/static_decoding.py): every row runs every
    stage at every byte, an inner stage at its next position (its count of outer chunks) and the main
    network at the slot of its next chunk; only the rows whose position starts a chunk (under the cap)
    move on, smooth the result into their chunk state and keep their router key. A row at a cap writes
    to a spare slot past the last one. Inner stages keep every position (no ring: their rows sit at
    different positions), so a two-stage model needs `inner_window` 0 or at least its outer cap + 1."""

    def __init__(self, model: HNet, prompt: torch.Tensor, graphs: bool = True):
        super().__init__(model, prompt, model.cfg.block_size, graphs, HNetError)

    def eager(self, ids: torch.Tensor) -> CachedDecoder:
        return CachedDecoder(self.model, ids)

    def adopt(self, eager: CachedDecoder) -> None:
        states = [eager.stage]
        while states[-1].inner is not None:
            states.append(states[-1].inner)
        stages, B = [state.stage for state in states], eager.ids.size(0)
        lengths = [eager.ids.size(1)] + [st.cap for st in stages[:-1]]  # filled positions of each stage's stacks
        if not hasattr(self, "enc"):
            like, slots = states[0].enc.k, [self.block_size] + [n + 1 for n in lengths[1:]]  # + the spare slot
            self.enc = [static_cache(st.encoder, B, n, like) for st, n in zip(stages, slots, strict=True)]
            self.dec = [static_cache(st.decoder, B, n, like) for st, n in zip(stages, slots, strict=True)]
            self.main = static_cache(stages[-1].main, B, stages[-1].cap + 1, like)
            self.n_groups = [torch.empty_like(state.n_groups) for state in states]
            self.zbar = [torch.empty_like(state.zbar) for state in states]
            self.k_last = [torch.empty_like(state.k_last) for state in states]
        for s, state in enumerate(states):
            fill_static_cache(self.enc[s], state.enc, lengths[s])
            fill_static_cache(self.dec[s], state.dec, lengths[s])
            self.n_groups[s].copy_(state.n_groups)
            self.zbar[s].copy_(state.zbar)
            self.k_last[s].copy_(state.k_last)
        fill_static_cache(self.main, states[-1].main_cache, stages[-1].cap)
        self.bounds = [GroupKeyBound(n, 0, st.cap + 1) for n, st in zip(self.n_groups, stages, strict=True)]

    def bucket(self) -> tuple[int, ...]:
        """Keys of the next step, from counts the host keeps: the byte stacks', each inner stage's stacks'
        (bounded by the outer stage's chunk count), the main network's."""
        inner = (bound.next_bucket(n) for bound, n in zip(self.bounds, self.n_groups, strict=True))
        return self.byte_bucket(self.enc[0]), *inner

    def step(self, bucket: tuple[int, ...]) -> None:
        m, B = self.model, self.next_id.size(0)
        y = self.stage_step(0, m.stage, m.embed(self.next_id[:, None]), self.t.expand(B), None, None, bucket)
        self.logits.copy_(m.head(y[:, -1]))
        self.t += 1

    def stage_step(self, s: int, st: HNetStage, x: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor | None, active: torch.Tensor | None, bucket: tuple[int, ...]) -> torch.Tensor:
        """Stage s on one position per row, x [B, 1, d_s] at `positions` [B] written to cache `slots`
        (None: the positions, in a ring where there is one); `active` [B] (None: all) marks the rows whose
        position is real, the others' state stays as it was."""
        h = st.enc_norm(static_stack_step(st.encoder, self.enc[s], x, positions, bucket[s], slots))
        p, k = st.routing.step(h, self.k_last[s])
        new = (p[:, 0] >= 0.5) & (self.n_groups[s] < st.cap)
        if active is not None:
            new &= active
            k = torch.where(active[:, None, None], k, self.k_last[s])
        self.k_last[s].copy_(k)
        slot = self.n_groups[s]  # st.cap, the spare slot, for a row at the cap
        if isinstance(st.main, HNetStage):
            z = self.stage_step(s + 1, st.main, st.widen(h), slot.clamp(max=st.cap - 1), slot, new, bucket)
        else:
            z = static_stack_step(st.main, self.main, st.widen(h), slot.clamp(max=st.cap - 1), bucket[-1], slot)
        smoothed = smooth_step(self.zbar[s], st.narrow(z, h.size(-1)), p)
        self.zbar[s].copy_(torch.where(new[:, None, None], smoothed, self.zbar[s]))
        self.n_groups[s] += new
        out = st.step_input(h, self.zbar[s])
        return st.dec_norm(static_stack_step(st.decoder, self.dec[s], out, positions, bucket[s], slots))
