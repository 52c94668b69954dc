"""The model contract: what every family provides, and all the rest of hlm relies on.

A family is one file with a config dataclass (`family: str` naming it, `vocab_size`, `block_size`,
and `describe() -> str` for eval.py's model column) and a `LanguageModel` subclass, registered with
`hlm.models.register_family`. The trainer, eval.py, sample.py, bench.py, FSDP wrapping and
`hlm.bytes.as_byte_lm` then work unchanged; nothing outside the family's file reads its attributes.

    forward(idx [B, T+1], **side_inputs) -> ModelOutput(loss, nll [B, T], metrics)
        `loss` is what training backpropagates (auxiliary terms included); `nll` is nats per
        target without them, and causal in eval mode: nll[:, t] depends on idx[:, :t+2] only.
    next_logprobs(idx [B, T]) -> [B, T, V]     the next id's log-probabilities after each position
    new_decoder(prompt [B, T]) -> IncrementalDecoder   cached decoding (hlm/models/generation.py);
        `generate_stream` and `generate` come from it
Optional on the config: `fill_from_data(data_path)`, called by the trainer before the model is built,
for settings the data folder decides (BLT: θ calibrated for a target patch size); the run's config
and checkpoint keep what it set.
Optional on the model, with defaults here:
    side_inputs          {forward keyword: file stem}: per-token files the trainer reads beside each
                         split (`<split>.<stem>.bin`) and passes to forward in training
    shard_modules()      the module types FSDP2 shards one by one before the root
    param_groups_lr_scale()  [(learning-rate multiplier, parameters)] (H-Net's stages)
    frozen_flops_per_token()  forward FLOPs per token of a frozen helper model (BLT's entropy patcher)
    extra_train_flops(tokens_per_step)  FLOPs of a frozen helper model run outside forward (BLT's
                         entropy patcher with precomputed entropies), counted toward FLOP budgets
    supports_patch_training  True where forward also takes `patch_size` (patch-level training, gpt)
    new_static_decoder(prompt, graphs)  `new_decoder` with fixed-shape steps that CUDA graphs replay
                         (hlm/models/parts/static_decoding.py; `generate(..., cuda_graphs=True)`), with
                         `has_static_decoder()` true (gpt, the hourglass, H-Net)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from hlm.models.generation import Generates


class ModelOutput(NamedTuple):
    """What every model returns: `loss` to backpropagate, `nll[B, T]` in nats per target without
    auxiliary terms, and scalar tensors to log (`metrics`)."""

    loss: torch.Tensor
    nll: torch.Tensor
    metrics: dict[str, torch.Tensor]


class LanguageModel(nn.Module, Generates):
    """Base class of every family (see the module docstring for the contract)."""

    supports_patch_training: bool = False

    def forward(self, idx: torch.Tensor, **side_inputs: torch.Tensor) -> ModelOutput:
        """idx [B, T+1] -> ModelOutput(loss, nll [B, T] without auxiliary terms, metrics)."""
        raise NotImplementedError

    def next_logprobs(self, idx: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T, V] of the next id after each position of idx [B, T]."""
        raise NotImplementedError

    @property
    def side_inputs(self) -> dict[str, str]:
        """{forward keyword: file stem} of per-token files the trainer passes in training."""
        return {}

    def shard_modules(self) -> tuple[type[nn.Module], ...]:
        """Module types FSDP2 shards one by one before the root."""
        from hlm.models.blocks import Block

        return (Block,)

    def param_groups_lr_scale(self) -> list[tuple[float, list[nn.Parameter]]]:
        """[(learning-rate multiplier, parameters)]: one part at 1.0 unless a family splits them."""
        return [(1.0, list(self.parameters()))]

    def frozen_flops_per_token(self) -> float:
        """Forward FLOPs per token of a frozen helper model the family runs (BLT's entropy patcher)."""
        return 0.0

    def extra_train_flops(self, tokens_per_step: int) -> int:
        """FLOPs per training step of a frozen helper model run outside forward."""
        return 0
