"""Data parallelism for the training loop, kept out of the model code (torchtitan-style).

`train.parallel: ddp` (default): every rank holds the whole model and optimizer; gradients
are all-reduced. `train.parallel: fsdp`: FSDP2 (`fully_shard`) shards parameters, gradients
and optimizer state over the ranks; each transformer block (`blocks.Block`, used by every
model family) is its own unit, gathered just before its forward and backward, and the root
holds the rest (embeddings, head, norms, pooling parameters). Checkpoints are the same file
either way: full state dicts (optimizer keyed by parameter index, as `Optimizer.state_dict()`),
so eval.py, sample.py and a resume under the other mode all read them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from hlm import ConfigError

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def apply_fsdp(model: nn.Module, world: int, device_type: str, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place over a 1-D mesh of `world` ranks: each module of a type the model names
    (`shard_modules()`: transformer blocks by default), then the root.

    `param_dtype` (bf16 on GPU) is the dtype parameters are gathered in for compute; gradients
    are reduced in fp32 and the sharded master weights stay fp32. Forward inputs are not cast,
    so fp32 buffers such as the rotary tables reach the blocks unchanged."""
    mesh = init_device_mesh(device_type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    shard_types = model.shard_modules()
    for module in model.modules():
        if isinstance(module, shard_types):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only if `sync` (gradient accumulation).

    DDP: `no_sync`. FSDP2: skip the reduce-scatter (unsharded gradients accumulate locally) and
    keep the gathered parameters after backward, so the next micro-step's forward needs no
    all-gather; both are switched back on for the last micro-step."""
    fsdp = getattr(model, "_orig_mod", model)  # through a torch.compile wrapper
    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
        return
    if isinstance(fsdp, FSDPModule):
        fsdp.set_requires_gradient_sync(sync)
        fsdp.set_reshard_after_backward(sync)
    yield


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for plain or DTensor (FSDP2) gradients; returns the global norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `t` over the ranks in place (nothing to do for one process); returns it."""
    if world > 1:
        dist.all_reduce(t)
    return t


def from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank (a collective)."""
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.item()


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in `state_dict()` index order."""
    name_of = {p: n for n, p in model.named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def full_model_state_dict(model: nn.Module) -> dict:
    """The model's state dict in the plain single-process format; under FSDP2 a collective (call it on
    every rank): rank 0 gets full tensors on CPU, the others an empty dict."""
    return get_model_state_dict(model, options=FULL_ON_RANK0) if is_sharded(model) else model.state_dict()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts in the plain single-process format. Under FSDP2 this is a
    collective (call it on every rank): rank 0 gets full tensors on CPU, the others empty dicts."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    model_state = get_model_state_dict(model, options=FULL_ON_RANK0)
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not by_name:
        return model_state, {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return model_state, {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (index-keyed, as saved by `full_state_dicts`) on every rank."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _parameter_names(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


@dataclass
class Runtime:
    """This process's device and place among the ranks."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str) -> Runtime:
    """Pick the device and join the process group when launched by torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if "RANK" not in os.environ:
        return Runtime(torch.device(device))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Runtime(torch.device("cuda", local_rank), rank, local_rank, world)
    dist.init_process_group("gloo")
    return Runtime(torch.device("cpu"), rank, local_rank, world)
