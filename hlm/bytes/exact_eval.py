"""Exact bits per byte of a token model in one batched tree pass (Phan et al. 2024).

In teacher-forced evaluation the whole text is known, so every exact node the byte-by-byte
recursion would query is known before the model runs. Three steps, one module each:

  plan.py    the nodes and next-byte terms of every document, without a model (worker processes;
             sentencepiece documents cut at pretoken boundaries, each distinct segment planned once);
  layout.py  all nodes as flat arrays, cut into windows of the model's context (trunk tokens plus the
             off-trunk nodes hanging from them, position = depth) and packed into rows with a `TreeMask`;
  score.py   one forward per batch of windows through `GPT.logits(ids, attn_mask=TreeMask(...),
             positions=...)`; every next-byte term a range sum over the sorted vocabulary, combined per
             byte with a scatter logsumexp.

The same pass gives the canonical token NLL on the same windows, so bpb_canon and bpb_conv differ only
by the conversion. Each document is scored from the start symbol with its end of text (counted as one
byte, like the separator of canonical eval). Windows of a long document are non-overlapping stretches
of the trunk; a node sees only its window. `exact_bpb` also reports where its time went, through a
`PhaseClock` it passes to the passes as their optional timer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from hlm import LN2
from hlm.bytes.covers import ConversionRules
from hlm.bytes.layout import Flat
from hlm.bytes.plan import plan_documents
from hlm.bytes.score import combine, next_byte_distributions, tree_pass, trunk_pass
from hlm.tokenizers import Tokenizer

PHASES = ("rules", "planning", "flattening", "masks", "windows", "packing")  # host phases of exact_bpb


class PhaseClock:
    """A `timer` for the passes: wall seconds summed per phase, except "forward" (the model's forward
    passes), which is timed in device time by CUDA events on a GPU (no sync until `forward_seconds`)."""

    def __init__(self, device: str | torch.device, phases: tuple[str, ...] = ()):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(phases, 0.0)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase == "forward" and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def forward_seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.seconds.get("forward", 0.0)

    def host_seconds(self) -> dict[str, float]:
        return {k: v for k, v in self.seconds.items() if k != "forward"}


@torch.no_grad()
def exact_bpb(model: torch.nn.Module, tok: Tokenizer, docs: list[bytes], start_id: int,
              device: str | torch.device = "cpu", batch_size: int = 8, chunk_rows: int | None = None,
              autocast: contextlib.AbstractContextManager | None = None, workers: int = 1,
              segment: bool = True, time_canonical: bool = False) -> dict:
    """bpb_canon, bpb_conv (and their gap) of an hlm token GPT on documents; documents that do not
    round-trip through the tokenizer, or whose covers cannot be tracked, are skipped and counted.
    Timing: `seconds`, `seconds_split` by phase, `forward_seconds` (device time of the forwards).
    `time_canonical`: also run canonical scoring alone on the same windows (`canonical_seconds`,
    `canonical_forward_seconds`, and its `bpb_canon_trunk`, equal to bpb_canon up to rounding)."""
    clock = PhaseClock(device, PHASES)
    t0 = time.perf_counter()
    with clock("rules"):
        rules = ConversionRules(tok)
    info: dict = {"planning": {}}
    with clock("planning"):
        plans, kept = plan_documents(docs, rules, start_id, workers, segment, stats=info["planning"])
    with clock("flattening"):
        flat = Flat(plans)
    scores = tree_pass(model, rules, flat, device, batch_size, chunk_rows, autocast, timer=clock)
    seconds = time.perf_counter() - t0
    totals, per_doc = combine(plans, flat, scores, len(docs) - len(kept))
    split = clock.host_seconds()
    info.update(forward_seconds=clock.forward_seconds(), windows=scores.windows,
                batches=-(-scores.windows // batch_size))
    if time_canonical:
        trunk_clock, t1 = PhaseClock(device), time.perf_counter()
        nll = trunk_pass(model, flat, tok.eos_id, device, batch_size, autocast, timer=trunk_clock)
        info.update(canonical_seconds=time.perf_counter() - t1,
                    canonical_forward_seconds=trunk_clock.forward_seconds(),
                    bpb_canon_trunk=nll / (LN2 * max(flat.n_pos, 1)))
    split["model_and_scoring"] = seconds - sum(split.values())
    return {**totals, "seconds": seconds, "seconds_split": split, "bytes_per_s": totals["bytes"] / max(seconds, 1e-9),
            "per_doc": per_doc} | info


@torch.no_grad()
def exact_prefix_logprobs(model: torch.nn.Module, tok: Tokenizer, docs: list[bytes], start_id: int,
                          device: str | torch.device = "cpu", batch_size: int = 8, chunk_rows: int | None = None,
                          autocast: contextlib.AbstractContextManager | None = None,
                          workers: int = 1) -> list[torch.Tensor | None]:
    """For each document, the full next-byte distributions [len+1, 257] after each of its prefixes (what
    `ByteLM.prefix_logprobs` gives byte by byte), from one batched tree pass; None for documents that do
    not round-trip or cannot be tracked. Memory grows with 256 values per cover and byte: meant for
    ensembles on modest text."""
    rules = ConversionRules(tok)
    plans, keep = plan_documents(docs, rules, start_id, workers)
    flat = Flat(plans)
    scores = next_byte_distributions(flat, tree_pass(model, rules, flat, device, batch_size, chunk_rows, autocast,
                                                     full=True))
    out: list[torch.Tensor | None] = [None] * len(docs)
    start = 0
    for d, plan in zip(keep, plans, strict=True):
        out[d] = scores[start : start + plan.n_bytes + 1]
        start += plan.n_bytes + 1
    return out
