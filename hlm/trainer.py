"""The one training loop for every model family.

Single process or `torchrun` (NCCL on CUDA, gloo on CPU) with DDP or FSDP2 (`train.parallel`,
see hlm/parallel.py). `Trainer(cfg)` builds the run: the batches (hlm/batches.py), the model,
its FLOPs per step (hlm/metrics.py), the optimizer and the state it starts from (a resume or
train.init_from, hlm/rundir.py), with out_dir locked. `fit` is the loop: the step's learning
rate (hlm/optim.py), `grad_accum` micro-batches per rank with the gradient reduction on the last
only, clipping, the finite checks (hlm/finite.py), the update; then logging, validation and
checkpoints, until max_steps or the time or FLOP budget is reached.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from hlm import LN2
from hlm.batches import Batches
from hlm.checkpoint import file_tensor, save_atomic, write_atomic
from hlm.config import Config, config_to_dict
from hlm.finite import FiniteGuard
from hlm.flops import peak_flops
from hlm.metrics import LogWindow, MetricsLog, count_step_flops, train_line, train_record, trim_metrics
from hlm.models import build_model
from hlm.optim import make_optimizer, set_lr, step_lr, training_progress
from hlm.parallel import (
    all_sum,
    apply_ddp,
    apply_fsdp,
    clip_grad_norm,
    from_rank0,
    full_model_state_dict,
    full_state_dicts,
    gradient_sync,
    load_optimizer_state,
    setup_runtime,
)
from hlm.rundir import check_out_dir, load_start, lock_run_dir


class StepResult(NamedTuple):
    """One optimizer step, left on the device (no host sync). A skipped non-finite step has no
    gradient norm, zero stats and no targets."""

    lr: float
    grad_norm: torch.Tensor | None
    stats: torch.Tensor  # [nll sum, bytes] of the targets seen (float64)
    n_targets: int  # this rank's
    metrics: dict[str, torch.Tensor]  # the model's, averaged over the micro-batches


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train  # values already checked by config.check_values when the config was read
        self.rt = rt = setup_runtime(tc.device)
        self.out_dir = Path(tc.out_dir)
        self.ckpt_path = self.out_dir / "ckpt.pt"
        check_out_dir(self.out_dir)  # a file in the way or no write access: one line before any work
        self.batches = Batches(cfg, rt)  # corpus, FIM and patch settings, checked before the model is built
        self.phases = self.batches.phases
        if hasattr(cfg.model, "fill_from_data"):  # settings the data folder decides (BLT: a calibrated θ)
            cfg.model.fill_from_data(cfg.data.path)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.raw_model = build_model(cfg.model).to(rt.device)
        self.batches.use_model(self.raw_model)
        self.step, self.train_time, self.tokens_seen, self.bytes_seen = 0, 0.0, 0, 0
        self.best_val_bpb = math.inf  # the lowest val bpb so far (train.keep_best: best.pt holds its weights)
        self._bytes_pending = torch.zeros((), device=rt.device, dtype=torch.float64)  # not yet in bytes_seen
        self.log_window = LogWindow(torch.zeros(2, device=rt.device, dtype=torch.float64))
        self.guard = FiniteGuard(tc.max_bad_steps, self.ckpt_path, rt)
        self.run_lock = lock_run_dir(self.out_dir, rt)  # before reading ckpt.pt: another run may be replacing it
        try:
            self._build(load_start(cfg, self.raw_model, self.batches.meta, rt))
        except BaseException:  # a failure after the lock (a bad checkpoint, out of memory) leaves no lock behind
            self.release_lock()
            raise

    def _build(self, resume_ckpt: dict | None) -> None:
        """Everything after the lock: FLOP counts, sharding, optimizer, resume state, compile, logging."""
        cfg, tc, rt = self.cfg, self.cfg.train, self.rt
        use_bf16 = rt.device.type == "cuda" and tc.dtype == "bf16"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.flops = count_step_flops(self.raw_model, self.batches, self.autocast, tc.grad_accum, rt.world)
        self.peak = peak_flops(rt.device)
        if rt.world > 1 and tc.parallel == "fsdp":  # shards raw_model in place: its state dict keeps its names
            apply_fsdp(self.raw_model, rt.world, rt.device.type, torch.bfloat16 if use_bf16 else None)
        self.optimizer = make_optimizer(self.raw_model, tc, rt.device)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        if rt.master:  # metrics.jsonl describes this run only
            trim_metrics(self.out_dir / "metrics.jsonl", self.step)
        model = self.raw_model
        if tc.compile if tc.compile is not None else rt.device.type == "cuda":
            # static shapes: the patch and token phases each get their own specialised graph
            model = torch.compile(model, dynamic=False if self.phases.enabled else None, mode=tc.compile_mode)
        if rt.world > 1 and tc.parallel == "ddp":
            model = apply_ddp(model, rt.device)
        self.model = model
        if rt.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2).encode())
        self.metrics_log = MetricsLog(self.out_dir, rt.master, cfg.log.tensorboard)

    def _restore(self, ckpt: dict) -> None:
        """Optimizer, counters, RNG and log window of a resumed run (after the optimizer exists)."""
        load_optimizer_state(self.raw_model, self.optimizer, ckpt["optimizer"])
        self.step, self.train_time = ckpt["step"], ckpt["train_time"]
        self.tokens_seen, self.bytes_seen = ckpt["tokens_seen"], ckpt["bytes_seen"]
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if self.rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        self.guard.bad_steps = ckpt.get("bad_steps", 0)
        self.best_val_bpb = ckpt.get("best_val_bpb", math.inf)
        if "log_window" in ckpt:
            self.log_window.load_state_dict(ckpt["log_window"], with_stats=self.rt.master, world=self.rt.world)

    def release_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    # ----- the loop -----
    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches (a non-finite one skipped under train.max_bad_steps)."""
        tc = self.cfg.train
        lr = step_lr(tc, self.phases, self.step, self.progress())
        set_lr(self.optimizer, lr)
        stats = torch.zeros(2, device=self.rt.device, dtype=torch.float64)
        n_targets, metrics = 0, {}
        for micro in range(tc.grad_accum):
            idx, kwargs = self.batches.train(self.step, micro)
            with gradient_sync(self.model, sync=self.rt.world == 1 or micro == tc.grad_accum - 1):
                with self.autocast:
                    out = self.model(idx, **kwargs)
                (out.loss / tc.grad_accum).backward()
            targets = idx[:, idx.size(1) - out.nll.size(1):]  # idx[:, 1:] in token mode, idx[:, K:] in patch mode
            stats += torch.stack([out.nll.detach().double().sum(), self.batches.token_nbytes[targets].sum().double()])
            n_targets += out.nll.numel()
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0) + v.detach().float() / tc.grad_accum
        grad_norm = clip_grad_norm(self.raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if not self.guard.step_finite(stats[0], grad_norm, self.step + 1):  # drop the update, count the step
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.metrics_log.write(self.guard.skip(self.step))
            return StepResult(lr, None, torch.zeros_like(stats), 0, {})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(lr, grad_norm, stats, n_targets, metrics)

    def fit(self) -> dict:
        """Train to the end; returns the final step, train time, FLOPs seen and the last validation."""
        try:
            return self._fit()
        finally:
            self.release_lock()

    def _fit(self) -> dict:
        cfg, tc, rt = self.cfg, self.cfg.train, self.rt
        self._print_start()
        self.model.train()
        last_val: dict = {}
        window = self.log_window  # restored on resume: the first record after it covers the same steps as ever
        window.restart_clock()
        first_step = True
        while not self._done():
            t0 = time.perf_counter()
            result = self.train_step()
            self.tokens_seen += result.n_targets * rt.world
            self._bytes_pending += result.stats[1]
            # the first step (and the first token step after patch mode) carries compilation: its loss
            # is logged, its time is kept out of the clock
            timed = not (first_step or self.step - 1 == self.phases.switch_step)
            first_step = False
            window.add(result.stats, result.n_targets, result.metrics, timed)
            if timed:
                self.train_time += time.perf_counter() - t0
                if tc.time_budget_s > 0 and rt.world > 1:  # one clock for all ranks: same lr, same last step
                    self.train_time = from_rank0(self.train_time, rt.device)

            log_now = self.step % cfg.log.interval == 0 or self._done() or self.step == self.phases.switch_step
            eval_now = (cfg.eval.interval and self.step % cfg.eval.interval == 0) or self._done()
            save_now = self.step % tc.ckpt_interval == 0 or self._done()
            if log_now or eval_now or save_now:
                self.guard.check_steps()
            if log_now:
                if window.steps:
                    self._log_train(result.lr, result.grad_norm)
                window.reset()
            if eval_now:
                last_val = self.validate()
                self.metrics_log.write({"kind": "val", "step": self.step, **last_val})
                if rt.master:
                    print(f"step {self.step} | val bpb {last_val['bpb']:.4f} | val loss {last_val['loss']:.4f}",
                          flush=True)
                if last_val["bpb"] < self.best_val_bpb:  # the same on every rank (all_sum)
                    self.best_val_bpb = last_val["bpb"]
                    if tc.keep_best:
                        self.save_best()
                window.restart_clock()
            if save_now:
                self.save()
                window.restart_clock()
        self.metrics_log.close()
        return {"step": self.step, "train_time": self.train_time, "flops_seen": self.flops_seen(),
                **{f"val_{k}": v for k, v in last_val.items()}}

    def progress(self) -> float:
        return training_progress(self.cfg.train, self.step, self.train_time, self.flops_seen())

    def flops_seen(self) -> int:
        """Training FLOPs of steps 0..step-1 (all ranks)."""
        return self.flops.seen(self.step)

    def _done(self) -> bool:
        return self.progress() >= 1.0

    # ----- validation, logging, checkpoints -----
    @torch.no_grad()
    def validate(self) -> dict:
        """Bits per byte on the validation windows (batches.val: the same ones every time)."""
        self.model.eval()
        sums = torch.zeros(3, device=self.rt.device, dtype=torch.float64)
        for idx, weight in self.batches.val():
            with self.autocast:
                out = self.raw_model(idx)
            sums += weight * torch.stack([out.nll.double().sum(), self.batches.token_nbytes[idx[:, 1:]].sum().double(),
                                          torch.tensor(out.nll.numel(), device=self.rt.device, dtype=torch.float64)])
        self.model.train()
        nll, nbytes, ntok = all_sum(sums, self.rt.world).tolist()
        return {"bpb": nll / (LN2 * nbytes), "loss": nll / ntok, "bytes": int(nbytes)}

    def _print_start(self) -> None:
        if not self.rt.master:
            return
        print(f"model: {sum(p.numel() for p in self.raw_model.parameters()) / 1e6:.2f}M parameters, "
              f"{self.flops.token / 1e9:.2f} GFLOP per step, world size {self.rt.world}", flush=True)
        if self.phases.enabled:
            print(f"patch training: steps 1-{self.phases.switch_step} in patch mode (K={self.phases.patch_size}, "
                  f"{self.flops.patch / 1e9:.2f} GFLOP per step), then token mode to {self.cfg.train.max_steps}",
                  flush=True)

    def _log_train(self, lr: float, grad_norm: torch.Tensor | None) -> None:
        """One train record of the log window (a collective: all ranks call it)."""
        window, rt = self.log_window, self.rt
        seconds = time.perf_counter() - window.start
        nll, nbytes = all_sum(window.stats.clone(), rt.world).tolist()
        self._sync_seen()
        mode = None
        if self.phases.enabled:  # logs never span the switch
            mode = "patch" if self.phases.patch_size_at(self.step - 1) > 1 else "token"
        counters = {"tokens_seen": self.tokens_seen, "bytes_seen": self.bytes_seen, "train_time_s": self.train_time,
                    "flops_seen": self.flops_seen()}
        rec = train_record(window, seconds, nll, nbytes, rt.world, step=self.step, lr=lr, grad_norm=grad_norm,
                           counters=counters, mode=mode, step_flops=self.flops.counted(self.step - 1),
                           peak=self.peak, device=rt.device)
        self.metrics_log.write(rec)
        if rt.master:
            eta = max(0.0, 1.0 - self.progress()) / max(self.progress(), 1e-9) * self.train_time
            print(train_line(rec, self.cfg.train.max_steps, eta), flush=True)

    def _sync_seen(self) -> None:
        """Fold every rank's bytes since the last sync into bytes_seen (a collective: all ranks call it)."""
        self.bytes_seen += int(all_sum(self._bytes_pending.clone(), self.rt.world).item())
        self._bytes_pending.zero_()

    def save_best(self) -> None:
        """Write out_dir/best.pt: the weights at the lowest val bpb so far, with what eval.py and sample.py
        read (no optimizer: it does not resume), never non-finite (a collective: all ranks call it)."""
        self.guard.check_steps()
        self.guard.check_state(self.raw_model, self.optimizer, self.step)
        model_state = full_model_state_dict(self.raw_model)  # FSDP: a collective
        if self.rt.master:
            save_atomic({"model": model_state, "step": self.step, "val_bpb": self.best_val_bpb,
                         "config": config_to_dict(self.cfg), **self._data_entries()}, self.out_dir / "best.pt")

    def _data_entries(self) -> dict:
        """What a checkpoint needs to read and score text: the data folder's meta, bytes per token, tokenizer."""
        meta, data_dir = self.batches.meta, self.batches.data_dir
        return {"data_meta": meta, "token_nbytes": self.batches.token_nbytes.cpu(),
                "tokenizer": file_tensor(data_dir / meta["tokenizer"]) if meta.get("tokenizer") else None}

    def save(self) -> None:
        """Write out_dir/ckpt.pt, never with non-finite weights (a collective: all ranks call it)."""
        self.guard.check_steps()
        self.guard.check_state(self.raw_model, self.optimizer, self.step)
        if self.rt.world > 1:  # rank 0's window takes every rank's sums, so the checkpoint holds them all
            dist.all_reduce(self.log_window.stats)
            if not self.rt.master:
                self.log_window.stats.zero_()
        self._sync_seen()
        model_state, optimizer_state = full_state_dicts(self.raw_model, self.optimizer)  # FSDP: a collective
        if not self.rt.master:
            return
        save_atomic({
            "model": model_state,
            "optimizer": optimizer_state,
            "step": self.step,
            "train_time": self.train_time,
            "bad_steps": self.guard.bad_steps,
            "best_val_bpb": self.best_val_bpb,
            "world": self.rt.world,  # ranks: a resume keeps the global batch, batch_size x world
            "log_window": self.log_window.state_dict(self.rt.world),
            "tokens_seen": self.tokens_seen,
            "bytes_seen": self.bytes_seen,
            "config": config_to_dict(self.cfg),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.rt.device.type == "cuda" else None},
            **self._data_entries(),
        }, self.ckpt_path)

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


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except BaseException:
        trainer.close(wait_for_ranks=False)
        raise
    trainer.close()
    return result
