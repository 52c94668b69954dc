"""GPT (byte and token) against the model contract (README): shapes, causality, KV cache,
next_logprobs agreeing with forward, generation."""

from __future__ import annotations

import math

import pytest
import torch

from hlm.models import build_model
from hlm.models.base import ModelOutput
from hlm.models.gpt import GPTConfig, KVWalk


def tiny_gpt(vocab_size: int = 256, block_size: int = 24, tie: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32,
                    tie_embeddings=tie)
    return build_model(cfg).double().eval()


def random_ids(vocab: int, shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vocab", [256, 300])
def test_output_contract(vocab):
    model = tiny_gpt(vocab)
    idx = random_ids(vocab, (3, 25))
    out = model(idx)
    assert isinstance(out, ModelOutput)
    assert out.nll.shape == (3, 24) and out.nll.dtype == torch.float64
    assert out.loss.dim() == 0 and torch.equal(out.loss, out.nll.mean())
    # an untrained model predicts close to uniform
    assert abs(out.loss.item() - math.log(vocab)) < 0.1


@pytest.mark.parametrize("j", [1, 2, 7, 13, 24])
def test_causality(j):
    """nll[:, t] depends only on idx[:, :t+2]: perturbing idx[:, j] leaves nll[:, :j-1] unchanged."""
    model = tiny_gpt()
    idx = random_ids(256, (2, 25))
    base = model(idx).nll
    perturbed = idx.clone()
    perturbed[:, j] = (perturbed[:, j] + 17) % 256
    nll = model(perturbed).nll
    torch.testing.assert_close(nll[:, : j - 1], base[:, : j - 1], rtol=0, atol=1e-12)
    assert (nll[:, j - 1] != base[:, j - 1]).all()  # idx[:, j] is the target of position j-1
    if j < 24:
        assert (nll[:, j:] != base[:, j:]).any()  # and later positions see it


def test_next_logprobs_agree_with_forward():
    model = tiny_gpt()
    idx = random_ids(256, (2, 25))
    logp = model.next_logprobs(idx[:, :-1])
    assert logp.shape == (2, 24, 256)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 24, dtype=torch.float64), rtol=0, atol=1e-12)
    gathered = -logp.gather(-1, idx[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(gathered, model(idx).nll, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunks", [[24], [1] * 24, [10, 1, 1, 12], [5, 19]])
def test_kv_cache_matches_full_forward(chunks):
    """Prefill and incremental decoding through the cache give the logits of one full pass."""
    model = tiny_gpt()
    idx = random_ids(256, (2, 24))
    full = model.logits(idx)
    cache = model.transformer.new_cache(2, 24, "cpu", torch.float64)
    parts, pos = [], 0
    for n in chunks:
        parts.append(model.logits(idx[:, pos : pos + n], cache))
        pos += n
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-10)


def test_kv_walk_follows_branching_paths():
    """`follow` keeps the prefix a path shares with the last one and feeds the rest: after every jump
    (a sibling, a shorter path, a repeat, a fresh start, ids fed directly) its logits are those of a full pass."""
    model = tiny_gpt()
    walk = KVWalk(model)
    base = random_ids(256, (20,)).tolist()
    for path in (base[:12], base[:12] + [7, 8], base[:12] + [9], base[:5], base[:5], base, [3]):
        torch.testing.assert_close(walk.follow(path), model.logits(torch.tensor([path]))[0, -1], rtol=0, atol=1e-10)
        assert len(walk) == len(path)
    walk.follow(base[:4])
    walk.feed(torch.tensor([[5, 6]]))  # fed after the path: `follow` keeps only what it knows
    torch.testing.assert_close(walk.follow(base[:6]), model.logits(torch.tensor([base[:6]]))[0, -1], rtol=0, atol=1e-10)
    walk.rewind(0)
    assert len(walk) == 0
    with pytest.raises(ValueError, match="rewind"):
        walk.rewind(1)


def test_greedy_generate_matches_full_recompute():
    model = tiny_gpt()
    prompt = random_ids(256, (2, 5))
    out = model.generate(prompt, max_new=15, temperature=0)
    assert out.shape == (2, 20) and torch.equal(out[:, :5], prompt)
    ids = prompt
    for _ in range(15):
        ids = torch.cat([ids, model.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_generate_bytes_beyond_context():
    """Sampling past block_size refills the cache from the last half window and keeps going."""
    model = tiny_gpt(block_size=16)
    g = torch.Generator().manual_seed(0)
    out = model.generate(b"hello", max_new=50, temperature=1.0, top_k=20, generator=g)
    assert isinstance(out, bytes) and len(out) == 50
    again = model.generate(b"hello", max_new=50, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(0))
    assert out == again
    assert model.generate(b"hello", max_new=0) == b""


def test_prompt_longer_than_context():
    """Only the last block_size ids of a long prompt condition the continuation."""
    model = tiny_gpt(block_size=16)
    prompt = random_ids(256, (1, 40))
    out = model.generate(prompt, max_new=5, temperature=0)
    tail = model.generate(prompt[:, -16:], max_new=5, temperature=0)
    assert out.shape == (1, 45) and torch.equal(out[:, :40], prompt)
    assert torch.equal(out[:, 40:], tail[:, 16:])


def test_top_k_one_is_greedy():
    model = tiny_gpt()
    prompt = random_ids(256, (1, 6))
    greedy = model.generate(prompt, 10, temperature=0)
    topk1 = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, topk1)


def test_weight_tying():
    tied, untied = tiny_gpt(tie=True), tiny_gpt(tie=False)
    assert tied.head.weight is tied.embed.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 256 * 32


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=256, block_size=16, n_layer=8, n_head=4, d_model=256))
    proj = model.transformer.blocks[0].mlp.proj.weight
    fc = model.transformer.blocks[0].mlp.fc.weight
    assert abs(fc.std().item() - 0.02) < 0.001
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_loss_backpropagates_to_every_parameter():
    model = tiny_gpt().train()
    model(random_ids(256, (2, 25))).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
