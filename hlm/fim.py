"""Fill-in-the-middle training data (Bavarian et al. 2022; Code Llama's SPM order).

A document d is cut at two uniform random points into prefix | middle | suffix and rearranged
with three sentinel ids that no text encodes to:

    PSM: <PRE> prefix <SUF> suffix <MID> middle        SPM: <PRE> <SUF> suffix <MID> prefix middle

The document separator that follows d in the stream stays after it, so the model learns to
end the middle with the separator (EOS in token corpora, 0x00 in byte corpora).

Sentinels are reserved ids just past the corpus vocabulary V: <PRE> = V, <SUF> = V+1,
<MID> = V+2 (bytes: 256..258, so model.vocab_size >= 259). The tokenizer and the corpus on
disk are unchanged: cuts fall on the corpus's own units, i.e. token boundaries for token
corpora. In SPM order prefix + middle is then the document's joint (canonical) tokenization,
so a prompt that ends inside a token is exactly the case that byte-level conversion handles.

The transform acts per training window (context-level FIM): each stretch between separators
is rearranged with probability `rate`, then the window is cut back to its length. Its random
draws come from a generator seeded by (seed, step, micro, rank), so a batch stays a pure
function of the step and resume stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hlm import HLMError

N_SENTINELS = 3
SENTINEL_NAMES = (b"<PRE>", b"<SUF>", b"<MID>")
_STREAM_TAG = 0xF1F  # keeps FIM draws apart from any other generator seeded with the same numbers


@dataclass(frozen=True)
class Sentinels:
    prefix: int
    suffix: int
    middle: int

    @classmethod
    def after(cls, vocab_size: int) -> Sentinels:
        """The reserved ids just past a corpus vocabulary of `vocab_size`."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)

    @property
    def ids(self) -> tuple[int, int, int]:
        return self.prefix, self.suffix, self.middle


def rearrange(doc: np.ndarray, lo: int, hi: int, s: Sentinels, spm: bool) -> np.ndarray:
    """doc[:lo] | doc[lo:hi] | doc[hi:] as prefix | middle | suffix, in SPM or PSM order."""
    prefix, middle, suffix = doc[:lo], doc[lo:hi], doc[hi:]
    pre, suf, mid = (np.array([i], dtype=doc.dtype) for i in s.ids)
    if spm:
        return np.concatenate([pre, suf, suffix, mid, prefix, middle])
    return np.concatenate([pre, prefix, suf, suffix, mid, middle])


def restore_psm(ids: np.ndarray | list[int], s: Sentinels) -> tuple[list[int], list[int], list[int]]:
    """(prefix, middle, suffix) of a PSM document: the inverse of `rearrange(..., spm=False)`."""
    ids = [int(i) for i in ids]
    if len(ids) < 3 or ids[0] != s.prefix or sum(i in s.ids for i in ids) != N_SENTINELS:
        raise HLMError("not a PSM document: expected <PRE> first and each sentinel once")
    i_suf, i_mid = ids.index(s.suffix), ids.index(s.middle)
    return ids[1:i_suf], ids[i_mid + 1 :], ids[i_suf + 1 : i_mid]


def restore_spm(ids: np.ndarray | list[int], s: Sentinels, prefix_len: int) -> tuple[list[int], list[int], list[int]]:
    """(prefix, middle, suffix) of an SPM document whose prefix has `prefix_len` ids (SPM does not mark
    where the prefix ends)."""
    ids = [int(i) for i in ids]
    if ids[:2] != [s.prefix, s.suffix] or ids.count(s.middle) != 1:
        raise HLMError("not an SPM document: expected <PRE> <SUF> ... <MID> ...")
    i_mid = ids.index(s.middle)
    after = ids[i_mid + 1 :]
    return after[:prefix_len], after[prefix_len:], ids[2:i_mid]


def fim_window(window: np.ndarray, separator: int, s: Sentinels, rng: np.random.Generator,
               rate: float, spm_rate: float) -> np.ndarray:
    """Rearrange each non-empty stretch between separators with probability `rate` (SPM with
    probability `spm_rate`, else PSM) and cut the result back to the window's length."""
    seps = np.flatnonzero(window == separator)
    bounds = np.concatenate([[-1], seps, [len(window)]])
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        doc = window[a + 1 : b]
        if len(doc) and rng.random() < rate:
            lo, hi = np.sort(rng.integers(0, len(doc) + 1, size=2))
            doc = rearrange(doc, int(lo), int(hi), s, bool(rng.random() < spm_rate))
        pieces.append(doc)
        if b < len(window):
            pieces.append(window[b : b + 1])
    return np.concatenate(pieces)[: len(window)]


class FIMTransform:
    """The training-batch FIM transform: windows [B, L] -> windows [B, L] with sentinels, as a pure
    function of (seed, step, micro, rank)."""

    def __init__(self, corpus_vocab: int, separator: int, rate: float, spm_rate: float, seed: int, rank: int):
        if not 0.0 <= rate <= 1.0 or not 0.0 <= spm_rate <= 1.0:
            raise HLMError(f"data.fim_rate and data.fim_spm_rate must be in [0, 1], got {rate} and {spm_rate}")
        self.sentinels = Sentinels.after(corpus_vocab)
        self.separator, self.rate, self.spm_rate = separator, rate, spm_rate
        self.seed, self.rank = seed, rank

    def __call__(self, x: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        rng = np.random.default_rng([_STREAM_TAG, self.seed, step, micro, self.rank])
        rows = x.numpy()
        out = np.stack([fim_window(row, self.separator, self.sentinels, rng, self.rate, self.spm_rate)
                        for row in rows])
        return torch.from_numpy(out)


def spm_prompt(prefix_ids: list[int], suffix_ids: list[int], s: Sentinels, start: int | None = None) -> list[int]:
    """The SPM inference prompt `[start] <PRE> <SUF> suffix <MID> prefix`; the model continues with
    the middle and ends it with the document separator."""
    head = [] if start is None else [start]
    return head + [s.prefix, s.suffix, *suffix_ids, s.middle, *prefix_ids]


def decode_with_sentinels(ids: list[int], decode, s: Sentinels) -> bytes:
    """Decode ids with `decode` (ids -> bytes), writing sentinels as <PRE>, <SUF>, <MID>."""
    names = dict(zip(s.ids, SENTINEL_NAMES, strict=True))
    out, run = bytearray(), []
    for i in [int(i) for i in ids] + [None]:
        if i is None or i in names:
            out += decode(run) if run else b""
            run = []
            if i is not None:
                out += names[i]
        else:
            run.append(i)
    return bytes(out)
