"""Checkpoints: atomic writes, `weights_only` loads, and rebuilding a model from one file.

A checkpoint holds the model weights, the optimizer, the step, the resolved config, RNG
states, training time, the corpus meta, the bytes covered by each id, and (for token
models) the tokenizer file itself, so eval.py and sample.py need nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from hlm import HLMError, pid_alive
from hlm.config import Config, ConfigError, config_from_dict
from hlm.models import build_model
from hlm.tokenizers import SentencePieceTokenizer


class CheckpointError(HLMError):
    """A checkpoint that is missing, unreadable or does not fit the model asked for."""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object] | bytes) -> None:
    """Write `path` whole or not at all: into a temporary file beside it (bytes, or a function that
    writes to the open file), synced, then renamed over it. A crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # TEMP_NAME: a kill leaves it behind
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)")  # write_atomic's temporary file


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files of `write_atomic` in `folder` whose writer is gone (killed
    mid-write, e.g. during a checkpoint); a live process's file and anything else stay."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        match = TEMP_NAME.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink() and not pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save, atomically (`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """`mmap=True` (CPU only) maps the file instead of reading it: ranks of one host share its pages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a user's file: torch.load raises many types for foreign or damaged files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint file, or a damaged one "
                              f"({type(e).__name__}: {detail})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an hlm checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


# the type each entry of an hlm checkpoint must have where a caller reads it
ENTRY_TYPES = {"model": dict, "config": dict, "data_meta": dict, "token_nbytes": torch.Tensor, "optimizer": dict,
               "step": int, "rng": dict}


def require_keys(ckpt: dict, path: str | Path, keys: tuple[str, ...]) -> None:
    """Raise a one-line CheckpointError when a checkpoint lacks entries the caller reads, or holds
    them with the wrong type."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an hlm checkpoint (no {', '.join(missing)} entries)")
    for key in keys:
        want = ENTRY_TYPES.get(key)
        if want is not None and not isinstance(ckpt[key], want):
            raise CheckpointError(f"{path} is not an hlm checkpoint (entry '{key}' is a {type(ckpt[key]).__name__}, "
                                  f"not a {want.__name__})")
    if "data_meta" in keys and "separator_id" not in ckpt["data_meta"]:
        raise CheckpointError(f"{path} is not an hlm checkpoint (data_meta has no separator_id)")


def check_same_model(saved: dict, current: dict, path: str | Path) -> None:
    """Raise if the model config saved in a checkpoint differs from the current one. A key the
    checkpoint predates counts as its default (as when `load_model` rebuilds the saved config)."""
    from hlm.models import model_config_class

    family = current.get("family", "gpt")
    if saved.get("family", "gpt") == family:
        saved = {**dataclasses.asdict(model_config_class(family)()), **saved}
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in diff)
        raise CheckpointError(f"checkpoint {path} was trained with a different model ({details})")


def load_state(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong shapes or names; entries that are not tensors
        details = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckpointError(f"checkpoint {path} does not fit the model: {details[:300]}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild the model of a checkpoint in eval mode; returns (model, config, checkpoint)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise HLMError(f"device {device}: no CUDA device is available here (use --device cpu)")
    ckpt = load_checkpoint(path)
    require_keys(ckpt, path, ("model", "config", "data_meta", "token_nbytes"))
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: saved config is not valid here: {e}") from None
    model = build_model(cfg.model)
    load_state(model, ckpt["model"], path)
    return model.to(device).eval(), cfg, ckpt


def tokenizer_from_checkpoint(ckpt: dict) -> SentencePieceTokenizer | None:
    """The tokenizer stored in a token model's checkpoint, or None for byte models."""
    blob = ckpt.get("tokenizer")
    if blob is None:
        return None
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise CheckpointError("the checkpoint's tokenizer entry is not a file's bytes (a uint8 tensor)")
    return SentencePieceTokenizer(model_proto=blob.numpy().tobytes())


def file_tensor(path: str | Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, so it can live inside a weights_only checkpoint."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

