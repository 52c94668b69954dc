"""Next-word accuracy (the metric of Learn Your Tokens, Thawani et al. 2023) for byte models.

  python -m hlm.next_word runs/hat/ckpt.pt runs/byte_gpt/ckpt.pt --data data/enwiki_bytes --split val

Words are those of `hlm.splitter` (max_word_bytes 64 for every model, so models are scored on
the same words). A word counts as predicted when greedy decoding from the context that ends
with the previous word reproduces it exactly: the most likely byte that starts a word is its
first byte, the most likely next byte is each following byte, and after its last byte the
most likely next byte starts a new word. With teacher forcing this is one pass of
`next_logprobs` per window. Windows do not overlap; the first word of each window (whose
start the model cannot see) and its last word (whose end is not in the window) are skipped.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hlm import HLMError
from hlm.evaluate import encode_stream, inference_autocast, split_documents
from hlm.splitter import PrefixState


def word_hits(logprobs: torch.Tensor, x: torch.Tensor, max_word_bytes: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(words predicted exactly, words scored) for byte windows x [B, L] and the model's next-byte
    log-probs [B, L, 256] after each position."""
    state = PrefixState(x, max_word_bytes)
    start_mask = state.next_starts(torch.arange(256, device=x.device).expand(*x.shape, 256))
    greedy = logprobs.argmax(-1)
    greedy_start = logprobs.masked_fill(~start_mask, float("-inf")).argmax(-1)
    nxt, starts_next = x[:, 1:], state.starts[:, 1:]
    right = torch.where(starts_next, greedy_start[:, :-1] == nxt, greedy[:, :-1] == nxt)  # prediction of x[t+1]
    ends_right = start_mask[:, :-1].gather(2, greedy[:, :-1, None]).squeeze(-1)  # greedy ends the word at t
    word = state.starts.long().cumsum(1) - 1
    errors = torch.zeros_like(word).scatter_add(1, word[:, 1:], (~right).long())
    errors = errors.scatter_add(1, word[:, :-1], (starts_next & ~ends_right).long())
    k = torch.arange(x.size(1), device=x.device)
    scored = (k >= 1) & (k < word[:, -1:])
    return ((errors == 0) & scored).sum(), scored.sum()


@torch.no_grad()
def next_word_accuracy(model: torch.nn.Module, ids: torch.Tensor, block: int, batch_size: int = 8,
                       device: torch.device | str = "cpu", max_word_bytes: int = 64) -> dict:
    """Next-word accuracy of a byte model (with `next_logprobs`) over a byte stream ids [N]."""
    dev = torch.device(device)
    autocast = inference_autocast(dev)
    n_full = len(ids) // block
    groups = [ids[: n_full * block].view(n_full, block)]
    if len(ids) - n_full * block >= 2:
        groups.append(ids[n_full * block :][None])
    hits = torch.zeros((), dtype=torch.long, device=dev)
    count = torch.zeros((), dtype=torch.long, device=dev)
    for group in groups:
        for i in range(0, len(group), batch_size):
            x = group[i : i + batch_size].to(dev)
            with autocast:
                logprobs = model.next_logprobs(x).float()
            if logprobs.size(-1) > 256:  # a FIM model's sentinels: the next byte given that one follows
                logprobs = torch.log_softmax(logprobs[..., :256], dim=-1)
            h, c = word_hits(logprobs, x, max_word_bytes)
            hits += h
            count += c
    if int(count) == 0:
        raise HLMError("no complete words to score: the text is too short for the model's context")
    return {"next_word_acc": int(hits) / int(count), "words": int(count)}


def main(argv: list[str] | None = None) -> int:
    from hlm.checkpoint import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True, help="prepared byte data folder")
    p.add_argument("--split", default="val")
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="score the first N bytes of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        ids = None
        print("| checkpoint | next-word accuracy | words |\n|---|---:|---:|")
        for path in args.checkpoints:
            model, cfg, ckpt = load_model(path, args.device)
            if ckpt["data_meta"]["kind"] != "bytes" or not hasattr(model, "next_logprobs"):
                raise HLMError(f"{path}: next-word accuracy needs a byte model with next_logprobs")
            if ids is None:
                ids = encode_stream(split_documents(args.data, args.split), None,
                                    ckpt["data_meta"]["separator_id"])[: args.max_bytes]
            res = next_word_accuracy(model, ids, cfg.model.block_size, args.batch_size, args.device)
            print(f"| {path} | {res['next_word_acc']:.4f} | {res['words']:,} |", flush=True)
    except HLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
