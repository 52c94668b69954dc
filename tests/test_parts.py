"""The shared hierarchy parts (hlm/models/parts): every boundary source is causal, the boundary
conventions convert both ways, no down/upsampling path lets a byte read a group holding a later
byte, segment attention and `rows_step` match plain loops, and the one cached decoder equals
teacher forcing for every family on it, at batch 3 with rows closing groups at different bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, decode_against_teacher_forcing

from hlm.models.blt import BLT, BLTConfig
from hlm.models.hat import HAT, HATConfig
from hlm.models.hnet import HNet, HNetConfig
from hlm.models.hourglass import Hourglass, HourglassConfig
from hlm.models.parts.boundaries import (
    ends_from_starts,
    fixed_ends,
    group_first,
    group_index,
    spacebyte_boundaries,
    starts_from_ends,
    whitespace_boundaries,
    whitespace_starts,
)
from hlm.models.parts.decoding import rows_step
from hlm.models.parts.downsample import PatchPooling, WordPooling, pool_first, pool_last, pool_mean, segment_attention
from hlm.models.parts.upsample import dechunk, feed_back_at_boundaries, smooth, upsample_groups
from hlm.splitter import PrefixState, word_starts

TEXT = open(ROOT / "tests" / "fixtures" / "tinyshakespeare_head32k.txt", "rb").read()


def text_batch(n_rows: int, length: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.tensor([list(TEXT[s : s + length]) for s in g.integers(0, len(TEXT) - length, n_rows)])


def hourglass(boundaries: str, **kw) -> Hourglass:
    torch.manual_seed(0)
    cfg = dict(block_size=48, n_pre=1, n_short=1, n_post=1, n_head=2, d_model=32, byte_window=8,
               boundaries=boundaries, fixed_stride=3, max_groups=16, predictor_ratio=2.0)
    return Hourglass(HourglassConfig(**{**cfg, **kw})).double().eval()


def hnet(n_stages: int) -> HNet:
    torch.manual_seed(0)
    stages = (dict(d_model=[32, 32], n_enc=[1], n_dec=[1], ratio_target=[3.0]) if n_stages == 1 else
              dict(d_model=[32, 48, 64], n_enc=[1, 1], n_dec=[1, 1], ratio_target=[2.0, 2.0]))
    return HNet(HNetConfig(block_size=48, n_main=1, head_dim=16, byte_window=8, **stages)).double().eval()


def blt(**kw) -> BLT:
    """A tiny BLT whose random entropy model spreads its entropies around the threshold."""
    torch.manual_seed(0)
    cfg = dict(block_size=48, d_local=32, n_head_local=2, n_enc=1, n_dec=2, byte_window=8, d_model=32, n_head=2,
               n_layer=1, max_patches=24, hash_vocab=97, entropy_model="random", entropy_n_layer=1,
               entropy_n_head=2, entropy_d_model=16, entropy_window=16, entropy_threshold=4.85)
    model = BLT(BLTConfig(**{**cfg, **kw}))
    torch.nn.init.normal_(model.entropy.head.weight, std=0.3)
    return model.double().eval()


def hat() -> HAT:
    torch.manual_seed(0)
    return HAT(HATConfig(block_size=48, max_words=16, max_word_bytes=8, d_byte=16, n_head_byte=2, n_enc_layer=1,
                         n_dec_layer=1, d_model=16, n_head=2, n_layer=2)).double().eval()


# ----- boundary sources -----

def _learned(model: Hourglass):
    return lambda x: model.boundaries(x, model.pre(model.embed(x)))[0]


def _router(model: HNet):
    return lambda x: model.stage.routing(model.stage.encode(model.embed(x)), torch.ones_like(x, dtype=torch.bool))[1]


SOURCES = {  # name -> (builder of decisions [B, T'] for bytes x [B, T], how many decisions byte t fixes)
    "fixed": (lambda: lambda x: fixed_ends(x, 3), 0),
    "whitespace": (lambda: whitespace_boundaries, 0),
    "spacebyte": (lambda: spacebyte_boundaries, 0),
    "whitespace_starts": (lambda: whitespace_starts, 0),
    "predictor": (lambda: _learned(hourglass("unigram")), 0),
    "gumbel_mode": (lambda: _learned(hourglass("gumbel")), 0),
    "cosine_router": (lambda: _router(hnet(1)), 0),
    "entropy": (lambda: blt().starts, 1),  # starts [B, T+1]: entry t+1 is known once byte t is
    "words": (lambda: lambda x: PrefixState(x, 8).starts, 0),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_boundary_sources_are_causal(name):
    """Changing bytes from j on never changes a decision that bytes < j fix, and does change some
    later ones (so the check is not vacuous)."""
    build, ahead = SOURCES[name]
    source = build()
    x = text_batch(3, 40, seed=3)
    g = torch.Generator().manual_seed(4)
    changed_later = False
    with torch.no_grad():
        base = source(x)
        for j in (1, 7, 20, 33):
            y = x.clone()
            y[:, j:] = torch.randint(0, 256, y[:, j:].shape, generator=g)
            other = source(y)
            assert torch.equal(base[:, : j + ahead], other[:, : j + ahead]), f"decision before byte {j} moved"
            changed_later |= not torch.equal(base, other)
    assert changed_later or name == "fixed"


def test_conventions_convert_both_ways():
    g = torch.Generator().manual_seed(0)
    ends = torch.rand(4, 30, generator=g) < 0.3
    starts = starts_from_ends(ends)
    assert starts[:, 0].all()
    assert torch.equal(ends_from_starts(starts), ends[:, :-1])
    exclusive = ends.long().cumsum(1) - ends.long()  # the group of each byte, counted from the ends
    assert torch.equal(group_index(starts), exclusive)
    first = group_first(starts)
    for r in range(4):
        for t in range(30):
            f = int(first[r, t])
            assert starts[r, f] and not starts[r, f + 1 : t + 1].any()


# ----- down and upsampling -----

def _ends(B: int, T: int, seed: int) -> torch.Tensor:
    ends = (torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.3).double()
    ends[0] = 0
    ends[0, [2, 3, 9, 15, 17]] = 1  # row 0 overflows a cap of 3
    return ends


def _pool(kind: str, h: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    group = (ends.cumsum(1) - ends).long().clamp(max=cap)
    if kind == "mean":
        return pool_mean(h, ends, cap)
    if kind == "last":
        return pool_last(h, ends, cap)
    torch.manual_seed(1)
    if kind == "learned_query":
        pool = WordPooling(h.size(-1), h.size(-1), 2).double()
        torch.nn.init.normal_(pool.query)
        return pool(h, group, cap)
    return PatchPooling(h.size(-1), 2).double()(h, group, cap + 1)[:, :cap]


@pytest.mark.parametrize("cap", [3, 40])
@pytest.mark.parametrize("feedback", ["group", "boundary"])
@pytest.mark.parametrize("kind", ["mean", "last", "learned_query", "cross_attention"])
def test_no_byte_reads_a_group_holding_a_later_byte(kind, feedback, cap):
    """d read[t] / d h[t'] is zero for every t' > t, through every pooling and both feedbacks;
    and the last byte of a group does read that group (the read is not trivially empty)."""
    B, T, D = 3, 20, 4
    ends = _ends(B, T, seed=cap)
    h = torch.randn(B, T, D, dtype=torch.double, generator=torch.Generator().manual_seed(2), requires_grad=True)
    table = torch.cat([torch.zeros(B, 1, D, dtype=h.dtype), _pool(kind, h, ends, cap)], dim=1)
    up = feed_back_at_boundaries if feedback == "boundary" else upsample_groups
    read = up(table, ends, cap)
    for t in range(T):
        (grad,) = torch.autograd.grad(read[:, t].sum(), h, retain_graph=True)
        assert grad[:, t + 1 :].abs().sum() == 0, f"byte {t} reads a later byte"
        closes = ends[:, t].bool() & (ends[:, : t + 1].sum(1) <= cap)
        assert (grad[closes, t].abs().sum(-1) > 0).all(), f"byte {t} does not read the group it closes"


def test_hnet_chunk_smooth_dechunk_reads_no_later_position():
    """H-Net's path: a position reads the smoothed chunk that starts at or before it (whose vector
    is its first position's state), never a later one."""
    B, T, D, cap = 3, 20, 4, 6
    starts = starts_from_ends(_ends(B, T, seed=5).bool())
    h = torch.randn(B, T, D, dtype=torch.double, generator=torch.Generator().manual_seed(2), requires_grad=True)
    chunks, pos, _ = pool_first(h, starts, cap)
    p = torch.rand(B, T, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    read = dechunk(smooth(chunks, p.gather(1, pos)), starts)
    for t in range(T):
        (grad,) = torch.autograd.grad(read[:, t].sum(), h, retain_graph=True)
        assert grad[:, t + 1 :].abs().sum() == 0


def test_segment_attention_matches_a_softmax_per_segment():
    g = torch.Generator().manual_seed(0)
    N, H, Dv, S = 25, 2, 3, 6
    scores, values = torch.randn(N, H, generator=g, dtype=torch.double), torch.randn(N, H, Dv, generator=g,
                                                                                     dtype=torch.double)
    slot = torch.randint(0, S - 1, (N,), generator=g)  # segment S - 1 stays empty
    out = segment_attention(scores, values, slot, S)
    for s in range(S):
        members = slot == s
        if not members.any():
            assert out[s].abs().sum() == 0
            continue
        w = torch.softmax(scores[members], dim=0)  # [n, H]
        torch.testing.assert_close(out[s], (w[..., None] * values[members]).sum(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [0, 3])  # 3: a local stack (HAT's byte stacks, rows at their own lengths)
def test_rows_step_matches_each_row_on_its_own_cache(window):
    """Rows of one batched cache stepped at their own positions equal a stack run per row."""
    from hlm.models.blocks import Transformer

    torch.manual_seed(0)
    stack = Transformer(2, 16, 2, 8, window=window).double()
    x = torch.randn(3, 8, 16, dtype=torch.double)
    lengths = [5, 2, 8]
    cache = stack.new_cache(3, 8, "cpu", torch.double)
    out = {r: [] for r in range(3)}
    for step in range(8):
        rows = torch.tensor([r for r in range(3) if step < lengths[r]])
        y = rows_step(stack, cache, x[rows, step : step + 1], rows, torch.full((len(rows), 1), step))
        for i, r in enumerate(rows.tolist()):
            out[r].append(y[i])
    for r in range(3):
        torch.testing.assert_close(torch.cat(out[r]), stack(x[r : r + 1, : lengths[r]])[0], rtol=0, atol=1e-12)


# ----- the one cached decoder -----

FAMILIES = {
    "hourglass_whitespace": lambda: hourglass("whitespace"),
    "hourglass_whitespace_cap": lambda: hourglass("whitespace", max_groups=3),
    "hourglass_fixed": lambda: hourglass("fixed"),  # the one source whose rows close together
    "hourglass_gumbel": lambda: hourglass("gumbel"),
    "spacebyte": lambda: hourglass("spacebyte", pooling="last", feedback="boundary"),
    "blt": blt,
    "blt_cap": lambda: blt(max_patches=4),
    "hnet_1stage": lambda: hnet(1),
    "hnet_2stage": lambda: hnet(2),
}


def _groups(dec) -> torch.Tensor:
    return (dec.stage if hasattr(dec, "stage") else dec).n_groups.clone()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decoder_matches_teacher_forcing_at_batch_3(family):
    """Every family on the shared decoder, past block_size (so the window restarts), at batch 3:
    each step's distribution equals the full forward, and the rows close groups at different
    bytes (some step adds a group to some rows and not to others; under a cap, once some rows
    are full)."""
    model = FAMILIES[family]()
    seq = text_batch(3, 80, seed=12)
    dec = model.new_decoder(seq[:, :5])
    uneven = False

    def push(d, nxt):
        nonlocal uneven
        before = _groups(d)
        type(d).push(d, nxt)
        grew = _groups(d) - before
        uneven |= bool(grew.min() == 0 and grew.max() > 0)

    assert decode_against_teacher_forcing(model, dec, seq, 5, push=push) == 2  # at 48 bytes, then 24 later
    assert uneven or family == "hourglass_fixed"


def test_hat_generation_at_batch_3_is_each_row_decoded_alone():
    """HAT keeps its own word decoder (EOW, then the next word's first byte, sampled in two
    steps), stepping all rows together: greedy, a batch of 3 rows yields what each row yields
    alone, with words ending at different bytes in each row and windows restarting (48 bytes)."""
    model = hat()
    prompt = text_batch(3, 12, seed=7)
    batch = model.generate(prompt, 50, temperature=0)
    for r in range(3):
        assert torch.equal(model.generate(prompt[r : r + 1], 50, temperature=0)[0], batch[r])
    starts = word_starts(batch, 8)[:, 12:]
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])


@pytest.mark.parametrize("family", ["hourglass_whitespace", "blt", "hnet_1stage"])
def test_cached_decoder_runs_under_bf16_autocast(family):
    """Generation runs under autocast as eval and the benchmarks run it (fp32 weights and caches,
    bf16 activations): the caches take the activations in their own dtype, and each step's
    log-probabilities differ from an fp32 decode's by bf16 rounding, far less than one step's
    distribution differs from the next."""
    model = FAMILIES[family]().float()
    seq = text_batch(3, 30, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.new_decoder(seq[:, :20])
        low_steps = [low.logits.float().log_softmax(-1)]
        for t in range(20, 30):
            low.push(seq[:, t])
            low_steps.append(low.logits.float().log_softmax(-1))
    dec = model.new_decoder(seq[:, :20])
    steps = [dec.logits.float().log_softmax(-1)]
    for t in range(20, 30):
        dec.push(seq[:, t])
        steps.append(dec.logits.float().log_softmax(-1))
    rounding = max((a - b).abs().max() for a, b in zip(steps, low_steps, strict=True))
    step_change = min((a - b).abs().max() for a, b in zip(steps[1:], steps[:-1], strict=False))
    assert rounding < 0.5 * step_change
