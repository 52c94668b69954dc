"""Non-finite training (README: Safety): a NaN or inf loss or gradient norm stops the run with
one line naming the step, or with `train.max_bad_steps` > 0 drops up to that many steps' updates
first; non-finite weights are never saved, so the last good checkpoint stays.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hlm import HLMError
from hlm.parallel import Runtime, all_sum

NO_BAD_STEP = 2**62  # `FiniteGuard._first_bad` before any non-finite step


class NonFiniteError(HLMError):
    """Training produced a non-finite loss, gradient norm or weight: the run stops, nothing is saved."""


class FiniteGuard:
    """Watches every step's loss and gradient norm, and the state before each checkpoint."""

    def __init__(self, max_bad_steps: int, ckpt_path: Path, rt: Runtime):
        self.max_bad_steps, self.ckpt_path, self.rt = max_bad_steps, ckpt_path, rt
        self.bad_steps = 0  # non-finite steps skipped so far (a checkpoint holds it)
        self._first_bad = torch.tensor(NO_BAD_STEP, device=rt.device)  # first non-finite step not yet reported

    def step_finite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """Whether step `step` (1-based) has a finite loss and gradient norm. With max_bad_steps > 0
        that is decided now (one host sync per step, the same on every rank); with 0 the first bad
        step is only noted on the device and reported by `check_steps`."""
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if self.max_bad_steps == 0:
            self._first_bad = torch.minimum(self._first_bad, torch.where(bad, step, NO_BAD_STEP))
            return True
        return all_sum(bad.double(), self.rt.world).item() == 0

    def skip(self, step: int) -> dict:
        """Count the skipped step `step`; stop past max_bad_steps, else return its `skip` record."""
        self.bad_steps += 1
        limit = self.max_bad_steps
        if self.bad_steps > limit:
            raise NonFiniteError(f"non-finite loss or gradient norm at step {step}, bad step {self.bad_steps} "
                                 f"of at most train.max_bad_steps={limit}: training stopped, {self.kept()}")
        if self.rt.master:
            print(f"step {step}: non-finite loss or gradient norm, update skipped "
                  f"({self.bad_steps} of train.max_bad_steps={limit})", flush=True)
        return {"kind": "skip", "step": step, "bad_steps": self.bad_steps}

    def check_steps(self) -> None:
        """Stop at the first non-finite step (max_bad_steps=0): called before every log,
        validation and checkpoint."""
        first = self._first_bad.clone()
        if self.rt.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if (step := int(first.item())) != NO_BAD_STEP:
            raise NonFiniteError(f"non-finite loss or gradient norm at step {step}: training stopped, {self.kept()} "
                                 "(lower train.lr, or let train.max_bad_steps skip such steps)")

    def check_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Never save non-finite weights: every parameter and optimizer tensor (this rank's shard)
        is checked before a checkpoint."""
        tensors = [*model.parameters(),
                   *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        n_bad = torch.stack([(~torch.isfinite(t.detach())).sum().to(self.rt.device, torch.float64) for t in local])
        if all_sum(n_bad.sum(), self.rt.world).item() > 0:
            raise NonFiniteError(f"non-finite weights or optimizer state after step {step}: training stopped, "
                                 f"{self.kept()} (lower train.lr)")

    def kept(self) -> str:
        return f"{self.ckpt_path} not overwritten" if self.ckpt_path.is_file() else "no checkpoint written"
