"""Byte-level views of language models: `ByteLM` converts a token model exactly,
`NativeByteLM` wraps models that already predict bytes, `as_byte_lm` picks the right one.

Every byte LM here has `next_byte_logprobs(prefix) -> Tensor[257]` (bytes 0..255, then
end-of-text), `prefix_logprobs(text) -> Tensor[len(text)+1, 257]` (the distribution after each
prefix of text, computed incrementally) and `logprob(text, eot=False)`.

End of text. For token models it is the EOS token at an exact node. Native hlm byte models
separate documents with byte 0x00, so their end-of-text is the probability of 0x00 and the
byte 0x00 itself gets probability 0 (it never occurs inside a document): every byte LM puts
its document boundary in entry 256, and ensembles of token and byte models stay consistent.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hlm import HLMError
from hlm.bytes.covers import ConversionRules, CoverTracker
from hlm.config import Config
from hlm.models.gpt import KVWalk
from hlm.tokenizers import Tokenizer

END = 256


class ByteLMBase:
    """Shared `logprob` and `prefix_logprobs` for anything with `next_byte_logprobs`."""

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        raise NotImplementedError

    def prefix_logprobs(self, text: bytes) -> torch.Tensor:
        return torch.stack([self.next_byte_logprobs(text[:i]) for i in range(len(text) + 1)])

    def logprob(self, text: bytes, eot: bool = False) -> float:
        """Sum over the bytes of text (and the end of text if eot) of their next-byte log-probability."""
        lp = self.prefix_logprobs(bytes(text))
        targets = list(text) + ([END] if eot else [])
        return float(lp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.int64)].double().sum())


class _TokenRunner:
    """Next-token log-probs [V] (fp64, CPU) of a token path. hlm GPTs follow the path with one KV walk
    (`hlm.models.gpt.KVWalk`: the prefix shared with the previous path stays cached, usually one token is
    fed). Other models are called on the whole path."""

    def __init__(self, model, vocab_size: int, context: list[int] = ()):
        self.model = model
        self.vocab_size = vocab_size
        self.context = list(context)  # ids fed before every path
        self.cached_gpt = hasattr(model, "logits") and hasattr(getattr(model, "transformer", None), "new_cache")
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        self.device = params[0].device if params else torch.device("cpu")
        self.block = model.cfg.block_size if self.cached_gpt else None
        self.walk, self.offset = None, 0

    @torch.no_grad()
    def logprobs(self, path: list[int]) -> torch.Tensor:
        path = self.context + list(path)
        if self.cached_gpt:
            logits = self._cached_logits(path)
        else:
            ids = torch.tensor([path], device=self.device)
            out = self.model.logits(ids) if hasattr(self.model, "logits") else self.model(ids)
            logits = (out.logits if hasattr(out, "logits") else out)[0, -1]
        if logits.size(-1) < self.vocab_size:
            raise HLMError(f"the model predicts {logits.size(-1)} ids but the tokenizer has {self.vocab_size}")
        return F.log_softmax(logits.double(), dim=-1)[: self.vocab_size].cpu()

    def _cached_logits(self, path: list[int]) -> torch.Tensor:
        if len(path) - self.offset > self.block or len(path) <= self.offset:
            self.offset = max(0, len(path) - self.block // 2)  # slide: keep the last half of the context
            self.walk = None
        if self.walk is None:
            self.walk = KVWalk(self.model)
        return self.walk.follow(path[self.offset :])


class ByteLM(ByteLMBase):
    """Exact next-byte distributions of a token model (the locally canonical conversion).

    `token_model(LongTensor[B, T]) -> logits[B, T, V]` is called with [start] + tokens, start =
    `start_id`, else the tokenizer's BOS, else its EOS; `context` ids go before the start (e.g. a
    FIM prompt `[EOS, <PRE>, <SUF>, suffix...]` with start_id `<MID>`: the text is then the
    prefix, and the middle its continuation). One model call per byte: the query at each
    new exact node (one per byte, a few under regex lookahead). `marginal=True` sums over every
    tokenization instead (each exact path needs its own call: small inputs only). `rules` shares
    one tokenizer's ConversionRules (and their caches) between many ByteLMs."""

    def __init__(self, token_model: Any, tok: Tokenizer, start_id: int | None = None, marginal: bool = False,
                 context: list[int] = (), rules: ConversionRules | None = None):
        if rules is not None and (rules.tok is not tok or rules.marginal != marginal):
            raise HLMError("ByteLM: the shared rules belong to another tokenizer or conversion")
        self.tok = tok
        self.rules = rules or ConversionRules(tok, marginal)
        self.index = self.rules.index
        self.start_id = start_id if start_id is not None else tok.bos_id if tok.bos_id is not None else tok.eos_id
        if self.start_id is None:
            raise HLMError("the tokenizer has neither BOS nor EOS: pass start_id to ByteLM")
        self.eos_id = tok.eos_id
        self.model = token_model
        self.context = list(context)
        self.runner = _TokenRunner(token_model, tok.vocab_size, self.context)
        self.model_calls = 0
        self.reset()

    def reset(self) -> None:
        self.tracker = CoverTracker(self.rules, self.start_id)
        self._logq: dict[int, float] = {0: 0.0}
        self._lp: dict[int, torch.Tensor] = {0: self._query(0)}
        self._sorted: dict[int, torch.Tensor] = {}
        self._skip = 0
        if getattr(self.tok, "add_dummy_prefix", False):  # the token stream starts with a space the text lacks
            self.advance(0x20)
            self._skip = 1

    @property
    def text(self) -> bytes:
        return bytes(self.tracker.text[self._skip :])

    def _query(self, node: int) -> torch.Tensor:
        self.model_calls += 1
        return self.runner.logprobs(self.tracker.trie.path(node))

    def goto(self, prefix: bytes) -> None:
        """Move the cover state to `prefix`, continuing from the current state when it is a prefix of it."""
        here = self.text
        if not prefix.startswith(here):
            self.reset()
            here = b""
        for b in prefix[len(here) :]:
            self.advance(b)

    def advance(self, b: int) -> None:
        """Append byte b to the text: one model call per new exact node (usually one)."""
        trie = self.tracker.trie
        for e in self.tracker.advance(b):
            parent = trie.parent[e]
            self._logq[e] = self._logq[parent] + float(self._lp[parent][trie.token[e]])
            self._lp[e] = self._query(e)
        live = set(self.tracker.anchors)
        for store in (self._logq, self._lp, self._sorted):
            for node in [n for n in store if n not in live]:
                del store[node]

    def _sorted_probs(self, node: int) -> torch.Tensor:
        """q(t | node) over the sorted vocabulary, zero for tokens that cannot validly follow node."""
        hit = self._sorted.get(node)
        if hit is None:
            probs = self._lp[node].exp() * self.tracker.mask(node)
            hit = self._sorted[node] = probs[self.index.perm]
        return hit

    def distribution(self) -> torch.Tensor:
        """Next-byte log-probs [257] after the current text (`next_byte_logprobs` without moving)."""
        scores = self.unnormalized_scores()
        total = torch.logsumexp(scores, 0)
        if not torch.isfinite(total):
            raise HLMError(f"the model gives zero probability to every continuation of {self.text[-40:]!r}")
        return scores - total

    def unnormalized_scores(self) -> torch.Tensor:
        """log P_v(s + b) for each byte b and log P_v(s + end), before local renormalisation."""
        scores = torch.full((257,), float("-inf"), dtype=torch.float64)
        for a in self.tracker.anchors:
            u = self.tracker.remainder(a)
            lo, hi = self.index.strict_range(u)
            if lo >= hi:
                continue
            bins = torch.zeros(256, dtype=torch.float64).index_add_(
                0, self.index.byte_at[lo:hi, len(u)].long(), self._sorted_probs(a)[lo:hi])
            scores[:256] = torch.logaddexp(scores[:256], self._logq[a] + bins.log())
        if self.eos_id is not None:
            for e in self.tracker.exact:
                end = torch.tensor(self._logq[e] + float(self._lp[e][self.eos_id]), dtype=torch.float64)
                scores[END] = torch.logaddexp(scores[END], end)
        return scores

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        self.goto(bytes(prefix))
        return self.distribution()

    def state(self) -> tuple:
        """A copy of the cover state at the current text, for `set_state`: branch twice from one
        prefilled prompt (e.g. score a continuation, then generate one) without prefilling again."""
        shared = {id(x): x for x in (self.rules, self.rules.tok, self.rules.index)}
        return copy.deepcopy(self.tracker, shared), dict(self._logq), dict(self._lp), dict(self._sorted), self._skip

    def set_state(self, state: tuple) -> None:
        tracker, logq, lp, sorted_probs, self._skip = state
        self.tracker = copy.deepcopy(tracker, {id(x): x for x in (self.rules, self.rules.tok, self.rules.index)})
        self._logq, self._lp, self._sorted = dict(logq), dict(lp), dict(sorted_probs)

    def prefix_logprobs(self, text: bytes) -> torch.Tensor:
        self.goto(b"")
        rows = [self.distribution()]
        for b in bytes(text):
            self.advance(b)
            rows.append(self.distribution())
        return torch.stack(rows)

    def covers(self) -> list[tuple[list[int], int | None, int, float]]:
        """Covers of the current text for prompt-boundary sampling: (path, straddling token or None,
        bytes of that token already in the text, log Q). The exact nodes are covers themselves."""
        out = []
        n = len(self.tracker.text)
        for a in self.tracker.anchors:
            if self.tracker.trie.pos[a] == n:
                continue
            u = self.tracker.remainder(a)
            lo, hi = self.index.strict_range(u)
            probs = self._sorted_probs(a)[lo:hi]
            for k in torch.nonzero(probs > 0).flatten().tolist():
                out.append((a, int(self.index.perm[lo + k]), len(u), self._logq[a] + float(probs[k].log())))
        for e in self.tracker.exact:
            out.append((e, None, 0, self._logq[e]))
        return out


class NativeByteLM(ByteLMBase):
    """A model that predicts bytes (`next_logprobs(idx[B, T]) -> [B, T, 256]`). The context starts with
    the document separator 0x00, as in training and eval; 0x00 is the end-of-text (module doc).
    `context` replaces that start (e.g. a FIM prompt with sentinel ids >= 256); a model over more
    than 256 ids (bytes + sentinels) is renormalised over the 256 bytes."""

    def __init__(self, model, separator: int = 0, context: list[int] | None = None):
        self.model = model
        self.separator = separator
        self.context = [separator] if context is None else list(context)
        self.block = getattr(getattr(model, "cfg", None), "block_size", None)
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        self.device = params[0].device if params else torch.device("cpu")

    def _to_257(self, lp: torch.Tensor) -> torch.Tensor:
        lp = lp.double().cpu()
        if lp.size(-1) > 256:
            lp = torch.log_softmax(lp[..., :256], dim=-1)
        out = torch.cat([lp, lp[..., self.separator : self.separator + 1]], dim=-1)
        out[..., self.separator] = float("-inf")
        return out

    @torch.no_grad()
    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        ids = self.context + list(prefix)
        if self.block is not None:
            ids = ids[-self.block :]
        return self._to_257(self.model.next_logprobs(torch.tensor([ids], device=self.device))[0, -1])

    @torch.no_grad()
    def prefix_logprobs(self, text: bytes) -> torch.Tensor:
        """One forward per window of the model's context (non-overlapping, like eval.py)."""
        ids = torch.tensor(self.context + list(text), device=self.device)
        block = self.block or len(ids)
        rows = [self.model.next_logprobs(ids[s : s + block][None])[0] for s in range(0, len(ids), block)]
        return self._to_257(torch.cat(rows)[len(self.context) - 1 :])


class CallableByteLM(ByteLMBase):
    """Any function `prefix bytes -> log-probs [257]`."""

    def __init__(self, fn):
        self.fn = fn

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        return torch.as_tensor(self.fn(bytes(prefix)), dtype=torch.float64)


def as_byte_lm(model: Any, tokenizer: Tokenizer | None = None, start_id: int | None = None,
               marginal: bool = False) -> ByteLMBase:
    """A byte LM for: an object that already is one; a token model with its tokenizer (hlm GPT,
    any `ids -> logits` callable, or a Hugging Face causal LM); a native hlm byte model; or a
    function `prefix -> log-probs[257]`."""
    if hasattr(model, "next_byte_logprobs"):
        return model
    if tokenizer is not None:
        return ByteLM(_hf_logits(model) or model, tokenizer, start_id, marginal)
    if hasattr(model, "next_logprobs"):
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", 256)
        if vocab != 256:
            raise HLMError(f"a model over {vocab} token ids needs its tokenizer to become a byte LM")
        return NativeByteLM(model)
    if callable(model):
        return CallableByteLM(model)
    raise HLMError(f"cannot make a byte LM from {type(model).__name__}: give a tokenizer for token models")


def _hf_logits(model):
    """`ids -> logits` for a Hugging Face causal LM (None for anything else; transformers is optional)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None

    class _HF(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids).logits

    return _HF(model)


def byte_lm_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[ByteLMBase, torch.nn.Module, Config, dict]:
    """(byte LM, model, config, checkpoint) for an hlm checkpoint: token models start from the
    corpus separator (EOS), as in training."""
    from hlm.checkpoint import load_model, tokenizer_from_checkpoint

    model, cfg, ckpt = load_model(path, device)
    tok = tokenizer_from_checkpoint(ckpt)
    sep = ckpt["data_meta"]["separator_id"]
    blm = NativeByteLM(model, sep) if tok is None else ByteLM(model, tok, start_id=sep)
    return blm, model, cfg, ckpt
