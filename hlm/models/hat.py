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

Generation runs the backbone once per completed word (with KV caches for all three stacks),
for all rows at once: sample from the decoder's 257-way distribution; the rows that drew EOW
pool their word and run the backbone one position each, at their own word counts, in one call
(`rows_step`), then sample the first byte of the next word; then every row's byte goes through
the byte stacks in one step. HAT keeps this decoder rather than `GroupedDecoder` of
hlm/models/parts/decoding.py: there, the boundary source decides a group from the bytes so far
and `logits` is one 256-way distribution; here the model *samples* the word's end (EOW), and a
256-way distribution at every byte would need the backbone run on the word so far at every byte
(as `next_logprobs` does), which generation avoids. Each row restarts its own window (when full,
or when its words would overflow), so rows sit at different byte positions too and the byte
stacks are stepped by `rows_step` as well. Splitting, pooling (learned query) and the group
indices come from hlm/models/parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import ConfigError, HLMError
from hlm.models.base import LanguageModel, ModelOutput
from hlm.models.blocks import RMSNorm, Transformer, at_least_fp32, init_weights
from hlm.models.generation import decoding_attention, generate_ids, sample_next
from hlm.models.parts.boundaries import group_first, group_index
from hlm.models.parts.decoding import rows_step
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
        return _at(table, word.clamp(max=S - 1))

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
        own = _at(first_states, word.clamp(max=S - 1))
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
    def generate_stream(self, prompt: torch.Tensor, max_new: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        utf8: bool = False) -> Iterator[torch.Tensor]:
        """Yield one new byte per row [B] at a time. Rows are decoded together but each as if alone
        (their words end at different bytes). With `utf8`, sampling is restricted to bytes that keep
        the text a valid UTF-8 prefix. Temperature and top-k apply to each factor (the 257-way
        decoder distribution, then the first byte of a new word)."""
        return (nxt for nxt, _ in self._sample(prompt, max_new, temperature, top_k, generator, utf8))

    @torch.no_grad()
    def generate(self, prompt: bytes | torch.Tensor, max_new: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 utf8: bool = False) -> bytes | torch.Tensor:
        """Continue `prompt` by `max_new` bytes: bytes in, bytes of the continuation out; or a
        LongTensor [B, T] in, the prompt with the continuation appended out."""
        return generate_ids(self, prompt,
                            lambda ids: self.generate_stream(ids, max_new, temperature, top_k, generator, utf8))

    @torch.no_grad()
    def _sample(self, prompt: torch.Tensor, max_new: int, temperature: float, top_k: int | None,
                generator: torch.Generator | None, utf8: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (bytes [B], their log-probs under the model at temperature 1). Each step samples the
        257-way decoder distribution; the rows that drew EOW close their word (the backbone once for
        all of them) and sample the next word's first byte. One random draw per factor for all rows,
        so a single row draws exactly as the per-row sampler did."""
        with decoding_attention():
            dec = _WordDecoder(self, prompt)
        nxt = None
        for _ in range(max_new):
            with decoding_attention():
                if nxt is not None:
                    dec.push(nxt)
                starts = dec.next_starts()
                allowed = dec.utf8_allowed() if utf8 else torch.ones_like(starts)
                starts_ok = starts & allowed
                no_first = ~starts_ok.any(-1, keepdim=True)  # EOW needs a byte to start the next word with
                closed = torch.cat([starts | ~allowed, no_first], dim=1)
                within = dec.logits.masked_fill(closed, float("-inf"))
                nxt = sample_next(within, temperature, top_k, generator)
                logp = within.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
                ended = torch.nonzero(nxt == EOW).flatten()
                if len(ended):
                    first = dec.end_words(ended).masked_fill(~starts_ok[ended], float("-inf"))
                    nxt[ended] = sample_next(first, temperature, top_k, generator)
                    logp[ended] += first.log_softmax(-1).gather(1, nxt[ended, None]).squeeze(1)
            yield nxt, logp

    def _fit_window(self, ids: list[int]) -> list[int]:
        """The longest tail of ids (halving) whose words stay out of overflow."""
        while len(ids) > 1:
            word, _, _ = self._split(torch.tensor([ids]), with_mask=False)
            if int(word[0, -1]) < self.cfg.max_words - 1:
                break
            ids = ids[-(len(ids) // 2) :]
        return ids


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] at positions index [B, T'] -> [B, T', D]."""
    return x.gather(1, index[..., None].expand(*index.shape, x.size(-1)))


class _WordDecoder:
    """Cached decoding of B rows, each in its own window: a row restarts from the last half of its
    window when the window is full or its words would overflow, so every row's distribution is
    `next_logprobs` of its own window, whatever the other rows do. The rows' windows then differ
    in length, so all three stacks keep each row at its own position (`rows_step`). Holds each
    row's bytes, word count, decoder context (the backbone output of its last word), the normed
    byte states of its open word, and the decoder's 257-way logits after its last byte."""

    def __init__(self, model: HAT, prompt: torch.Tensor):
        if not prompt.size(1):
            raise HLMError("generation needs a non-empty prompt (start with the separator byte 0x00)")
        cfg = model.cfg
        p = next(model.parameters())
        B, dev = prompt.size(0), p.device
        self.model = model
        self.ids = torch.zeros(B, cfg.block_size + 1, dtype=torch.long, device=dev)
        # bytes in the window, completed words, bytes of the open word
        self.n_bytes, self.n_words, self.n_open = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))
        self.open = torch.zeros(B, cfg.max_word_bytes, cfg.d_byte, device=dev, dtype=p.dtype)
        self.context = torch.zeros(B, 1, cfg.d_model, device=dev, dtype=p.dtype)
        self.logits = torch.zeros(B, 257, device=dev, dtype=at_least_fp32(p).dtype)
        self.enc_cache = model.encoder.new_cache(B, cfg.block_size, dev, p.dtype)
        self.dec_cache = model.decoder.new_cache(B, cfg.block_size, dev, p.dtype)
        self.backbone_cache = model.backbone.new_cache(B, cfg.max_words, dev, p.dtype)
        self._prefill({r: model._fit_window(row[-cfg.block_size :]) for r, row in enumerate(prompt.tolist())})

    def _prefill(self, windows: dict[int, list[int]]) -> None:
        """Run the three stacks on the new windows of some rows (batched over rows of one length)
        and copy their keys and values into those rows of the batched caches."""
        m, cfg = self.model, self.model.cfg
        for length in sorted({len(w) for w in windows.values()}):
            group = [r for r, w in windows.items() if len(w) == length]
            rows = torch.tensor(group, device=self.ids.device)
            x = torch.tensor([windows[r] for r in group], device=rows.device)
            word, word_first, _ = m._split(x, with_mask=False)
            n_words, n = word[:, -1], len(group)
            caches = [stack.new_cache(n, size, rows.device, self.open.dtype)
                      for stack, size in ((m.encoder, length), (m.backbone, cfg.max_words), (m.decoder, length))]
            h, h_norm = m._encode(x, caches[0])
            table = m.first_word.to(h.dtype).expand(n, 1, -1)  # decoder context of word w is table[:, w]
            if int(n_words.max()):
                slot = torch.where(word < n_words[:, None], word, cfg.max_words)
                pooled = m.pool(h_norm, slot, cfg.max_words)[:, : int(n_words.max())]
                table = torch.cat([table, m.backbone_norm(m.backbone(pooled, caches[1]))], dim=1)
            dec = m._decode(h, _at(table, word), caches[2])
            for big, small in zip((self.enc_cache, self.backbone_cache, self.dec_cache), caches, strict=True):
                big.k[:, rows, :, : small.pos] = small.k[:, :, :, : small.pos]
                big.v[:, rows, :, : small.pos] = small.v[:, :, :, : small.pos]
            self.ids[rows, :length] = x
            self.n_bytes[rows], self.n_words[rows] = length, n_words
            self.context[rows] = _at(table, n_words[:, None]).to(self.context.dtype)
            self.n_open[rows] = length - word_first[:, -1]
            at = (word_first[:, -1:] + torch.arange(cfg.max_word_bytes, device=rows.device)).clamp(max=length - 1)
            self.open[rows] = _at(h_norm, at).to(self.open.dtype)
            self.logits[rows] = at_least_fp32(m.head(dec[:, -1]))

    def next_starts(self) -> torch.Tensor:
        """bool [B, 256]: would each byte value start a new word after each row's window? (The split
        is causal, so a row padded on the right reads its state at its own last byte.)"""
        state = PrefixState(self.ids[:, : int(self.n_bytes.max())], self.model.cfg.max_word_bytes)
        last = (self.n_bytes - 1)[:, None]
        for name in ("p", "pp", "p_joiner", "open_char", "cut"):
            setattr(state, name, getattr(state, name).gather(1, last))
        return state.next_starts(torch.arange(256, device=last.device).expand(len(last), 256), last=True)

    def utf8_allowed(self) -> torch.Tensor:
        """bool [B, 256]: the bytes that keep each row's text a valid UTF-8 prefix (from its last 3 bytes)."""
        tails = self.ids.gather(1, (self.n_bytes[:, None] + torch.arange(-3, 0, device=self.ids.device)).clamp(min=0))
        return torch.tensor([utf8_allowed_next(bytes(t[max(3 - n, 0) :]))
                             for t, n in zip(tails.tolist(), self.n_bytes.tolist(), strict=True)], device=tails.device)

    def close_words(self, rows: torch.Tensor) -> torch.Tensor:
        """Backbone outputs [n, 1, d_model] of the open words of `rows`, as if they ended now. Writes
        only the rows' next backbone slot, which nothing reads before it is written again."""
        m = self.model
        slot = (torch.arange(self.open.size(1), device=rows.device) >= self.n_open[rows, None]).long()
        word = m.pool(self.open[rows], slot, 1)
        return m.backbone_norm(rows_step(m.backbone, self.backbone_cache, word, rows, self.n_words[rows, None]))

    def first_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits [n, 256] of the first byte of the next word, from backbone outputs [n, 1, d_model]."""
        return at_least_fp32(self.model.head(self.model._first_state(out[:, 0])))[:, :256]

    def end_words(self, rows: torch.Tensor) -> torch.Tensor:
        """Close the open words of `rows` (one backbone step each, one call) and return the logits
        [n, 256] of the next word's first byte."""
        out = self.close_words(rows)
        self.context[rows] = out.to(self.context.dtype)
        self.n_words[rows] += 1
        self.n_open[rows] = 0
        return self.first_logits(out)

    def push(self, nxt: torch.Tensor) -> None:
        """Append one byte per row (nxt [B]; a row that starts a word has ended the last one) and
        update `logits`: rows with room step the byte stacks together, the others restart."""
        m, cfg = self.model, self.model.cfg
        self.ids[torch.arange(len(nxt), device=nxt.device), self.n_bytes] = nxt
        self.n_bytes += 1
        restart = (self.n_bytes > cfg.block_size) | (self.n_words >= cfg.max_words - 1)
        rows = torch.nonzero(~restart).flatten()
        if len(rows):
            pos = self.n_bytes[rows, None] - 1
            h = rows_step(m.encoder, self.enc_cache, m.embed(nxt[rows, None]), rows, pos)
            self.open[rows, self.n_open[rows]] = m.enc_norm(h)[:, 0].to(self.open.dtype)
            self.n_open[rows] += 1
            dec = m.dec_norm(rows_step(m.decoder, self.dec_cache, h + m.condition(self.context[rows]), rows, pos))
            self.logits[rows] = at_least_fp32(m.head(dec[:, 0]))
        windows = {}
        for r in torch.nonzero(restart).flatten().tolist():
            n = int(self.n_bytes[r])
            keep = cfg.block_size // 2 if n > cfg.block_size else n // 2
            windows[r] = m._fit_window(self.ids[r, n - keep : n].tolist())
        self._prefill(windows)
