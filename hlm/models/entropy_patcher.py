"""Entropy patching (Pagnoni et al. 2024, "Byte Latent Transformer: Patches Scale Better Than
Tokens"): a small frozen byte LM scores every position with the entropy of its next-byte
distribution, and a patch starts where that entropy is high.

Conventions (shared by the BLT model, data_prep/entropy_patches.py and the tests):
  H[t]  the entropy in nats of p(x_t | the `window` bytes before t), the entropy model run
        with a sliding window of its training context (rotary positions are relative, so any
        offset reads the same). Side files `<split>.<name>.bin` hold H as float16 for every
        byte of a split; position 0 of a stream has no context and copies H[1].
  s[t]  byte t starts a patch: t == 0, or H[t] > θ ("global"), or H[t] - H[t-1] > θ
        ("monotonic"), or the patch holding t-1 already has `max_len` bytes (0: no limit).
        H[t] depends on x_<t only, so whether byte t+1 starts a patch is known once x_t is.

Entropies are rounded to float16 wherever they are made (the side files store float16), so a
threshold compares the same numbers in training, evaluation and generation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hlm import HLMError
from hlm.models.blocks import KVCache, RMSNorm, Transformer, at_least_fp32

PATCHING_MODES = ("global", "monotonic")


class PatcherError(HLMError):
    """An entropy model or patching setting that cannot be used."""


class EntropyModel(nn.Module):
    """A byte GPT (the `gpt` family over 256 bytes) with the same parameter names, so a GPT
    checkpoint's weights load as they are, run with local attention over `window` positions."""

    def __init__(self, n_layer: int, n_head: int, d_model: int, window: int, max_len: int,
                 mlp_ratio: float = 4.0, rope_theta: float = 10000.0):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(256, d_model)
        self.transformer = Transformer(n_layer, d_model, n_head, max_len, mlp_ratio, rope_theta, window)
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)

    def entropies(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Entropy [B, T] (nats, float16 values in at least fp32) of the next-byte distribution
        after each byte of x [B, T]: entry t is H[t+1] of the module docstring."""
        logp = F.log_softmax(at_least_fp32(self.head(self.norm(self.transformer(self.embed(x), cache)))), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        return ent.half().to(ent.dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, length: int) -> EntropyModel:
        """The entropy model of an hlm byte GPT checkpoint, window = its training context, for
        sequences of up to `length` + window bytes."""
        from hlm.checkpoint import load_checkpoint, require_keys

        ckpt = load_checkpoint(path)
        require_keys(ckpt, path, ("model", "config"))
        m = ckpt["config"]["model"]
        if m.get("family", "gpt") != "gpt" or m.get("vocab_size") != 256:
            raise PatcherError(f"{path} is not a byte GPT checkpoint (family gpt, vocab_size 256)")
        model = cls(m["n_layer"], m["n_head"], m["d_model"], m["block_size"], length + m["block_size"],
                    m.get("mlp_ratio", 4.0),
                    m.get("rope_theta", 10000.0))
        model.load_gpt_state(ckpt["model"], path)
        return model

    def load_gpt_state(self, state: dict, path: str | Path) -> None:
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise PatcherError(f"{path} does not fit the entropy model: {str(e).splitlines()[0]}") from None


def patch_starts(entropy: torch.Tensor, mode: str, threshold: float, max_len: int = 0) -> torch.Tensor:
    """s [B, N] (bool) for entropies H [B, N] under the rules of the module docstring."""
    if mode == "global":
        start = entropy > threshold
    else:
        start = F.pad(entropy[:, 1:] - entropy[:, :-1] > threshold, (1, 0), value=True)
    start[:, 0] = True
    if max_len > 0:  # forced starts every max_len bytes after each entropy start
        t = torch.arange(entropy.size(1), device=entropy.device)
        last = torch.where(start, t, 0).cummax(dim=1).values
        start = start | ((t - last) % max_len == 0)
    return start


def next_start(h_next: torch.Tensor, h_prev: torch.Tensor, open_len: torch.Tensor, mode: str, threshold: float,
               max_len: int) -> torch.Tensor:
    """s for the next byte [B] (incremental `patch_starts`): its entropy, the previous one, and
    the length of the patch the last byte belongs to."""
    start = h_next > threshold if mode == "global" else h_next - h_prev > threshold
    if max_len > 0:
        start = start | (open_len >= max_len)
    return start


def mean_patch_size(entropy: np.ndarray, mode: str, threshold: float, max_len: int = 0) -> float:
    """Bytes per patch of one stream of entropies under a threshold."""
    if len(entropy) == 0:
        return float("nan")
    starts = patch_starts(torch.from_numpy(np.asarray(entropy, dtype=np.float32))[None], mode, threshold, max_len)
    return len(entropy) / int(starts.sum())


def calibrate_threshold(entropy: np.ndarray, target: float, mode: str, max_len: int = 0,
                        iterations: int = 60) -> tuple[float, float]:
    """θ whose mean patch size on `entropy` is closest to `target` bytes, by bisection (the size
    grows with θ); returns (θ, achieved size)."""
    if target < 1:
        raise PatcherError(f"target bytes per patch must be >= 1, got {target}")
    ent = np.asarray(entropy, dtype=np.float32)
    diffs = np.diff(ent) if mode == "monotonic" else ent
    lo, hi = float(diffs.min()) - 1.0, float(diffs.max()) + 1.0  # sizes 1 (every byte starts) and the most
    best = min(((lo, mean_patch_size(ent, mode, lo, max_len)), (hi, mean_patch_size(ent, mode, hi, max_len))),
               key=lambda r: abs(r[1] - target))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        size = mean_patch_size(ent, mode, mid, max_len)
        if abs(size - target) < abs(best[1] - target):
            best = (mid, size)
        if size < target:
            lo = mid
        else:
            hi = mid
    return best


@torch.no_grad()
def stream_entropies(model: EntropyModel, data: np.ndarray, batch_size: int, device: torch.device,
                     chunk: int = 4096) -> np.ndarray:
    """H[t] (float16) for every byte of a stream: chunks of `chunk` bytes, each scored with the
    window - 1 bytes before it as context, batched; on CUDA under bf16 autocast."""
    n, ctx = len(data), model.window - 1
    out = np.zeros(n, dtype=np.float16)
    starts = list(range(0, max(n - 1, 0), chunk))  # chunk [c, c + chunk) of predicting positions
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    full = [c for c in starts if c >= ctx and c + chunk <= n - 1]
    edges = [c for c in starts if not (c >= ctx and c + chunk <= n - 1)]
    for group in (full, edges):
        for i in range(0, len(group), batch_size if group is full else 1):
            batch = group[i : i + batch_size] if group is full else group[i : i + 1]
            rows = [data[max(0, c - ctx) : min(c + chunk, n - 1)].astype(np.int64) for c in batch]
            x = torch.from_numpy(np.stack(rows)).to(device)
            with autocast:
                ent = model.entropies(x).float().cpu().numpy()
            for row, c in zip(ent, batch, strict=True):
                scored = min(c + chunk, n - 1) - c
                out[c + 1 : c + 1 + scored] = row[-scored:]  # prediction after byte p is H[p + 1]
    if n > 1:
        out[0] = out[1]
    return out
