"""Bits per byte of a model on a byte stream (README: Bits per byte).

The bytes of a split are re-encoded with each model's own tokenizer (raw bytes for byte
models), so models with different vocabularies are scored on identical bytes. The stream
starts with one context-only document separator; every other position is scored once
(non-overlapping windows of the model's context) unless a stride is given.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from hlm import LN2
from hlm.data import DataError, Split, eval_windows
from hlm.tokenizers import Tokenizer


def split_documents(folder: str | Path, split: str) -> list[bytes]:
    """The raw documents of a prepared split (token splits are decoded back to bytes)."""
    s = Split(folder, split)
    data = s.memmap()
    sep = s.meta["separator_id"]
    if s.meta["kind"] == "bytes":
        return bytes(data).split(bytes([sep]))
    from hlm.tokenizers import load_tokenizer

    tok = load_tokenizer(Path(folder) / s.meta["tokenizer"])
    parts = np.split(np.asarray(data, dtype=np.int64), np.flatnonzero(np.asarray(data) == sep))
    return [tok.decode(part[1 if i else 0 :].tolist()) for i, part in enumerate(parts)]


def encode_stream(docs: list[bytes], tokenizer: Tokenizer | None, separator_id: int) -> torch.Tensor:
    """[separator] + doc0 + [separator] + doc1 ...: ids of the stream a model scores."""
    out = [separator_id]
    for i, doc in enumerate(docs):
        if i:
            out.append(separator_id)
        out.extend(tokenizer.encode(doc) if tokenizer is not None else doc)
    return torch.tensor(out, dtype=torch.int64)


@torch.no_grad()
def score_stream(model: torch.nn.Module, ids: torch.Tensor, token_nbytes: torch.Tensor, block: int,
                 stride: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu",
                 autocast=None) -> dict:
    """Sum of NLL (nats), bytes and tokens over every scored target of `ids`."""
    autocast = autocast or contextlib.nullcontext()
    windows = eval_windows(len(ids), block, stride)
    token_nbytes = token_nbytes.to(device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    # windows of equal length and scored count go through the model together
    groups: dict[tuple[int, int], list[int]] = {}
    for start, length, n_scored in windows:
        groups.setdefault((length, n_scored), []).append(start)
    for (length, n_scored), starts in groups.items():
        for i in range(0, len(starts), batch_size):
            x = torch.stack([ids[s : s + length] for s in starts[i : i + batch_size]]).to(device)
            with autocast:
                nll = model(x).nll[:, -n_scored:]
            nll_sum += nll.double().sum()
            byte_sum += token_nbytes[x[:, -n_scored:]].sum().double()
            n_tokens += nll.numel()
    return {"nll": nll_sum.item(), "bytes": int(byte_sum.item()), "tokens": n_tokens}


def inference_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast for scoring and sampling on CUDA, a no-op context elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model: torch.nn.Module, ids: torch.Tensor, token_nbytes: torch.Tensor, block: int,
             stride: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """Score a stream and report bpb, perplexity per token, bytes, seconds and bytes/s."""
    if len(ids) < 2:
        raise DataError("nothing to score: the text is empty")
    dev = torch.device(device)
    t0 = time.perf_counter()
    sums = score_stream(model, ids, token_nbytes, block, stride, batch_size, dev, inference_autocast(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return {"bpb": sums["nll"] / (LN2 * sums["bytes"]), "ppl_token": math.exp(sums["nll"] / sums["tokens"]),
            "bytes": sums["bytes"], "tokens": sums["tokens"], "seconds": seconds,
            "bytes_per_s": sums["bytes"] / seconds, "stride": stride or block}
