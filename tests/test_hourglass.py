"""Hourglass (dynamic token pooling): pooling and upsampling against naive loops, causality of
every boundary type, next_logprobs vs teacher forcing, the gumbel prior, compile == eager,
local attention, boundary-target data prep, and loss falling through the training CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import decode_against_teacher_forcing

from data_prep import boundaries as boundary_prep
from data_prep import prepare
from hlm.config import load_config
from hlm.models import build_model
from hlm.models.blocks import Transformer, local_causal_attention, window_keep
from hlm.models.gpt import GPT, GPTConfig
from hlm.models.hourglass import (
    BOUNDARY_TYPES,
    TARGET_BOUNDARIES,
    CachedDecoder,
    Hourglass,
    HourglassConfig,
    HourglassError,
)
from hlm.models.parts.boundaries import whitespace_boundaries
from hlm.models.parts.downsample import pool_mean
from hlm.models.parts.upsample import upsample_groups
from hlm.trainer import train

FIXTURE = "tests/fixtures/tinyshakespeare_head32k.txt"
TEXT = open(FIXTURE, "rb").read()


def tiny(boundaries: str, **kw) -> Hourglass:
    cfg = dict(block_size=48, n_pre=1, n_short=1, n_post=1, n_head=2, d_model=32, byte_window=8,
               boundaries=boundaries, fixed_stride=3, max_groups=16, predictor_ratio=2.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return Hourglass(HourglassConfig(**cfg))


def text_batch(n_rows: int, length: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(TEXT) - length, n_rows)
    return torch.tensor([list(TEXT[s : s + length]) for s in starts])


# ----- pooling and upsampling -----

def naive_pool(h, b, G):
    B, T, D = h.shape
    out = torch.zeros(B, G, D, dtype=h.dtype)
    for r in range(B):
        groups: dict[int, list] = {}
        g = 0
        for t in range(T):
            groups.setdefault(g, []).append(h[r, t])
            g += int(b[r, t])
        for g, vecs in groups.items():
            if g < G:
                out[r, g] = torch.stack(vecs).mean(0)
    return out


def naive_upsample(short, b, G):
    B, T = b.shape
    out = torch.zeros(B, T, short.size(-1), dtype=short.dtype)
    for r in range(B):
        done = 0
        for t in range(T):
            done += int(b[r, t])  # groups completed at or before t
            out[r, t] = short[r, min(done, G)]
    return out


@pytest.mark.parametrize("G", [3, 7, 40])  # overflowing, tight, roomy
def test_pool_and_upsample_match_naive_loops(G):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 29, 5, dtype=torch.float64, generator=g)
    b = (torch.rand(3, 29, generator=g) < 0.3).double()
    b[2] = 0  # a row without boundaries: one unfinished group, everything reads the null group
    torch.testing.assert_close(pool_mean(h, b, G), naive_pool(h, b, G), rtol=0, atol=1e-12)
    short = torch.randn(3, G + 1, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(upsample_groups(short, b, G), naive_upsample(short, b, G), rtol=0, atol=0)


def test_straight_through_pooling_gives_boundaries_a_gradient():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 12, 4, dtype=torch.float64, generator=g)
    soft = torch.rand(2, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = (soft > 0.5).double() + soft - soft.detach()
    pooled = pool_mean(h, b, 6)
    torch.testing.assert_close(pooled, naive_pool(h, b.detach().round(), 6), rtol=0, atol=1e-12)
    pooled.square().sum().backward()
    assert soft.grad.abs().sum() > 0


def test_whitespace_rule():
    x = torch.tensor([list(b"ab  c\td\n\x00e\xc3\xa9 f")])
    closes = [i for i, v in enumerate(whitespace_boundaries(x)[0].tolist()) if v]
    # the first space of a run closes "ab "; the tab, newline, separator and the space after e-acute close
    assert closes == [2, 5, 7, 8, 12]


# ----- causality, next_logprobs, generation -----

def assert_causal(model, x, j, **kw):
    y = x.clone()
    y[:, j] = (y[:, j] + 1 + torch.arange(y.size(0))) % 256
    a, c = model(x, **kw).nll, model(y, **kw).nll
    torch.testing.assert_close(a[:, : j - 1], c[:, : j - 1], rtol=0, atol=0)
    return a, c


@pytest.mark.parametrize("max_groups", [16, 4])  # with and without the group cap
@pytest.mark.parametrize("boundaries", BOUNDARY_TYPES)
def test_causal_in_eval(boundaries, max_groups):
    model = tiny(boundaries, max_groups=max_groups).double().eval()
    x = text_batch(3, 49)
    for j in (5, 20, 37, 48):
        a, c = assert_causal(model, x, j)
        assert not torch.equal(a[:, j - 1 :], c[:, j - 1 :])  # the perturbation does reach later bytes


@pytest.mark.parametrize("boundaries", ["fixed", "whitespace"])
def test_groups_carry_context_beyond_the_byte_window(boundaries):
    """With byte_window 8 (one pre and one post layer), byte j can reach positions past j + 14
    only through the pooled groups and the shortened layers."""
    model = tiny(boundaries).double().eval()
    x = text_batch(2, 49, seed=12)
    a, c = assert_causal(model, x, 10)
    assert not torch.equal(a[:, 26:], c[:, 26:])
    model.cfg.boundaries, model.cfg.fixed_stride = "fixed", 64  # no boundary: every byte reads the null group
    a, c = assert_causal(model, x, 10)
    assert torch.equal(a[:, 26:], c[:, 26:])


def test_gumbel_boundaries_learn_from_the_lm_loss():
    model = tiny("gumbel", aux_weight=0.0)
    model(text_batch(2, 49, seed=13)).loss.backward()
    assert model.predictor[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("boundaries", TARGET_BOUNDARIES)
def test_reference_segmentation_never_feeds_evaluation(boundaries, monkeypatch):
    """Look-ahead targets (as a Unigram segmentation is) change before the perturbed byte. The
    model must give the same prefix NLL whatever targets it is handed in eval; a model that
    pooled with the targets fails this check (shown with a deliberately leaky variant)."""
    model = tiny(boundaries).double().eval()
    x = text_batch(2, 49, seed=3)
    j = 30
    y = x.clone()
    y[:, j] = (y[:, j] + 7) % 256
    tx = (torch.rand(2, 49, generator=torch.Generator().manual_seed(4)) < 0.3).long()
    ty = tx.clone()
    ty[:, 10:j] = 1 - ty[:, 10:j]  # the segmentation of the prefix changed because a later byte did

    def prefix_nll_equal(m):
        a = m(x, boundary_targets=tx).nll[:, : j - 1]
        c = m(y, boundary_targets=ty).nll[:, : j - 1]
        return torch.equal(a, c)

    assert prefix_nll_equal(model)
    leaky_targets = {}
    real_run = model._run
    leaky = lambda x_, h_: (leaky_targets["t"].double(), 2.0 * leaky_targets["t"].double() - 1)  # noqa: E731
    monkeypatch.setattr(model, "boundaries", leaky)

    def leaky_run(x_, targets=None):
        leaky_targets["t"] = targets
        return real_run(x_, targets)

    monkeypatch.setattr(model, "_run", leaky_run)
    assert not prefix_nll_equal(model)


@pytest.mark.parametrize("boundaries", BOUNDARY_TYPES)
def test_next_logprobs_equal_teacher_forcing_and_prefixes(boundaries):
    model = tiny(boundaries).double().eval()
    x = text_batch(2, 49, seed=5)
    nll = model(x).nll
    logp = model.next_logprobs(x[:, :-1])
    torch.testing.assert_close(-logp.gather(-1, x[:, 1:, None])[..., 0], nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones_like(nll), rtol=0, atol=1e-12)
    for k in (1, 9, 30):  # what generation sees after a prefix of k bytes
        torch.testing.assert_close(model.next_logprobs(x[:, :k])[:, -1], logp[:, k - 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_groups", [16, 3])
@pytest.mark.parametrize("boundaries", BOUNDARY_TYPES)
def test_cached_decoder_matches_the_full_forward(boundaries, max_groups):
    """Byte by byte through the KV-cached decoder (past block_size, so the window restarts) and
    the full model on the same window give the same next-byte distribution."""
    model = tiny(boundaries, max_groups=max_groups).double().eval()
    seq = text_batch(1, 110, seed=14)
    dec = CachedDecoder(model, seq[:, :5])
    restarts = decode_against_teacher_forcing(model, dec, seq, 5, )
    assert restarts == 3  # at 48 bytes, then every 24


def test_generate_streams_bytes_matching_greedy_argmax():
    model = tiny("whitespace").eval()
    out = model.generate(b"\x00First Citizen", 10, temperature=0)
    assert isinstance(out, bytes) and len(out) == 10
    ids = torch.tensor([list(b"\x00First Citizen" + out)])
    greedy = model.next_logprobs(ids[:, :-1]).argmax(-1)[0, -10:]
    assert greedy.tolist() == list(out)
    long = model.generate(torch.tensor([list(TEXT[:60])]), 3, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert long.shape == (1, 63)  # prompt longer than block_size: the window slides


def test_bad_config_and_missing_targets_raise():
    with pytest.raises(HourglassError, match="boundaries"):
        tiny("spaces")
    with pytest.raises(HourglassError, match="data_prep/boundaries.py"):
        tiny("unigram").train()(text_batch(1, 49))


# ----- gumbel prior, compile -----

@pytest.mark.parametrize("prior", [0.1, 0.9])
def test_gumbel_prior_moves_the_training_rate_toward_its_target(prior):
    """The sampled (training-mode) boundary rate starts at 0.5 (predictor bias zero) and the prior
    pulls it toward `prior`, from below or above. Asserted: the mean of the last 10 of 30 steps
    is past the midpoint between 0.5 and the prior (observed within 0.02 of the prior; a wide
    margin, since where a short run lands depends on float rounding)."""
    model = tiny("gumbel", prior=prior, max_groups=48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = text_batch(8, 49, seed=6)
    rates = []
    for _ in range(30):
        out = model(x)
        rates.append(out.metrics["boundary_rate"].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert abs(rates[0] - 0.5) < 0.1  # 384 draws at p ~ 0.5: the std of the rate is 0.026
    midpoint = (0.5 + prior) / 2
    assert (np.mean(rates[-10:]) - midpoint) * (prior - 0.5) > 0


def set_predictor_logits(model: Hourglass, logit: float) -> None:
    """Make the boundary predictor output `logit` for every byte (zero last-layer weights)."""
    with torch.no_grad():
        model.predictor[3].weight.zero_()
        model.predictor[3].bias.fill_(logit)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_gumbel_training_samples_are_bernoulli_and_eval_takes_the_mode(p):
    """With logistic noise, `sigmoid((logit + noise) / tau) > 0.5` is a Bernoulli(sigmoid(logit))
    draw for any temperature, so a hand-set logit gives training rate p (3,072 draws: std <= 0.009,
    asserted within 0.04), and eval mode takes the mode: every byte a boundary iff p > 0.5."""
    model = tiny("gumbel", prior=0.2, max_groups=48)
    set_predictor_logits(model, float(np.log(p / (1 - p))))
    x = text_batch(64, 49, seed=5)
    torch.manual_seed(1)
    with torch.no_grad():
        assert abs(model(x).metrics["boundary_rate"].item() - p) < 0.04
        model.eval()
        assert model(x).metrics["boundary_rate"].item() == float(p > 0.5)


def test_gumbel_eval_boundaries_are_the_positive_logits():
    """Eval mode is deterministic and uses the mode of each byte's Bernoulli: boundary iff logit > 0.
    The predictor's last bias is shifted so that both signs occur."""
    model = tiny("gumbel", prior=0.2, max_groups=48).eval()
    x = text_batch(4, 48, seed=2)
    with torch.no_grad():
        h = model.pre(model.embed(x))
        logits = model.predictor(h).squeeze(-1)
        model.predictor[3].bias -= logits.median()
        b, logits = model.boundaries(x, h)
        again, _ = model.boundaries(x, h)
    assert 0 < (logits > 0).float().mean() < 1
    assert torch.equal(b, (logits > 0).float())
    assert torch.equal(b, again)


def test_compile_matches_eager():
    """Training-mode forward of a learned-boundary model (predictor, pooling, cap, BCE) compiled."""
    model = tiny("unigram", max_groups=8)
    x = text_batch(2, 49, seed=7)
    kw = {"boundary_targets": (x == 32).long()}
    eager = model(x, **kw)
    compiled = torch.compile(model)(x, **kw)
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-5)


# ----- local attention (blocks.py) -----

@pytest.mark.parametrize("T,window", [(40, 8), (300, 130)])  # one tile; full, partial and incomplete tiles
def test_local_attention_backends_agree_and_match_a_loop(T, window):
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is slow
        flex = local_causal_attention(q, k, v, window, backend="flex")
    sdpa = local_causal_attention(q, k, v, window, backend="sdpa")
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-12)
    ref = torch.zeros_like(q)
    for i in range(T):
        lo = max(0, i - window + 1)
        w = torch.softmax(q[:, :, i : i + 1] @ k[:, :, lo : i + 1].transpose(-1, -2) / 8**0.5, -1)
        ref[:, :, i : i + 1] = w @ v[:, :, lo : i + 1]
    torch.testing.assert_close(sdpa, ref, rtol=0, atol=1e-12)
    assert window_keep(3, 5, 2, "cpu").tolist() == [[False, True, True, False, False],
                                                    [False, False, True, True, False],
                                                    [False, False, False, True, True]]


def test_compiled_flex_path_matches_sdpa(monkeypatch):
    """The torch.compile + FlexAttention path (what CUDA training runs), forced on CPU: forward
    only, since compiled FlexAttention has no CPU backward. Rotary q/k computed inside the
    graph once hit an inductor layout bug here; the flex branch makes its inputs contiguous."""
    import hlm.models.blocks as blocks

    torch.manual_seed(11)
    stack = Transformer(1, 32, 2, 256, window=40).eval()
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        ref = stack(x)
        original = blocks.local_causal_attention
        monkeypatch.setattr(blocks, "local_causal_attention", lambda q, k, v, w: original(q, k, v, w, "flex"))
        out = torch.compile(stack, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_tile_sizes_apply_only_where_measured(monkeypatch):
    """The tuned tiles are for sm90 at head dim 64 (their sweep); other GPUs, head dims and the CPU
    keep inductor's defaults, and the tiles divide the 128-position block mask as flex requires."""
    import hlm.models.blocks as blocks

    assert blocks.flex_kernel_options(torch.device("cpu"), 64) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tuned = blocks.flex_kernel_options(torch.device("cuda"), 64)
    assert tuned == blocks.FLEX_SM90_HEAD64 and tuned is not blocks.FLEX_SM90_HEAD64
    assert all(blocks.FLEX_BLOCK % v == 0 for k, v in tuned.items() if "BLOCK" in k)
    assert blocks.flex_kernel_options(torch.device("cuda"), 128) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert blocks.flex_kernel_options(torch.device("cuda"), 64) == {}


def test_windowed_transformer_kv_cache_matches_full_forward():
    torch.manual_seed(9)
    stack = Transformer(2, 16, 2, 32, window=5).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    full = stack(x)
    cache = stack.new_cache(1, 32, "cpu", torch.float64)
    parts = [stack(x[:, :7], cache)] + [stack(x[:, t : t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


# ----- data prep and the training CLI -----

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The fixture prepared as bytes, with unigram targets and entropy targets from a briefly
    trained byte GPT (the real pipeline, tiny)."""
    root = tmp_path_factory.mktemp("hourglass")
    data = root / "data"
    assert prepare.main(["--input", FIXTURE, "--out", str(data)]) == 0
    assert boundary_prep.main(["unigram", "--data", str(data), "--vocab-size", "400", "--threads", "1"]) == 0
    gpt = load_config("configs/smoke/byte_gpt.yaml", [f"data.path={data}", f"train.out_dir={root / 'gpt'}",
                                                       "train.max_steps=3", "log.tensorboard=false"])
    train(gpt)
    assert boundary_prep.main(["entropy", "--data", str(data), "--model", str(root / "gpt" / "ckpt.pt"),
                               "--device", "cpu"]) == 0
    return root


def test_unigram_targets_end_pieces(corpus):
    from hlm.tokenizers import SentencePieceTokenizer

    data = corpus / "data"
    tok = SentencePieceTokenizer(data / "boundaries.unigram.model")
    val = (data / "val.bin").read_bytes()
    targets = np.fromfile(data / "val.boundaries.unigram.bin", dtype=np.uint8)
    ends, pos = [], 0
    for line in val.decode().splitlines(keepends=True):
        for i in tok.encode(line.encode()):
            pos += len(tok.token_bytes(i))
            ends.append(pos - 1)
    assert np.flatnonzero(targets).tolist() == ends
    info = json.loads((data / "boundaries.unigram.json").read_text())
    assert info["rate"]["val"] == pytest.approx(targets.mean())


def test_entropy_targets_are_spikes_of_the_models_entropy(corpus):
    from hlm.checkpoint import load_model

    data = corpus / "data"
    model, cfg, _ = load_model(corpus / "gpt" / "ckpt.pt")
    val = np.fromfile(data / "val.bin", dtype=np.uint8)
    ent = boundary_prep.next_byte_entropy(model, val, cfg.model.block_size, 4, torch.device("cpu"))
    block, step = cfg.model.block_size, cfg.model.block_size // 2
    for t in (0, block - 1, block, block + step + 3, len(val) - 1):
        # documented windows: [0, block) first, then windows of `block` bytes whose last `step` are scored
        end = block if t < block else min(len(val), block + -(-(t + 1 - block) // step) * step)
        x = torch.tensor(val[max(0, end - block) : t + 1].astype(np.int64))[None]
        logp = model.next_logprobs(x)[0, -1]
        assert ent[t] == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-5)
    naive = [int(all(ent[t] > ent[t - i] for i in (1, 2) if t - i >= 0)) for t in range(len(ent))]
    assert boundary_prep.entropy_spikes(ent, 2).tolist() == naive
    targets = np.fromfile(data / "val.boundaries.entropy.bin", dtype=np.uint8)
    assert targets.tolist() == naive  # val has no separator byte


@pytest.mark.parametrize("boundaries", BOUNDARY_TYPES)
def test_smoke_config_loss_falls(boundaries, corpus):
    out = corpus / f"run_{boundaries}"
    name = "spacebyte" if boundaries == "spacebyte" else f"hourglass_{boundaries}"  # SpaceByte's own smoke config
    cfg = load_config(f"configs/smoke/{name}.yaml",
                      [f"data.path={corpus / 'data'}", f"train.out_dir={out}", "train.max_steps=30",
                       "log.tensorboard=false", "eval.interval=0"])
    assert build_model(cfg.model).cfg.boundaries == boundaries
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.3
    last = [r for r in records if r["kind"] == "train"][-1]
    for key in ("bytes_per_group", "group_cap_hit", "boundary_rate"):
        assert key in last
    if boundaries in TARGET_BOUNDARIES:
        assert {"predictor_precision", "predictor_recall", "aux_loss"} <= set(last)


def test_missing_target_file_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    assert prepare.main(["--input", FIXTURE, "--out", str(data)]) == 0
    cfg = load_config("configs/smoke/hourglass_entropy.yaml", [f"data.path={data}", f"train.out_dir={tmp_path / 'r'}"])
    with pytest.raises(Exception, match="boundaries.entropy.bin"):
        train(cfg)


def test_gpt_byte_model_is_untouched_by_windows():
    """blocks.py default (window 0) is plain causal attention: GPT logits equal a causal loop."""
    torch.manual_seed(10)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=16)).double().eval()
    x = torch.randint(0, 256, (1, 16))
    full = model.next_logprobs(x)
    for k in (1, 8, 16):
        torch.testing.assert_close(model.next_logprobs(x[:, :k])[:, -1], full[:, k - 1], rtol=0, atol=1e-12)
