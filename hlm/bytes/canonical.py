"""The locally canonical token model: canonicalized bits per byte at the cost of one canonical pass.

A token model q leaks some mass to next tokens that cannot occur in a canonical encoding. Masking
those tokens at every position and renormalising gives a proper model over canonical encodings
("locally canonical", Vieira et al. 2024, "Language Models over Canonical Byte-Pair Encodings"):

    q_c(t | E) = q(t | E) [t allowed after E] / Σ_u q(u | E) [u allowed after E]

Scoring the canonical encoding of a document (plus its end of text) under q_c gives
bpb_canonicalized. It is never above bpb_canon (every canonical token is allowed, so each term only
loses the leaked mass from its normaliser), and where the masks are exact (raw byte and
sentencepiece BPE) it equals bpb_conv (hlm/bytes/exact_eval.py) of the masked model q_c: a model
that leaks nothing has conv = canon (the per-byte conditionals telescope to the canonical probability).

"Allowed after E" is `ConversionRules.next_mask(last token of E, incomplete character E ends
with)`, the same validity the exact conversion uses (hlm/bytes/covers.py), plus the end of text
(the separator), which may follow any node:
- raw byte BPE: t is reachable (`encode(bytes(t)) == [t]`) and `encode(bytes(a) + bytes(t)) == [a, t]`
  for the last token a: exact (canonical encodings are closed under prefixes, and a pair decides
  validity; Phan et al. 2024).
- sentencepiece BPE: the same inside a whitespace pretoken; a token starting with a space after a
  token not ending in one starts a new pretoken (any reachable token). After an incomplete UTF-8
  character only the byte pieces that continue it (and do not complete a character that is a
  piece) are allowed; on a character boundary no continuation byte piece is. Exact.
- regex pretokenizers (GPT-2, cl100k): reachability only. Which pairs are canonical there depends
  on pretoken boundaries decided by lookahead, so no per-token table is exact; the mask keeps a
  superset of the canonical next tokens (the canonical token is never masked), so
  bpb_canonicalized lies between the exact locally canonical value and bpb_canon.
Special tokens other than the end of text, and model ids past the tokenizer's vocabulary, are
never allowed.

Masks are keyed like the exact pass's (`mask_key_code`): one row per distinct (last token,
incomplete character) of the scored stream, built once with `ConversionRules.invalid_table` and
kept on the device as packed bits (ceil(V/8) bytes a row: 2 MiB per 1,024 keys at V = 16,384, at
most 32 MiB for every last token of that vocabulary). Each batch unpacks only the rows of its
positions.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from hlm import LN2, HLMError
from hlm.bytes.covers import ConversionRules
from hlm.bytes.plan import mask_key, mask_key_code
from hlm.data import eval_windows
from hlm.models.blocks import at_least_fp32
from hlm.tokenizers import Tokenizer

_BITS = 1 << torch.arange(8, dtype=torch.uint8)
LEAK_THRESHOLD = 0.01  # positions leaking more than this are counted


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool [K, V] -> uint8 [K, ceil(V/8)] (bit j of byte i is column 8i + j)."""
    k, v = mask.shape
    padded = F.pad(mask, (0, -v % 8)).view(k, -1, 8).to(torch.uint8)
    return (padded * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, v: int, bits: torch.Tensor) -> torch.Tensor:
    """uint8 [..., ceil(V/8)] -> bool [..., V] (`bits`: `_BITS` on packed's device)."""
    return (packed[..., None] & bits).ne(0).flatten(-2)[..., :v]


class CanonicalMasks:
    """Invalid next tokens for every validity key of a stream, as packed bits on one device.

    `rows(codes)` gives the row of each key code; `packed[rows]` their masks, unpacked where they are used."""

    def __init__(self, tok: Tokenizer, end_id: int, codes: np.ndarray, device: torch.device | str = "cpu",
                 rules: ConversionRules | None = None, chunk: int = 1024):
        self.rules = rules or ConversionRules(tok)
        self.tok, self.end_id = tok, end_id
        self.codes = np.unique(codes)
        device = torch.device(device)
        perm = self.rules.index.perm.to(device)
        v = tok.vocab_size
        parts = []
        for c in range(0, len(self.codes), chunk):  # bounds the bool table: chunk x V
            keys = [mask_key(int(k)) for k in self.codes[c : c + chunk]]
            invalid = torch.ones(len(keys), v, dtype=torch.bool, device=device)  # specials: invalid
            invalid[:, perm] = self.rules.invalid_table(keys, device)
            invalid[:, end_id] = False
            parts.append(_pack(invalid))
        self.bits = _BITS.to(device)
        self.packed = torch.cat(parts) if parts else torch.zeros(0, -(-v // 8), dtype=torch.uint8, device=device)

    def rows(self, codes: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.codes, codes)


def stream_keys(ids: np.ndarray, tok: Tokenizer, end_id: int, rules: ConversionRules) -> np.ndarray:
    """The validity key code after every token of a stream of documents separated by `end_id`
    (after a separator: no last token, a character boundary). Only sentencepiece byte pieces can
    leave a character incomplete; only the whitespace rule looks at it."""
    rule = rules.rule
    last = np.where(ids == end_id, -1, ids).astype(np.int64)
    codes = np.where(last < 0, 0, (last + 1) << 32) if rule != "regex" else np.zeros(len(ids), dtype=np.int64)
    if rule != "whitespace":
        return codes
    byte_piece = np.zeros(tok.vocab_size + 1, dtype=bool)
    byte_piece[list(tok.byte_pieces.values())] = True
    partial = b""
    for i in np.flatnonzero(byte_piece[np.minimum(ids, tok.vocab_size)]).tolist():
        if i == 0 or not byte_piece[min(int(ids[i - 1]), tok.vocab_size)]:
            partial = b""  # a piece (or separator) before: the character started at this byte
        partial = _extend_char(partial, tok.token_bytes(int(ids[i])))
        if partial:
            codes[i] = mask_key_code(int(ids[i]), partial)
    return codes


def _extend_char(partial: bytes, b: bytes) -> bytes:
    """The incomplete UTF-8 character after appending byte b to one (b"" once it completes)."""
    lead = b[0]
    if partial and 0x80 <= lead < 0xC0:
        data = partial + b
    else:
        data = b
    need = _char_len(data[0])
    return data if 1 < need and len(data) < need else b""


def incomplete_char(data: bytes) -> bytes:
    """The trailing incomplete UTF-8 character of data (b"" when data ends on a character boundary)."""
    for k in (1, 2, 3):
        lead = data[-k:-k + 1] if k > 1 else data[-1:]
        if not lead:
            return b""
        if not 0x80 <= lead[0] < 0xC0:
            return data[-k:] if k < _char_len(lead[0]) else b""
    return b""


def _char_len(lead: int) -> int:
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1


def canonicalized_terms(logits: torch.Tensor, targets: torch.Tensor, invalid: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From next-token logits [N, V] (fp32 or fp64), their targets [N] and invalid masks [N, V]: canonical
    NLL, canonicalized NLL (target renormalised over the allowed tokens), leaked mass and whether the
    mask rejects the target, each [N]. Three passes over the logits (two logsumexps and the mask), no
    log-softmax. A rejected target (text the tokenizer's rules do not track) keeps its canonical NLL
    and counts no leak."""
    target = logits.gather(1, targets[:, None]).squeeze(1)
    log_total = logits.logsumexp(1)
    log_allowed = logits.masked_fill(invalid, float("-inf")).logsumexp(1)
    hit = invalid.gather(1, targets[:, None]).squeeze(1)
    log_allowed = torch.where(hit, log_total, log_allowed)
    return log_total - target, log_allowed - target, -torch.expm1(log_allowed - log_total), hit


def _chunk_sums(logits: torch.Tensor, targets: torch.Tensor, packed: torch.Tensor, bits: torch.Tensor,
                v: int) -> torch.Tensor:
    """float64 [5]: the sums of canonical NLL, canonicalized NLL, leaked mass, positions leaking more than
    LEAK_THRESHOLD and rejected targets over a chunk of next-token logits [N, n_logits] and their packed
    masks [N, ceil(V/8)]. On CUDA it runs compiled: the unpacking, the mask and both logsumexps fuse into
    one read of the logits instead of a pass each."""
    invalid = _unpack(packed, v, bits)
    if logits.size(1) > v:  # ids past the tokenizer's vocabulary (padding, FIM sentinels) are invalid
        invalid = F.pad(invalid, (0, logits.size(1) - v), value=True)
    canon, canz, leak, hit = canonicalized_terms(at_least_fp32(logits), targets, invalid)
    return torch.stack([canon.double().sum(), canz.double().sum(), leak.double().sum(),
                        (leak > LEAK_THRESHOLD).double().sum(), hit.double().sum()])


@torch.no_grad()
def canonicalized_stream(model: torch.nn.Module, ids: torch.Tensor, tok: Tokenizer, end_id: int,
                         token_nbytes: torch.Tensor, block: int, stride: int | None = None, batch_size: int = 8,
                         device: torch.device | str = "cpu", autocast=None, rules: ConversionRules | None = None,
                         chunk_rows: int = 4096) -> dict:
    """bpb_canon and bpb_canonicalized of a token GPT on a stream, in the windows of
    `hlm.evaluate.score_stream` (same ids, same windows: bpb_canon is its bpb), from one forward per
    batch; plus the leak statistics and the seconds of the pass (masks built before the clock)."""
    dev = torch.device(device)
    autocast = autocast or contextlib.nullcontext()
    chunk_sums = torch.compile(_chunk_sums, dynamic=True) if dev.type == "cuda" else _chunk_sums
    t0 = time.perf_counter()
    rules = rules or ConversionRules(tok)
    ids_np = ids.numpy()
    codes = stream_keys(ids_np, tok, end_id, rules)
    masks = CanonicalMasks(tok, end_id, codes, dev, rules)
    key_row = torch.from_numpy(masks.rows(codes)).to(dev)
    mask_seconds = time.perf_counter() - t0
    token_nbytes = token_nbytes.to(dev)
    ids_dev = ids.to(dev)
    groups: dict[tuple[int, int], list[int]] = {}
    for start, length, n_scored in eval_windows(len(ids), block, stride):
        groups.setdefault((length, n_scored), []).append(start)
    batches = [(length, n_scored, starts[i : i + batch_size])
               for (length, n_scored), starts in groups.items() for i in range(0, len(starts), batch_size)]
    if not batches:
        raise HLMError(f"canonicalized bpb needs at least 2 tokens to score, got {len(ids)}")

    def score(length: int, n_scored: int, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The five sums, the scored bytes and the scored tokens of one batch of windows."""
        first = torch.tensor(starts, device=dev)
        pos = first[:, None] + torch.arange(length, device=dev)
        x = ids_dev[pos]
        with autocast:
            logits = model.logits(x[:, :-1])[:, -n_scored:].flatten(0, 1)
        targets = x[:, -n_scored:].flatten()
        rows = key_row[pos[:, -n_scored - 1 : -1]].flatten()
        sums = sum(chunk_sums(logits[c : c + chunk_rows], targets[c : c + chunk_rows],
                              masks.packed[rows[c : c + chunk_rows]], masks.bits, masks.tok.vocab_size)
                   for c in range(0, len(targets), chunk_rows))
        return sums, token_nbytes[targets].double().sum(), len(targets)

    if dev.type == "cuda":  # compile for every batch shape before the clock (a shape met later recompiles)
        for shape in {(length, n_scored, len(starts)): (length, n_scored, starts)
                      for length, n_scored, starts in batches}.values():
            score(*shape)
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # canon, canonicalized, leak, > threshold, masked
    n_bytes = torch.zeros((), dtype=torch.float64, device=dev)
    n_tokens = 0
    for batch in batches:
        batch_sums, batch_bytes, batch_tokens = score(*batch)
        sums += batch_sums
        n_bytes += batch_bytes
        n_tokens += batch_tokens
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    canon, canz, leak, above, masked = sums.tolist()
    b = n_bytes.item()
    return {"bpb_canon": canon / (LN2 * b), "bpb_canonicalized": canz / (LN2 * b),
            "bpb_leak": (canon - canz) / (LN2 * b), "nll_canon": canon, "nll_canonicalized": canz,
            "mean_leak": leak / max(n_tokens, 1),
            "share_leak_above_1pct": above / max(n_tokens, 1), "masked_targets": int(masked),
            "ppl_token_canonicalized": math.exp(canz / max(n_tokens, 1)), "bytes": int(b), "tokens": n_tokens,
            "mask_keys": len(masks.codes), "mask_bytes": masks.packed.numel(), "mask_seconds": mask_seconds,
            "seconds": seconds}


def canonical_eval(model: torch.nn.Module, tok: Tokenizer, ids: torch.Tensor, end_id: int,
                   token_nbytes: torch.Tensor, block: int, stride: int | None = None, batch_size: int = 8,
                   device: torch.device | str = "cpu", autocast=None) -> dict:
    """`canonicalized_stream` and its cost: canonical scoring alone (`hlm.evaluate.score_stream`) is timed
    on the same ids and windows right before it, so `cost_vs_canonical` compares like with like (run it
    after a warm-up pass, as eval.py does)."""
    from hlm.evaluate import score_stream

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    score_stream(model, ids, token_nbytes, block, stride, batch_size, dev, autocast)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    canonical_seconds = time.perf_counter() - t0
    rules = ConversionRules(tok)
    res = canonicalized_stream(model, ids, tok, end_id, token_nbytes, block, stride, batch_size, dev, autocast,
                               rules)
    res |= {"canonical_seconds": canonical_seconds, "cost_vs_canonical": res["seconds"] / max(canonical_seconds, 1e-9)}
    open_end = open_end_correction(model, ids, tok, end_id, block, stride, autocast, rules)
    if open_end is not None:
        res["bpb_canon_open_end"] = (res["nll_canon"] - open_end) / (LN2 * res["bytes"])
    return res


def open_end_correction(model: torch.nn.Module, ids: torch.Tensor, tok: Tokenizer, end_id: int, block: int,
                        stride: int | None = None, autocast=None, rules: ConversionRules | None = None) -> float | None:
    """The split's last document has no end of text, so its canonical score conditions on a token boundary
    at its last byte. Scored as a prefix instead (hlm/bytes/cut.py), its log-probability rises by the
    returned amount (nats): log P(doc) - log Q(encode(doc)), from a pass over the stream's last window
    and one over the chains of covers at the end (its first positions dropped if they do not fit the
    context). None when the covers cannot be tracked."""
    from hlm import HLMError
    from hlm.bytes.cut import cut_logprobs

    ids_list = ids.tolist()
    if ids_list[-1] == end_id:
        return 0.0
    start = eval_windows(len(ids_list), block, stride)[-1][0]
    sep = len(ids_list) - 1 - ids_list[::-1].index(end_id)
    tokens = ids_list[sep + 1 :]
    text = tok.decode(tokens)
    if getattr(tok, "add_dummy_prefix", False):
        text = text[1:]
    try:
        res = cut_logprobs(model, rules or ConversionRules(tok), end_id, text, tokens, None,
                           ids_list[start:sep] if sep >= start else [], autocast, slide=True)
    except HLMError:
        return None
    return res["prefix"] - res["text"]
