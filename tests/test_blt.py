"""BLT with entropy patches: the patch rules and their calibration, hash n-grams, the pooling and
reading index maps on hand-built patches, causality (patcher included), cached generation ==
teacher forcing at batch > 1, compile == eager, loss falling, and the pipeline through the CLIs
(entropy model -> data_prep/entropy_patches.py -> train.py -> eval.py, sample.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from data_prep import entropy_patches
from data_prep import prepare as prepare_data
from hlm import HLMError
from hlm.bytes import as_byte_lm
from hlm.config import load_config
from hlm.models import build_model
from hlm.models.blt import BLT, BLTConfig, BLTError, CachedDecoder, ngram_hashes, patch_index
from hlm.models.entropy_patcher import (
    EntropyModel,
    calibrate_threshold,
    mean_patch_size,
    next_start,
    patch_starts,
    stream_entropies,
)
from hlm.models.parts.downsample import PatchPooling
from hlm.models.parts.upsample import PatchReader
from hlm.optim import make_optimizer
from hlm.trainer import train
from tests.conftest import QUIET, SHAKESPEARE, assert_one_line_error, decode_against_teacher_forcing, run_cli

TEXT = SHAKESPEARE.read_bytes()


def tiny(**kw) -> BLT:
    """A tiny BLT (fp64, eval) whose random entropy model spreads its entropies (about 4.5-5.1
    nats) so that thresholds near 4.85 make patches of a few bytes."""
    cfg = dict(block_size=48, d_local=32, n_head_local=2, n_enc=1, n_dec=2, byte_window=8, d_model=32, n_head=2,
               n_layer=1, max_patches=24, hash_vocab=97, entropy_model="random", entropy_n_layer=1,
               entropy_n_head=2, entropy_d_model=16, entropy_window=16, entropy_threshold=4.85)
    cfg.update(kw)
    torch.manual_seed(0)
    model = BLT(BLTConfig(**cfg))
    torch.nn.init.normal_(model.entropy.head.weight, std=0.3)
    return model.double().eval()


def text_batch(n_rows: int, length: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.tensor([list(TEXT[s : s + length]) for s in g.integers(0, len(TEXT) - length, n_rows)])


VARIANTS = {  # name -> config changes
    "global": {},
    "cap": {"max_patches": 4},
    "monotonic": {"patching": "monotonic", "entropy_threshold": 0.05},
    "max_len": {"max_patch_len": 3, "entropy_threshold": 4.95},
    "monotonic_max_len": {"patching": "monotonic", "entropy_threshold": 0.1, "max_patch_len": 4},
    "nohash": {"hash_ngrams": False},
}


# ----- patch rules and calibration -----

def naive_starts(h, mode, theta, max_len):
    out, length = [], 0
    for t, value in enumerate(h):
        start = t == 0 or (value > theta if mode == "global" else value - h[t - 1] > theta)
        start = start or (max_len > 0 and length == max_len)
        length = 1 if start else length + 1
        out.append(start)
    return out


@pytest.mark.parametrize("mode,theta", [("global", 0.3), ("monotonic", 0.2)])
@pytest.mark.parametrize("max_len", [0, 3])
def test_patch_starts_match_a_loop_and_the_incremental_rule(mode, theta, max_len):
    h = torch.rand(3, 40, generator=torch.Generator().manual_seed(1))
    s = patch_starts(h, mode, theta, max_len)
    for r in range(3):
        assert s[r].tolist() == naive_starts(h[r].tolist(), mode, theta, max_len)
        open_len = 1
        for t in range(1, 40):  # what generation decides byte by byte
            nxt = next_start(h[r, t : t + 1], h[r, t - 1 : t], torch.tensor([open_len]), mode, theta, max_len)
            assert bool(nxt) == bool(s[r, t])
            open_len = 1 if nxt else open_len + 1


def test_calibration_reaches_the_target_on_entropies_of_the_fixture():
    torch.manual_seed(3)
    model = EntropyModel(1, 2, 16, 32, 512 + 32)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    ent = stream_entropies(model, np.frombuffer(TEXT, dtype=np.uint8), 8, torch.device("cpu"), chunk=512)
    assert len(np.unique(ent)) > 500  # spread entropies: a size near any target exists
    for mode in ("global", "monotonic"):
        for target in (4.5, 6.0):
            theta, achieved = calibrate_threshold(ent, target, mode)
            assert achieved == pytest.approx(mean_patch_size(ent, mode, theta))
            assert abs(achieved - target) / target < 0.02
            assert mean_patch_size(ent, mode, theta + 0.05) > achieved  # size grows with θ
    assert calibrate_threshold(ent, 1.0, "global")[1] == 1.0


def test_stream_entropies_see_the_window_before_each_byte():
    torch.manual_seed(4)
    model = EntropyModel(1, 2, 16, 16, 64 + 16).double()
    data = np.frombuffer(TEXT[:300], dtype=np.uint8)
    ent = stream_entropies(model, data, 2, torch.device("cpu"), chunk=64)
    for t in (1, 5, 16, 17, 64, 65, 130, 299):
        x = torch.tensor(data[max(0, t - 16) : t].astype(np.int64))[None]
        assert ent[t] == np.float16(model.entropies(x)[0, -1].item())
    assert ent[0] == ent[1]


def test_float16_side_files_are_read_as_floats(tmp_path):
    from hlm.data import DataError, Split

    data = tmp_path / "data"
    assert prepare_data.main(["--input", str(SHAKESPEARE), "--out", str(data)]) == 0
    split = Split(data, "val")
    values = np.linspace(0, 5, split.n_tokens).astype(np.float16)
    values.tofile(data / "val.entropy.bin")
    windows = split.windows(np.array([0, 100]), 10, "entropy")
    assert windows.dtype == torch.float32 and windows[1].tolist() == values[100:110].astype(np.float32).tolist()
    values[:-1].tofile(data / "val.entropy.bin")
    with pytest.raises(DataError, match="one uint8 or float16 per token"):
        split.windows(np.array([0]), 10, "entropy")


# ----- hash n-grams, pooling and reading on hand-built patches -----

def test_hash_ngrams_depend_only_on_their_bytes():
    x = text_batch(2, 30, seed=5)
    sizes = [3, 5, 8]
    base = ngram_hashes(x, sizes, 1000)
    t = 20
    for n, ids in zip(sizes, base, strict=True):
        outside, inside = x.clone(), x.clone()
        outside[:, t - n] = (outside[:, t - n] + 1) % 256  # one byte before the n-gram ending at t
        inside[:, t - n + 1] = (inside[:, t - n + 1] + 1) % 256
        assert torch.equal(ngram_hashes(outside, sizes, 1000)[sizes.index(n)][:, t], ids[:, t])
        assert not torch.equal(ngram_hashes(inside, sizes, 1000)[sizes.index(n)][:, t], ids[:, t])
    # before the window, bytes count as the separator 0x00
    padded = torch.cat([torch.zeros(2, 7, dtype=torch.long), x], dim=1)
    for ids, ref in zip(base, ngram_hashes(padded, sizes, 1000), strict=True):
        assert torch.equal(ids, ref[:, 7:])


def test_patch_index_on_hand_built_starts():
    # bytes 0..7, patches [0 1 2] [3 4] [5] [6 7], and byte 8 (the next one) starts a patch
    s = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    pid, read = patch_index(s, 10)
    assert pid.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert read.tolist() == [[0, 0, 1, 1, 2, 3, 3, 4]]  # slot 0: null; k: patch k-1, once it has ended
    for t in range(8):  # a byte reads only patches whose bytes are all <= t
        assert all(u <= t for u in range(8) if pid[0, u] < read[0, t])
    pid, read = patch_index(s, 2)  # a cap of two patches
    assert pid.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]] and read.tolist() == [[0, 0, 1, 1, 2, 2, 2, 2]]


def test_pooling_attends_to_its_own_bytes_only():
    torch.manual_seed(6)
    pool = PatchPooling(8, 2).double()
    h = torch.randn(1, 8, 8, dtype=torch.float64)
    pid = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3]])
    out = pool(h, pid, 5)
    for p in range(4):  # a naive attention of each patch's query over its bytes
        mine = h[0, pid[0] == p]
        query = mine.max(0).values
        q = pool.q(pool.q_norm(query)).view(2, 4)
        k, v = pool.kv(pool.kv_norm(mine)).view(-1, 2, 2, 4).unbind(1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / 2.0, dim=-1)
        ref = query + pool.proj(torch.einsum("hn,nhd->hd", w, v).reshape(8))
        torch.testing.assert_close(out[0, p], ref, rtol=0, atol=1e-12)
    assert torch.equal(out[0, 4], torch.zeros(8, dtype=torch.float64))  # an empty slot
    other = h.clone()
    other[0, 5] += 1.0  # patch 2's only byte
    changed = (pool(other, pid, 5) - out).abs().sum(-1)[0]
    assert changed[2] > 0 and changed[[0, 1, 3]].eq(0).all()


def test_reader_attends_to_the_slots_of_its_patch_only():
    torch.manual_seed(7)
    reader = PatchReader(8, 2).double()
    h = torch.randn(1, 6, 8, dtype=torch.float64)
    slots = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    read = torch.tensor([[0, 0, 1, 1, 2, 3]])
    out = reader(h, slots, read)
    for t in range(6):
        torch.testing.assert_close(out[:, t], reader(h[:, t : t + 1], slots[:, read[0, t]][:, None],
                                                     torch.zeros(1, 1, dtype=torch.long))[:, 0], rtol=0, atol=1e-12)
    other = slots.clone()
    other[0, 2] += 1.0
    changed = (reader(h, other, read) - out).abs().sum(-1)[0]
    assert changed.ne(0).tolist() == [False, False, False, False, True, False]


# ----- the model: causality, teacher forcing, generation -----

def assert_causal(model, x, j):
    y = x.clone()
    y[:, j] = (y[:, j] + 1 + torch.arange(y.size(0))) % 256
    a, c = model(x).nll, model(y).nll
    torch.testing.assert_close(a[:, : j - 1], c[:, : j - 1], rtol=0, atol=0)
    return a, c


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_in_eval_with_the_patcher(variant):
    model = tiny(**VARIANTS[variant])
    x = text_batch(3, 49, seed=8)
    n = model(x).metrics["bytes_per_patch"].item()
    assert 1 < n < 48  # patches of several bytes, not one patch or one byte each
    for j in (3, 20, 37, 48):
        a, c = assert_causal(model, x, j)
        assert not torch.equal(a[:, j - 1 :], c[:, j - 1 :])


def test_patches_carry_context_beyond_the_byte_window():
    """byte_window 8, 8-gram hashes, one encoder and two decoder layers: byte j reaches past
    j + 28 only through the patches and the global transformer."""
    model = tiny()
    x = text_batch(2, 49, seed=9)
    a, c = assert_causal(model, x, 10)
    assert not torch.equal(a[:, 40:], c[:, 40:])
    model.cfg.entropy_threshold = 99.0  # one patch per window, never completed: everything reads the null patch
    a, c = assert_causal(model, x, 10)
    assert torch.equal(a[:, 40:], c[:, 40:])


def test_side_file_entropies_replace_the_entropy_model(monkeypatch):
    model = tiny()
    x = text_batch(2, 49, seed=10)
    h = model.entropy.entropies(x[:, :-1])
    side = torch.cat([torch.full_like(h[:, :1], 7.0), h], dim=1)  # H[0] is never read
    ref = model(x).nll
    monkeypatch.setattr(model.entropy, "entropies", lambda *a, **k: pytest.fail("entropy model ran"))
    torch.testing.assert_close(model(x, entropies=side).nll, ref, rtol=0, atol=0)
    assert not torch.equal(model(x, entropies=side.flip(1)).nll, ref)


@pytest.mark.parametrize("variant", ["global", "monotonic", "max_len"])
def test_next_logprobs_equal_teacher_forcing_and_the_byte_lm(variant):
    model = tiny(**VARIANTS[variant])
    x = text_batch(2, 49, seed=11)
    nll = model(x).nll
    logp = model.next_logprobs(x[:, :-1])
    torch.testing.assert_close(-logp.gather(-1, x[:, 1:, None])[..., 0], nll, rtol=0, atol=1e-12)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones_like(nll), rtol=0, atol=1e-12)
    lm = as_byte_lm(model)
    prefix = bytes(x[0, 1:20].tolist())  # the byte LM puts the separator first
    row = torch.tensor([[0, *prefix]])
    assert lm.next_byte_logprobs(prefix)[:256][1:].tolist() == pytest.approx(
        model.next_logprobs(row)[0, -1, 1:].tolist(), abs=1e-12)


@pytest.mark.parametrize("variant", ["global", "cap", "monotonic_max_len"])
def test_cached_decoder_matches_the_full_forward_at_batch_2(variant):
    """Byte by byte through the cached decoder (past block_size, so the window restarts) and the
    full model on the same window give the same next-byte distributions, for two rows that
    complete patches at different bytes."""
    model = tiny(**VARIANTS[variant])
    seq = text_batch(2, 80, seed=12)
    restarts = decode_against_teacher_forcing(model, CachedDecoder(model, seq[:, :5]), seq, 5)
    assert restarts == 2  # at 48 bytes, then 24 later


def test_generate_streams_greedy_bytes_and_batches():
    model = tiny().float()
    out = model.generate(b"\x00First Citizen", 10, temperature=0)
    assert isinstance(out, bytes) and len(out) == 10
    ids = torch.tensor([list(b"\x00First Citizen" + out)])
    assert model.next_logprobs(ids[:, :-1]).argmax(-1)[0, -10:].tolist() == list(out)
    batch = model.generate(text_batch(3, 60, seed=13), 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (3, 64)
    with pytest.raises(HLMError, match="non-empty"):
        model.generate(b"", 3)


# ----- training: compile, loss, the frozen entropy model -----

def test_compile_matches_eager():
    model = tiny(max_patches=8, n_dec=1, hash_sizes=[3, 5]).float().train()
    x = text_batch(2, 49, seed=14)
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=1e-5, atol=1e-5)


def test_loss_falls_and_the_entropy_model_stays_frozen():
    model = tiny().float().train()
    frozen = {k: v.clone() for k, v in model.entropy.state_dict().items()}
    opt = make_optimizer(model, load_config("configs/smoke/blt.yaml").train, torch.device("cpu"))
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.entropy.parameters())
    x = text_batch(4, 49, seed=15)
    losses = []
    for _ in range(15):
        out = model(x)
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 1.0  # from ~ln 256 = 5.5 nats; a fixed batch is memorised fast
    assert all(torch.equal(v, frozen[k]) for k, v in model.entropy.state_dict().items())


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(BLTError, match="entropy_threshold"):
        tiny(entropy_threshold=None)
    with pytest.raises(BLTError, match="patching"):
        tiny(patching="spaces")
    with pytest.raises(BLTError, match="entropy_model"):
        tiny(entropy_model="")
    model = tiny(entropy_model=str(tmp_path / "missing.pt"))
    with pytest.raises(BLTError, match="missing.pt not found"):
        model(text_batch(1, 49))
    model.load_state_dict(tiny().state_dict())  # a BLT checkpoint brings the entropy model's weights
    model(text_batch(1, 49))


# ----- the pipeline through the CLIs -----

def test_entropy_patches_cli_errors_are_one_line(tmp_path, capsys):
    rc = entropy_patches.main(["x.pt", "--data", str(tmp_path / "none"), "--target-bytes-per-patch", "4"])
    assert_one_line_error(rc, capsys.readouterr().err, "meta.json")
    rc = entropy_patches.main(["x.pt", "--data", str(tmp_path), "--target-bytes-per-patch", "0.5"])
    assert_one_line_error(rc, capsys.readouterr().err, "--target-bytes-per-patch")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The fixture as bytes, an entropy model (the smoke byte GPT, briefly trained), entropy side
    files calibrated to 4 bytes per patch, and a BLT trained on them through train.py (θ read from the
    calibration for its target patch size)."""
    root = tmp_path_factory.mktemp("blt")
    data = root / "data"
    assert prepare_data.main(["--input", str(SHAKESPEARE), "--out", str(data)]) == 0
    gpt = load_config("configs/smoke/byte_gpt.yaml", [f"data.path={data}", f"train.out_dir={root / 'gpt'}",
                                                       "train.max_steps=30", "eval.interval=0", *QUIET])
    train(gpt)
    assert entropy_patches.main([str(root / "gpt" / "ckpt.pt"), "--data", str(data), "--target-bytes-per-patch",
                                 "4", "--device", "cpu", "--chunk", "512"]) == 0
    info = json.loads((data / "patches.entropy.json").read_text())
    theta = info["calibration"][0]["threshold"]
    proc = run_cli("train.py", "configs/smoke/blt.yaml", f"data.path={data}", f"train.out_dir={root / 'run'}",
                   f"model.entropy_model={root / 'gpt' / 'ckpt.pt'}", "model.target_bytes_per_patch=4",
                   "train.max_steps=30", "eval.interval=0", *QUIET)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads((root / "run" / "config.json").read_text())["model"]["entropy_threshold"] == theta
    return root, info


def test_threshold_from_the_calibration_record(tmp_path, byte_corpus):
    """θ is read for the config's target patch size, patching mode and length limit, from a record made with
    its entropy model; a missing record, another entropy model or another mode is one line naming the
    problem (train.py: before any training)."""
    shutil.copytree(byte_corpus, tmp_path, dirs_exist_ok=True)
    record = {"entropy_model": str(tmp_path / "ent.pt"), "calibration": [
        {"target_bytes_per_patch": 4.5, "mode": "global", "max_patch_len": 0, "threshold": 1.25},
        {"target_bytes_per_patch": 6.0, "mode": "global", "max_patch_len": 0, "threshold": 2.5},
        {"target_bytes_per_patch": 4.5, "mode": "monotonic", "max_patch_len": 0, "threshold": 0.125}]}
    (tmp_path / "patches.entropy.json").write_text(json.dumps(record))

    def filled(**kw) -> float | None:
        cfg = BLTConfig(entropy_model=str(tmp_path / "ent.pt"), entropy_file="entropy", **kw)
        cfg.fill_from_data(tmp_path)
        return cfg.entropy_threshold

    assert filled(target_bytes_per_patch=6) == 2.5
    assert filled(target_bytes_per_patch=4.5, patching="monotonic") == 0.125
    assert filled(target_bytes_per_patch=6, entropy_threshold=3.0) == 3.0  # a θ given wins
    assert filled() is None  # no target: θ stays for check_config to ask for
    with pytest.raises(BLTError, match="no threshold for 5 bytes per patch"):
        filled(target_bytes_per_patch=5)
    with pytest.raises(BLTError, match="max_patch_len=8"):
        filled(target_bytes_per_patch=6, max_patch_len=8)
    with pytest.raises(BLTError, match="not of model.entropy_model"):
        BLTConfig(entropy_model=str(tmp_path / "other.pt"), target_bytes_per_patch=6).fill_from_data(tmp_path)
    with pytest.raises(BLTError, match="not found"):
        BLTConfig(entropy_model="e.pt", target_bytes_per_patch=6).fill_from_data(tmp_path / "none")
    proc = run_cli("train.py", "configs/smoke/blt.yaml", f"data.path={tmp_path}", f"train.out_dir={tmp_path / 'run'}",
                   f"model.entropy_model={tmp_path / 'other.pt'}", "model.target_bytes_per_patch=6", *QUIET)
    assert_one_line_error(proc.returncode, proc.stderr, "model.entropy_model")
    assert not (tmp_path / "run").exists()


def test_entropy_files_and_calibration_record(pipeline):
    root, info = pipeline
    data = root / "data"
    val = np.fromfile(data / "val.bin", dtype=np.uint8)
    ent = np.fromfile(data / "val.entropy.bin", dtype=np.float16)
    assert len(ent) == len(val) and np.isfinite(ent).all() and ent.std() > 0.1
    (cal,) = info["calibration"]
    assert cal["mode"] == "global" and abs(cal["bytes_per_patch"]["train_sample"] - 4) / 4 < 0.02
    assert cal["bytes_per_patch"]["val"] == pytest.approx(mean_patch_size(ent, "global", cal["threshold"]))
    assert set(cal["bytes_per_patch"]) == {"train_sample", "val", "test"}
    assert json.loads((data / "meta.json").read_text())["kind"] == "bytes"  # prepare's meta is untouched


def test_training_run_logs_patches_and_loss_falls(pipeline):
    root, info = pipeline
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.3
    assert all(k in train_recs[-1] for k in ("bytes_per_patch", "patch_cap_hit", "bytes_past_cap"))
    assert 3 < train_recs[-1]["bytes_per_patch"] < 5.5  # calibrated to 4 on train (cap not hit often)


def test_eval_and_sample_need_only_the_checkpoint(pipeline, tmp_path):
    root, _ = pipeline
    ckpt = root / "run" / "ckpt.pt"
    (root / "gpt" / "ckpt.pt").rename(root / "gpt" / "moved.pt")  # the entropy model travels in the checkpoint
    try:
        out = tmp_path / "eval.json"
        proc = run_cli("eval.py", ckpt, "--data", root / "data", "--split", "val", "--json", out)
        assert proc.returncode == 0, proc.stderr.decode()
        (row,) = json.loads(out.read_text())
        assert row["model"].startswith("blt 1+2+1L/32-64d global") and 0 < row["bpb"] < 8
        proc = run_cli("sample.py", ckpt, "--prompt", "ROMEO:", "--max-bytes", "30", "--seed", "1")
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.startswith(b"ROMEO:") and len(proc.stdout) == len(b"ROMEO:") + 30 + 1
    finally:
        (root / "gpt" / "moved.pt").rename(root / "gpt" / "ckpt.pt")


def test_entropy_model_loads_from_its_checkpoint_and_is_checked(pipeline):
    root, info = pipeline
    cfg = load_config("configs/smoke/blt.yaml", [f"model.entropy_model={root / 'gpt' / 'ckpt.pt'}",
                                                 f"model.entropy_threshold={info['calibration'][0]['threshold']}"])
    model = build_model(cfg.model)
    gpt = torch.load(root / "gpt" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(model.entropy.state_dict()[k], v) for k, v in gpt.items())
    assert not any(p.requires_grad for p in model.entropy.parameters())
    matmul_params = sum(p.numel() for n, p in model.entropy.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert model.frozen_flops_per_token() >= 2 * matmul_params  # matmuls (attention is counted on CUDA)
    cfg.model.entropy_d_model = 32
    other = build_model(cfg.model)  # a BLT checkpoint's weights may still follow (eval.py, sample.py)
    with pytest.raises(BLTError, match="entropy_d_model"):
        other.next_logprobs(torch.zeros(1, 4, dtype=torch.long))
    assert not math.isnan(info["calibration"][0]["threshold"])


def test_training_flops_count_the_patcher_once():
    """A side file stands in for the entropy model in training: its forward FLOPs come back through
    extra_train_flops; without a side file the model runs inside forward and adds nothing extra."""
    with_file, on_the_fly = tiny(entropy_file="entropy"), tiny(entropy_file="")
    per_byte = with_file.frozen_flops_per_token()
    assert per_byte > 0
    assert with_file.extra_train_flops(1000) == int(per_byte * 1000)
    assert on_the_fly.extra_train_flops(1000) == 0


@pytest.mark.parametrize("name", ["../x", "boundaries.unigram", "a/b", ""])
def test_entropy_patches_refuses_names_outside_its_own_files(tmp_path, capsys, name):
    assert entropy_patches.main(["missing.pt", "--data", str(tmp_path), "--name", name]) == 1
    assert "--name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
