"""The one training loop for every model family.

Single process or `torchrun` (NCCL on CUDA, gloo on CPU) with DDP or FSDP2 (`train.parallel`,
see hlm/parallel.py). Each optimizer step runs `grad_accum` micro-batches per rank, skipping
the gradient reduction on all but the last.
The learning rate (hlm/optim.py) is warmup (in steps) times a decay over training progress, where progress
is step/max_steps or, with `train.time_budget_s` and/or `train.flop_budget`, the largest of that,
the share of the time budget spent and the share of the FLOP budget spent, so a wall-clock- or
compute-limited run still finishes its schedule and stops at the first step that reaches it.
Training FLOPs are the counted forward+backward FLOPs per step (the patch phase's count for
patch steps, whose schedule still follows the phases; hlm/flops.py) plus the model's
`extra_train_flops(tokens_per_step)`, the FLOPs of a frozen auxiliary model it runs outside forward.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hlm import LN2, HLMError
from hlm.checkpoint import (
    check_same_model,
    file_tensor,
    load_checkpoint,
    load_state,
    remove_stale_temps,
    require_keys,
    save_atomic,
    write_atomic,
)
from hlm.config import Config, ConfigError, config_to_dict
from hlm.data import DataError, Split, WindowSampler, token_byte_lengths
from hlm.fim import N_SENTINELS, FIMTransform
from hlm.flops import count_flops, peak_flops
from hlm.models import build_model
from hlm.optim import lr_at, make_optimizer
from hlm.parallel import (
    apply_ddp,
    apply_fsdp,
    clip_grad_norm,
    full_state_dicts,
    gradient_sync,
    load_optimizer_state,
    setup_runtime,
)
from hlm.patch import check_patch_support, patch_phases
from hlm.rundir import RunDirError, RunLock, check_out_dir, check_same_corpus, resume_changes

NO_BAD_STEP = 2**62  # `Trainer._first_bad` before any non-finite step


class NonFiniteError(HLMError):
    """Training produced a non-finite loss, gradient norm or weight: the run stops, nothing is saved."""


@dataclass
class LogWindow:
    """Training stats since the last log record. Checkpoints hold it, so the first record after a
    resume covers the same steps as an uninterrupted run's. The clock is this process's own:
    throughput counts only the steps since `start` (not a step that compiled, nor eval or save)."""

    stats: torch.Tensor  # nll sum, bytes sum (float64, on the device)
    targets: int = 0  # per rank
    steps: int = 0  # steps that trained (a skipped non-finite step adds nothing)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    start: float = 0.0
    timed_steps: int = 0
    timed_targets: int = 0

    def add(self, stats: torch.Tensor, targets: int, metrics: dict[str, torch.Tensor], timed: bool) -> None:
        if targets:
            self.stats += stats
            self.targets += targets
            self.steps += 1
            for k, v in metrics.items():
                self.metrics[k] = self.metrics.get(k, 0) + v
        if timed:
            self.timed_steps += 1
            self.timed_targets += targets
        else:
            self.restart_clock()

    def restart_clock(self) -> None:
        self.start, self.timed_steps, self.timed_targets = time.perf_counter(), 0, 0

    def reset(self) -> None:
        self.stats.zero_()
        self.targets, self.steps, self.metrics = 0, 0, {}
        self.restart_clock()

    def state_dict(self, world: int) -> dict:
        """Targets are saved for all ranks together, so a resume on another rank count logs the same."""
        return {"stats": self.stats.cpu(), "targets_all_ranks": self.targets * world, "steps": self.steps,
                "metrics": {k: v.cpu() for k, v in self.metrics.items()}}

    def load_state_dict(self, state: dict, with_stats: bool, world: int) -> None:
        """`with_stats`: rank 0 only (a saved window holds every rank's sums)."""
        if with_stats:
            self.stats.copy_(state["stats"])
        self.targets, self.steps = state["targets_all_ranks"] // world, state["steps"]
        self.metrics = {k: v.to(self.stats.device) for k, v in state["metrics"].items()}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train  # values already checked by config.check_values when the config was read
        self.rt = rt = setup_runtime(tc.device)
        self.out_dir = Path(tc.out_dir)
        check_out_dir(self.out_dir)  # a file in the way or no write access: one line before any work
        self.data_dir = Path(cfg.data.path)
        self.train_split = Split(self.data_dir, "train")
        self.val_split = Split(self.data_dir, "val")
        self.meta = self.train_split.meta
        if self.meta["vocab_size"] > getattr(cfg.model, "vocab_size", 256):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the corpus vocabulary "
                              f"({self.meta['vocab_size']}) in {self.data_dir}")
        token_nbytes = token_byte_lengths(self.meta, self.data_dir)
        self.fim = self._fim_transform(cfg, rt.rank)
        if self.fim is not None:  # sentinels cover no bytes of text
            token_nbytes = np.concatenate([token_nbytes, np.zeros(N_SENTINELS, dtype=token_nbytes.dtype)])
        self.token_nbytes = torch.from_numpy(token_nbytes).to(rt.device)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.raw_model = build_model(cfg.model).to(rt.device)
        # per-token side files a model trains on (keyword -> `<split>.<stem>.bin`), e.g. hourglass boundary targets
        self.side_inputs: dict[str, str] = self.raw_model.side_inputs
        for stem in self.side_inputs.values():
            self.train_split.side_path(stem)
        if self.side_inputs and self.fim is not None:
            raise ConfigError("data.fim_rate > 0 moves tokens around, which the model's side inputs "
                              f"({', '.join(self.side_inputs)}) cannot follow")
        self.phases = patch_phases(tc)
        if self.phases.enabled:
            check_patch_support(self.raw_model)
        self.step, self.train_time, self.tokens_seen, self.bytes_seen = 0, 0.0, 0, 0
        self._bytes_pending = torch.zeros((), device=rt.device, dtype=torch.float64)  # not yet in bytes_seen
        self.log_window = LogWindow(torch.zeros(2, device=rt.device, dtype=torch.float64))
        self.bad_steps = 0  # non-finite steps skipped so far (train.max_bad_steps)
        self._first_bad = torch.tensor(NO_BAD_STEP, device=rt.device)  # first non-finite step not yet reported
        self.window = cfg.model.block_size + 1
        if self.val_split.n_tokens < self.window:  # fail now, not at the first validation
            raise DataError(f"val split too short: {self.val_split.n_tokens} tokens, need {self.window}")
        self._lock_out_dir()  # before reading ckpt.pt: another run may be about to replace it
        try:
            self._build(self._load_weights())
        except BaseException:  # a failure after the lock (a bad checkpoint, out of memory) leaves no lock behind
            self.release_lock()
            raise

    def _build(self, resume_ckpt: dict | None) -> None:
        """Everything after the lock: FLOP counts, sharding, optimizer, resume state, compile, logging."""
        cfg, tc, rt = self.cfg, self.cfg.train, self.rt
        use_bf16 = rt.device.type == "cuda" and tc.dtype == "bf16"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        sampler = WindowSampler(self.train_split.n_tokens, self.window, tc.batch_size, tc.grad_accum,
                                rt.rank, rt.world, tc.seed)
        probe = self._batch(sampler, self.train_split, 0, 0)
        probe_side = self._side_batch(sampler, self.train_split, 0, 0)
        self.flops_per_step = count_flops(self.raw_model, probe, self.autocast, **probe_side) * tc.grad_accum * rt.world
        self.samplers = {1: sampler}  # by patch size
        if self.phases.enabled:
            K = self.phases.patch_size
            self.samplers[K] = WindowSampler(self.train_split.n_tokens, K * self.window, tc.batch_size // K,
                                             tc.grad_accum, rt.rank, rt.world, tc.seed)
            probe = self._batch(self.samplers[K], self.train_split, 0, 0)
            self.patch_flops_per_step = count_flops(self.raw_model, probe, self.autocast, patch_size=K) \
                * tc.grad_accum * rt.world
        self.tokens_per_step = tc.batch_size * self.window * tc.grad_accum * rt.world  # all ranks, token mode
        self.extra_flops_per_step = self.raw_model.extra_train_flops(self.tokens_per_step)
        self.peak = peak_flops(rt.device)

        if rt.world > 1 and tc.parallel == "fsdp":  # shards raw_model in place: its state dict keeps its names
            apply_fsdp(self.raw_model, rt.world, rt.device.type, torch.bfloat16 if use_bf16 else None)
        self.optimizer = make_optimizer(self.raw_model, tc, rt.device)
        if resume_ckpt is not None:
            self._restore_training_state(resume_ckpt)
        else:
            self._trim_metrics()
        model = self.raw_model
        if tc.compile if tc.compile is not None else rt.device.type == "cuda":
            # static shapes: the patch and token phases each get their own specialised graph
            model = torch.compile(model, dynamic=False if self.phases.enabled else None, mode=tc.compile_mode)
        if rt.world > 1 and tc.parallel == "ddp":
            model = apply_ddp(model, rt.device)
        self.model = model
        self.writer = None
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2).encode())
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tb"))

    # ----- state -----
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "ckpt.pt"

    def _lock_out_dir(self) -> None:
        """Rank 0 locks out_dir for the run (rundir.RunLock) and clears temporary files that killed
        runs left there; every rank stops with the same line when another run holds the lock."""
        self.run_lock, error = None, ""
        if self.rt.master:
            try:
                self.run_lock = RunLock(self.out_dir)
            except RunDirError as e:
                error = str(e)
        if self.rt.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RunDirError(error)
        if self.rt.master:
            for path in remove_stale_temps(self.out_dir):
                print(f"removed {path}: a temporary file of a killed run", flush=True)

    def release_lock(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()

    def _load_weights(self) -> dict | None:
        """Load weights into the unsharded model from out_dir/ckpt.pt (resume: returns that
        checkpoint for `_restore_training_state`) or from train.init_from. Checkpoints stay on
        the CPU (memory-mapped): a sharded run's full state need not fit on one GPU."""
        tc = self.cfg.train
        model_cfg = config_to_dict(self.cfg)["model"]
        if tc.resume and self.ckpt_path.is_file():
            ckpt = load_checkpoint(self.ckpt_path, mmap=True)
            require_keys(ckpt, self.ckpt_path, ("model", "config", "optimizer", "step", "train_time", "tokens_seen",
                                                "bytes_seen", "rng"))
            check_same_model(ckpt["config"]["model"], model_cfg, self.ckpt_path)
            self._check_resume_settings(ckpt)
            load_state(self.raw_model, ckpt["model"], self.ckpt_path)
            return ckpt
        if tc.init_from:
            ckpt = load_checkpoint(tc.init_from, mmap=True)
            require_keys(ckpt, tc.init_from, ("model", "config"))
            check_same_model(ckpt["config"]["model"], model_cfg, tc.init_from)
            load_state(self.raw_model, ckpt["model"], tc.init_from)
        return None

    def _check_resume_settings(self, ckpt: dict) -> None:
        """A resume refuses another corpus and settings that decide the data of each step
        (rundir.FIXED_ON_RESUME); other changed settings are listed, then used."""
        check_same_corpus(ckpt.get("data_meta"), self.meta, self.data_dir, self.ckpt_path)
        changes = resume_changes(ckpt["config"], config_to_dict(self.cfg), self.ckpt_path, ckpt.get("world"),
                                 self.rt.world)
        if changes and self.rt.master:
            print(f"resuming {self.ckpt_path} (step {ckpt['step']}) with changed settings: {'; '.join(changes)}",
                  flush=True)

    def _restore_training_state(self, ckpt: dict) -> None:
        """Optimizer, counters and RNG of a resumed run (after the optimizer exists)."""
        load_optimizer_state(self.raw_model, self.optimizer, ckpt["optimizer"])
        self.step, self.train_time = ckpt["step"], ckpt["train_time"]
        self.tokens_seen, self.bytes_seen = ckpt["tokens_seen"], ckpt["bytes_seen"]
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if self.rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        self.bad_steps = ckpt.get("bad_steps", 0)
        if "log_window" in ckpt:
            self.log_window.load_state_dict(ckpt["log_window"], with_stats=self.rt.master, world=self.rt.world)
        self._trim_metrics()

    def _trim_metrics(self) -> None:
        """Drop metric records logged after the step we start from (all of an earlier run's, when
        a fresh run reuses its out_dir), so metrics.jsonl describes this run only."""
        path = self.out_dir / "metrics.jsonl"
        if self.rt.master and path.is_file():
            keep, torn = [], 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    step = record["step"] if isinstance(record, dict) else None
                except json.JSONDecodeError:
                    step = None
                if isinstance(step, int):
                    keep += [line] if step <= self.step else []
                else:  # a line cut short by a crash (power loss mid-write)
                    torn += 1
            if torn:
                print(f"{path}: dropped {torn} unreadable line(s), cut short by a crash", flush=True)
            write_atomic(path, "".join(line + "\n" for line in keep).encode())

    def _sync_seen(self) -> None:
        """Fold every rank's bytes since the last sync into bytes_seen (a collective: all ranks call it)."""
        self.bytes_seen += int(self.all_sum(self._bytes_pending.clone()).item())
        self._bytes_pending.zero_()

    # ----- non-finite values -----
    def _note_finite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step's loss and gradient norm are finite. With train.max_bad_steps > 0
        that is decided now (one host sync per step, the same on every rank); with 0 the first
        bad step is only noted on the device and reported by `_check_finite_steps`."""
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if self.cfg.train.max_bad_steps == 0:
            step = torch.where(bad, self.step + 1, NO_BAD_STEP)
            self._first_bad = torch.minimum(self._first_bad, step)
            return True
        return self.all_sum(bad.double()).item() == 0

    def _skip_bad_step(self) -> None:
        """Drop a non-finite step's update: gradients zeroed, optimizer untouched, the step counted."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad_steps += 1
        limit = self.cfg.train.max_bad_steps
        if self.bad_steps > limit:
            raise NonFiniteError(f"non-finite loss or gradient norm at step {self.step}, bad step {self.bad_steps} "
                                 f"of at most train.max_bad_steps={limit}: training stopped, {self._kept()}")
        self.log({"kind": "skip", "step": self.step, "bad_steps": self.bad_steps})
        if self.rt.master:
            print(f"step {self.step}: non-finite loss or gradient norm, update skipped "
                  f"({self.bad_steps} of train.max_bad_steps={limit})", flush=True)

    def _check_finite_steps(self) -> None:
        """Stop at the first non-finite step (train.max_bad_steps=0), checked before every log,
        validation and checkpoint."""
        first = self._first_bad.clone()
        if self.rt.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if (step := int(first.item())) != NO_BAD_STEP:
            raise NonFiniteError(f"non-finite loss or gradient norm at step {step}: training stopped, {self._kept()} "
                                 "(lower train.lr, or let train.max_bad_steps skip such steps)")

    def _check_finite_state(self) -> None:
        """Never save non-finite weights: every parameter and optimizer tensor (this rank's shard)
        is checked before a checkpoint."""
        tensors = [*self.raw_model.parameters(),
                   *(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        n_bad = torch.stack([(~torch.isfinite(t.detach())).sum().to(self.rt.device, torch.float64) for t in local])
        if self.all_sum(n_bad.sum()).item() > 0:
            raise NonFiniteError(f"non-finite weights or optimizer state after step {self.step}: training stopped, "
                                 f"{self._kept()} (lower train.lr)")

    def _kept(self) -> str:
        return f"{self.ckpt_path} not overwritten" if self.ckpt_path.is_file() else "no checkpoint written"

    def save(self) -> None:
        self._check_finite_steps()
        self._check_finite_state()
        if self.rt.world > 1:  # rank 0's window takes every rank's sums, so the checkpoint holds them all
            dist.all_reduce(self.log_window.stats)
            if not self.rt.master:
                self.log_window.stats.zero_()
        self._sync_seen()
        model_state, optimizer_state = full_state_dicts(self.raw_model, self.optimizer)  # FSDP: a collective
        if not self.rt.master:
            return
        ckpt = {
            "model": model_state,
            "optimizer": optimizer_state,
            "step": self.step,
            "train_time": self.train_time,
            "bad_steps": self.bad_steps,
            "world": self.rt.world,  # ranks: a resume keeps the global batch, batch_size x world
            "log_window": self.log_window.state_dict(self.rt.world),
            "tokens_seen": self.tokens_seen,
            "bytes_seen": self.bytes_seen,
            "config": config_to_dict(self.cfg),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.rt.device.type == "cuda" else None},
            "data_meta": self.meta,
            "token_nbytes": self.token_nbytes.cpu(),
            "tokenizer": file_tensor(self.data_dir / self.meta["tokenizer"]) if self.meta.get("tokenizer") else None,
        }
        save_atomic(ckpt, self.ckpt_path)

    # ----- data -----
    def _fim_transform(self, cfg: Config, rank: int) -> FIMTransform | None:
        """The FIM batch transform when data.fim_rate > 0 (sentinels just past the corpus vocabulary)."""
        if cfg.data.fim_rate <= 0:
            return None
        need = self.meta["vocab_size"] + N_SENTINELS
        if getattr(cfg.model, "vocab_size", 256) < need:
            raise ConfigError(f"data.fim_rate > 0 needs model.vocab_size >= {need} (corpus vocabulary "
                              f"{self.meta['vocab_size']} + {N_SENTINELS} FIM sentinels)")
        return FIMTransform(self.meta["vocab_size"], self.meta["separator_id"], cfg.data.fim_rate,
                            cfg.data.fim_spm_rate, cfg.train.seed, rank)

    def _batch(self, sampler: WindowSampler, split: Split, step: int, micro: int) -> torch.Tensor:
        x = split.windows(sampler.starts(step, micro), sampler.length)
        if self.fim is not None and split is self.train_split:
            x = self.fim(x, step, micro)
        if self.rt.device.type == "cuda":
            return x.pin_memory().to(self.rt.device, non_blocking=True)
        return x

    def _side_batch(self, sampler: WindowSampler, split: Split, step: int, micro: int) -> dict[str, torch.Tensor]:
        """The same windows as `_batch` of the model's side files, as forward keyword arguments."""
        if not self.side_inputs:
            return {}
        starts = sampler.starts(step, micro)
        side = {key: split.windows(starts, sampler.length, stem) for key, stem in self.side_inputs.items()}
        if self.rt.device.type == "cuda":
            side = {k: v.pin_memory().to(self.rt.device, non_blocking=True) for k, v in side.items()}
        return side

    # ----- logging -----
    def log(self, record: dict) -> None:
        if not self.rt.master:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def from_rank0(self, value: float) -> float:
        t = torch.tensor([value], device=self.rt.device, dtype=torch.float64)
        dist.broadcast(t, 0)
        return t.item()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world > 1:
            dist.all_reduce(t)
        return t

    # ----- evaluation -----
    @torch.no_grad()
    def validate(self) -> dict:
        """Bits per byte on the first `eval.batches` x batch windows of val (the same windows every
        time, split across ranks)."""
        ec = self.cfg.eval
        bs = ec.batch_size or self.cfg.train.batch_size
        stride = self.window - 1
        n_windows = (self.val_split.n_tokens - 1) // stride
        every_start = np.arange(min(n_windows, ec.batches * bs)) * stride
        starts = every_start[self.rt.rank :: self.rt.world]
        n_batches = -(-len(every_start[:: self.rt.world]) // bs)  # rank 0 has the most windows
        self.model.eval()
        sums = torch.zeros(3, device=self.rt.device, dtype=torch.float64)
        for i in range(n_batches):
            # every rank runs the same number of forwards (FSDP gathers parameters collectively);
            # a rank out of windows scores one window and counts it zero times
            chunk, weight = (starts[i * bs : (i + 1) * bs], 1.0) if i * bs < len(starts) else (every_start[:1], 0.0)
            x = self.val_split.windows(chunk, self.window).to(self.rt.device)
            with self.autocast:
                out = self.raw_model(x)
            sums += weight * torch.stack([out.nll.double().sum(), self.token_nbytes[x[:, 1:]].sum().double(),
                                          torch.tensor(out.nll.numel(), device=self.rt.device, dtype=torch.float64)])
        self.model.train()
        nll, nbytes, ntok = self.all_sum(sums).tolist()
        return {"bpb": nll / (LN2 * nbytes), "loss": nll / ntok, "bytes": int(nbytes)}

    # ----- main loop -----
    def train_step(self) -> tuple[float, torch.Tensor | None, torch.Tensor, int, dict[str, torch.Tensor]]:
        """One optimizer step over grad_accum micro-batches. Returns the lr, the gradient norm,
        [nll sum, bytes] of the targets seen, their count and the model's metrics, all left on
        the device (no host sync). A skipped non-finite step (train.max_bad_steps) returns no
        gradient norm, zero stats and no targets."""
        tc = self.cfg.train
        if self.phases.enabled:  # patch training: the schedule restarts at the switch to token mode
            lr = lr_at(tc, *self.phases.schedule_position(self.step))
        else:
            lr = lr_at(tc, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        patch_size = self.phases.patch_size_at(self.step)
        stats = torch.zeros(2, device=self.rt.device, dtype=torch.float64)
        n_targets, metrics = 0, {}
        for micro in range(tc.grad_accum):
            x = self._batch(self.samplers[patch_size], self.train_split, self.step, micro)
            kwargs = {"patch_size": patch_size} if patch_size > 1 else \
                self._side_batch(self.samplers[1], self.train_split, self.step, micro)
            sync = self.rt.world == 1 or micro == tc.grad_accum - 1
            with gradient_sync(self.model, sync):
                with self.autocast:
                    out = self.model(x, **kwargs)
                (out.loss / tc.grad_accum).backward()
            targets = x[:, x.size(1) - out.nll.size(1):]  # x[:, 1:] in token mode, x[:, K:] in patch mode
            stats += torch.stack([out.nll.detach().double().sum(), self.token_nbytes[targets].sum().double()])
            n_targets += out.nll.numel()
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0) + v.detach().float() / tc.grad_accum
        grad_norm = clip_grad_norm(self.raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if not self._note_finite(stats[0], grad_norm):
            self._skip_bad_step()
            return lr, None, torch.zeros_like(stats), 0, {}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, grad_norm, stats, n_targets, metrics

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.release_lock()

    def _fit(self) -> dict:
        cfg, tc, rt = self.cfg, self.cfg.train, self.rt
        self.model.train()
        last_val: dict = {}
        window = self.log_window  # restored on resume: the first record after it covers the same steps as ever
        window.restart_clock()
        first_step = True
        if rt.master:
            print(f"model: {sum(p.numel() for p in self.raw_model.parameters()) / 1e6:.2f}M parameters, "
                  f"{self.flops_per_step / 1e9:.2f} GFLOP per step, world size {rt.world}", flush=True)
            if self.phases.enabled:
                print(f"patch training: steps 1-{self.phases.switch_step} in patch mode (K={self.phases.patch_size}, "
                      f"{self.patch_flops_per_step / 1e9:.2f} GFLOP per step), then token mode to {tc.max_steps}",
                      flush=True)
        while not self._done():
            t0 = time.perf_counter()
            lr, grad_norm, stats, n_targets, metrics = self.train_step()
            self.tokens_seen += n_targets * rt.world
            self._bytes_pending += stats[1]
            # the first step (and the first token step after patch mode) carries compilation: its loss
            # is logged, its time is kept out of the clock
            timed = not (first_step or self.step - 1 == self.phases.switch_step)
            first_step = False
            window.add(stats, n_targets, metrics, timed)
            if timed:
                self.train_time += time.perf_counter() - t0
                if tc.time_budget_s > 0 and rt.world > 1:  # one clock for all ranks: same lr, same last step
                    self.train_time = self.from_rank0(self.train_time)

            log_now = self.step % cfg.log.interval == 0 or self._done() or self.step == self.phases.switch_step
            eval_now = (cfg.eval.interval and self.step % cfg.eval.interval == 0) or self._done()
            save_now = self.step % tc.ckpt_interval == 0 or self._done()
            if log_now or eval_now or save_now:
                self._check_finite_steps()
            if log_now:
                if window.steps:
                    self._log_train(lr, grad_norm, window)
                window.reset()
            if eval_now:
                last_val = self.validate()
                self.log({"kind": "val", "step": self.step, **last_val})
                if rt.master:
                    print(f"step {self.step} | val bpb {last_val['bpb']:.4f} | val loss {last_val['loss']:.4f}",
                          flush=True)
                window.restart_clock()
            if save_now:
                self.save()
                window.restart_clock()
        if self.writer is not None:
            self.writer.close()
        return {"step": self.step, "train_time": self.train_time, "flops_seen": self.flops_seen(),
                **{f"val_{k}": v for k, v in last_val.items()}}

    def close(self, wait_for_ranks: bool = True) -> None:
        """Leave the process group. First a barrier (so gloo's worker threads are done freeing the
        last collectives' tensors), then free the DDP/FSDP modules, which hold the group, while the
        interpreter is alive: a group destroyed at interpreter exit while a worker thread still
        needs the GIL aborts the process or hangs (pytorch#56297)."""
        if not dist.is_initialized():
            return
        if wait_for_ranks:
            dist.barrier()
        del self.model, self.raw_model, self.optimizer
        gc.collect()
        dist.destroy_process_group()

    def progress(self) -> float:
        tc = self.cfg.train
        p = self.step / max(1, tc.max_steps)
        if tc.time_budget_s > 0:
            p = max(p, self.train_time / tc.time_budget_s)
        if tc.flop_budget > 0:
            p = max(p, self.flops_seen() / tc.flop_budget)
        return p

    def flops_seen(self) -> int:
        """Training FLOPs of steps 0..step-1 (all ranks): each step at its phase's count."""
        patch_steps = min(self.step, self.phases.switch_step)
        per_patch = self.patch_flops_per_step if patch_steps else 0
        return (patch_steps * per_patch + (self.step - patch_steps) * self.flops_per_step
                + self.step * self.extra_flops_per_step)

    def _done(self) -> bool:
        return self.progress() >= 1.0

    def _log_train(self, lr: float, grad_norm: torch.Tensor | None, window: LogWindow) -> None:
        """One train record of the window. Loss fields cover all its steps; throughput covers its
        timed steps (bytes/s at the window's mean bytes per token) and is left out when none is."""
        tc, rt = self.cfg.train, self.rt
        dt = time.perf_counter() - window.start
        nll, nbytes = self.all_sum(window.stats.clone()).tolist()
        n_targets, steps = window.targets * rt.world, window.steps
        self._sync_seen()
        rec = {"kind": "train", "step": self.step, "loss": nll / n_targets, "bpb": nll / (LN2 * nbytes), "lr": lr,
               "tokens_seen": self.tokens_seen, "bytes_seen": self.bytes_seen, "train_time_s": self.train_time,
               "flops_seen": self.flops_seen()}
        if window.timed_steps:
            timed_targets = window.timed_targets * rt.world
            rec.update(tokens_per_s=timed_targets / dt, bytes_per_s=nbytes / n_targets * timed_targets / dt,
                       step_time_s=dt / window.timed_steps)
        patch_mode = self.phases.patch_size_at(self.step - 1) > 1  # logs never span the switch
        if self.phases.enabled:  # in patch mode the loss is the next-patch loss: logged apart, no bpb
            rec["mode"] = "patch" if patch_mode else "token"
            if patch_mode:
                rec["patch_loss"] = rec.pop("loss")
                del rec["bpb"]
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        if self.peak and window.timed_steps:
            flops = self.patch_flops_per_step if patch_mode else self.flops_per_step  # all ranks' FLOPs
            rec["mfu"] = flops * window.timed_steps / dt / (self.peak * rt.world)
        if rt.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        rec.update({k: float(v) / steps for k, v in window.metrics.items()})
        self.log(rec)
        if not rt.master:
            return
        remaining = max(0.0, 1.0 - self.progress()) / max(self.progress(), 1e-9) * self.train_time
        if patch_mode:
            parts = [f"step {self.step}/{tc.max_steps} patch", f"patch loss {rec['patch_loss']:.4f}"]
        else:
            parts = [f"step {self.step}/{tc.max_steps}", f"loss {rec['loss']:.4f}", f"bpb {rec['bpb']:.4f}"]
        parts.append(f"lr {lr:.2e}")
        if "bytes_per_s" in rec:
            parts += [f"{rec['bytes_per_s'] / 1e3:.1f}k B/s", f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s"]
        parts.append(f"{self.tokens_seen / 1e6:.2f}M tok")
        if "mfu" in rec:
            parts.append(f"mfu {100 * rec['mfu']:.1f}%")
        if "peak_mem_gib" in rec:
            parts.append(f"mem {rec['peak_mem_gib']:.1f}GiB")
        parts.append(f"eta {remaining:.0f}s")
        print(" | ".join(parts), flush=True)


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except BaseException:
        trainer.close(wait_for_ranks=False)
        raise
    trainer.close()
    return result
