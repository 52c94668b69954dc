"""Fill-in-the-middle evaluation with prompts that end inside a token (Phan et al. 2024).

A cut takes a file and a random middle span [a, b) at byte positions (so the prefix often ends
inside a token). Models see the SPM prompt `<PRE> <SUF> suffix <MID> prefix` (sentinels as in
hlm/fim.py) and fill the middle greedily; the middle ends at the document separator. Methods:

  plain    token prompting: encode(prefix) as the prompt, greedy tokens.
  healing  token healing: drop the prompt's last token, require the first new token to start with
           its bytes, greedy tokens.
  exact    exact byte-level conversion of the token model (hlm.bytes.ByteLM after the
           `<MID>` sentinel): greedy over the exact next-byte distribution. The prefix up to
           its last point where every cover restarts goes in as canonical tokens (`exact_tail`).
  cut      token healing's fill; its NLL is the telescoped exact ratio
           -log [Q(encode(prefix + middle) + [EOS]) / P(prefix)], P(prefix) over the covers at the
           cut (hlm/bytes/cut.py): canonical scoring plus a few positions per cut, batched. With a model that
           leaks no mass to non-canonical tokens it equals exact's NLL; otherwise it is above it.
  byte     a byte-level FIM model, greedy over bytes.

Scores per method: exact match of the middle, the share of filled files `ast.parse` accepts
(whole file: full prefix + fill + full suffix), and NLL of the true middle plus its end, in bits
per byte (the end counts as one byte). NLL for plain is -log q(encode(middle) + [EOS] |
prompt); for healing the same with the first token renormalised over the allowed tokens,
scoring encode(dropped + middle) (or [dropped token] + encode(middle) when its first token
does not start with the dropped bytes): both are one tokenization's probability, a lower
bound of the exact value.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hlm import LN2, HLMError
from hlm.fim import Sentinels, spm_prompt
from hlm.models.gpt import GPT

if TYPE_CHECKING:  # hlm.bytes is imported where a method needs it: plain and healing run without it
    from hlm.bytes.byte_lm import ByteLM, ByteLMBase, NativeByteLM
    from hlm.bytes.covers import ConversionRules

END = 256  # a byte LM's end-of-text outcome (`hlm.bytes.byte_lm.END`)


@dataclass
class Cut:
    """One FIM task: the model sees `prefix` (the end of the text before the middle) and `suffix`
    (the start of the text after it); `before`/`after` are the full file around the middle."""
    doc: int
    before: bytes
    middle: bytes
    after: bytes
    prefix: bytes
    suffix: bytes


def parses(source: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def _char_start(data: bytes, i: int) -> int:
    while 0 < i < len(data) and data[i] & 0xC0 == 0x80:
        i -= 1
    return i


def make_cuts(docs: list[bytes], n: int, seed: int, max_middle: int, prefix_bytes: int,
              suffix_bytes: int) -> list[Cut]:
    """`n` cuts in files that parse, at uniform byte positions (on UTF-8 character boundaries); the
    middle is 1..max_middle bytes; the prompt keeps the last `prefix_bytes` of the text before it
    and the first `suffix_bytes` after it, trimmed to whole lines."""
    pool = [i for i, d in enumerate(docs) if len(d) > 1 and parses(d)]
    if not pool:
        raise HLMError("no test document parses as Python: nothing to cut")
    rng = np.random.default_rng(seed)
    cuts = []
    for _ in range(n):
        i = int(rng.choice(pool))
        doc = docs[i]
        a = _char_start(doc, int(rng.integers(0, len(doc))))
        b = _char_start(doc, min(len(doc), a + int(rng.integers(1, max_middle + 1))))
        if b <= a:
            b = a + 1
            while b < len(doc) and doc[b] & 0xC0 == 0x80:
                b += 1
        before, after = doc[:a], doc[b:]
        prefix = before[-prefix_bytes:]
        if len(prefix) < len(before) and b"\n" in prefix:
            prefix = prefix[prefix.index(b"\n") + 1 :]
        suffix = after[:suffix_bytes]
        if len(suffix) < len(after) and b"\n" in suffix:
            suffix = suffix[: suffix.rindex(b"\n") + 1]
        cuts.append(Cut(i, before, doc[a:b], after, prefix, suffix))
    return cuts


def inside_token(tok, cut: Cut) -> bool:
    """Whether the cut falls inside a token of the joint encoding of prefix + middle."""
    ends, pos = set(), 0
    for t in tok.encode(cut.prefix + cut.middle):
        pos += len(tok.token_bytes(t))
        ends.add(pos)
    return len(cut.prefix) > 0 and len(cut.prefix) not in ends


class TokenFIM:
    """Plain prompting and token healing for a FIM-trained token model (an hlm GPT)."""

    def __init__(self, model, tok, separator: int, corpus_vocab: int):
        self.model, self.tok, self.sep = model, tok, separator
        self.s = Sentinels.after(corpus_vocab)
        self.V = tok.vocab_size
        self.block = model.cfg.block_size
        self.device = next(model.parameters()).device
        self.token_bytes = [tok.token_bytes(i) for i in range(self.V)]

    def context(self, cut: Cut) -> list[int]:
        return spm_prompt([], self.tok.encode(cut.suffix), self.s, start=self.sep)

    @cached_property
    def rules(self) -> ConversionRules:
        """The exact-conversion rules, built on first use (plain and healing do not need them)."""
        from hlm.bytes.covers import ConversionRules

        return ConversionRules(self.tok)

    def _check(self, n: int) -> None:
        if n > self.block:
            raise HLMError(f"a FIM prompt of {n} tokens does not fit the model's {self.block}: "
                           "lower --prefix-bytes / --suffix-bytes / --max-new-bytes")

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """Next-token log-probs [T, V] (fp64) over the text tokens after each position."""
        self._check(len(ids))
        logits = self.model.logits(torch.tensor([ids], device=self.device))[0]
        return F.log_softmax(logits.double(), dim=-1)[:, : self.V].cpu()

    def _score(self, prompt: list[int], targets: list[int], first_mask: torch.Tensor | None = None) -> float:
        lp = self._logprobs(prompt + targets[:-1])[len(prompt) - 1 :]
        rows = lp[torch.arange(len(targets)), torch.tensor(targets)]
        if first_mask is not None:
            rows[0] = rows[0] - torch.logsumexp(lp[0][first_mask], 0)
        return -float(rows.sum())

    @torch.no_grad()
    def _greedy(self, prompt: list[int], max_bytes: int, first_mask: torch.Tensor | None = None) -> bytes:
        self._check(len(prompt) + 1)
        decoder = self.model.new_decoder(torch.tensor([prompt], device=self.device))
        out, n = bytearray(), len(prompt)
        while len(out) < max_bytes and n < self.block:
            lp = decoder.logits[0, : self.V].double()
            if first_mask is not None:
                lp = lp.masked_fill(~first_mask.to(lp.device), float("-inf"))
                first_mask = None
            t = int(lp.argmax())
            if t == self.sep:
                break
            out += self.token_bytes[t]
            decoder.push(torch.tensor([t], device=self.device))
            n += 1
        return bytes(out[:max_bytes])

    def plain_nll(self, cut: Cut) -> float:
        return self._score(self.context(cut) + self.tok.encode(cut.prefix), self.tok.encode(cut.middle) + [self.sep])

    def plain_fill(self, cut: Cut, max_bytes: int) -> bytes:
        return self._greedy(self.context(cut) + self.tok.encode(cut.prefix), max_bytes)

    def _healed(self, cut: Cut) -> tuple[list[int], bytes, int | None]:
        """(prompt without its last token, that token's bytes, that token) for healing."""
        ids = self.tok.encode(cut.prefix)
        if not ids:
            return self.context(cut), b"", None
        return self.context(cut) + ids[:-1], self.token_bytes[ids[-1]], ids[-1]

    def _allowed(self, dropped: bytes) -> torch.Tensor:
        return torch.tensor([tb.startswith(dropped) and len(tb) > 0 for tb in self.token_bytes])

    def healing_nll(self, cut: Cut) -> float:
        prompt, dropped, last = self._healed(cut)
        if last is None:
            return self.plain_nll(cut)
        targets = self.tok.encode(dropped + cut.middle)
        if not self.token_bytes[targets[0]].startswith(dropped):
            targets = [last] + self.tok.encode(cut.middle)
        return self._score(prompt, targets + [self.sep], self._allowed(dropped))

    def cut_requests(self, cuts: list[Cut]) -> list:
        """Each cut as a `CutRequest`: prefix + middle + [EOS] scored after the FIM prompt, its prefix ending
        at the cut."""
        from hlm.bytes.cut import CutRequest

        requests = []
        for cut in cuts:
            context, tokens = self.context(cut), self.tok.encode(cut.prefix + cut.middle)
            self._check(len(context) + len(tokens))
            requests.append(CutRequest(cut.prefix, tokens, self.sep, context[:-1]))
        return requests

    def cut_nlls(self, cuts: list[Cut], workers: int = 1, batch_size: int = 32) -> list[float]:
        """-log P(middle + end | prefix) of each cut as a ratio of whole-text probabilities: the canonical score
        of prefix + middle + [EOS] over the prefix probability at the cut (covers included), batched
        (hlm/bytes/cut.py); the covers planned while the device runs the trunks, or first in `workers` processes."""
        from hlm.bytes.cut import cut_logprobs_batch, plan_cuts

        requests = self.cut_requests(cuts)
        plans = plan_cuts(self.rules, self.s.middle, requests, workers) if workers > 1 else None
        res = cut_logprobs_batch(self.model, self.rules, self.s.middle, requests, plans=plans, batch_size=batch_size)
        return [r["prefix"] - r["text"] for r in res]

    def cut_nll(self, cut: Cut) -> float:
        return self.cut_nlls([cut])[0]

    def healing_fill(self, cut: Cut, max_bytes: int) -> bytes:
        prompt, dropped, last = self._healed(cut)
        if last is None:
            return self.plain_fill(cut, max_bytes)
        return self._greedy(prompt, max_bytes + len(dropped), self._allowed(dropped))[len(dropped) :]


def exact_byte_lm(fim: TokenFIM, cut: Cut) -> ByteLM:
    """The exact byte-level view of the token model after `[EOS] <PRE> <SUF> suffix <MID>`."""
    from hlm.bytes.byte_lm import ByteLM

    return ByteLM(fim.model, fim.tok, start_id=fim.s.middle, context=fim.context(cut)[:-1], rules=fim.rules)


def exact_tail(fim: TokenFIM, cut: Cut) -> tuple[ByteLM, Cut]:
    """`exact_byte_lm` for scoring and filling after the prefix, at the cost of its tail only.
    Every cover of the prefix has a token boundary at its last `segment_points` cut (sentencepiece
    BPE: a space after a non-space), and only the canonical tokens are valid before it. So those
    tokens go into the context (one forward), their probability, common to every cover, cancels
    from the next-byte distributions, and the ByteLM tracks covers over the bytes after the cut
    (one model call per byte of the tail instead of the prefix). Returns the ByteLM and the cut
    whose prefix is that tail; tokenizers without such cuts get the whole prefix."""
    from hlm.bytes.byte_lm import ByteLM
    from hlm.bytes.plan import segment_points

    points = segment_points(cut.prefix, fim.rules)
    if not points:
        return exact_byte_lm(fim, cut), cut
    context = fim.context(cut) + fim.tok.encode(cut.prefix[: points[-1]])
    blm = ByteLM(fim.model, fim.tok, start_id=context[-1], context=context[:-1], rules=fim.rules)
    return blm, replace(cut, prefix=cut.prefix[points[-1] :])


def native_byte_lm(model: torch.nn.Module, cut: Cut) -> NativeByteLM:
    """A byte FIM model (sentinels 256..258) after `0x00 <PRE> <SUF> suffix <MID>`."""
    from hlm.bytes.byte_lm import NativeByteLM

    s = Sentinels.after(256)
    return NativeByteLM(model, 0, spm_prompt([], list(cut.suffix), s, start=0))


def byte_nll(blm: ByteLMBase, cut: Cut) -> float:
    """-log p(middle + end | prefix) under a byte LM (257 outcomes, end = 256)."""
    rows = blm.prefix_logprobs(cut.prefix + cut.middle)[len(cut.prefix) :]
    targets = torch.tensor(list(cut.middle) + [END])
    return -float(rows[torch.arange(len(targets)), targets].sum())


def byte_fill(blm: ByteLMBase, cut: Cut, max_bytes: int) -> bytes:
    """Greedy bytes after the prefix until the end of the middle."""
    out = bytearray()
    while len(out) < max_bytes:
        b = int(blm.next_byte_logprobs(cut.prefix + bytes(out)).argmax())
        if b == END:
            break
        out.append(b)
    return bytes(out)


@torch.no_grad()
def native_byte_fill(model: torch.nn.Module, cut: Cut, max_bytes: int) -> bytes:
    """`byte_fill` of `native_byte_lm(model, cut)`, but an hlm GPT decodes with its KV cache: one
    single-byte forward per new byte instead of a full forward over the prompt. Same greedy rule:
    the best of the 256 bytes (the separator excluded), or END when the separator's logit beats
    it (ties go to the byte, as argmax over the 257 outcomes does). Other models, and prompts that
    would overflow the context, take the uncached path."""
    blm = native_byte_lm(model, cut)
    ids = blm.context + list(cut.prefix)
    if not isinstance(model, GPT) or len(ids) + max_bytes > model.cfg.block_size:
        return byte_fill(blm, cut, max_bytes)
    decoder = model.new_decoder(torch.tensor([ids], device=next(model.parameters()).device))
    out = bytearray()
    while len(out) < max_bytes:
        logits = decoder.logits[0]
        lp = logits[:256].clone()
        lp[blm.separator] = float("-inf")
        best = lp.argmax()
        b = int(torch.where(logits[blm.separator] > lp[best], END, best))  # one device sync per byte
        if b == END:
            break
        out.append(b)
        decoder.push(best.view(1))
    return bytes(out)


def exact_fill_and_nll(blm: ByteLM, cut: Cut, max_bytes: int) -> tuple[bytes, float]:
    """`byte_fill` and `byte_nll` of a ByteLM from one prefill of the prefix (the costly part)."""
    lp = blm.next_byte_logprobs(cut.prefix)
    at_prefix = blm.state()
    nll = 0.0
    for b in list(cut.middle) + [END]:
        nll -= float(lp[b])
        if b != END:
            blm.advance(b)
            lp = blm.distribution()
    blm.set_state(at_prefix)
    return byte_fill(blm, cut, max_bytes), nll


def summarize(method: str, cuts: list[Cut], fills: list[bytes], nlls: list[float], seconds: float) -> dict:
    n_bytes = sum(len(c.middle) + 1 for c in cuts)
    return {"method": method, "cuts": len(cuts),
            "exact_match": sum(f == c.middle for f, c in zip(fills, cuts, strict=True)) / len(cuts),
            "middle_bpb": sum(nlls) / (LN2 * n_bytes),
            "parse_rate": sum(parses(c.before + f + c.after) for f, c in zip(fills, cuts, strict=True)) / len(cuts),
            "seconds": seconds}
