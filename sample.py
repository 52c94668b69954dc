"""Continue a prompt from a checkpoint: `python sample.py CKPT --prompt "The meaning of" --max-bytes 200`.

Byte models stream bytes as they are sampled; token models sample tokens until the
continuation has --max-bytes bytes. Output goes to stdout as raw bytes.
"""

import argparse
import sys

import torch

from hlm import HLMError
from hlm.checkpoint import load_model, tokenizer_from_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = sys.stdout.buffer
    try:
        model, cfg, ckpt = load_model(args.checkpoint, args.device)
        tok = tokenizer_from_checkpoint(ckpt)
        sep = ckpt["data_meta"]["separator_id"]
        prompt = args.prompt.encode("utf-8")
        ids = [sep] + (tok.encode(prompt) if tok is not None else list(prompt))
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        stream = model.generate_stream(torch.tensor([ids], device=args.device), args.max_bytes,
                                       args.temperature, args.top_k, gen)
        out.write(prompt)
        written = 0
        for nxt in stream:
            piece = tok.token_bytes(int(nxt)) if tok is not None else bytes([int(nxt)])
            piece = piece[: args.max_bytes - written]
            out.write(piece)
            out.flush()
            written += len(piece)
            if written >= args.max_bytes:
                break
        out.write(b"\n")
    except HLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
