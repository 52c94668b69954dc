"""Tokenizers as byte-exact maps between bytes and ids.

Every tokenizer here exposes `encode(bytes) -> list[int]`, `decode(ids) -> bytes`,
`token_bytes(i) -> bytes`, `vocab_size`, `eos_id` and `bos_id` (DESIGN §9).
"""

from __future__ import annotations

import re
from pathlib import Path

from hlm import HLMError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerError(HLMError):
    """Input a text tokenizer cannot take, or a tokenizer file that cannot be used."""


class SentencePieceTokenizer:
    """A sentencepiece `.model` seen as bytes: pieces map to their UTF-8 bytes ('▁' is a space),
    byte-fallback pieces `<0xAB>` to one byte, control pieces to no bytes."""

    def __init__(self, path: str | Path | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is not None:
                self.sp.LoadFromSerializedProto(model_proto)
            else:
                self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {path}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b""
        piece = self.sp.id_to_piece(i)
        m = _BYTE_PIECE.match(piece)
        if m and self.sp.is_byte(i):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def encode(self, data: bytes) -> list[int]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"invalid UTF-8 at byte {e.start}: a text tokenizer needs text") from None
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids) -> bytes:
        return b"".join(self._bytes[i] for i in ids)


def load_tokenizer(path: str | Path):
    """Load a tokenizer file by its kind (sentencepiece `.model` for now)."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"unknown tokenizer format: {path}")
