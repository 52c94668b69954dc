"""What a run trains on and validates on: `Batches.train(step, micro) -> (idx, kwargs)`.

One object hides every kind of training batch: token windows; in the patch phase
(hlm/patch.py) batch_size/K windows of K times the length, with `patch_size=K` for forward;
FIM-rearranged windows (hlm/fim.py); and the model's side files (`model.side_inputs`, e.g.
hourglass boundary targets or BLT entropies) cut at the same windows, as forward keywords.
A batch is a pure function of (seed, step, micro, rank) (data.WindowSampler,
fim.FIMTransform), so a resume reads exactly the batches an uninterrupted run reads and
ranks read disjoint windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hlm.config import Config, ConfigError
from hlm.data import DataError, Split, WindowSampler, token_byte_lengths
from hlm.fim import N_SENTINELS, FIMTransform
from hlm.models.base import LanguageModel
from hlm.parallel import Runtime
from hlm.patch import check_patch_support, patch_phases


def fim_transform(cfg: Config, meta: dict, rank: int) -> FIMTransform | None:
    """The FIM batch transform when data.fim_rate > 0 (sentinels just past the corpus vocabulary)."""
    if cfg.data.fim_rate <= 0:
        return None
    need = meta["vocab_size"] + N_SENTINELS
    if getattr(cfg.model, "vocab_size", 256) < need:
        raise ConfigError(f"data.fim_rate > 0 needs model.vocab_size >= {need} (corpus vocabulary "
                          f"{meta['vocab_size']} + {N_SENTINELS} FIM sentinels)")
    return FIMTransform(meta["vocab_size"], meta["separator_id"], cfg.data.fim_rate, cfg.data.fim_spm_rate,
                        cfg.train.seed, rank)


class Batches:
    """The train and val batches of a run on this rank. The corpus and the FIM and patch settings
    are checked when it is made, before the model is built; `use_model` then checks what the
    model's forward needs (its side files, its patch mode)."""

    def __init__(self, cfg: Config, rt: Runtime):
        tc = cfg.train
        self.cfg, self.rt = cfg, rt
        self.data_dir = Path(cfg.data.path)
        self.train_split = Split(self.data_dir, "train")
        self.val_split = Split(self.data_dir, "val")
        self.meta = self.train_split.meta
        if self.meta["vocab_size"] > getattr(cfg.model, "vocab_size", 256):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the corpus vocabulary "
                              f"({self.meta['vocab_size']}) in {self.data_dir}")
        token_nbytes = token_byte_lengths(self.meta, self.data_dir)
        self.fim = fim_transform(cfg, self.meta, rt.rank)
        if self.fim is not None:  # sentinels cover no bytes of text
            token_nbytes = np.concatenate([token_nbytes, np.zeros(N_SENTINELS, dtype=token_nbytes.dtype)])
        self.token_nbytes = torch.from_numpy(token_nbytes).to(rt.device)  # bytes covered by each id
        self.window = cfg.model.block_size + 1
        if self.val_split.n_tokens < self.window:  # fail now, not at the first validation
            raise DataError(f"val split too short: {self.val_split.n_tokens} tokens, need {self.window}")
        self.phases = patch_phases(tc)
        self.samplers = {1: WindowSampler(self.train_split.n_tokens, self.window, tc.batch_size, tc.grad_accum,
                                          rt.rank, rt.world, tc.seed)}  # by patch size
        if self.phases.enabled:
            K = self.phases.patch_size
            self.samplers[K] = WindowSampler(self.train_split.n_tokens, K * self.window, tc.batch_size // K,
                                             tc.grad_accum, rt.rank, rt.world, tc.seed)
        self.tokens_per_step = tc.batch_size * self.window * tc.grad_accum * rt.world  # all ranks, token mode
        self.side_inputs: dict[str, str] = {}  # forward keyword -> side file stem

    def use_model(self, model: LanguageModel) -> None:
        """Read the side files `model` trains on (checked to exist and fit the corpus) and check
        that it has a patch mode when the run has a patch phase."""
        self.side_inputs = model.side_inputs
        for stem in self.side_inputs.values():
            self.train_split.side_path(stem)
        if self.side_inputs and self.fim is not None:
            raise ConfigError("data.fim_rate > 0 moves tokens around, which the model's side inputs "
                              f"({', '.join(self.side_inputs)}) cannot follow")
        if self.phases.enabled:
            check_patch_support(model)

    def train(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """Micro-batch `micro` of optimizer step `step`: (idx, forward keyword arguments)."""
        return self.at_patch_size(step, micro, self.phases.patch_size_at(step))

    def at_patch_size(self, step: int, micro: int, patch_size: int) -> tuple[torch.Tensor, dict]:
        """The batch of (step, micro) in patch mode `patch_size` (1: token mode), whatever the phase."""
        sampler = self.samplers[patch_size]
        starts = sampler.starts(step, micro)
        idx = self.train_split.windows(starts, sampler.length)
        if self.fim is not None:
            idx = self.fim(idx, step, micro)
        if patch_size > 1:
            return self._to_device(idx), {"patch_size": patch_size}
        side = {key: self.train_split.windows(starts, sampler.length, stem) for key, stem in self.side_inputs.items()}
        return self._to_device(idx), {key: self._to_device(t) for key, t in side.items()}

    def val(self) -> Iterator[tuple[torch.Tensor, float]]:
        """(idx, weight) batches of the first `eval.batches` x batch windows of val, laid end to end
        (the same windows every time), split across ranks. Every rank gets the same number of
        batches (FSDP gathers parameters collectively): a rank out of windows gets one window at
        weight 0."""
        ec, rank, world = self.cfg.eval, self.rt.rank, self.rt.world
        bs = ec.batch_size or self.cfg.train.batch_size
        stride = self.window - 1
        n_windows = (self.val_split.n_tokens - 1) // stride
        every_start = np.arange(min(n_windows, ec.batches * bs)) * stride
        starts = every_start[rank::world]
        n_batches = -(-len(every_start[::world]) // bs)  # rank 0 has the most windows
        for i in range(n_batches):
            chunk, weight = (starts[i * bs : (i + 1) * bs], 1.0) if i * bs < len(starts) else (every_start[:1], 0.0)
            yield self.val_split.windows(chunk, self.window).to(self.rt.device), weight

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.device.type == "cuda":
            return t.pin_memory().to(self.rt.device, non_blocking=True)
        return t
