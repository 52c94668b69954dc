"""The run folder (`train.out_dir`) and what a run may do to it.

Before any training work the folder is checked (not a file, writable); for the whole run it is
locked, so two runs never train into one folder; a resume must be on the same corpus and keep
the settings that decide which data each step sees (README: Safety).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
from pathlib import Path

import torch
import torch.distributed as dist

from hlm import HLMError
from hlm.checkpoint import (
    CheckpointError,
    check_same_model,
    load_checkpoint,
    load_state,
    remove_stale_temps,
    require_keys,
    write_atomic,
)
from hlm.config import SECTIONS, Config, ConfigError, config_to_dict
from hlm.parallel import Runtime


class RunDirError(HLMError):
    """An out_dir that cannot be used: a file, not writable, or in use by another run."""


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, an out_dir that is a file (or lies under one) or cannot be written."""
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"lies under {existing}, which is a file"
        raise RunDirError(f"train.out_dir {out_dir} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"train.out_dir {out_dir}: {existing} is not writable")


class RunLock:
    """An exclusive `flock` on the out_dir folder itself, held for the run; `.lock` in it names
    the holder's PID for the message a second run gets. Locking the folder, not a file in it,
    means a refused run writes nothing, and `.lock` can be removed on release without a race."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file = out_dir / ".lock"
        self.fd: int | None = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise RunDirError(f"train.out_dir {out_dir} is in use by another training run (pid {self._holder()}): "
                              "wait for it to finish or choose another train.out_dir") from None
        except OSError as e:  # a file system without flock (some network mounts): train unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self._close()
                raise
            print(f"warning: cannot lock {out_dir} here ({e.strerror}): make sure no other run uses it", flush=True)
        try:
            write_atomic(self.pid_file, f"{os.getpid()}\n".encode())
        except BaseException:
            self._close()  # closing the folder's descriptor drops the lock
            raise

    def _holder(self) -> str:
        try:
            return self.pid_file.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Unlock; remove `.lock`, and the folder too when this run made it and left it empty."""
        if self.fd is None:
            return
        if self._holder() == str(os.getpid()):
            self.pid_file.unlink(missing_ok=True)
        if self.created:
            try:
                self.out_dir.rmdir()
            except OSError:  # not empty: the run wrote something
                pass
        self._close()

    def __del__(self) -> None:
        self.release()


def lock_run_dir(out_dir: Path, rt: Runtime) -> RunLock | None:
    """Rank 0 locks out_dir for the run (`RunLock`; the other ranks get None) and clears temporary
    files that killed runs left there; every rank stops with the same line when another run holds it."""
    lock, error = None, ""
    if rt.master:
        try:
            lock = RunLock(out_dir)
        except RunDirError as e:
            error = str(e)
    if rt.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirError(error)
    if rt.master:
        for path in remove_stale_temps(out_dir):
            print(f"removed {path}: a temporary file of a killed run", flush=True)
    return lock


def _corpus_identity(meta: dict) -> dict:
    """What names a corpus's content: every sha256 in meta.json, its kind, vocabulary and split sizes."""
    ident = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "sha256" or key.endswith("_sha256"):
                    ident[prefix + key] = value
                else:
                    walk(value, f"{prefix}{key}.")

    walk(meta, "")
    ident.update({k: meta.get(k) for k in ("kind", "vocab_size")})
    splits = meta.get("splits")
    if isinstance(splits, dict):
        ident.update({f"splits.{name}.tokens": s.get("tokens") for name, s in splits.items() if isinstance(s, dict)})
    return ident


def check_same_corpus(saved_meta: dict | None, meta: dict, data_dir: Path, path: Path) -> None:
    """Refuse to resume a checkpoint on a corpus other than the one it was trained on (compared by
    content, so a moved corpus folder is fine). Fields missing on either side are not compared."""
    if not isinstance(saved_meta, dict):
        return
    saved, current = _corpus_identity(saved_meta), _corpus_identity(meta)
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            raise CheckpointError(f"{path} was trained on a different corpus ({key}: checkpoint {_short(saved[key])} "
                                  f"vs {data_dir} {_short(current[key])}): resume on that corpus or use a new "
                                  "train.out_dir")


def _short(value: object) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else repr(value)


# Settings that decide which data each step sees, or the phase a step is in: changing them on a
# resume would not continue the same run, so a resume refuses it. train.batch_size counts per
# rank: what must stay is the global batch, batch_size x ranks.
FIXED_ON_RESUME = ("train.grad_accum", "train.seed", "train.patch_size", "train.patch_fraction",
                   "data.fim_rate", "data.fim_spm_rate")
IGNORED_ON_RESUME = ("train.resume", "train.init_from")  # a resume is on; init_from only starts a fresh run


def resume_changes(saved: dict, current: dict, path: Path, saved_world: int | None, world: int) -> list[str]:
    """The data/train/eval/log settings that differ from the checkpoint's, as `key: old -> new`
    (a key the checkpoint predates counts at its default). Raises for FIXED_ON_RESUME keys and a
    changed global batch (checked where the checkpoint records its number of ranks)."""
    changes = []
    for section, cls in SECTIONS.items():
        old = {**dataclasses.asdict(cls()), **(saved.get(section) or {})}
        for key, new in current[section].items():
            name = f"{section}.{key}"
            if name not in IGNORED_ON_RESUME and old.get(key) != new:
                changes.append((name, old.get(key), new))
    fixed = [f"{k} {o!r} -> {n!r}" for k, o, n in changes if k in FIXED_ON_RESUME]
    old_batch = {**dataclasses.asdict(SECTIONS["train"]()), **(saved.get("train") or {})}["batch_size"]
    if saved_world is not None and old_batch * saved_world != current["train"]["batch_size"] * world:
        fixed.insert(0, f"global batch (train.batch_size x ranks) {old_batch} x {saved_world} -> "
                        f"{current['train']['batch_size']} x {world}")
    if fixed:
        raise ConfigError(f"cannot resume {path} with changed {', '.join(fixed)}: these decide which data each step "
                          "sees; restore them or use a new train.out_dir")
    return [f"{k}: {o!r} -> {n!r}" for k, o, n in changes]


def load_start(cfg: Config, model: torch.nn.Module, meta: dict, rt: Runtime) -> dict | None:
    """Load the weights a run starts from into the unsharded `model`: out_dir/ckpt.pt on a resume
    (returned, for the optimizer, counters and RNG), or train.init_from. A resume is checked first:
    the same model, the same corpus, no change to FIXED_ON_RESUME; other changes are listed.
    Checkpoints stay on the CPU (memory-mapped): a sharded run's full state need not fit on one GPU."""
    tc = cfg.train
    model_cfg = config_to_dict(cfg)["model"]
    ckpt_path = Path(tc.out_dir) / "ckpt.pt"
    if tc.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, mmap=True)
        require_keys(ckpt, ckpt_path, ("model", "config", "optimizer", "step", "train_time", "tokens_seen",
                                       "bytes_seen", "rng"))
        check_same_model(ckpt["config"]["model"], model_cfg, ckpt_path)
        check_same_corpus(ckpt.get("data_meta"), meta, Path(cfg.data.path), ckpt_path)
        changes = resume_changes(ckpt["config"], config_to_dict(cfg), ckpt_path, ckpt.get("world"), rt.world)
        if changes and rt.master:
            print(f"resuming {ckpt_path} (step {ckpt['step']}) with changed settings: {'; '.join(changes)}",
                  flush=True)
        load_state(model, ckpt["model"], ckpt_path)
        return ckpt
    if tc.init_from:
        ckpt = load_checkpoint(tc.init_from, mmap=True)
        require_keys(ckpt, tc.init_from, ("model", "config"))
        check_same_model(ckpt["config"]["model"], model_cfg, tc.init_from)
        load_state(model, ckpt["model"], tc.init_from)
    return None
