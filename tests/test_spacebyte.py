"""SpaceByte as an hourglass configuration: the boundary rule on hand-written bytes, pooling at the
boundary byte and feeding back at it against naive loops, causality, and the KV-cached decoder
against teacher forcing for every pooling/feedback pair."""

from __future__ import annotations

import pytest
import torch
from test_hourglass import assert_causal, naive_upsample, text_batch, tiny

from hlm.config import load_config
from hlm.models import build_model
from hlm.models.hourglass import CachedDecoder
from hlm.models.parts.boundaries import spacebyte_boundaries
from hlm.models.parts.downsample import pool_last
from hlm.models.parts.upsample import feed_back_at_boundaries


def closes(text: bytes) -> list[int]:
    return [i for i, v in enumerate(spacebyte_boundaries(torch.tensor([list(text)]))[0].tolist()) if v]


def test_spacebyte_rule_on_hand_written_bytes():
    text = b"Hello, world! 3.14 caf\xc3\xa9 na\xc3\xafve\n\n\x00x"
    # ',' closes "Hello," and the space after it does not (a spacelike run closes once); '!' likewise;
    # '.' between digits closes; the space after "14" closes; the UTF-8 lead bytes 0xC3 are spacelike
    # (they close "caf" and "na"), their continuation bytes are not (so the space after the e-acute
    # closes); the first newline closes, the second does not; the separator 0x00 always closes
    assert closes(text) == [5, 12, 15, 18, 22, 24, 27, 31, 33]
    assert closes(b"abc123XYZ") == []  # letters and digits never close
    assert closes(b"  a") == [0]  # the window's first byte has no predecessor: a spacelike one closes
    assert closes(b"\xe4\xb8\xad\xe6\x96\x87") == [0, 3]  # every CJK character's lead byte closes
    assert closes(b"a\x00\x00") == [1, 2]  # separators close even in a run
    assert closes(bytes([0x7F, 0x80, 0xBF, 0xC0, 0xFF])) == [0, 3]  # DEL spacelike; 0xC0.. lead bytes


def test_pool_last_and_boundary_feedback_match_naive_loops():
    torch.manual_seed(0)
    B, T, D, G = 2, 30, 5, 4
    h, short = torch.randn(B, T, D), torch.randn(B, G + 1, D)
    b = (torch.rand(B, T) < 0.3).float()
    b[0, :] = 0
    b[0, [3, 4, 10, 20, 25, 28]] = 1  # row 0 overflows the cap of 4 groups
    pooled, fed = pool_last(h, b, G), feed_back_at_boundaries(short, b, G)
    up = naive_upsample(short, b, G)
    for r in range(B):
        ends = torch.nonzero(b[r]).flatten().tolist()
        for g in range(G):
            want = h[r, ends[g]] if g < len(ends) else torch.zeros(D)
            assert torch.equal(pooled[r, g], want)
        for t in range(T):
            kept = t in ends[:G]
            assert torch.equal(fed[r, t], up[r, t] if kept else torch.zeros(D))


@pytest.mark.parametrize("max_groups", [16, 4])
def test_spacebyte_config_is_causal(max_groups):
    cfg = load_config("configs/smoke/spacebyte.yaml", [f"model.max_groups={max_groups}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).double().eval()
    assert (model.cfg.boundaries, model.cfg.pooling, model.cfg.feedback) == ("spacebyte", "last", "boundary")
    x = text_batch(3, 65, seed=2)
    for j in (3, 20, 40, 64):
        a, c = assert_causal(model, x, j)
        assert not torch.equal(a[:, j - 1 :], c[:, j - 1 :])


@pytest.mark.parametrize("max_groups", [16, 3])
@pytest.mark.parametrize("pooling,feedback", [("last", "boundary"), ("last", "group"), ("mean", "boundary")])
def test_cached_decoder_matches_teacher_forcing(pooling, feedback, max_groups):
    model = tiny("spacebyte", pooling=pooling, feedback=feedback, max_groups=max_groups).double().eval()
    seq = text_batch(1, 110, seed=14)
    dec = CachedDecoder(model, seq[:, :5])
    for t in range(5, 110):
        ref = model.next_logprobs(dec.ids)[:, -1]
        torch.testing.assert_close(torch.log_softmax(dec.logits, -1), ref, rtol=0, atol=1e-10)
        dec.push(seq[:, t])
    assert dec.ids.size(1) < 48  # the window restarted on the way


def test_checkpoints_from_before_pooling_and_feedback_still_resume():
    """A checkpoint's saved model config predating `pooling`/`feedback` means their defaults."""
    import dataclasses

    from hlm.checkpoint import CheckpointError, check_same_model
    from hlm.models.hourglass import HourglassConfig

    current = dataclasses.asdict(HourglassConfig())
    old = {k: v for k, v in current.items() if k not in ("pooling", "feedback")}
    check_same_model(old, current, "old.pt")
    with pytest.raises(CheckpointError, match="pooling"):
        check_same_model(old, {**current, "pooling": "last"}, "old.pt")


def test_eval_model_column_names_pooling_and_feedback_where_not_default():
    from conftest import load_cli

    describe = load_cli("eval").describe
    assert describe(load_config("configs/spacebyte.yaml")) == \
        "hourglass 2+8+2L/768d spacebyte (pooling last, feedback boundary)"
    assert describe(load_config("configs/hourglass_whitespace.yaml")) == "hourglass 2+8+2L/768d whitespace"
