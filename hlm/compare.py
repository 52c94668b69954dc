"""Matched-compute comparison: a YAML grid of models x corpora x budgets x seeds, each run trained
by train.py and scored by eval.py (subprocesses, the same entry points a user runs), plus training
throughput, inference FLOPs per byte and cached generation speed, into one results JSONL, a
markdown table and PNG charts (hlm/compare_report.py).

Grid file (every key but `out`, `corpora`, `models` and `budgets` optional):

    out: runs/compare/my_grid              # one folder per run below it, results.jsonl, results.md, *.png
    corpora:                               # name -> data folder, or data kind -> data folder
      enwiki: {bytes: data/enwiki_bytes, bpe: data/enwiki_bpe}
    models:                                # family name -> its config, the data kind it reads (default bytes)
      byte_gpt: {config: configs/byte_gpt.yaml}
      bpe_gpt: {config: configs/bpe_gpt.yaml, data: bpe, overrides: [eval.interval=1000]}
      blt: {config: configs/blt_p4.5.yaml, overrides: ["model.entropy_model=runs/entropy/{corpus}/ckpt.pt"]}
    budgets:                               # training seconds or counted training FLOPs, each with its seeds
      - {time_s: 300, seeds: [1337, 1338]}
      - {flops: 1.7e17}
    seeds: [1337]                          # seeds of a budget that names none
    overrides: [train.ckpt_interval=1000000]   # for every run, before the model's own
    eval: {batch_size: 16}                 # eval.py --batch-size
    generation: {prompt_tokens: 512, new_tokens: 256, batch_sizes: [1, 64], cuda_graphs: false}
    device: auto                           # where generation speed and inference FLOPs are measured
    prepare:                               # shell commands run in order before the runs, each only while the
      - creates: data/enwiki_bytes/meta.json   # path it makes is missing (and, with `corpus` / `models`, only
        run: bash scripts/prepare_enwiki.sh    # when a run to do reads that corpus / is of one of those
        corpus: enwiki                         # models); output in <out>/prepare.log
      - creates: runs/entropy/enwiki/ckpt.pt
        run: python train.py configs/entropy_gpt.yaml data.path=data/enwiki_bytes train.out_dir=runs/entropy/enwiki
        corpus: enwiki
        models: [blt]

In every override, `{corpus}` stands for the corpus's name (per-corpus helper files such as BLT's
entropy model). Every run is scored with eval.py on the test split of its corpus's `bytes` folder
where the corpus has one (token models encode those bytes with their own tokenizer, so all score the
same bytes), else of its own folder, using the final checkpoint; the best val bpb of the run is kept
beside it.
A run whose record is in results.jsonl is never redone; a run whose folder holds a checkpoint but
no record resumes through train.py's own resume. A failed run is reported and left out, so the
next invocation tries it again.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from hlm import HLMError
from hlm.compare_report import EPOCH_FLAG, report_files, write_report

ROOT = Path(__file__).resolve().parents[1]
GRID_KEYS = {"out", "corpora", "models", "budgets", "seeds", "overrides", "eval", "generation", "device", "prepare"}
GENERATION_DEFAULTS = {"prompt_tokens": 512, "new_tokens": 256, "batch_sizes": [1, 64], "cuda_graphs": False}


class CompareError(HLMError):
    """A grid file that cannot be run; the message names the key."""


@dataclass(frozen=True)
class Run:
    model: str
    config: str
    corpus: str
    data: str
    budget_kind: str  # time | flops
    budget: float
    seed: int
    overrides: tuple[str, ...] = ()
    eval_data: str = ""  # the corpus's byte folder where it has one: every model scores the same bytes

    @property
    def budget_label(self) -> str:
        if self.budget_kind == "time":
            return f"{self.budget:g}s"
        return f"{self.budget:.3g}".replace("e+0", "e").replace("e+", "e") + "FLOP"

    @property
    def name(self) -> str:
        return f"{self.model}__{self.corpus}__{self.budget_label}__seed{self.seed}"


@dataclass(frozen=True)
class PrepareStep:
    """A shell command the grid's runs need first (data, a helper model), run only while `creates` is
    missing; with `corpus`, only when a run to do reads that corpus; with `models`, only when a run to do
    is of one of those models (so a slice without BLT does not train BLT's entropy model)."""

    run: str
    creates: str
    corpus: str | None = None
    models: tuple[str, ...] | None = None

    def needed_by(self, runs: list[Run]) -> bool:
        return any((self.corpus is None or r.corpus == self.corpus) and (self.models is None or r.model in self.models)
                   for r in runs)


@dataclass
class Grid:
    out: Path
    runs: list[Run]
    eval_batch_size: int = 8
    generation: dict = field(default_factory=lambda: dict(GENERATION_DEFAULTS))
    device: str = "auto"
    prepare: list[PrepareStep] = field(default_factory=list)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CompareError(message)


def _list(value, key: str) -> list:
    _require(isinstance(value, list), f"{key}: expected a list, got {value!r}")
    return value


def _int_list(value, key: str) -> list[int]:
    _require(isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in value), f"{key}: expected a list of integers")
    return value


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (module docstring), expanding it to its runs."""
    path = Path(path)
    _require(path.is_file(), f"grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CompareError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _require(isinstance(raw, dict), f"{path}: top level must be a mapping")
    unknown = set(raw) - GRID_KEYS
    _require(not unknown, f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(GRID_KEYS))})")
    for key in ("out", "corpora", "models", "budgets"):
        _require(bool(raw.get(key)), f"{path}: '{key}' is missing or empty")
    for key in ("corpora", "models"):
        _require(isinstance(raw[key], dict), f"{path}: '{key}' must be a mapping of names")
    _require(isinstance(raw["budgets"], list), f"{path}: 'budgets' must be a list")
    corpora = {name: spec if isinstance(spec, dict) else {"bytes": spec} for name, spec in raw["corpora"].items()}
    default_seeds = _int_list(raw.get("seeds", [1337]), "seeds")
    common = [str(o) for o in _list(raw.get("overrides", []), "overrides")]
    runs = []
    for model, spec in raw["models"].items():
        _require(isinstance(spec, dict) and "config" in spec, f"models.{model}: needs a 'config'")
        _require(set(spec) <= {"config", "data", "overrides"}, f"models.{model}: keys are config, data, overrides")
        _require(Path(spec["config"]).is_file(), f"models.{model}: config file not found: {spec['config']}")
        kind = spec.get("data", "bytes")
        for corpus, folders in corpora.items():
            _require(kind in folders, f"corpora.{corpus}: no '{kind}' data folder, which models.{model} reads")
            for i, budget in enumerate(raw["budgets"]):
                _require(isinstance(budget, dict) and len(set(budget) & {"time_s", "flops"}) == 1
                         and set(budget) <= {"time_s", "flops", "seeds"},
                         f"budgets[{i}]: give exactly one of time_s, flops (and optionally seeds)")
                budget_kind = "time" if "time_s" in budget else "flops"
                try:
                    value = float(budget.get("time_s", budget.get("flops")))
                except (TypeError, ValueError):
                    raise CompareError(f"budgets[{i}]: the budget must be a number") from None
                _require(value > 0, f"budgets[{i}]: the budget must be > 0")
                seeds = _int_list(budget["seeds"], f"budgets[{i}].seeds") if "seeds" in budget else default_seeds
                for seed in seeds:
                    own = [str(o) for o in _list(spec.get("overrides", []), f"models.{model}.overrides")]
                    overrides = tuple(o.replace("{corpus}", corpus) for o in common + own)
                    runs.append(Run(model, str(spec["config"]), corpus, str(folders[kind]), budget_kind, value,
                                    seed, overrides,
                                    str(folders.get("bytes", folders[kind]))))
    generation = {**GENERATION_DEFAULTS, **(raw.get("generation") or {})}
    _require(set(generation) == set(GENERATION_DEFAULTS),
             f"generation: keys are {', '.join(GENERATION_DEFAULTS)}")
    _require(isinstance(generation["cuda_graphs"], bool), "generation.cuda_graphs: true or false")
    prepare = []
    for i, step in enumerate(_list(raw.get("prepare", []), "prepare")):
        _require(isinstance(step, dict) and {"run", "creates"} <= set(step) <= {"run", "creates", "corpus", "models"}
                 and all(isinstance(step[k], str) and step[k] for k in set(step) - {"models"}),
                 f"prepare[{i}]: give 'run' (a shell command) and 'creates' (the path it makes), "
                 "optionally 'corpus' and 'models'")
        _require(step.get("corpus") in (None, *corpora), f"prepare[{i}].corpus: no corpus '{step.get('corpus')}'")
        models = step.get("models")
        if models is not None:
            _require(isinstance(models, list) and bool(models) and all(m in raw["models"] for m in models),
                     f"prepare[{i}].models: a list of the grid's model names, got {models!r}")
            models = tuple(models)
        prepare.append(PrepareStep(step["run"], step["creates"], step.get("corpus"), models))
    return Grid(Path(raw["out"]), runs, int((raw.get("eval") or {}).get("batch_size", 8)), generation,
                str(raw.get("device", "auto")), prepare)


def prepare_steps(grid: Grid, todo: list[Run], say=print) -> None:
    """Run the grid's `prepare` steps the runs in `todo` still need, in order; a step that fails or does not
    make its path stops the grid before any run."""
    log = grid.out / "prepare.log"
    for i, step in enumerate(grid.prepare):
        if Path(step.creates).exists() or not step.needed_by(todo):
            continue
        say(f"prepare[{i}]: {step.run}")
        run_logged(["bash", "-c", step.run], log, f"prepare[{i}]")
        _require(Path(step.creates).exists(), f"prepare[{i}] did not create {step.creates}: {step.run} (log: {log})")


# ----- one run -----

def train_command(run: Run, out_dir: Path) -> list[str]:
    budget = f"train.time_budget_s={run.budget}" if run.budget_kind == "time" else f"train.flop_budget={run.budget}"
    return [sys.executable, str(ROOT / "train.py"), run.config, *run.overrides, f"data.path={run.data}",
            f"train.out_dir={out_dir}", f"train.seed={run.seed}", "train.max_steps=1000000000", budget,
            "train.keep_best=true"]


def eval_command(out_dir: Path, run: Run, batch_size: int, checkpoint: str = "ckpt.pt",
                 result: str = "eval_test.json") -> list[str]:
    return [sys.executable, str(ROOT / "eval.py"), str(out_dir / checkpoint), "--data", run.eval_data or run.data,
            "--split", "test", "--batch-size", str(batch_size), "--json", str(out_dir / result)]


def best_val_test_bpb(run: Run, out_dir: Path, summary: dict, final_bpb: float, batch_size: int) -> float | None:
    """Test bpb of the checkpoint with the lowest val bpb (best.pt, `train.keep_best`): the final one's when
    the last validation was the best, else eval.py on best.pt. An overfitting run is scored at its best too.
    None when best.pt is not of that step (a run begun before the runner kept it)."""
    from hlm.checkpoint import load_checkpoint

    if summary["val_best_step"] == summary["steps"]:
        return final_bpb
    best = out_dir / "best.pt"
    if not best.is_file() or load_checkpoint(best, mmap=True).get("step") != summary["val_best_step"]:
        return None
    run_logged(eval_command(out_dir, run, batch_size, "best.pt", "eval_test_best.json"), out_dir / "eval.log")
    return json.loads((out_dir / "eval_test_best.json").read_text())[0]["bpb"]


def shown(cmd: list[str]) -> str:
    """A CLI command as a user types it from the repository root."""
    return " ".join(["python", Path(cmd[1]).name, *cmd[2:]])


def run_logged(cmd: list[str], log_path: Path, name: str | None = None) -> None:
    """Run a command with its output in `log_path`; a failure raises with its `name` (default: the CLI's
    file name) and the log's last line."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise CompareError(f"{name or Path(cmd[1]).name} exited {rc}: {lines[-1] if lines else ''} (log: {log_path})")


def metrics_summary(out_dir: Path) -> dict:
    """Steps, time, FLOPs, bytes seen, median training bytes/s and best/final val bpb from metrics.jsonl."""
    records = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line (the trainer drops it on resume)
            continue
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    _require(bool(train and val), f"{out_dir / 'metrics.jsonl'}: no train or val records")
    best = min(val, key=lambda r: r["bpb"])
    timed = [r["bytes_per_s"] for r in train if "bytes_per_s" in r]  # a window of untimed steps has none
    last = train[-1]
    return {"steps": last["step"], "train_time_s": last["train_time_s"], "flops_seen": last["flops_seen"],
            "bytes_seen": last["bytes_seen"], "train_bytes_per_s": statistics.median(timed) if timed else float("nan"),
            "val_bpb_best": best["bpb"], "val_best_step": best["step"], "val_bpb_final": val[-1]["bpb"]}


def inference_flops_per_byte(model: torch.nn.Module, window: torch.Tensor, token_nbytes: torch.Tensor) -> float:
    """Forward FLOPs per byte of text, counted by FlopCounterMode on one window [1, T+1] (attention
    counted as full, as the training log counts it)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(window)
    return counter.get_total_flops() / float(token_nbytes[window[0, 1:].cpu()].sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks the end of each decoding step without a host sync (CUDA events on the current stream; the
    host clock elsewhere), so that the median step can be read once the stream is done: a steady-state
    rate that leaves out the few slow steps (graph warm-ups and captures, bucket crossings)."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive marks (after a sync)."""
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def median_step_rate(step_bytes: float, step_seconds: list[float]) -> float:
    """Bytes per second at the median step: `step_bytes` (bytes decoded per step, all rows) over the median
    of `step_seconds`."""
    return step_bytes / statistics.median(step_seconds)


@torch.no_grad()
def generation_speed(model: torch.nn.Module, ids: np.ndarray, token_nbytes: torch.Tensor, batch: int,
                     prompt_tokens: int, new_tokens: int, device: torch.device, cuda_graphs: bool = False) -> dict:
    """Cached generation through `model.generate_stream`: prefill bytes/s (the prompt's bytes over the
    time to the first new token) and decode bytes/s (the new tokens' bytes over the rest), for
    `batch` rows prompted with consecutive slices of `ids`. Prompt and continuation fit one window.
    `cuda_graphs`: through the family's static decoder (the graph captures count in decode time).
    `decode_bytes_per_s_median_step`: the same bytes over the median step time (`StepClock`), the rate a
    long generation approaches."""
    stream_kw = {"cuda_graphs": True} if cuda_graphs else {}
    block = model.cfg.block_size
    prompt_tokens = max(1, min(prompt_tokens, block // 2))
    new_tokens = max(2, min(new_tokens, block - prompt_tokens))
    _require(len(ids) >= batch * prompt_tokens, f"test split too short for {batch} prompts of {prompt_tokens} tokens")
    prompt = torch.from_numpy(ids[: batch * prompt_tokens].astype(np.int64)).view(batch, prompt_tokens).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    list(model.generate_stream(prompt[:, :2], 2, generator=generator, **stream_kw))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    stream = model.generate_stream(prompt, new_tokens, generator=generator, **stream_kw)
    new = [next(stream)]
    _sync(device)
    t1 = time.perf_counter()
    clock = StepClock(device)
    clock.mark()
    for token in stream:
        new.append(token)
        clock.mark()
    _sync(device)
    t2 = time.perf_counter()
    prefill_bytes = float(token_nbytes[prompt.cpu()].sum())
    decode_bytes = float(token_nbytes[torch.stack(new[1:], 1).cpu()].sum())
    return {"prefill_bytes_per_s": prefill_bytes / (t1 - t0), "decode_bytes_per_s": decode_bytes / (t2 - t1),
            "decode_bytes_per_s_median_step": median_step_rate(decode_bytes / (len(new) - 1), clock.step_seconds()),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


def generation_speeds(model: torch.nn.Module, ids: np.ndarray, token_nbytes: torch.Tensor, generation: dict,
                      device: torch.device) -> dict:
    """`generation_speed` at each of `generation["batch_sizes"]`: eager, under bf16 autocast on CUDA
    (`generation`); and with `generation["cuda_graphs"]`, for a model with a static decoder, through CUDA
    graphs with the weights cast to bf16 on CUDA, which the model keeps (`generation_graphs`)."""
    from hlm.evaluate import inference_autocast
    from hlm.models.parts.static_decoding import weights_to

    def speeds(cuda_graphs: bool) -> dict:
        return {str(b): generation_speed(model, ids, token_nbytes, int(b), generation["prompt_tokens"],
                                         generation["new_tokens"], device, cuda_graphs)
                for b in generation["batch_sizes"]}

    with inference_autocast(device):  # bf16 on CUDA, as eval.py scores
        result = {"generation": speeds(False)}
    if generation.get("cuda_graphs") and model.has_static_decoder():
        if device.type == "cuda":
            weights_to(model, torch.bfloat16)
        result["generation_graphs"] = speeds(True)
    return result


def measure_checkpoint(ckpt_path: Path, data: str, generation: dict, device: str) -> dict:
    """Parameters, inference FLOPs per byte and generation speed of a trained checkpoint (`generation_speeds`)."""
    from hlm.checkpoint import load_model
    from hlm.data import Split

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, cfg, ckpt = load_model(ckpt_path, dev)
    nbytes = ckpt["token_nbytes"].cpu()
    ids = np.asarray(Split(data, "test").memmap())
    window = torch.from_numpy(ids[: cfg.model.block_size + 1].astype(np.int64))[None].to(dev)
    result = {"params": sum(p.numel() for p in model.parameters()),
              "inference_flops_per_byte": inference_flops_per_byte(model, window, nbytes),
              **generation_speeds(model, ids, nbytes, generation, dev),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the next run's train.py gets the whole GPU
    return result


def execute(run: Run, grid: Grid) -> dict:
    """Train (or resume), evaluate and measure one run; returns its result record."""
    from hlm.data import read_meta

    out_dir = grid.out / run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    train_cmd, eval_cmd = train_command(run, out_dir), eval_command(out_dir, run, grid.eval_batch_size)
    run_logged(train_cmd, out_dir / "train.log")
    run_logged(eval_cmd, out_dir / "eval.log")
    test = json.loads((out_dir / "eval_test.json").read_text())[0]
    summary = metrics_summary(out_dir)
    test_best = best_val_test_bpb(run, out_dir, summary, test["bpb"], grid.eval_batch_size)
    train_bytes = read_meta(run.data)["splits"]["train"]["bytes"]
    epochs = summary["bytes_seen"] / train_bytes
    return {"run": run.name, "model": run.model, "config": run.config, "corpus": run.corpus, "data": run.data,
            "budget_kind": run.budget_kind, "budget": run.budget, "budget_label": run.budget_label,
            "seed": run.seed, "out_dir": str(out_dir), **summary, "train_split_bytes": train_bytes,
            "epochs": epochs, "over_epoch_flag": epochs > EPOCH_FLAG, "test_bpb": test["bpb"],
            "test_bpb_best_val": test_best,
            "test_bytes": test["bytes"], **measure_checkpoint(out_dir / "ckpt.pt", run.data, grid.generation,
                                                              grid.device),
            "commands": [shown(train_cmd), shown(eval_cmd)],
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


# ----- the grid -----

def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_grid(grid_path: str | Path, say=print, only: list[str] = ()) -> dict:
    """Run every run of the grid not yet in results.jsonl (with `only`, those whose name contains every
    one of its strings: a slice of the grid for one machine or session), then rewrite the table and
    charts from all the records. Returns counts: runs done now, skipped (already done, or outside
    `only`), and the names of failed runs."""
    from tqdm import tqdm

    grid = load_grid(grid_path)
    names = [r.name for r in grid.runs]
    duplicates = {n for n in names if names.count(n) > 1}
    _require(not duplicates, f"{grid_path}: runs repeat ({', '.join(sorted(duplicates))})")
    results_path = grid.out / "results.jsonl"
    if not results_path.exists():  # the report's files would replace files this runner did not write
        theirs = [name for name in report_files() if (grid.out / name).exists()]
        _require(not theirs, f"out: {grid.out} already holds {', '.join(theirs)} but no results.jsonl; "
                             "choose another out folder")
    grid.out.mkdir(parents=True, exist_ok=True)
    finished = {r["run"] for r in read_results(results_path)}
    chosen = [r for r in grid.runs if all(part in r.name for part in only)]
    _require(bool(chosen), f"--only {' '.join(only)}: no run of {grid_path} is named so (see --list)")
    todo = [r for r in chosen if r.name not in finished]
    outside = f", {len(grid.runs) - len(chosen)} outside --only" if only else ""
    say(f"{len(grid.runs)} runs in {grid_path}: {len(chosen) - len(todo)} already done{outside}, {len(todo)} to run")
    if todo:
        prepare_steps(grid, todo, say)
    failed = []
    for run in tqdm(todo, desc="grid", unit="run", file=sys.stderr, disable=not todo):
        try:
            record = execute(run, grid)
        except Exception as e:  # one failed run (a bad config, out of memory) must not stop the grid's report
            failed.append(run.name)
            tqdm.write(f"run {run.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        flag = f" (past {EPOCH_FLAG:g} epochs)" if record["over_epoch_flag"] else ""
        tqdm.write(f"{run.name}: test bpb {record['test_bpb']:.4f}, {record['steps']} steps, "
                   f"{record['epochs']:.2f} epochs{flag}", file=sys.stderr)
    write_report(read_results(results_path), grid.out, str(grid_path), say)
    return {"done": len(todo) - len(failed), "skipped": len(grid.runs) - len(todo), "failed": failed}


def all_runs_listing(grid_path: str | Path) -> list[str]:
    """The prepare steps, then the train and eval commands of every run, for `compare.py --list`."""
    grid = load_grid(grid_path)
    lines = [f"# prepare[{i}], while {step.creates} is missing"
             + (f", for {', '.join(step.models)}" if step.models else "") + f"\n{step.run}"
             for i, step in enumerate(grid.prepare)]
    for run in grid.runs:
        out_dir = grid.out / run.name
        lines += [f"# {run.name}"] + [shown(cmd) for cmd in (train_command(run, out_dir),
                                                eval_command(out_dir, run, grid.eval_batch_size))]
    return lines

