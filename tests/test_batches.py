"""The batch source: side inputs cut at the training windows, batches a pure function of
(step, micro, rank), ranks disjoint, validation split across ranks without loss or overlap."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET, SMOKE_BYTE, TINY_MODEL

from hlm.batches import Batches
from hlm.config import ConfigError, load_config
from hlm.parallel import Runtime


@pytest.fixture(scope="module")
def corpus_with_side_file(byte_corpus, tmp_path_factory):
    """The byte corpus with a side file `train.copy.bin` that repeats train.bin byte for byte."""
    data = tmp_path_factory.mktemp("side") / "data"
    shutil.copytree(byte_corpus, data)
    shutil.copy(data / "train.bin", data / "train.copy.bin")
    return data


def batches(data, rank=0, world=1, *overrides):
    cfg = load_config(SMOKE_BYTE, [f"data.path={data}", *TINY_MODEL, *QUIET, "train.batch_size=3",
                                   "train.grad_accum=2", "eval.batches=3", *overrides])
    return Batches(cfg, Runtime(torch.device("cpu"), rank, rank, world))


def test_side_inputs_are_the_same_windows_as_the_batch(corpus_with_side_file):
    source = batches(corpus_with_side_file)
    source.use_model(SimpleNamespace(side_inputs={"copy": "copy"}))
    for step, micro in ((0, 0), (0, 1), (7, 1)):
        idx, kwargs = source.train(step, micro)
        assert idx.shape == (3, 33) and kwargs.keys() == {"copy"}
        assert torch.equal(kwargs["copy"], idx)  # the copy file cut at the batch's windows is the batch


def test_side_inputs_refuse_fim(corpus_with_side_file):
    source = batches(corpus_with_side_file, 0, 1, "data.fim_rate=0.5", "model.vocab_size=259")
    with pytest.raises(ConfigError, match="side inputs .*copy.* cannot follow"):
        source.use_model(SimpleNamespace(side_inputs={"copy": "copy"}))


def test_batches_are_a_function_of_step_micro_and_rank(byte_corpus):
    first, again = batches(byte_corpus, 0, 2), batches(byte_corpus, 0, 2)
    other_rank = batches(byte_corpus, 1, 2)
    for step, micro in ((3, 1), (0, 0), (3, 1)):  # any order, any object: the same windows
        x, _ = first.train(step, micro)
        assert torch.equal(x, again.train(step, micro)[0])
        rows = {tuple(r) for r in x.tolist()} | {tuple(r) for r in other_rank.train(step, micro)[0].tolist()}
        assert len(rows) == 6  # two ranks, three windows each, none shared
    assert not torch.equal(first.train(0, 0)[0], first.train(0, 1)[0])


@pytest.mark.parametrize("eval_batch", ["3", "1"])  # with batches of 1 window, rank 1 runs out first
def test_val_windows_are_split_over_ranks_without_loss_or_overlap(byte_corpus, eval_batch):
    setting = f"eval.batch_size={eval_batch}"
    whole = [x for x, weight in batches(byte_corpus, 0, 1, setting).val() if weight]
    per_rank = [list(batches(byte_corpus, rank, 2, setting).val()) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # every rank runs the same number of forwards
    scored = [row for rank_batches in per_rank for x, weight in rank_batches if weight for row in x.tolist()]
    assert sorted(scored) == sorted(row for x in whole for row in x.tolist())
    n_windows = 3 * int(eval_batch)  # eval.batches x eval.batch_size
    assert len(scored) == n_windows == len({tuple(r) for r in scored})
