"""Static (CUDA-graph) decoding: the fixed-shape step of gpt, the hourglass and the one-stage H-Net
gives the full forward's next-byte distribution at every step (fp64), through ring caches that wrap,
groups capped, rows closing groups at different bytes, and window restarts; and
`generate(cuda_graphs=True)` samples what eager decoding samples. That CUDA graphs replay these steps
exactly is benchmarks/graph_check.py's check on the GPU (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import decode_against_teacher_forcing
from test_hnet import ONE, TWO, stage_boundaries
from test_hnet import tiny as tiny_hnet
from test_hourglass import text_batch, tiny

from hlm import HLMError
from hlm.config import load_config
from hlm.models import build_model
from hlm.models.gpt import GPTConfig
from hlm.models.hnet import HNetError
from hlm.models.hourglass import BOUNDARY_TYPES
from hlm.models.parts.static_decoding import (
    KEY_BUCKET,
    GroupKeyBound,
    StepGraphs,
    graphs_match,
    key_bucket,
    weights_to,
)


def tiny_gpt(block_size: int = 40):
    torch.manual_seed(0)
    return build_model(GPTConfig(block_size=block_size, n_layer=2, n_head=2, d_model=32)).double().eval()


def test_gpt_static_decoder_matches_the_full_forward():
    model = tiny_gpt()
    seq = text_batch(3, 110, seed=14)
    dec = model.new_static_decoder(seq[:, :5])
    assert decode_against_teacher_forcing(model, dec, seq, 5) == 4  # at 40 bytes, then every 20


@pytest.mark.parametrize("max_groups, byte_window", [(16, 8), (3, 0)])  # ring / full byte caches; roomy / capped
@pytest.mark.parametrize("boundaries", BOUNDARY_TYPES)
def test_hourglass_static_decoder_matches_the_full_forward(boundaries, max_groups, byte_window):
    """Three rows that close groups at different bytes, past block_size (48) so the window restarts."""
    model = tiny(boundaries, max_groups=max_groups, byte_window=byte_window).double().eval()
    seq = text_batch(3, 110, seed=14)
    ends = model.boundaries(seq, torch.zeros(3, 110, 32, dtype=torch.float64))[0]
    if boundaries in ("whitespace", "spacebyte"):
        assert not all(torch.equal(ends[0], ends[r]) for r in (1, 2))
    dec = model.new_static_decoder(seq[:, :5])
    assert decode_against_teacher_forcing(model, dec, seq, 5) == 3


@pytest.mark.parametrize("stages, caps, byte_window", [
    (ONE, [], 8), (ONE, [5], 0),  # ring / full byte caches; roomy / capped
    (TWO, [], 8), (TWO, [14, 4], 0),  # an inner stage without and with caps
])
def test_hnet_static_decoder_matches_the_full_forward(stages, caps, byte_window):
    """One and two stages, three rows starting chunks at different bytes (in every stage), past block_size (48)."""
    model = tiny_hnet(stages, max_chunks=caps, byte_window=byte_window).double().eval()
    seq = text_batch(3, 80, seed=14)
    for b in stage_boundaries(model, seq[:, :48]):
        assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])
    dec = model.new_static_decoder(seq[:, :5])
    assert decode_against_teacher_forcing(model, dec, seq, 5) == 2


@pytest.mark.parametrize("family", ["gpt", "hourglass", "hnet", "hnet2"])
def test_small_key_buckets_still_cover_every_row(family, monkeypatch):
    """Buckets of 4 keys: the attended slots grow step by step, and the grouped models re-read their rows'
    group counts whenever a bound would cross into a larger bucket (the two-stage H-Net has two bounds)."""
    monkeypatch.setattr("hlm.models.parts.static_decoding.KEY_BUCKET", 4)
    model = {"gpt": tiny_gpt, "hourglass": lambda: tiny("whitespace", max_groups=40, byte_window=0).double().eval(),
             "hnet": lambda: tiny_hnet(ONE, max_chunks=[40], byte_window=0).double().eval(),
             "hnet2": lambda: tiny_hnet(TWO, max_chunks=[40, 30], byte_window=0).double().eval()}[family]()
    seq = text_batch(3, 100, seed=4)
    dec = model.new_static_decoder(seq[:, :3])
    buckets = []
    step = dec.step
    dec.step = lambda bucket: (buckets.append(bucket), step(bucket))
    decode_against_teacher_forcing(model, dec, seq, 3)
    assert len(set(buckets)) > 5


@pytest.mark.parametrize("kw", [dict(feedback="boundary"), dict(pooling="last")])
def test_hourglass_static_decoder_feedback_and_pooling_variants(kw):
    model = tiny("spacebyte", **kw).double().eval()
    seq = text_batch(2, 70, seed=3)
    dec = model.new_static_decoder(seq[:, :9])
    assert decode_against_teacher_forcing(model, dec, seq, 9) == 1


@pytest.mark.parametrize("family", ["gpt", "hourglass", "hnet", "hnet2"])
def test_generate_with_cuda_graphs_samples_what_eager_decoding_samples(family):
    model = {"gpt": tiny_gpt, "hourglass": lambda: tiny("whitespace").double().eval(),
             "hnet": lambda: tiny_hnet(ONE).double().eval(), "hnet2": lambda: tiny_hnet(TWO).double().eval()}[family]()
    prompt = text_batch(4, 30, seed=2)
    runs = [model.generate(prompt, 40, generator=torch.Generator().manual_seed(7), cuda_graphs=graphs)
            for graphs in (False, True)]
    assert torch.equal(runs[0], runs[1])
    assert model.generate(b"\x00Fi", 5, temperature=0, cuda_graphs=True) == model.generate(b"\x00Fi", 5, temperature=0)


def test_models_without_a_static_decoder_say_so():
    hat = build_model(load_config("configs/smoke/hat.yaml").model).eval()
    short_inner_window = tiny_hnet(TWO, inner_window=4).eval()  # shorter than the outer stage's 48 chunks
    assert tiny_gpt().has_static_decoder() and tiny_hnet(ONE).has_static_decoder()
    assert tiny_hnet(TWO).has_static_decoder() and tiny_hnet(TWO, inner_window=49).has_static_decoder()
    assert not hat.has_static_decoder() and not short_inner_window.has_static_decoder()
    with pytest.raises(HLMError, match="no CUDA-graph decoder"):
        hat.new_static_decoder(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(HNetError, match="inner_window is shorter"):
        short_inner_window.generate(b"\x00ab", 2, cuda_graphs=True)


def test_key_buckets_cover_every_row_and_stay_within_the_cache():
    assert key_bucket(1, 4096) == KEY_BUCKET and key_bucket(KEY_BUCKET + 1, 4096) == 2 * KEY_BUCKET
    assert key_bucket(1000, 1026) == 1024 and key_bucket(1025, 1026) == 1026


def test_step_graphs_off_cuda_run_every_step():
    calls = []
    graphs = StepGraphs(torch.device("cpu"))
    for key in (1, 1, 2, 1):
        graphs.run(key, calls.append)
    assert calls == [1, 1, 2, 1] and not graphs.graphs
    assert graphs_match(tiny_gpt(), text_batch(2, 10), 5) == {"same_greedy_ids": True, "max_abs_logit_diff": 0.0}


def test_group_key_bound_covers_every_row_and_reads_back_only_at_bucket_crossings(monkeypatch):
    monkeypatch.setattr("hlm.models.parts.static_decoding.KEY_BUCKET", 8)
    n_groups = torch.tensor([3, 0])
    bound = GroupKeyBound(n_groups, first_slot=1, slots=64)
    reads = 0
    reset = bound.reset

    def counted(n):
        nonlocal reads
        reads += 1
        reset(n)

    bound.reset = counted
    for step in range(60):
        bucket = bound.next_bucket(n_groups)
        assert bucket >= int(n_groups.max()) + 2  # the slot of every row's next group is attended
        if step % 3 == 0:  # one row takes a group every third byte
            n_groups[0] += 1
    assert bucket <= 32 and 0 < reads < 20  # about the slots used, not one per step


def test_weights_to_casts_parameters_and_keeps_rotary_tables():
    model = build_model(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=32))
    assert weights_to(model, torch.bfloat16) is model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.transformer.rotary.cos.dtype == torch.float32


@pytest.mark.parametrize("family", ["gpt", "whitespace", "spacebyte", "hnet", "hnet2"])
def test_bf16_weights_decode_without_autocast(family):
    """The GPU path: weights cast to bf16 and no autocast, through the eager prefill, the static steps and a
    window restart (block 48). Every step's log-probabilities stay within 0.03 nats (ten times the bf16
    rounding seen here) of the same decoder in fp32, fed the same bytes."""
    def build():
        if family == "gpt":
            return tiny_gpt(48).float()
        if family == "hnet":
            return tiny_hnet(ONE, max_chunks=[5], byte_window=8).float().eval()
        if family == "hnet2":
            return tiny_hnet(TWO, max_chunks=[14, 4], byte_window=8).float().eval()
        return tiny(family, max_groups=4, byte_window=8).float().eval()

    seq = text_batch(3, 70, seed=5)
    logprobs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = weights_to(build(), dtype)
        dec = model.new_static_decoder(seq[:, :5])
        steps = []
        for t in range(5, 70):
            assert dec.logits.dtype == dtype
            steps.append(torch.log_softmax(dec.logits.float(), -1))
            dec.push(seq[:, t])
        logprobs.append(torch.stack(steps))
    assert logprobs[1].isfinite().all()
    assert (logprobs[0] - logprobs[1]).abs().max() < 0.03
