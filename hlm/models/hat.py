"""HAT: a hierarchical byte -> word -> byte model (Neitemeier et al. 2025; Learn Your Tokens,
Thawani et al. 2023).

    bytes --encoder--> byte states --pooling--> one vector per word --backbone--> word states
    word state w + byte states of word w+1 --decoder--> next byte of word w+1, or end-of-word

- Words come from the causal splitter of `hlm.splitter` (HAT-style: leading space + letters +
  trailing punctuation), computed inside the model from the bytes of the window.
- Encoder: a small byte transformer, causal over the window (not intra-word); with
  `byte_window > 0` each byte attends to that many bytes back (local attention, as the
  hourglass byte layers), which bounds the byte stacks' attention cost.
- Pooling: per head, a learned query attends over the bytes of one word only (a segment
  softmax with scatter ops; no [B, T, words] matrix).
- Backbone: a causal transformer over the word vectors (the big model).
- Decoder: a small byte transformer, causal over the window (local as the encoder). The input at byte t of word w+1
  is the encoder state plus a projection of the backbone output of word w (a learned vector
  for the first word of the window): one key, so this is cross-attention to that word.
- Head: 257-way, the 256 bytes and end-of-word (EOW). Bytes that would start a new word (by
  the splitter) are masked out of it; the first byte of word w+1 comes from the backbone
  output of word w through the same head, restricted to bytes that do start a word. So the
  next-byte distribution is proper: p(b) = p_dec(b) when b continues the word, and
  p_dec(EOW) * p_first(b) when b starts the next one (the EOW cost is charged to the byte that
  starts the next word, as the README says). `nll` is then comparable with byte_gpt.

Static shapes: `max_words` word slots per window. From the word in the last slot on, a
window is in "overflow": those bytes are predicted by the decoder alone, over the 256 bytes,
conditioned on the last word that fits (counted as `overflow_frac` in the metrics). Windows
start and end anywhere: the first byte of a window starts its first word (conditioned on the
learned first-word vector), and a word cut by the end of the window is simply never pooled.

Cost (configs/hat.yaml, forward+backward, as FlopCounterMode counts it on the GPU): 298 MFLOP
per byte against 1,039 for byte_gpt at the same width and depth. The backbone takes 160 (over
all 1024 word slots), the byte stacks 131, of which 88 is attention counted over the whole
4096-byte window; with `byte_window: 512` the attention actually needed is 11, so the model
FLOPs are 221 MFLOP per byte (BENCHMARKS.md, "Speed").

Generation runs the backbone once per completed word (with KV caches for all three stacks):
sample from the decoder's 257-way distribution; on EOW, pool the word, run the backbone one
step and sample the first byte of the next word. This is why HAT keeps its own decoder rather
than the shared one of hlm/models/parts/decoding.py: there, the boundary source decides a group
from the bytes so far and `logits` is one 256-way distribution; here the model *samples* the
word's end (EOW), and a 256-way distribution at every byte would need the backbone run on the
word so far at every byte (as `next_logprobs` does), which generation avoids. Splitting,
pooling (learned query) and the group indices come from hlm/models/parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import ConfigError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.generation import decoding_attention, generate_ids, sample_next
from hlm.models.parts.boundaries import group_first, group_index
from hlm.models.parts.downsample import WordPooling
from hlm.splitter import PrefixState, utf8_allowed_next

EOW = 256


@dataclass
class HATConfig:
    family: str = "hat"
    vocab_size: int = 256  # bytes; the head adds end-of-word
    block_size: int = 4096  # context in bytes
    max_words: int = 1024  # word slots per window (static shape of the backbone)
    max_word_bytes: int = 32  # longer words are cut by the splitter
    d_byte: int = 384  # encoder and decoder width
    n_head_byte: int = 6
    n_enc_layer: int = 2
    n_dec_layer: int = 2
    byte_window: int = 0  # local attention of encoder and decoder, in bytes (0: causal over the window)
    d_model: int = 768  # backbone width
    n_head: int = 12
    n_layer: int = 12  # backbone depth
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def describe(self) -> str:
        return f"hat {self.n_enc_layer}+{self.n_layer}+{self.n_dec_layer}L/{self.d_byte}-{self.d_model}d"


class HAT(LanguageModel):
    def __init__(self, cfg: HATConfig):
        super().__init__()
        if cfg.max_word_bytes < 4:
            raise ConfigError(f"model.max_word_bytes must be >= 4 (a UTF-8 character has up to 4 bytes), "
                              f"got {cfg.max_word_bytes}")
        if cfg.vocab_size != 256:
            raise ConfigError(f"model.vocab_size: hat is a byte model (256), got {cfg.vocab_size}")
        if cfg.max_words < 2:
            raise ConfigError(f"model.max_words must be >= 2, got {cfg.max_words}")
        for width, heads, name in ((cfg.d_byte, cfg.n_head_byte, "d_byte"), (cfg.d_model, cfg.n_head, "d_model")):
            if width % heads or (width // heads) % 2:
                raise ConfigError(f"model.{name}={width} must split into heads of even size")
        if cfg.d_model % cfg.n_head_byte:
            raise ConfigError(f"model.d_model={cfg.d_model} must be divisible by n_head_byte={cfg.n_head_byte}")
        self.cfg = cfg
        self.embed = nn.Embedding(256, cfg.d_byte)
        self.encoder = Transformer(cfg.n_enc_layer, cfg.d_byte, cfg.n_head_byte, cfg.block_size,
                                   cfg.mlp_ratio, cfg.rope_theta, cfg.byte_window)
        self.enc_norm = RMSNorm(cfg.d_byte)
        self.pool = WordPooling(cfg.d_byte, cfg.d_model, cfg.n_head_byte)
        self.backbone = Transformer(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.max_words, cfg.mlp_ratio,
                                    cfg.rope_theta)
        self.backbone_norm = RMSNorm(cfg.d_model)
        self.first_word = nn.Parameter(torch.zeros(1, 1, cfg.d_model))  # context of a window's first word
        self.condition = nn.Linear(cfg.d_model, cfg.d_byte, bias=False)
        self.decoder = Transformer(cfg.n_dec_layer, cfg.d_byte, cfg.n_head_byte, cfg.block_size,
                                   cfg.mlp_ratio, cfg.rope_theta, cfg.byte_window)
        self.dec_norm = RMSNorm(cfg.d_byte)
        self.first_byte = nn.Linear(cfg.d_model, cfg.d_byte, bias=False)  # word state -> next word's first byte
        self.first_norm = RMSNorm(cfg.d_byte)
        self.head = nn.Linear(cfg.d_byte, 257, bias=False)
        init_weights(self, cfg.n_layer, cfg.init_std)
        init_weights(self.encoder, cfg.n_enc_layer, cfg.init_std)
        init_weights(self.decoder, cfg.n_dec_layer, cfg.init_std)
        nn.init.normal_(self.first_word, std=cfg.init_std)

    # ----- pieces -----
    def _split(self, x: torch.Tensor, with_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Word index of every byte [B, T], first byte of its word [B, T], and (with_mask) whether
        byte v at t+1 would start a new word [B, T, 256]."""
        state = PrefixState(x, self.cfg.max_word_bytes)
        word, word_first = group_index(state.starts), group_first(state.starts)
        if not with_mask:
            return word, word_first, None
        start_mask = state.next_starts(torch.arange(256, device=x.device).expand(*x.shape, 256))
        return word, word_first, start_mask

    def _encode(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(self.embed(x), cache)
        return h, self.enc_norm(h)

    def _word_vectors(self, h_norm: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Backbone inputs [B, max_words, d_model]; words past the last slot are dropped."""
        S = self.cfg.max_words
        return self.pool(h_norm, word.clamp(max=S), S)

    def _decode(self, h: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        return self.dec_norm(self.decoder(h + self.condition(context), cache))

    def _contexts(self, words_out: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """The decoder context of each byte [B, T, d_model]: backbone output of the previous word,
        the learned first-word vector for word 0, the last word that fits for overflow bytes."""
        B, S, D = words_out.shape
        table = torch.cat([self.first_word.to(words_out.dtype).expand(B, 1, D), words_out[:, : S - 1]], dim=1)
        return table.gather(1, word.clamp(max=S - 1)[..., None].expand(*word.shape, D))

    def _byte_logprobs(self, dec: torch.Tensor, start_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Within-word log-probs [B, T, 257] (bytes that would start a word masked out) and the
        plain 256-way log-probs used in overflow."""
        logits = at_least_fp32(self.head(dec))
        within = torch.cat([logits[..., :256].masked_fill(start_mask, float("-inf")), logits[..., 256:]], dim=-1)
        return F.log_softmax(within, dim=-1), F.log_softmax(logits[..., :256], dim=-1)

    def _first_state(self, word_out: torch.Tensor) -> torch.Tensor:
        """Decoder-width state [..., d_byte] that predicts the next word's first byte from a word's output."""
        return self.first_norm(self.first_byte(word_out))

    def _first_logprobs(self, first_state: torch.Tensor, start_mask: torch.Tensor) -> torch.Tensor:
        """Log-probs [..., 256] of the first byte of the next word, over bytes that start a word."""
        logits = at_least_fp32(self.head(first_state))[..., :256]
        return F.log_softmax(logits.masked_fill(~start_mask, float("-inf")), dim=-1)

    # ----- training and scoring -----
    def forward(self, idx: torch.Tensor) -> ModelOutput:
        x, y = idx[:, :-1], idx[:, 1:]
        S = self.cfg.max_words
        word, _, start_mask = self._split(x)
        h, h_norm = self._encode(x)
        words_out = self.backbone_norm(self.backbone(self._word_vectors(h_norm, word)))
        within, plain = self._byte_logprobs(self._decode(h, self._contexts(words_out, word)), start_mask)
        # first byte of word w+1 from the backbone output of word w (used where y starts a word)
        first_states = self._first_state(words_out)
        own = first_states.gather(1, word.clamp(max=S - 1)[..., None].expand(*word.shape, first_states.size(-1)))
        first = self._first_logprobs(own, start_mask)
        new_word = start_mask.gather(2, y[..., None]).squeeze(-1)
        nll_within = -within.gather(2, torch.where(new_word, EOW, y)[..., None]).squeeze(-1)
        nll_first = -first.gather(2, y[..., None]).squeeze(-1)
        nll_words = nll_within + torch.where(new_word, nll_first, torch.zeros_like(nll_first))
        overflow = word >= S - 1
        nll = torch.where(overflow, -plain.gather(2, y[..., None]).squeeze(-1), nll_words)
        metrics = {"overflow_frac": overflow.float().mean(), "words_per_byte": new_word.float().mean()}
        return ModelOutput(nll.mean(), nll, metrics)

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, 256] of the byte after each position of idx [B, T]; every row
        sums to 1, and the entry of the true next byte is -nll of `forward`. A byte that would
        start a new word gets p(EOW | word so far) * p(byte | backbone output of the word so far),
        which runs the backbone once more for each position (a masked pass)."""
        S = self.cfg.max_words
        word, word_first, start_mask = self._split(idx)
        h, h_norm = self._encode(idx)
        word_in = self._word_vectors(h_norm, word)
        words_out = self.backbone_norm(self.backbone(word_in))
        within, plain = self._byte_logprobs(self._decode(h, self._contexts(words_out, word)), start_mask)
        partial = self.pool.prefixes(h_norm, word_first, self.cfg.max_word_bytes)
        first = self._first_logprobs(self._first_state(self._backbone_if_ended(word_in, partial, word)), start_mask)
        words_lp = torch.where(start_mask, within[..., EOW:] + first, within[..., :256])
        return torch.where((word >= S - 1)[..., None], plain, words_lp)

    def _backbone_if_ended(self, word_in: torch.Tensor, partial: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Backbone output [B, T, d_model] at every t as if word(t) ended at t: the partial word
        vector at position word(t), attending to the real words before it and to itself."""
        B, S, _ = word_in.shape
        T = word.size(1)
        dev = word.device
        slots = torch.arange(S, device=dev)
        positions = torch.cat([slots.expand(B, S), word.clamp(max=S - 1)], dim=1)
        real = torch.cat([torch.ones(S, S, dtype=torch.bool, device=dev).tril(),
                          torch.zeros(S, T, dtype=torch.bool, device=dev)], dim=1).expand(B, S, S + T)
        cand = torch.cat([slots < word[..., None], torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T)], dim=2)
        mask = torch.cat([real, cand], dim=1)[:, None]
        out = self.backbone(torch.cat([word_in, partial], dim=1), positions=positions, attn_mask=mask)
        return self.backbone_norm(out[:, S:])

    # ----- generation -----
    @torch.no_grad()
    def generate_stream(self, prompt: torch.Tensor, max_new: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        utf8: bool = False) -> Iterator[torch.Tensor]:
        """Yield one new byte per row [B] at a time. Rows are decoded independently (their words
        end at different bytes). With `utf8`, sampling is restricted to bytes that keep the text
        a valid UTF-8 prefix. Temperature and top-k apply to each factor (the 257-way decoder
        distribution, then the first byte of a new word)."""
        streams = [self._stream_row(prompt[r : r + 1], max_new, temperature, top_k, generator, utf8)
                   for r in range(prompt.size(0))]
        for _ in range(max_new):
            with decoding_attention():
                nxt = [next(s)[0] for s in streams]
            yield torch.tensor(nxt, device=prompt.device)

    @torch.no_grad()
    def generate(self, prompt: bytes | torch.Tensor, max_new: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 utf8: bool = False) -> bytes | torch.Tensor:
        """Continue `prompt` by `max_new` bytes: bytes in, bytes of the continuation out; or a
        LongTensor [B, T] in, the prompt with the continuation appended out."""
        return generate_ids(self, prompt,
                            lambda ids: self.generate_stream(ids, max_new, temperature, top_k, generator, utf8))

    @torch.no_grad()
    def _stream_row(self, prompt: torch.Tensor, max_new: int, temperature: float, top_k: int | None,
                    generator: torch.Generator | None, utf8: bool) -> Iterator[tuple[int, float]]:
        """Sample bytes for one row, yielding (byte, its log-prob under the model at temperature 1).
        The window restarts from its last half when it is full or its words would overflow, so
        every step's distribution is `next_logprobs` of the current window."""
        cfg, dev = self.cfg, prompt.device
        ids = self._fit_window(prompt[0, -cfg.block_size :].tolist())
        state = _RowState(self, ids)
        values = torch.arange(256, device=dev).expand(1, 256)
        for _ in range(max_new):
            starts = PrefixState(torch.tensor([ids], device=dev), cfg.max_word_bytes).next_starts(values, last=True)[0]
            allowed = torch.ones_like(starts)
            if utf8:
                allowed = torch.tensor(utf8_allowed_next(bytes(ids)), device=dev)
            starts_ok = starts & allowed
            closed = torch.cat([starts | ~allowed, ~starts_ok.any()[None]])  # EOW needs a byte to start with
            within = state.logits.masked_fill(closed, float("-inf"))
            choice = int(sample_next(within[None], temperature, top_k, generator)[0])
            logp = float(torch.log_softmax(within, 0)[choice])
            if choice == EOW:
                first = state.end_word().masked_fill(~starts_ok, float("-inf"))
                choice = int(sample_next(first[None], temperature, top_k, generator)[0])
                logp += float(torch.log_softmax(first, 0)[choice])
            yield choice, logp
            ids.append(choice)
            if len(ids) > cfg.block_size:
                ids = self._fit_window(ids[-(cfg.block_size // 2) :])
                state = _RowState(self, ids)
            else:
                state.advance(choice)
                if state.n_words >= cfg.max_words - 1:
                    ids = self._fit_window(ids[-(len(ids) // 2) :])
                    state = _RowState(self, ids)

    def _fit_window(self, ids: list[int]) -> list[int]:
        """The longest tail of ids (halving) whose words stay out of overflow."""
        while len(ids) > 1:
            word, _, _ = self._split(torch.tensor([ids]), with_mask=False)
            if int(word[0, -1]) < self.cfg.max_words - 1:
                break
            ids = ids[-(len(ids) // 2) :]
        return ids


class _RowState:
    """KV caches of the three stacks for one generated row, the decoder contexts of the words
    so far, the normed byte states of the current word, and the decoder's last logits."""

    def __init__(self, model: HAT, ids: list[int]):
        cfg = model.cfg
        self.model = model
        param = next(model.parameters())
        x = torch.tensor([ids], device=param.device)
        word, word_first, _ = model._split(x, with_mask=False)
        self.enc_cache = model.encoder.new_cache(1, cfg.block_size, param.device, param.dtype)
        self.dec_cache = model.decoder.new_cache(1, cfg.block_size, param.device, param.dtype)
        self.backbone_cache = model.backbone.new_cache(1, cfg.max_words, param.device, param.dtype)
        h, h_norm = model._encode(x, self.enc_cache)
        self.n_words = int(word[0, -1])  # completed words; the current one is still open
        self.current = h_norm[:, int(word_first[0, -1]) :]
        self.table = model.first_word.to(h.dtype)  # decoder context of word w is table[:, w]
        if self.n_words:
            slot = torch.where(word < self.n_words, word, cfg.max_words)
            pooled = model.pool(h_norm, slot, cfg.max_words)[:, : self.n_words]
            out = model.backbone_norm(model.backbone(pooled, self.backbone_cache))
            self.table = torch.cat([self.table, out], dim=1)
        self._set_logits(model._decode(h, self.table[:, word[0]], self.dec_cache))

    def _set_logits(self, dec: torch.Tensor) -> None:
        self.logits = at_least_fp32(self.model.head(dec[0, -1]))

    def end_word(self) -> torch.Tensor:
        """Close the current word: pool it, run the backbone one step, return first-byte logits [256]."""
        m = self.model
        slot = torch.zeros(self.current.shape[:2], dtype=torch.long, device=self.current.device)
        out = m.backbone_norm(m.backbone(m.pool(self.current, slot, 1), self.backbone_cache))
        self.table = torch.cat([self.table, out], dim=1)
        self.n_words += 1
        self.current = None
        return at_least_fp32(m.head(m._first_state(out[0, 0])))[:256]

    def advance(self, byte: int) -> None:
        m = self.model
        h, h_norm = m._encode(torch.tensor([[byte]], device=self.table.device), self.enc_cache)
        self.current = h_norm if self.current is None else torch.cat([self.current, h_norm], dim=1)
        self._set_logits(m._decode(h, self.table[:, self.n_words : self.n_words + 1], self.dec_cache))
