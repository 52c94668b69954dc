"""Patch-level training (Shao et al. 2024, arXiv 2407.12665) as the first phase of one run.

With `train.patch_size` K > 1 and `train.patch_fraction` λ > 0, optimizer steps
0 .. switch_step-1 run in patch mode and the rest in token mode, where
switch_step = round(λ * max_steps). As in the paper, every step consumes the same number of
tokens in both modes: a patch micro-batch holds batch_size/K windows of K*(block_size+1)
tokens (block_size+1 patches: block_size inputs, each scored against the K tokens of the
next patch), so the model sees sequences of its usual length and a patch step costs about
1/K of a token step. The token budget is max_steps * batch_size * grad_accum * world *
block_size targets, λ of it in patch mode, and training cost is λ/K + 1 - λ of a token-only
run (0.5 at K=4, λ=2/3).

The learning-rate schedule restarts at the switch, as in the paper, where the token phase is
a new run: each phase has the configured warmup and decay over its own steps. Unlike the
paper's new run, the AdamW moments carry over. The paper's two-run recipe itself is
`patch_fraction=1` and then a token run with `train.init_from` pointing at its checkpoint.

Everything depends on the step alone, so resume is exact in either phase: patch steps s
draw windows s of a patch-window sampler, token steps s draw windows s of the usual token
sampler, i.e. the token phase reads the same batches as steps switch_step.. of a token-only
run with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from hlm.config import ConfigError, TrainConfig
from hlm.models.base import LanguageModel


@dataclass(frozen=True)
class PatchPhases:
    patch_size: int  # K; 1 when patch training is off
    switch_step: int  # first optimizer step in token mode (0 when off)
    max_steps: int = 0  # train.max_steps: the token phase ends there

    @property
    def enabled(self) -> bool:
        return self.switch_step > 0

    def patch_size_at(self, step: int) -> int:
        """K for the optimizer step `step` (0-based) of the patch phase, 1 in token mode."""
        return self.patch_size if step < self.switch_step else 1

    def schedule_position(self, step: int) -> tuple[int, float]:
        """(step within its phase, progress through that phase): each phase has its own warmup
        and decay, as the paper's separate patch and token runs do."""
        if step < self.switch_step:
            return step, step / self.switch_step
        return step - self.switch_step, (step - self.switch_step) / max(1, self.max_steps - self.switch_step)


def patch_phases(tc: TrainConfig) -> PatchPhases:
    """The patch/token split of a run, checking the patch settings."""
    K, frac = tc.patch_size, tc.patch_fraction
    if K < 1:
        raise ConfigError(f"train.patch_size must be >= 1, got {K}")
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"train.patch_fraction must be in [0, 1], got {frac}")
    switch = round(frac * tc.max_steps) if K > 1 else 0
    if frac > 0 and K == 1:
        raise ConfigError("train.patch_fraction > 0 needs train.patch_size > 1")
    if switch == 0:
        return PatchPhases(1, 0)
    if tc.batch_size % K:
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must be a multiple of train.patch_size ({K}): "
                          f"a patch micro-batch holds batch_size/K windows of K times the length")
    if tc.time_budget_s > 0:
        raise ConfigError("train.time_budget_s cannot be combined with patch training: the switch to token mode "
                          "is defined by the token budget of train.max_steps")
    return PatchPhases(K, switch, tc.max_steps)


def check_patch_support(model: LanguageModel) -> None:
    """Patch training needs a family whose forward takes `patch_size` (`supports_patch_training`: gpt)."""
    if not model.supports_patch_training:
        raise ConfigError(f"train.patch_size > 1: {type(model).__name__} has no patch mode (use model.family gpt)")
