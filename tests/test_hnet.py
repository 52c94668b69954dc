"""H-Net (dynamic chunking): the parts against naive loops and their formulas (routing, chunking,
smoothing scan, dechunk, STE, ratio loss), causality of one and two stages, cached decoding at
batch > 1 == teacher forcing, compile == eager, per-stage lr groups, loss falling, and the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config
from conftest import ROOT, decode_against_teacher_forcing, load_cli, run_cli

import hlm.models.hnet as hnet_module
import hlm.models.parts.decoding as decoding_module
from hlm.bytes import as_byte_lm
from hlm.config import load_config
from hlm.models.hnet import CachedDecoder, HNet, HNetConfig, HNetError, HNetStage
from hlm.models.parts.boundaries import ratio_loss, whitespace_starts
from hlm.models.parts.decoding import rows_step
from hlm.models.parts.downsample import pool_first
from hlm.models.parts.upsample import dechunk, smooth, ste
from hlm.optim import make_optimizer
from hlm.trainer import Trainer, train

TEXT = open(ROOT / "tests" / "fixtures" / "tinyshakespeare_head32k.txt", "rb").read()
ONE = dict(d_model=[32, 32], n_enc=[1], n_dec=[1], ratio_target=[3.0])
TWO = dict(d_model=[32, 48, 64], n_enc=[1, 1], n_dec=[1, 1], ratio_target=[2.0, 2.0])


def tiny(stages: dict, **kw) -> HNet:
    """A tiny H-Net; W_res starts at the identity so that the byte-level path (zero at the paper's
    initialisation) counts in every causality and decoding check."""
    cfg = dict(block_size=48, n_main=1, head_dim=16, byte_window=8, residual_init="identity")
    cfg.update(stages)
    cfg.update(kw)
    torch.manual_seed(0)
    return HNet(HNetConfig(**cfg))


def text_batch(n_rows: int, length: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(TEXT) - length, n_rows)
    return torch.tensor([list(TEXT[s : s + length]) for s in starts])


def stage_boundaries(model: HNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's boundaries b [B, L_s] for byte ids x."""
    with torch.no_grad():
        _, stages = model.stage(model.embed(x), torch.ones_like(x, dtype=torch.bool))
    return [st.b & st.valid for st in stages]


# ----- the parts -----

@pytest.mark.parametrize("dtype, M, tol", [(torch.float64, 1, 1e-12), (torch.float64, 200, 1e-12),
                                           (torch.float32, 1000, 1e-5)])
def test_smoothing_scan_matches_a_naive_loop(dtype, M, tol):
    g = torch.Generator().manual_seed(M)
    z = torch.randn(2, M, 3, generator=g, dtype=dtype)
    P = torch.rand(2, M, generator=g, dtype=dtype) ** 3  # many small P: long memories
    P[0, ::7], P[1, ::11] = 0.0, 1.0  # beyond the clamp on both sides
    Pc = P.clamp(1e-4, 1 - 1e-4)
    ref, prev = torch.zeros_like(z), torch.zeros_like(z[:, 0])
    for j in range(M):
        prev = Pc[:, j, None] * z[:, j] + (1 - Pc[:, j, None]) * prev
        ref[:, j] = prev
    torch.testing.assert_close(smooth(z, P), ref, rtol=tol, atol=tol)


def test_chunk_and_dechunk_against_a_loop():
    h = torch.randn(2, 10, 4, dtype=torch.float64)
    b = torch.zeros(2, 10, dtype=torch.bool)
    b[0, [0, 3, 4, 8]] = True
    b[1, [0, 1, 2, 5, 6, 9]] = True  # 6 starts: the cap of 4 drops the last two
    chunks, pos, valid = pool_first(h, b, 4)
    assert valid.tolist() == [[True] * 4, [True] * 4]
    assert pos.tolist() == [[0, 3, 4, 8], [0, 1, 2, 5]]
    torch.testing.assert_close(chunks, torch.stack([h[r, pos[r]] for r in range(2)]), rtol=0, atol=0)
    _, pos, valid = pool_first(h, b, 6)
    assert valid[0].tolist() == [True] * 4 + [False] * 2 and pool_first(h, b, 6)[0][0, 4:].abs().sum() == 0
    zbar = torch.randn(2, 4, 4, dtype=torch.float64)
    out = dechunk(zbar, b)
    for r in range(2):
        j = -1
        for t in range(10):
            j += int(b[r, t])
            assert torch.equal(out[r, t], zbar[r, min(j, 3)])  # the latest chunk that fits


def test_ste_is_one_forward_and_identity_backward():
    c = torch.tensor([0.0, 0.3, 0.5, 0.999], dtype=torch.float64, requires_grad=True)
    out = ste(c)
    assert torch.equal(out, torch.ones_like(c))
    w = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    (out * w).sum().backward()
    assert torch.equal(c.grad, w)


def test_ratio_loss_is_the_formula():
    b = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    p = torch.tensor([[1.0, 0.2, 0.1, 0.9, 0.3, 0.4, 0.9, 0.6]], dtype=torch.float64)
    valid = torch.tensor([[True] * 6 + [False] * 2])
    F, G, N = 2 / 6, 2.9 / 6, 3.0  # over the six valid positions only
    expected = N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G))
    assert ratio_loss(b, p, N, valid).item() == pytest.approx(expected, abs=1e-12)
    at_target = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.bool)  # F = G = 1/N: loss 1
    assert ratio_loss(at_target, torch.full((1, 6), 1 / 6, dtype=torch.float64), 6.0,
                      torch.ones(1, 6, dtype=torch.bool)).item() == pytest.approx(1.0, abs=1e-12)


def test_routing_starts_at_the_cosine_of_neighbours():
    model = tiny(ONE).double()
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    p, b = model.stage.routing(h, torch.ones(2, 7, dtype=torch.bool))
    cos = torch.nn.functional.cosine_similarity(h[:, 1:], h[:, :-1], dim=-1)
    assert torch.equal(p[:, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(p[:, 1:], (1 - cos) / 2, rtol=0, atol=1e-14)
    assert torch.equal(b, p >= 0.5)


def test_whitespace_rule_and_metrics_with_every_byte_a_boundary():
    x = torch.tensor([list(b"\x00ab  c\nd\x00e")])
    assert whitespace_starts(x)[0].nonzero().flatten().tolist() == [1, 5, 7, 9]
    model = tiny(ONE, max_chunks=[20]).double().eval()
    torch.nn.init.zeros_(model.stage.routing.q.weight)  # q = 0: p = 1/2 everywhere, every byte starts a chunk
    x = text_batch(3, 49, seed=2)
    m = model(x).metrics
    ws = whitespace_starts(x[:, :-1])
    assert m["chunk_cap_hit_s0"] == 1.0 and m["boundary_rate_s0"] == 1.0
    assert m["bytes_per_chunk_s0"].item() == pytest.approx(48 / 20)
    assert m["past_cap_s0"].item() == pytest.approx(28 / 48)
    assert m["ws_recall_s0"] == 1.0
    assert m["ws_precision_s0"].item() == pytest.approx(ws.sum().item() / (3 * 47))
    assert m["rate_vs_target_s0"].item() == pytest.approx(3.0)


def test_bad_configs_raise():
    for bad in (dict(d_model=[32], n_enc=[], n_dec=[], ratio_target=[]), dict(ONE, d_model=[64, 32]),
                dict(ONE, ratio_target=[1.0]), dict(ONE, lr_scale=[1.0]), dict(ONE, residual_init="eye")):
        with pytest.raises(HNetError):
            tiny(bad)


@pytest.mark.parametrize("stages", [ONE, TWO])
def test_residual_starts_at_zero_or_the_identity(stages):
    """The paper's W_res = 0 by default: at initialisation the decoder sees only the chunks; `identity`
    passes each position's encoder state straight through, as the hourglass's skip does."""
    for init, expected in (("zero", torch.zeros), ("identity", torch.eye)):
        model = tiny(stages, residual_init=init)
        stages_ = [m for m in model.modules() if isinstance(m, HNetStage)]
        assert len(stages_) == model.cfg.n_stages
        for st in stages_:
            assert torch.equal(st.residual.weight, expected(st.residual.in_features, st.residual.in_features))


# ----- the model -----

@pytest.mark.parametrize("stages, caps", [(ONE, []), (ONE, [6]), (TWO, []), (TWO, [20, 6])])
def test_causal_in_eval(stages, caps):
    model = tiny(stages, max_chunks=caps).double().eval()
    x = text_batch(3, 49)
    for j in (1, 5, 20, 37, 48):
        y = x.clone()
        y[:, j] = (y[:, j] + 1 + torch.arange(3)) % 256
        a, c = model(x).nll, model(y).nll
        torch.testing.assert_close(a[:, : j - 1], c[:, : j - 1], rtol=0, atol=0)
        assert not torch.equal(a[:, j - 1 :], c[:, j - 1 :])


@pytest.mark.parametrize("stages, caps, inner_window", [(ONE, [], 0), (ONE, [5], 0), (TWO, [], 0), (TWO, [14, 4], 0),
                                                      (TWO, [], 3)])
def test_cached_decoding_at_batch_3_matches_teacher_forcing(stages, caps, inner_window):
    """Three rows that start chunks at different bytes, decoded byte by byte past block_size
    (the window restarts), against the full forward on the same window; the inner stage of a
    two-stage model with full attention and with a local window."""
    model = tiny(stages, max_chunks=caps, inner_window=inner_window).double().eval()
    seq = text_batch(3, 80, seed=14)
    bounds = stage_boundaries(model, seq[:, :48])
    for b in bounds:
        assert 0.1 < b[:, 1:].float().mean() < 0.9
        assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])
    metrics = model(seq[:, :49]).metrics
    assert all((metrics[f"chunk_cap_hit_s{s}"] > 0) == bool(caps) for s in range(len(bounds)))
    restarts = decode_against_teacher_forcing(model, CachedDecoder(model, seq[:, :5]), seq, 5)
    assert restarts == 2  # at 48 bytes, then 24 bytes later


def test_a_two_stage_step_runs_each_inner_stack_once_for_all_rows(monkeypatch):
    """The inner stage steps every row whose chunk starts in one call per stack (its encoder, the main
    Transformer, its decoder), not one call per row."""
    model = tiny(TWO).double().eval()
    seq = text_batch(6, 30, seed=5)
    decoder = CachedDecoder(model, seq[:, :10])
    calls = []

    def counted(stack, cache, x, rows, positions):
        calls.append(len(rows))
        return rows_step(stack, cache, x, rows, positions)

    monkeypatch.setattr(hnet_module, "rows_step", counted)
    monkeypatch.setattr(decoding_module, "rows_step", counted)
    stepped = 0
    for t in range(10, 30):
        calls.clear()
        decoder.push(seq[:, t])
        assert len(calls) <= 3
        stepped += max(calls, default=0) > 1
    assert stepped > 0  # some bytes started chunks in several rows at once


def test_generate_at_batch_2_and_as_byte_lm():
    model = tiny(TWO).double().eval()
    prompt = text_batch(2, 20, seed=3)
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 28) and torch.equal(out[:, :20], prompt)
    greedy = model.next_logprobs(out[:, :-1]).argmax(-1)[:, -8:]
    assert torch.equal(greedy, out[:, 20:])
    assert len(model.generate(b"\x00First", 4, temperature=0)) == 4
    lm = as_byte_lm(model)
    lp = lm.next_byte_logprobs(b"First Cit")
    assert lp.shape == (257,) and lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_next_logprobs_equal_teacher_forcing():
    model = tiny(TWO).double().eval()
    x = text_batch(2, 49, seed=5)
    logp = model.next_logprobs(x[:, :-1])
    torch.testing.assert_close(-logp.gather(-1, x[:, 1:, None])[..., 0], model(x).nll, rtol=0, atol=1e-12)


def test_compile_matches_eager(monkeypatch):
    """Training-mode forward of a two-stage model with both caps hit, compiled on CPU (one graph;
    inductor compiles in this process, which is faster than its worker pool on a busy machine)."""
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    model = tiny(TWO, max_chunks=[16, 6])
    x = text_batch(2, 49, seed=7)
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)


def test_lr_scale_groups_follow_the_stages():
    model = tiny(TWO, lr_scale=[3.0, 1.7, 0.9])
    groups = model.param_groups_lr_scale()
    assert [s for s, _ in groups] == [3.0, 1.7, 0.9]
    ids = [{id(p) for p in params} for _, params in groups]
    assert sum(map(len, ids)) == len(list(model.parameters())) == len(set().union(*ids))
    owner = {name: next(i for i, s in enumerate(ids) if id(p) in s) for name, p in model.named_parameters()}
    assert owner["embed.weight"] == owner["head.weight"] == owner["stage.routing.q.weight"] == 0
    assert owner["stage.main.encoder.blocks.0.attn.qkv.weight"] == owner["stage.main.residual.weight"] == 1
    assert owner["stage.pad"] == owner["stage.inner_norm.weight"] == 0
    assert owner["stage.main.main.blocks.0.mlp.fc.weight"] == 2


def test_the_optimizer_applies_each_stage_lr_scale():
    """make_optimizer gives every stage its own groups (decayed and not), and the step sets lr x scale."""
    cfg = load_config(ROOT / "configs/smoke/hnet_2stage.yaml", ["model.lr_scale=[3.0, 1.7, 0.9]", "train.lr=0.01"])
    model = tiny(TWO, lr_scale=[3.0, 1.7, 0.9])
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    assert [g["lr_scale"] for g in opt.param_groups] == [3.0, 3.0, 1.7, 1.7, 0.9, 0.9]
    assert [g["weight_decay"] > 0 for g in opt.param_groups] == [True, False] * 3
    by_group = [{id(p) for p in g["params"]} for g in opt.param_groups]
    scale_of = {id(p): s for s, ps in model.param_groups_lr_scale() for p in ps}
    assert all(scale_of[i] == g["lr_scale"] for g, ids in zip(opt.param_groups, by_group, strict=True) for i in ids)
    assert sum(map(len, by_group)) == len(list(model.parameters()))


def test_a_training_step_sets_each_groups_lr_times_its_scale(tmp_path, byte_corpus):
    cfg = load_config(ROOT / "configs/smoke/hnet_2stage.yaml",
                      [f"data.path={byte_corpus}", f"train.out_dir={tmp_path}", "model.lr_scale=[3.0, 1.7, 0.9]",
                       "train.max_steps=1", "eval.interval=0", "log.tensorboard=false"])
    trainer = Trainer(cfg)
    lr = trainer.train_step()[0]
    assert lr > 0
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr * s for s in (3.0, 3.0, 1.7, 1.7, 0.9, 0.9)]
    trainer.close()


@pytest.mark.parametrize("stages", [ONE, TWO])
def test_the_lm_loss_alone_reaches_every_router(stages):
    """Through the smoothing's P and the confidence STE, not only through the ratio loss."""
    model = tiny(stages, ratio_weight=0.0)
    model(text_batch(2, 49, seed=8)).loss.backward()
    routers = [m.routing for m in model.modules() if hasattr(m, "routing")]
    assert len(routers) == len(stages["n_enc"])
    assert all(r.q.weight.grad.abs().sum() > 0 and r.k.weight.grad.abs().sum() > 0 for r in routers)


@pytest.mark.parametrize("stages", [ONE, TWO])
def test_loss_falls_and_the_ratio_loss_reaches_the_router(stages):
    model = tiny(stages)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = text_batch(4, 49, seed=6)
    losses = []
    for _ in range(25):
        out = model(x)
        losses.append(out.nll.mean().item())
        opt.zero_grad()
        out.loss.backward()
        assert model.stage.routing.q.weight.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0] - 1.0  # from about ln 256 = 5.5 nats on one fixed batch


# ----- the CLIs -----

def test_eval_model_column():
    describe = load_cli("eval").describe
    assert describe(load_config(ROOT / "configs" / "hnet_1stage.yaml")) == "hnet 1-stage 2+12+2L/768-768d N=6"
    assert describe(load_config(ROOT / "configs" / "hnet_2stage.yaml")) == \
        "hnet 2-stage 2+2+12+2+2L/768-768-768d N=3,3"


def train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_one_stage_smoke_config_trains(byte_corpus, tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke" / "hnet_1stage.yaml",
                      [f"data.path={byte_corpus}", f"train.out_dir={tmp_path}", "train.max_steps=20",
                       "eval.interval=0", "log.tensorboard=false"])
    train(cfg)
    records = train_records(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert {"bytes_per_chunk_s0", "boundary_rate_s0", "rate_vs_target_s0", "chunk_cap_hit_s0", "ws_precision_s0",
            "ws_recall_s0", "ratio_loss_s0"} <= set(records[-1])


def test_two_stage_train_eval_sample_cli(byte_corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train.py", ROOT / "configs" / "smoke" / "hnet_2stage.yaml", f"data.path={byte_corpus}",
                   f"train.out_dir={out}", "train.max_steps=20", "train.ckpt_interval=20", "eval.interval=0",
                   "log.tensorboard=false")
    assert proc.returncode == 0, proc.stderr.decode()
    records = train_records(out)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    keys = {f"{key}_s{s}" for key in ("bytes_per_chunk", "boundary_rate", "ws_recall") for s in (0, 1)}
    assert keys <= set(records[-1])
    res = tmp_path / "res.json"
    proc = run_cli("eval.py", out / "ckpt.pt", "--data", byte_corpus, "--split", "val", "--json", res)
    assert proc.returncode == 0, proc.stderr.decode()
    (row,) = json.loads(res.read_text())
    assert row["model"] == "hnet 2-stage 1+1+2+1+1L/32-64-64d N=2,2" and row["bpb"] < 8.0
    proc = run_cli("sample.py", out / "ckpt.pt", "--prompt", "ROMEO:", "--max-bytes", "20", "--seed", "1")
    assert proc.returncode == 0, proc.stderr.decode()
