"""Sampling from byte LMs.

`sample_bytes`: byte by byte from any byte LM. Temperature and top-k act on the 257 next-byte
outcomes (256 bytes and end-of-text): p_T(b) ∝ p(b)^(1/T), keeping the k most likely. This is
not the same as token-level temperature.

`sample_prompt_boundary`: exact sampling after a prompt that may end inside a token (mid-word).
It draws one cover of the prompt with probability ∝ Q(cover) (at temperature 1: exact), emits
the part of the cover's last token beyond the prompt, then continues at token speed with
ordinary token sampling, where temperature and top-k act on tokens. With `canonical=True` the
tokens after the cover come from the locally canonical model (hlm/bytes/canonical.py): next tokens
that cannot occur in a canonical encoding are masked before temperature and top-k, so the
sampled ids are the tokenizer's own encoding of the sampled text (`canonical_token_stream`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hlm.bytes.byte_lm import END, ByteLM, ByteLMBase
from hlm.models.generation import sample_next


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def sample_bytes(blm: ByteLMBase, prompt: bytes, max_bytes: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield sampled bytes one at a time until end-of-text or `max_bytes`."""
    gen = _cpu_generator(generator)
    text = bytearray(prompt)
    for _ in range(max_bytes):
        lp = blm.next_byte_logprobs(bytes(text)).double()
        b = int(sample_next(lp[None], temperature, top_k, gen)[0])
        if b == END:
            return
        text.append(b)
        yield b


def sample_prompt_boundary(blm: ByteLM, prompt: bytes, max_bytes: int, temperature: float = 1.0,
                           top_k: int | None = None, generator: torch.Generator | None = None,
                           canonical: bool = False) -> Iterator[bytes]:
    """Yield pieces of bytes continuing `prompt` (total at most `max_bytes`), stopping at EOS; with
    `canonical`, tokens are drawn from the locally canonical model."""
    blm.goto(bytes(prompt))
    covers = blm.covers()
    weights = torch.tensor([c[3] for c in covers], dtype=torch.float64)
    cpu_gen = _cpu_generator(generator)  # one stream for the cover and any host-side token draws after it
    pick = int(torch.multinomial(torch.softmax(weights, 0), 1, generator=cpu_gen)[0])
    node, token, consumed, _ = covers[pick]
    path = blm.tracker.trie.path(node)
    written = 0
    if token is not None:
        path.append(token)
        piece = blm.tok.token_bytes(token)[consumed:][:max_bytes]
        written += len(piece)
        yield piece
    if canonical:
        stream = canonical_token_stream(blm, path, temperature, top_k, cpu_gen)
    else:
        stream = _token_stream(blm, path, temperature, top_k, generator, cpu_gen)
    for t in stream:
        if written >= max_bytes or t == blm.eos_id or t >= blm.tok.vocab_size:  # ids past the tokenizer: FIM sentinels
            return
        piece = blm.tok.token_bytes(t)[: max_bytes - written]
        written += len(piece)
        yield piece


def _token_stream(blm: ByteLM, path: list[int], temperature: float, top_k: int | None,
                  generator: torch.Generator | None, cpu_gen: torch.Generator | None) -> Iterator[int]:
    """Ordinary token sampling after `path`: the model's own KV-cached generator (drawing from `generator`)
    when it has one, else host-side draws from `cpu_gen`."""
    model = blm.model
    if hasattr(model, "generate_stream") and blm.runner.cached_gpt:
        ids = torch.tensor([blm.context + path], device=blm.runner.device)
        for nxt in model.generate_stream(ids, 1 << 20, temperature, top_k, generator):
            yield int(nxt[0])
        return
    path = list(path)
    while True:
        lp = blm.runner.logprobs(path)
        t = int(sample_next(lp[None], temperature, top_k, cpu_gen)[0])
        path.append(t)
        yield t


def canonical_token_stream(blm: ByteLM, path: list[int], temperature: float = 1.0, top_k: int | None = None,
                           generator: torch.Generator | None = None) -> Iterator[int]:
    """Token sampling after `path` (start symbol first, then a valid token path) with the tokens that may
    not follow masked out: `ConversionRules.next_mask` of the last token and the incomplete character
    the text ends with (exact for raw byte and sentencepiece BPE), and the end of text only on a
    character boundary. Regex pretokenizers: a drawn token is also checked against the tokenizer (the
    text so far plus the token, continued by the probe characters, must encode to the path), and
    redrawn without it if it fails; inside a character, where the text cannot be encoded, it is kept."""
    from hlm.bytes.canonical import incomplete_char

    rules, tok = blm.rules, blm.tok
    path = list(path)
    text = tok.decode(path[1:])
    while True:
        lp = blm.runner.logprobs(path)
        partial = incomplete_char(text)
        allowed = rules.next_mask(None if len(path) == 1 else path[-1], partial).clone()
        if blm.eos_id is not None:
            allowed[blm.eos_id] = not partial
        while True:
            t = int(sample_next(lp.masked_fill(~allowed, float("-inf"))[None], temperature, top_k, generator)[0])
            if t == blm.eos_id or rules.rule != "regex" or _regex_prefix_valid(tok, path[1:] + [t]):
                break
            allowed[t] = False
        path.append(t)
        text += tok.token_bytes(t)
        yield t


def _regex_prefix_valid(tok, ids: list[int]) -> bool:
    """Is `ids` a prefix of the encoding of its text continued by some probe character? (True inside a
    character: the text cannot be encoded there.)"""
    from hlm.bytes.covers import PROBES

    try:
        text = tok.decode(ids).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(tok.encode((text + z).encode())[: len(ids)] == ids for z in PROBES)
