"""FLOPs and MFU: the counted FLOPs of a training step and the peak they are divided by."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 datasheet peak of the GPU, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("B200", 2.25e15)):
        if key in name:
            return flops
    return None


def count_flops(model: torch.nn.Module, batch: torch.Tensor, autocast: contextlib.AbstractContextManager,
                **forward_kwargs) -> int:
    """Model FLOPs of one forward+backward on `batch`, counted by FlopCounterMode (matmuls and
    attention; attention is counted as full, not halved for the causal mask). Counted on the
    first row and scaled by the rows (FLOPs are linear in the batch), so the probe's activations
    stay small for a model that is still unsharded here."""
    rows = batch.size(0)
    one = {k: v[:1] if torch.is_tensor(v) else v for k, v in forward_kwargs.items()}
    with FlopCounterMode(display=False) as counter:
        with autocast:
            out = model(batch[:1], **one)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * rows
