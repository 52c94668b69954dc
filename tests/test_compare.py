"""The comparison runner on a tiny CPU grid (2 smoke configs x 1 corpus x 1 FLOP budget): it writes
results.jsonl, the table and the charts, and a second invocation redoes nothing."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import yaml
from conftest import assert_one_line_error, load_cli

from hlm import HLMError
from hlm.checkpoint import load_checkpoint
from hlm.compare import StepClock, load_grid, median_step_rate, run_grid
from hlm.compare_report import table as table_of
from hlm.config import load_config
from hlm.flops import count_flops
from hlm.models import build_model
from hlm.trainer import Trainer

MODELS = {
    "byte_gpt": ("configs/smoke/byte_gpt.yaml", ["model.n_layer=1", "model.d_model=32", "model.block_size=32"]),
    "spacebyte": ("configs/smoke/spacebyte.yaml", ["model.d_model=32", "model.block_size=32",
                                                   "model.max_groups=12"]),
}
COMMON = ["log.tensorboard=false", "eval.batches=2", "train.batch_size=4"]


def flops_per_step(config: str, overrides: list[str]) -> int:
    import torch

    cfg = load_config(config, COMMON + overrides)
    model = build_model(cfg.model)
    batch = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.block_size + 1))
    return count_flops(model, batch, contextlib.nullcontext())


@pytest.fixture
def grid_file(tmp_path, byte_corpus):
    budget = 4 * max(flops_per_step(c, o) for c, o in MODELS.values())  # every model trains >= 4 steps
    grid = {
        "out": str(tmp_path / "out"),
        "corpora": {"shakespeare": {"bytes": str(byte_corpus)}},
        "models": {name: {"config": c, "overrides": o} for name, (c, o) in MODELS.items()},
        "budgets": [{"flops": budget}],
        "overrides": COMMON,
        "generation": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1, 2], "cuda_graphs": True},
        "device": "cpu",
        "prepare": [{"creates": str(tmp_path / "made.txt"), "run": f"echo $((6 * 7)) > '{tmp_path}/made.txt'"}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_runner_writes_results_table_and_charts_then_redoes_nothing(grid_file, monkeypatch):
    pytest.importorskip("matplotlib")  # in the dev extra; the runner itself only skips the charts
    summary = run_grid(grid_file, say=lambda _: None)
    assert summary == {"done": 2, "skipped": 0, "failed": []}
    out = grid_file.parent / "out"
    assert (grid_file.parent / "made.txt").read_text() == "42\n"  # the prepare step ran before the runs
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["byte_gpt", "spacebyte"]
    budget = load_grid(grid_file).runs[0].budget
    for r in records:
        assert r["flops_seen"] >= budget  # stopped at the first step that reached the FLOP budget ...
        assert r["flops_seen"] * (r["steps"] - 1) < budget * r["steps"]  # ... not a step later
        assert r["steps"] >= 4 and 0 < r["epochs"] < 1 and not r["over_epoch_flag"]
        assert 0 < r["test_bpb"] < 9 and r["val_bpb_best"] <= r["val_bpb_final"]
        best = load_checkpoint(out / r["run"] / "best.pt")  # train.keep_best: the weights of the lowest val bpb
        assert best["step"] == r["val_best_step"] and best["val_bpb"] == r["val_bpb_best"]
        if r["val_best_step"] == r["steps"]:
            assert r["test_bpb_best_val"] == r["test_bpb"]
        else:
            assert r["test_bpb_best_val"] == json.loads((out / r["run"] / "eval_test_best.json").read_text())[0]["bpb"]
        assert r["inference_flops_per_byte"] > 0
        assert set(r["generation"]) == {"1", "2"}
        assert all(g["prefill_bytes_per_s"] > 0 and g["decode_bytes_per_s"] > 0 for g in r["generation"].values())
        assert set(r["generation_graphs"]) == {"1", "2"}  # both families have a static decoder
        for g in [*r["generation"].values(), *r["generation_graphs"].values()]:
            assert g["decode_bytes_per_s"] > 0 and g["decode_bytes_per_s_median_step"] > 0
    # a training step is one forward and its backward (2x the forward's matmuls, 2.5x its attention)
    # over batch_size x block_size bytes: 3 to 3.5 times the forward FLOPs per byte counted on a test window
    gpt = records[0]
    train_per_byte = gpt["flops_seen"] / gpt["steps"] / (4 * 32)
    assert 3.0 <= train_per_byte / gpt["inference_flops_per_byte"] <= 3.5
    table = (out / "results.md").read_text()
    assert "| byte_gpt | shakespeare |" in table and "| spacebyte | shakespeare |" in table
    assert "graphed decode B/s @2, whole / median step |" in table and "| test bpb, best-val ckpt |" in table
    row = next(line for line in table.splitlines() if line.startswith("| byte_gpt |"))
    graphed = records[0]["generation_graphs"]["2"]
    assert row.endswith(f"| {graphed['decode_bytes_per_s']:,.0f} / {graphed['decode_bytes_per_s_median_step']:,.0f} |")
    eager_only = {k: v for k, v in records[0].items() if k != "generation_graphs"} | {"model": "no_graphs"}
    row = next(line for line in table_of([*records, eager_only]).splitlines() if line.startswith("| no_graphs |"))
    assert row.endswith("| – | – |")  # a family without a static decoder has no graphed rates
    for stem in ("bpb_vs_train_flops", "bpb_vs_wall_clock", "bpb_vs_inference_flops"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt.pt")}
    results_before = (out / "results.jsonl").read_bytes()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr("hlm.compare.execute", must_not_run)
    assert run_grid(grid_file, say=lambda _: None) == {"done": 0, "skipped": 2, "failed": []}
    assert run_grid(grid_file, say=lambda _: None, only=["spacebyte"]) == {"done": 0, "skipped": 2, "failed": []}
    with pytest.raises(HLMError, match="no run"):
        run_grid(grid_file, say=lambda _: None, only=["hat"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/ckpt.pt")} == stamps
    assert (out / "results.jsonl").read_bytes() == results_before

    # a run trained but without a record (say eval failed) resumes: train.py finds its finished
    # checkpoint and trains no further step, then eval and the measurements run again
    monkeypatch.undo()
    (out / "results.jsonl").write_bytes(results_before.splitlines(keepends=True)[0])
    # --only: the missing spacebyte run is outside the slice, so nothing runs
    assert run_grid(grid_file, say=lambda _: None, only=["byte_gpt"]) == {"done": 0, "skipped": 2, "failed": []}
    assert run_grid(grid_file, say=lambda _: None) == {"done": 1, "skipped": 1, "failed": []}
    redone = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][1]
    assert redone["model"] == "spacebyte" and redone["steps"] == records[1]["steps"]
    assert redone["test_bpb"] == records[1]["test_bpb"]
    assert (out / redone["run"] / "train.log").read_text().count("$ ") == 2
    assert (out / "prepare.log").read_text().count("$ ") == 1  # its path was there on every later invocation


def test_median_step_rate_leaves_out_the_slow_steps():
    """Eight steps of 10 ms and two captures of 1 s, 64 bytes a step: the median step decodes 6,400 bytes/s,
    the whole stream 640 bytes in 2.08 s."""
    seconds = [0.01] * 4 + [1.0] + [0.01] * 4 + [1.0]
    assert median_step_rate(64.0, seconds) == pytest.approx(6400.0)
    assert median_step_rate(64.0, seconds[:5]) == pytest.approx(6400.0)  # the slow steps need not be at the end
    assert median_step_rate(64.0, [0.5, 0.01, 1.0]) == pytest.approx(128.0)
    clock = StepClock(torch.device("cpu"))
    for _ in range(4):
        clock.mark()
    steps = clock.step_seconds()
    assert len(steps) == 3 and all(s >= 0 for s in steps)


def test_matched_compute_grid_expands_to_the_issue_grid():
    grid = load_grid("benchmarks/grids/matched_compute.yaml")
    assert len(grid.runs) == 8 * 2 * (1 + 2 + 1)  # families x corpora x (2 min, 5 min x 2 seeds, FLOPs)
    assert {o for r in grid.runs if r.model == "blt_p4.5" for o in r.overrides if "entropy_model" in o} == {
        "model.entropy_model=runs/entropy/enwiki/ckpt.pt", "model.entropy_model=runs/entropy/code/ckpt.pt"}
    assert {r.budget for r in grid.runs if r.budget_kind == "flops"} == {1.7e17}
    assert {r.seed for r in grid.runs if r.budget == 300} == {1337, 1338}
    assert {r.data for r in grid.runs if r.model == "bpe_gpt"} == {"data/enwiki_bpe", "data/code_bpe"}
    assert {r.eval_data for r in grid.runs} == {"data/enwiki_bytes", "data/code_bytes"}  # the same bytes for all
    for config in {r.config for r in grid.runs}:
        load_config(config)


def test_prepare_steps_run_only_for_the_runs_to_do_and_stop_the_grid_on_failure(tmp_path, capsys, byte_corpus):
    """A step for a corpus no run to do reads is skipped; a step that fails, or exits 0 without making its
    path, is one line naming it, and no run starts."""
    compare = load_cli("compare")
    grid = {"out": str(tmp_path / "o"), "corpora": {"c": str(byte_corpus), "d": str(byte_corpus)},
            "models": {"m": {"config": "configs/smoke/byte_gpt.yaml"}}, "budgets": [{"time_s": 1}],
            "prepare": [{"creates": str(tmp_path / "for_d"), "run": "exit 5", "corpus": "d"},
                        {"creates": str(tmp_path / "made"), "run": f"printf x > '{tmp_path}/made'; exit 4"}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert_one_line_error(compare.main([str(path), "--only", "__c__"]), capsys.readouterr().err, "prepare[1] exited 4")
    assert (tmp_path / "made").read_text() == "x"
    grid["prepare"][1] = {"creates": str(tmp_path / "never"), "run": "true"}
    path.write_text(yaml.safe_dump(grid))
    assert_one_line_error(compare.main([str(path), "--only", "__c__"]), capsys.readouterr().err,
                          f"prepare[1] did not create {tmp_path / 'never'}")
    assert_one_line_error(compare.main([str(path)]), capsys.readouterr().err, "prepare[0] exited 5")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["prepare.log"]


def test_a_prepare_step_for_some_models_runs_only_when_one_of_them_is_to_do(tmp_path, capsys, byte_corpus):
    """`models` scopes a step to the runs that need it: a slice of other models skips it (and gets as far as
    its own runs), a slice with one of them runs it first."""
    compare = load_cli("compare")
    grid = {"out": str(tmp_path / "o"), "corpora": {"c": str(byte_corpus)},
            "models": {"a": {"config": "configs/smoke/byte_gpt.yaml", "overrides": ["model.n_layer=-1"]},
                       "b": {"config": "configs/smoke/byte_gpt.yaml"}},
            "budgets": [{"time_s": 1}],
            "prepare": [{"creates": str(tmp_path / "for_b"), "run": "exit 3", "models": ["b"]}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert compare.main([str(path), "--only", "a__"]) == 1
    err = capsys.readouterr().err
    assert "prepare[0]" not in err and "a__c__1s__seed1337" in err  # its own run was tried (and failed)
    assert_one_line_error(compare.main([str(path), "--only", "b__"]), capsys.readouterr().err, "prepare[0] exited 3")
    grid["prepare"][0]["models"] = ["z"]
    path.write_text(yaml.safe_dump(grid))
    assert_one_line_error(compare.main([str(path)]), capsys.readouterr().err,
                          "prepare[0].models: a list of the grid's model names")


def test_bad_grid_is_one_line_error(tmp_path, capsys, byte_corpus):
    compare = load_cli("compare")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "corpora": {"c": str(byte_corpus)},
                                   "models": {"m": {"config": "configs/smoke/byte_gpt.yaml", "data": "bpe"}},
                                   "budgets": [{"time_s": 1}]}))
    assert_one_line_error(compare.main([str(bad)]), capsys.readouterr().err, "no 'bpe' data folder")
    bad.write_text(yaml.safe_dump({"out": "o", "corpora": {"c": "d"}, "models": {"m": {"config": "x.yaml"}},
                                   "budgets": [{"time_s": 1, "flops": 2}]}))
    assert_one_line_error(compare.main([str(bad)]), capsys.readouterr().err, "config file not found")
    bad.write_text(yaml.safe_dump({"out": "o", "corpora": {"c": "d"},
                                   "models": {"m": {"config": "configs/byte_gpt.yaml"}},
                                   "budgets": [{"time_s": 1}], "prepare": [{"run": "true"}]}))
    assert_one_line_error(compare.main([str(bad)]), capsys.readouterr().err, "prepare[0]: give 'run'")
    bad.write_text(yaml.safe_dump({"out": "o", "corpora": {"c": "d"},
                                   "models": {"m": {"config": "configs/byte_gpt.yaml"}},
                                   "budgets": [{"time_s": 1}], "generation": {"cuda_graphs": "yes"}}))
    assert_one_line_error(compare.main([str(bad)]), capsys.readouterr().err, "generation.cuda_graphs: true or false")
    assert not (tmp_path / "o").exists()


def test_pareto_front_keeps_the_points_no_other_beats_on_cost_and_bpb():
    from hlm.compare_report import pareto_front

    points = [(3.0, 1.2), (1.0, 1.5), (2.0, 1.6), (4.0, 1.2), (5.0, 1.1), (2.5, 1.3)]
    assert pareto_front(points) == [(1.0, 1.5), (2.5, 1.3), (3.0, 1.2), (5.0, 1.1)]
    assert pareto_front([(1.0, 1.0)]) == [(1.0, 1.0)]


def test_chart_keeps_family_styles_across_corpora_names_all_labels_epochs_and_joins_fronts():
    """A family missing from the first corpus's runs must not shift the others' styles in the second panel,
    and the legend must name families that only one panel shows."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from hlm.compare_report import chart_figure

    def record(model, corpus, flops, bpb, epochs=1.3):
        return {"model": model, "corpus": corpus, "flops_seen": flops, "test_bpb": bpb, "epochs": epochs,
                "over_epoch_flag": epochs > 4}

    records = [record("a", "wiki", 1e16, 1.5), record("b", "wiki", 2e16, 1.4),
               record("b", "code", 1e16, 0.8), record("c", "code", 3e16, 0.7, epochs=5.5),
               record("a", "code", 2e16, 0.9)]
    fig = chart_figure(records, "flops_seen", "training FLOPs", True)
    try:
        styles = {}
        for ax in fig.axes:
            for points in ax.collections:
                colour = tuple(points.get_facecolor()[0])
                marker = points.get_paths()[0].vertices.round(6).tobytes()
                styles.setdefault(points.get_label(), set()).add((colour, marker))
        assert {m: len(s) for m, s in styles.items()} == {"a": 1, "b": 1, "c": 1}  # one style per family
        assert len({s.pop() for s in styles.values()}) == 3  # and the families differ
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "c"]
        colour_b = next(iter(c for ax in fig.axes for c in ax.collections if c.get_label() == "b"))
        assert tuple(colour_b.get_facecolor()[0]) == to_rgba("C1")
        labels = sorted(t.get_text() for ax in fig.axes for t in ax.texts)
        assert labels == ["1.3 ep"] * 4 + ["5.5 ep ⚑"]  # every run says how often it read its split
        assert [len(ax.lines) for ax in fig.axes] == [0, 0]  # one point per family and corpus: no front
    finally:
        plt.close(fig)
    # a's three code runs: the dearest is worse than the middle one, so the front stops there
    records += [record("a", "code", 4e16, 0.85), record("a", "code", 8e16, 0.87)]
    fig = chart_figure(records, "flops_seen", "training FLOPs", True)
    try:
        (line,) = fig.axes[1].lines
        assert line.get_xdata().tolist() == [2e16, 4e16] and line.get_ydata().tolist() == [0.9, 0.85]
    finally:
        plt.close(fig)


def test_an_out_folder_with_someone_else_s_report_files_is_refused_untouched(tmp_path, capsys, byte_corpus):
    """results.md and the chart PNGs are rewritten after every run: in a folder without the runner's
    results.jsonl they are someone else's, so the grid stops before writing anything there."""
    compare = load_cli("compare")
    out = tmp_path / "papers"
    out.mkdir()
    (out / "bpb_vs_wall_clock.png").write_bytes(b"my figure")
    grid = {"out": str(out), "corpora": {"c": str(byte_corpus)},
            "models": {"m": {"config": "configs/smoke/byte_gpt.yaml"}}, "budgets": [{"time_s": 1}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert_one_line_error(compare.main([str(path)]), capsys.readouterr().err,
                          f"out: {out} already holds bpb_vs_wall_clock.png but no results.jsonl")
    assert [p.name for p in out.iterdir()] == ["bpb_vs_wall_clock.png"]
    assert (out / "bpb_vs_wall_clock.png").read_bytes() == b"my figure"


def test_best_val_checkpoint_is_scored_when_an_earlier_validation_was_the_best(tmp_path, byte_corpus):
    """A run whose lowest val bpb came before its last step is scored on test with best.pt too; a best.pt of
    another step (a run begun before the runner kept it) or none gives no number rather than a wrong one."""
    from hlm.compare import Run, best_val_test_bpb

    out = tmp_path / "run"
    Trainer(load_config("configs/smoke/byte_gpt.yaml", [
        f"data.path={byte_corpus}", f"train.out_dir={out}", *MODELS["byte_gpt"][1], *COMMON, "train.max_steps=4",
        "eval.interval=2", "train.keep_best=true"])).fit()
    step = load_checkpoint(out / "best.pt")["step"]
    run = Run("byte_gpt", "configs/smoke/byte_gpt.yaml", "c", str(byte_corpus), "time", 1.0, 1337, ())
    later = {"val_best_step": step, "steps": step + 3}  # as if three more steps had ended worse
    bpb = best_val_test_bpb(run, out, later, final_bpb=-1.0, batch_size=4)
    assert bpb == json.loads((out / "eval_test_best.json").read_text())[0]["bpb"] and 0 < bpb < 9
    assert "best.pt" in (out / "eval.log").read_text()
    assert best_val_test_bpb(run, out, {"val_best_step": step, "steps": step}, final_bpb=-1.0, batch_size=4) == -1.0
    assert best_val_test_bpb(run, out, {"val_best_step": step - 2, "steps": step + 3}, -1.0, 4) is None
    (out / "best.pt").unlink()
    assert best_val_test_bpb(run, out, later, -1.0, 4) is None
