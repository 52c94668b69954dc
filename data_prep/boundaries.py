"""Per-byte boundary targets for the hourglass `unigram` and `entropy` boundary predictors.

For every split of a prepared byte corpus, writes `<split>.boundaries.<name>.bin` beside
`<split>.bin`: one uint8 per byte, 1 where the byte is the LAST byte of a segment (the
hourglass convention), plus `boundaries.<name>.json` with how it was made and the boundary
rate of each split. The document separator 0x00 is always a boundary.

  unigram  a sentencepiece Unigram model (byte-exact settings, as data_prep/prepare.py) trained
           on the train split; a byte is a boundary iff it ends a piece of the segmentation of
           its line. The model is saved as `boundaries.<name>.model`.
  entropy  a trained hlm byte model (e.g. a small byte GPT) scores every position with the
           entropy H[t] of its next-byte distribution (at least half a window of left
           context); byte t is a boundary iff H[t] > H[t-i] for i = 1..spikes_left (an entropy
           spike: the byte after t is hard to predict, so a new segment starts there).

These targets look ahead (Unigram) or come from another model: they only supervise the
hourglass boundary predictor in training, never feed the LM at evaluation.

Examples:
  python data_prep/boundaries.py unigram --data data/enwiki_bytes --vocab-size 5000
  python data_prep/boundaries.py entropy --data data/enwiki_bytes --model runs/entropy_gpt/ckpt.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find hlm and data_prep

from hlm import HLMError  # noqa: E402
from hlm.checkpoint import write_atomic  # noqa: E402
from hlm.data import Split, read_meta  # noqa: E402

SEPARATOR = 0


def split_bytes(folder: Path, name: str) -> np.ndarray:
    split = Split(folder, name)
    if split.meta["kind"] != "bytes":
        raise HLMError(f"{folder} is a token corpus: boundary targets are made for byte corpora")
    return np.asarray(split.memmap())


def unigram_targets(data: np.ndarray, tok, threads: int, chunk_lines: int = 200_000) -> np.ndarray:
    """1 at the last byte of every sentencepiece piece of every line of every document."""
    from data_prep.prepare import decode_utf8

    piece_len = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    out = np.zeros(len(data), dtype=np.uint8)
    seps = np.flatnonzero(data == SEPARATOR)
    out[seps] = 1
    starts = np.concatenate([[0], seps + 1])
    ends = np.concatenate([seps, [len(data)]])
    for doc_start, doc_end in zip(starts, ends, strict=True):
        lines = decode_utf8(bytes(data[doc_start:doc_end]), f"document at byte {doc_start}").splitlines(keepends=True)
        offset = int(doc_start)
        for i in range(0, len(lines), chunk_lines):
            for ids in tok.encode_batch(lines[i : i + chunk_lines], threads):
                lengths = piece_len[np.asarray(ids, dtype=np.int64)]
                out[offset + np.cumsum(lengths) - 1] = 1
                offset += int(lengths.sum())
        if offset != doc_end:
            raise HLMError("sentencepiece pieces do not cover a document byte for byte: the Unigram model "
                           "does not round-trip this corpus")
    return out


@torch.no_grad()
def next_byte_entropy(model, data: np.ndarray, block: int, batch_size: int, device: torch.device) -> np.ndarray:
    """H[t] in nats of the model's next-byte distribution after byte t, for every t. Windows of
    `block` bytes advance by block // 2; each scores its last half (the first window all of it)."""
    n = len(data)
    out = np.zeros(n, dtype=np.float32)
    jobs, first = [], 0  # (window start, first scored position, window end)
    while first < n:
        end = min(n, first + (block if first == 0 else max(1, block // 2)))
        jobs.append((max(0, end - block), first, end))
        first = end
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    full = [j for j in jobs if j[2] - j[0] == block]
    for group in (full, [j for j in jobs if j[2] - j[0] != block]):
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            x = torch.from_numpy(np.stack([data[s:e].astype(np.int64) for s, _, e in batch])).to(device)
            with autocast:
                logp = model.next_logprobs(x).float()
            ent = -(logp.exp() * logp).sum(-1).cpu().numpy()
            for row, (s, first, e) in zip(ent, batch, strict=True):
                out[first:e] = row[first - s :]
    return out


def entropy_spikes(entropy: np.ndarray, spikes_left: int) -> np.ndarray:
    """1 where entropy[t] > entropy[t - i] for every i = 1..spikes_left (vacuous before t = i)."""
    spike = np.ones(len(entropy), dtype=bool)
    for i in range(1, spikes_left + 1):
        spike[i:] &= entropy[i:] > entropy[:-i]
    return spike.astype(np.uint8)


def train_unigram(data: np.ndarray, vocab_size: int, threads: int) -> bytes:
    from data_prep.prepare import decode_utf8, train_sentencepiece

    docs = [decode_utf8(d, f"train document {i}") for i, d in enumerate(bytes(data).split(bytes([SEPARATOR])))]
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "unigram.model"
        train_sentencepiece(docs, "unigram", vocab_size, model_file, threads)  # raises PrepareError on bad settings
        return model_file.read_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["unigram", "entropy"])
    p.add_argument("--data", required=True, help="byte corpus folder written by data_prep/prepare.py")
    p.add_argument("--name", default=None, help="target name (files <split>.boundaries.<name>.bin); default: kind")
    p.add_argument("--vocab-size", type=int, default=5000, help="unigram: sentencepiece vocabulary")
    p.add_argument("--model", help="entropy: checkpoint of a trained hlm byte model")
    p.add_argument("--spikes-left", type=int, default=2, help="entropy: H[t] must exceed this many previous H")
    p.add_argument("--batch-size", type=int, default=16, help="entropy: windows per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    folder = Path(args.data)
    name = args.name or args.kind
    try:
        for flag, value, least in (("--threads", args.threads, 1), ("--batch-size", args.batch_size, 1),
                                   ("--spikes-left", args.spikes_left, 0), ("--vocab-size", args.vocab_size, 1)):
            if value < least:
                raise HLMError(f"{flag} must be at least {least}, got {value}")
        meta = read_meta(folder)
        info: dict = {"kind": args.kind, "convention": "1 = last byte of a segment; separator 0x00 is always 1"}
        if args.kind == "unigram":
            from hlm.tokenizers import SentencePieceTokenizer

            proto = train_unigram(split_bytes(folder, "train"), args.vocab_size, args.threads)
            write_atomic(folder / f"boundaries.{name}.model", proto)
            tok = SentencePieceTokenizer(model_proto=proto)
            info.update(vocab_size=tok.vocab_size, tokenizer=f"boundaries.{name}.model")
            make = lambda data: unigram_targets(data, tok, args.threads)  # noqa: E731
        else:
            if not args.model:
                raise HLMError("entropy targets need --model: a checkpoint of a trained hlm byte model")
            from hlm.checkpoint import load_model

            device = torch.device(args.device)
            model, cfg, _ = load_model(args.model, device)
            if not hasattr(model, "next_logprobs") or getattr(cfg.model, "vocab_size", 0) != 256:
                raise HLMError(f"{args.model} is not a byte model with next_logprobs")
            info.update(model=str(args.model), spikes_left=args.spikes_left, block=cfg.model.block_size)

            def make(data):
                ent = next_byte_entropy(model, data, cfg.model.block_size, args.batch_size, device)
                out = entropy_spikes(ent, args.spikes_left)
                out[data == SEPARATOR] = 1
                return out
        info["rate"] = {}
        for split in meta["splits"]:
            targets = make(split_bytes(folder, split))
            write_atomic(folder / f"{split}.boundaries.{name}.bin", targets.tofile)
            info["rate"][split] = float(targets.mean()) if len(targets) else math.nan
            print(f"{split}: {len(targets):,} bytes, boundary rate {info['rate'][split]:.4f} "
                  f"({1 / max(info['rate'][split], 1e-9):.2f} bytes per segment)")
        write_atomic(folder / f"boundaries.{name}.json", json.dumps(info, indent=2).encode())
    except (HLMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
