"""Reading prepared corpora (README: Data): memory-mapped `.bin` splits, their `meta.json`, the
bytes each token covers, and a stateless window sampler that makes resume exact and gives
every rank different data.

Document rule (written to meta.json by data_prep): documents are joined by one separator,
the byte 0x00 in byte corpora and the tokenizer's EOS id in token corpora. The separator
counts as one byte in every model's bits-per-byte denominator, so byte and token corpora
of one source have the same byte count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hlm import HLMError

SPLITS = ("train", "val", "test")


class DataError(HLMError):
    """A data folder or file that cannot be used; the message says which and why."""


DTYPES = ("uint8", "uint16", "uint32")


def read_meta(folder: str | Path) -> dict:
    """A corpus folder's meta.json, checked to hold what the readers of the folder rely on."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no meta.json in {folder}: prepare the corpus with data_prep/prepare.py first")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from None
    check_meta(meta, meta_path)
    return meta


def check_meta(meta: object, meta_path: Path) -> None:
    """Raise a DataError naming `meta_path` and the key if `meta` lacks what the readers use."""
    def bad(what: str) -> DataError:
        return DataError(f"{meta_path}: {what}; prepare the corpus again with data_prep/prepare.py")

    def natural(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not an object")
    for key in ("kind", "dtype", "vocab_size", "separator_id", "splits"):
        if key not in meta:
            raise bad(f"missing key '{key}'")
    if meta["kind"] not in ("bytes", "tokens"):
        raise bad(f"'kind' must be 'bytes' or 'tokens', got {meta['kind']!r}")
    if meta["dtype"] not in DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(DTYPES)}, got {meta['dtype']!r}")
    limit = np.iinfo(meta["dtype"]).max + 1
    if not natural(meta["vocab_size"]) or not 0 < meta["vocab_size"] <= limit:
        raise bad(f"'vocab_size' must be an integer in 1..{limit} for {meta['dtype']}, got {meta['vocab_size']!r}")
    if not natural(meta["separator_id"]) or meta["separator_id"] >= meta["vocab_size"]:
        raise bad(f"'separator_id' must be an id below vocab_size, got {meta['separator_id']!r}")
    if meta["kind"] == "tokens" and not isinstance(meta.get("tokenizer"), str):
        raise bad("a token corpus needs 'tokenizer' (the tokenizer file's name)")
    if not isinstance(meta["splits"], dict):
        raise bad(f"'splits' must be an object, got {meta['splits']!r}")
    for name, info in meta["splits"].items():
        if not isinstance(info, dict) or not natural(info.get("tokens")):
            raise bad(f"'splits.{name}.tokens' must be a count, got "
                      f"{info.get('tokens') if isinstance(info, dict) else info!r}")


def token_byte_lengths(meta: dict, folder: str | Path) -> np.ndarray:
    """Bytes covered by each id [V]: 1 for every byte id; for tokens, the token's bytes, and 1
    for the document separator (EOS)."""
    if meta["kind"] == "bytes":
        return np.ones(meta["vocab_size"], dtype=np.int64)
    from hlm.tokenizers import load_tokenizer

    tok = load_tokenizer(Path(folder) / meta["tokenizer"])
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    lengths[meta["separator_id"]] = 1
    return lengths


class Split:
    """One split of a prepared corpus, read through `numpy.memmap` (opened per read, which
    keeps resident memory flat on long runs)."""

    def __init__(self, folder: str | Path, name: str):
        self.folder = Path(folder)
        self.meta = read_meta(folder)
        if name not in self.meta["splits"]:
            raise DataError(f"split '{name}' not in {self.folder} (has: {', '.join(self.meta['splits'])})")
        self.name = name
        self.path = self.folder / f"{name}.bin"
        if not self.path.is_file():
            raise DataError(f"missing {self.path}")
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens = self.meta["splits"][name]["tokens"]
        expected, actual = self.n_tokens * self.dtype.itemsize, self.path.stat().st_size
        if actual != expected:
            raise DataError(f"{self.path} is {'truncated' if actual < expected else 'longer than meta.json says'}: "
                            f"{actual:,} bytes, expected {expected:,} ({self.n_tokens:,} {self.dtype} tokens); "
                            "prepare the corpus again")

    def memmap(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r")

    def side_path(self, stem: str) -> Path:
        """A per-token file aligned with this split (`<split>.<stem>.bin`): uint8 (e.g. boundary
        targets written by data_prep/boundaries.py) or float16 (e.g. entropies written by
        data_prep/entropy_patches.py), checked to have one entry per token."""
        path = self.folder / f"{self.name}.{stem}.bin"
        if not path.is_file():
            raise DataError(f"missing {path}: the model needs it (see data_prep/boundaries.py, "
                            "data_prep/entropy_patches.py)")
        if path.stat().st_size not in (self.n_tokens, 2 * self.n_tokens):
            raise DataError(f"{path} has {path.stat().st_size} bytes but {self.path} has {self.n_tokens} "
                            "tokens (one uint8 or float16 per token): prepare it again for this corpus")
        return path

    def windows(self, starts: np.ndarray, length: int, stem: str | None = None) -> torch.Tensor:
        """Token windows [len(starts), length] as int64; with `stem`, the same windows of the
        aligned side file `<split>.<stem>.bin` instead (int64 from uint8, float32 from float16)."""
        if stem:
            path = self.side_path(stem)
            # the type is told by the size: one byte (targets) or two (float16 entropies) per token
            float16 = path.stat().st_size == 2 * self.n_tokens != self.n_tokens
            data = np.memmap(path, dtype=np.float16 if float16 else np.uint8, mode="r")
            out = np.float32 if float16 else np.int64
        else:
            data, out = self.memmap(), np.int64
        return torch.from_numpy(np.stack([data[s : s + length].astype(out) for s in starts]))


class WindowSampler:
    """Random windows of `length` tokens without replacement within an epoch.

    The windows of optimizer step s, micro-step m on rank r are a pure function of
    (seed, s, m, r): a checkpoint needs only the step to resume the exact stream, and ranks
    take disjoint slots of each epoch's permutation.
    """

    def __init__(self, n_tokens: int, length: int, batch_size: int, grad_accum: int,
                 rank: int = 0, world: int = 1, seed: int = 0):
        stride = length - 1
        self.n_windows = (n_tokens - 1) // stride - 1
        if self.n_windows < 1:
            raise DataError(f"corpus too short: {n_tokens} tokens, need at least {2 * stride + 1} "
                            f"for windows of {length}")
        self.length, self.stride = length, stride
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world, self.seed = rank, world, seed
        self._epoch, self._perm, self._shift = -1, None, 0

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._epoch:
            g = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm, self._shift = epoch, g.permutation(self.n_windows), int(g.integers(self.stride))
        return self._perm, self._shift

    def starts(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, g in enumerate(range(first, first + self.batch_size)):
            perm, shift = self._epoch_order(g // self.n_windows)
            out[j] = shift + perm[g % self.n_windows] * self.stride
        return out


def eval_windows(n_tokens: int, block: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows covering a stream of `n_tokens` (which starts with one context-only separator)
    so that every target 1..n_tokens-1 is scored exactly once.

    Returns (start, length, n_scored): the window is tokens [start, start+length) and its last
    `n_scored` targets count. Without `stride` windows do not overlap; with it, each window
    after the first scores only its last `stride` targets and sees `block - stride` of context.
    """
    stride = stride or block
    if not 0 < stride <= block:
        raise DataError(f"stride must be in 1..{block}, got {stride}")
    out, scored = [], 0  # `scored`: targets 1..scored are done
    n_targets = n_tokens - 1
    while scored < n_targets:
        new = min(stride if scored else block, n_targets - scored)
        end = scored + new + 1  # exclusive token end
        start = max(0, end - block - 1)
        out.append((start, end - start, new))
        scored += new
    return out
