"""Continue a prompt from a checkpoint: `python sample.py CKPT --prompt "The meaning of" --max-bytes 200`.

The prompt is bytes (--prompt as typed, or --prompt-file): byte models take any bytes, UTF-8 or
not. Byte models stream bytes as they are sampled. Token models use exact prompt-boundary sampling
(hlm/bytes/sampling.py): the prompt may end anywhere, even mid-word; one cover of the prompt is
drawn with its exact probability, then tokens are sampled as usual (temperature and top-k on
tokens). --byte-level samples any model byte by byte through its exact byte-level view, with
temperature and top-k applied to the 257 next-byte outcomes. --canonical-sampling (token models)
masks the next tokens that cannot occur in a canonical encoding, so the sampled tokens are the
tokenizer's own encoding of the text (hlm/bytes/sampling.py). Output goes to stdout as raw bytes.
--cuda-graphs (byte models of gpt, the hourglass, H-Net) decodes with one CUDA graph per
byte, bf16 weights on CUDA. In a copy of hlm without hlm/bytes, token models fall back to plain token
prompting (the prompt's own encoding, then tokens as sampled), and --byte-level and --canonical-sampling
are refused.
"""

import argparse
import codecs
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from hlm import HLMError, has_exact_bytes, require_exact_bytes
from hlm.checkpoint import load_model, tokenizer_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    prompt_src = p.add_mutually_exclusive_group()
    prompt_src.add_argument("--prompt", default="", help="prompt: the argument's exact bytes, UTF-8 or not")
    prompt_src.add_argument("--prompt-file", help="read the prompt's bytes from this file")
    p.add_argument("--max-bytes", type=int, default=200, help="bytes to sample after the prompt (0: none)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--byte-level", action="store_true", help="sample byte by byte (byte-level temperature/top-k)")
    p.add_argument("--canonical-sampling", action="store_true",
                   help="token models: mask non-canonical next tokens while sampling")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="byte models (gpt, hourglass, one-stage H-Net): decode with fixed-shape steps replayed as "
                        "CUDA graphs (bf16 weights on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = sys.stdout.buffer
    try:
        check_args(args)
        # argv arrives decoded with surrogateescape: fsencode gives back the bytes as typed
        prompt = Path(args.prompt_file).read_bytes() if args.prompt_file else os.fsencode(args.prompt)
        model, _, ckpt = load_model(args.checkpoint, args.device)
        tok = tokenizer_from_checkpoint(ckpt)
        separator = ckpt["data_meta"]["separator_id"]
        tokenized = tok is not None
        if args.canonical_sampling and (not tokenized or args.byte_level):
            raise HLMError("--canonical-sampling applies to token-level sampling of a token model")
        for flag, given in (("--byte-level", args.byte_level), ("--canonical-sampling", args.canonical_sampling)):
            if given:
                require_exact_bytes(flag)
        if tokenized:
            check_text_prompt(prompt)
        if args.cuda_graphs:
            check_cuda_graphs(model, tokenized or args.byte_level)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        exact = has_exact_bytes()
        if args.byte_level or (tokenized and exact):
            from hlm.bytes import ByteLM, NativeByteLM, sample_bytes, sample_prompt_boundary

            blm = ByteLM(model, tok, start_id=separator) if tokenized else NativeByteLM(model, separator)
            if args.byte_level:
                pieces = (bytes([b]) for b in sample_bytes(blm, prompt, args.max_bytes, args.temperature, args.top_k,
                                                           gen))
            else:
                pieces = sample_prompt_boundary(blm, prompt, args.max_bytes, args.temperature, args.top_k, gen,
                                                canonical=args.canonical_sampling)
        elif tokenized:
            print("note: no hlm/bytes here: plain token prompting (the prompt's own encoding)", file=sys.stderr)
            pieces = token_pieces(model, tok, prompt, separator, args, gen)
        else:
            ids = torch.tensor([[separator] + list(prompt)], device=args.device)
            graphs = {"cuda_graphs": True} if args.cuda_graphs else {}  # HAT's generate_stream has no such option
            stream = model.generate_stream(ids, args.max_bytes, args.temperature, args.top_k, gen, **graphs)
            ids_out = (int(nxt) for nxt in stream)  # the separator (end of document) or a FIM sentinel ends it
            pieces = (bytes([i]) for i in itertools.takewhile(lambda i: i < 256 and i != separator, ids_out))
        t0, written = time.perf_counter(), 0
        pieces = iter(pieces)
        first = next(pieces, b"")  # a prompt the model cannot take fails here, before anything is written
        out.write(prompt)
        for piece in itertools.chain([first], pieces):
            out.write(piece)
            out.flush()
            written += len(piece)
        seconds = time.perf_counter() - t0
        out.write(b"\n")
        mode = ("byte-level" if args.byte_level else "native bytes" if not tokenized
                else "prompt-boundary" if exact else "token prompting")
        print(f"{written} bytes in {seconds:.2f}s ({written / max(seconds, 1e-9):,.0f} bytes/s, {mode})",
              file=sys.stderr)
    except (HLMError, OSError) as e:  # bad input or an unreadable prompt file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def token_pieces(model: torch.nn.Module, tok, prompt: bytes, separator: int, args: argparse.Namespace,
                 gen: torch.Generator) -> Iterator[bytes]:
    """Plain token sampling after the prompt's own encoding, up to `--max-bytes` bytes; the end of text or a
    FIM sentinel ends it. A prompt that ends mid-word keeps its last token as encoded (no cover sampling)."""
    ids = torch.tensor([[separator] + tok.encode(prompt)], device=args.device)
    written = 0
    for nxt in model.generate_stream(ids, args.max_bytes, args.temperature, args.top_k, gen):
        t = int(nxt)
        if written >= args.max_bytes or t == separator or t >= tok.vocab_size:
            return
        piece = tok.token_bytes(t)[: args.max_bytes - written]
        written += len(piece)
        yield piece


def check_cuda_graphs(model: torch.nn.Module, other_sampler: bool) -> None:
    """--cuda-graphs needs native sampling of a family with a static decoder; on CUDA it casts the weights to bf16."""
    from hlm.models.parts.static_decoding import weights_to

    if other_sampler:
        raise HLMError("--cuda-graphs applies to the native sampling of a byte model (not --byte-level, "
                       "not token models)")
    if not model.has_static_decoder():
        raise HLMError(f"--cuda-graphs: this {model.cfg.family} model has no CUDA-graph decoder "
                       "(gpt, the hourglass and the one-stage H-Net have one)")
    if next(model.parameters()).device.type == "cuda":
        weights_to(model, torch.bfloat16)


def check_text_prompt(prompt: bytes) -> None:
    """A token model's tokenizer encodes text: the prompt must be UTF-8, though it may end mid-character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(prompt, final=False)
    except UnicodeDecodeError as e:
        raise HLMError(f"the prompt is not UTF-8 (byte {e.start}: {prompt[e.start:e.end]!r}) and this token model's "
                       "tokenizer encodes text; byte models take any bytes") from None


def check_args(args: argparse.Namespace) -> None:
    """Refuse values the samplers would crash on or silently misread."""
    if args.max_bytes < 0:
        raise HLMError(f"--max-bytes must be >= 0, got {args.max_bytes}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise HLMError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise HLMError(f"--top-k must be >= 1, got {args.top_k}")


if __name__ == "__main__":
    sys.exit(main())
