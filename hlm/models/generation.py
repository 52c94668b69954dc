"""One generation loop for every family.

A family gives `new_decoder(prompt [B, T]) -> IncrementalDecoder`: an object whose `logits` [B, V]
predict each row's next id and whose `push(next_ids [B])` appends one id per row. `Generates`
turns that into `generate_stream` (ids one step at a time) and `generate` (bytes or tensors in and
out); sampling (temperature, top-k, greedy) is `sample_next`, the same for all. A family may also
give `new_static_decoder(prompt)`, the same decoder with fixed-shape steps that CUDA graphs replay
(hlm/models/parts/static_decoding.py), taken with `cuda_graphs=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hlm import HLMError


def decoding_attention():
    """SDPA backends for incremental decoding, where the key length grows by one every step:
    every backend but cuDNN, which builds an execution plan for each new shape (tens of ms on
    H100, more than the step itself)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class IncrementalDecoder(Protocol):
    """Decoding state of B rows: `logits` [B, V] for the next id of each row."""

    logits: torch.Tensor

    def push(self, nxt: torch.Tensor) -> None:
        """Append one id per row (nxt [B]) and update `logits`."""


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one id per row from logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_ids(model: torch.nn.Module, prompt: bytes | torch.Tensor,
                 stream: Callable[[torch.Tensor], Iterator[torch.Tensor]]) -> bytes | torch.Tensor:
    """`generate` around a `generate_stream` (`stream`): a `bytes` prompt gives the bytes of the
    continuation; a LongTensor [B, T] gives the prompt with the continuation appended."""
    as_bytes = isinstance(prompt, (bytes, bytearray))
    if len(prompt) == 0 or (not as_bytes and prompt.size(1) == 0):
        raise HLMError("generate needs a non-empty prompt (start with the separator byte 0x00)")
    ids = torch.tensor([list(prompt)], device=next(model.parameters()).device) if as_bytes else prompt
    new = list(stream(ids))
    out = torch.stack(new, dim=1) if new else ids[:, :0]
    return bytes(out[0].tolist()) if as_bytes else torch.cat([ids, out], dim=1)


class Generates:
    """Mixin for a model with `new_decoder(prompt)`: cached sampling through one loop."""

    def new_decoder(self, prompt: torch.Tensor) -> IncrementalDecoder:
        """A decoder holding `prompt` [B, T] (its last block_size ids) as context."""
        raise NotImplementedError

    def has_static_decoder(self) -> bool:
        """Whether `new_static_decoder` (decoding with `cuda_graphs=True`) works for this model."""
        return type(self).new_static_decoder is not Generates.new_static_decoder

    def new_static_decoder(self, prompt: torch.Tensor, graphs: bool = True) -> IncrementalDecoder:
        """`new_decoder` with fixed-shape steps, replayed as CUDA graphs on CUDA where `graphs`."""
        raise HLMError(f"{type(self).__name__} has no CUDA-graph decoder "
                       "(gpt, the hourglass and H-Net have one)")

    @torch.no_grad()
    def generate_stream(self, prompt: torch.Tensor, max_new: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        cuda_graphs: bool = False) -> Iterator[torch.Tensor]:
        """Yield one new id per row [B] at a time (call in eval mode). `cuda_graphs` decodes with the
        family's static decoder, in the model's own dtype (cast it to bf16 for speed)."""
        with decoding_attention():
            decoder = self.new_static_decoder(prompt) if cuda_graphs else self.new_decoder(prompt)
        for _ in range(max_new):
            nxt = sample_next(decoder.logits, temperature, top_k, generator)
            yield nxt
            with decoding_attention():
                decoder.push(nxt)

    @torch.no_grad()
    def generate(self, prompt: bytes | torch.Tensor, max_new: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 cuda_graphs: bool = False) -> bytes | torch.Tensor:
        """Continue `prompt` by `max_new` ids: bytes in, bytes of the continuation out; or a
        LongTensor [B, T] in, the prompt with the continuation appended out."""
        return generate_ids(self, prompt, lambda ids: self.generate_stream(ids, max_new, temperature, top_k,
                                                                           generator, cuda_graphs))
