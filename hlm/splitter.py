"""A causal word splitter on raw bytes, in the spirit of the HAT splitter.

The rule works on *characters*: a character is a UTF-8 lead byte followed by the
continuation bytes (0x80-0xBF) it announces, read leniently and causally: a continuation
byte joins the character before it only while that character still expects one, so an
invalid byte, a stray continuation byte or a truncated sequence is a one-byte (or shorter)
character. Any byte string splits; valid UTF-8 characters are never cut.

Each character has a class, read from its first byte:

  SPACE  0x20
  BREAK  other control bytes and whitespace: 0x00-0x1F, 0x7F (newline, tab, the 0x00 document separator)
  ALNUM  [0-9A-Za-z], and every non-ASCII character not listed below (Latin, Greek, Cyrillic,
         Arabic, Hebrew, Devanagari, Hangul, ... and invalid bytes): they spell words
  PUNCT  other printable ASCII, and non-ASCII punctuation blocks: lead 0xC2 (U+0080-U+00BF:
         NBSP, « », °, ©) and lead 0xE2 (U+2000-U+2FFF: dashes, quotes, arrows, math symbols)
  CJK    lead bytes 0xE3-0xE9 (U+3000-U+9FFF: CJK punctuation, kana, ideographs): these
         scripts have no spaces, so every such character is a word of its own

A word is an optional single leading space, then a run of ALNUM characters (or one CJK
character, or a run of punctuation), then trailing punctuation. Runs of two or more spaces
and runs of BREAK characters are words of their own. An apostrophe or a period between two
ALNUM characters stays inside the word ("don't", "3.14"). Precisely, a new word starts at
character c (class C) after characters ... pp, p when

  C = SPACE: p is not SPACE            C = BREAK: p is not BREAK
  C = ALNUM: not (p is ALNUM, or p is a single SPACE (pp is not SPACE), or p is ' or . and pp is ALNUM)
  C = CJK:   not (p is a single SPACE)
  C = PUNCT: p is BREAK, or p is a SPACE that follows a SPACE

and the first byte of a sequence always starts a word. Words longer than `max_word_bytes`
(M >= 4) are cut: a new piece starts at the first character that begins at or past each
multiple of M - 3 bytes from the word's start, so no piece exceeds M bytes and no character
is cut. The decision to start a word at byte i+1 depends only on bytes <= i+1 (causal).

Examples (M = 64):

  b"Hello, world!"            -> [b"Hello,", b" world!"]
  b"a  b\n\nc"                -> [b"a", b"  ", b"b", b"\n\n", b"c"]
  b"don't (stop) 3.14"        -> [b"don't", b" (", b"stop)", b" 3.14"]
  "日本語 text".encode()      -> ["日", "本", "語", " text"] (as UTF-8 bytes)
  "naïve café".encode()       -> ["naïve", " café"]
  b"\xff\x80abc"              -> [b"\xff\x80abc"] (invalid bytes read as letters)
  split_words(b"abcdefgh", 5) -> [b"ab", b"cd", b"ef", b"gh"] (pieces start at multiples of 2)

`split_words` is the readable reference (pure Python, used by tests and documentation);
`word_starts` and `next_byte_starts` compute the same rule on [B, T] byte tensors with
shifts and cumulative maxima, with static shapes, for use inside models.
"""

from __future__ import annotations

import torch

from hlm import HLMError

SPACE, BREAK, ALNUM, PUNCT, CJK = range(5)
NONE = -1  # "no character" before the start of a sequence


def byte_class(b: int) -> int:
    """Class of a character whose first byte is b."""
    if b == 0x20:
        return SPACE
    if b < 0x20 or b == 0x7F:
        return BREAK
    if b < 0x80:
        return ALNUM if chr(b).isalnum() else PUNCT
    if b in (0xC2, 0xE2):
        return PUNCT
    if 0xE3 <= b <= 0xE9:
        return CJK
    return ALNUM


def lead_length(b: int) -> int:
    """Bytes announced by a UTF-8 lead byte (2-4), or 1 for any other byte."""
    if 0xC2 <= b <= 0xDF:
        return 2
    if 0xE0 <= b <= 0xEF:
        return 3
    if 0xF0 <= b <= 0xF4:
        return 4
    return 1


def is_continuation(b: int) -> bool:
    return 0x80 <= b <= 0xBF


def check_max_word_bytes(max_word_bytes: int) -> None:
    if max_word_bytes < 4:
        raise HLMError(f"max_word_bytes must be >= 4 (a UTF-8 character has up to 4 bytes), got {max_word_bytes}")


# ----- reference implementation -----

def characters(data: bytes) -> list[bytes]:
    """Lenient causal UTF-8 characters: a lead byte takes the continuation bytes that follow,
    up to the number it announces; every other byte is a character of its own."""
    chars, i = [], 0
    while i < len(data):
        j = i + 1
        while j < min(len(data), i + lead_length(data[i])) and is_continuation(data[j]):
            j += 1
        chars.append(data[i:j])
        i = j
    return chars


def _starts_natural_word(c: int, p: int, pp: int, p_joiner: bool) -> bool:
    if p == NONE:
        return True
    single_space = p == SPACE and pp != SPACE
    if c == SPACE:
        return p != SPACE
    if c == BREAK:
        return p != BREAK
    if c == ALNUM:
        return not (p == ALNUM or single_space or (p_joiner and pp == ALNUM))
    if c == CJK:
        return not single_space
    return p == BREAK or (p == SPACE and pp == SPACE)  # PUNCT


def split_words(data: bytes, max_word_bytes: int = 64) -> list[bytes]:
    """Split bytes into words by the rule of the module docstring; b"".join(words) == data."""
    check_max_word_bytes(max_word_bytes)
    step = max_word_bytes - 3
    words: list[bytes] = []
    p = pp = NONE
    p_joiner = False
    offset = next_cut = 0  # bytes since the natural word's start; where the next piece may start
    for ch in characters(data):
        c = byte_class(ch[0])
        if _starts_natural_word(c, p, pp, p_joiner):
            words.append(ch)
            offset, next_cut = 0, step
        elif offset >= next_cut:
            words.append(ch)
            next_cut = (offset // step + 1) * step
        else:
            words[-1] += ch
        offset += len(ch)
        p, pp, p_joiner = c, p, ch in (b"'", b".")
    return words


# ----- vectorised implementation -----

def byte_classes(x: torch.Tensor) -> torch.Tensor:
    """`byte_class` of every element of a byte tensor (comparisons only: fuses under compile and
    needs no lookup table on the device)."""
    alnum = ((x >= 0x30) & (x <= 0x39)) | ((x >= 0x41) & (x <= 0x5A)) | ((x >= 0x61) & (x <= 0x7A)) | (x >= 0x80)
    punct = ((x > 0x20) & (x < 0x7F) & ~alnum) | (x == 0xC2) | (x == 0xE2)
    cls = torch.where(punct, PUNCT, torch.where(alnum, ALNUM, BREAK))
    cls = torch.where((x >= 0xE3) & (x <= 0xE9), CJK, cls)
    return torch.where(x == 0x20, SPACE, cls)


def lead_lengths(x: torch.Tensor) -> torch.Tensor:
    """`lead_length` of every element of a byte tensor."""
    return torch.where((x >= 0xC2) & (x <= 0xDF), 2,
           torch.where((x >= 0xE0) & (x <= 0xEF), 3, torch.where((x >= 0xF0) & (x <= 0xF4), 4, 1)))


def _shift(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """x shifted right by k along dim 1 (x[:, t-k] at t), `fill` where t < k."""
    k = min(k, x.size(1))
    return torch.cat([torch.full_like(x[:, :k], fill), x[:, : x.size(1) - k]], dim=1)


class PrefixState:
    """What the split rule needs to know about a prefix x[:, :t+1], for every t at once."""

    def __init__(self, x: torch.Tensor, max_word_bytes: int):
        check_max_word_bytes(max_word_bytes)
        x = x.long()
        B, T = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        cont = (x >= 0x80) & (x <= 0xBF)
        lead = lead_lengths(x)
        lead1, lead2, lead3 = _shift(lead, 1, 1), _shift(lead, 2, 1), _shift(lead, 3, 1)
        cont1, cont2 = _shift(cont, 1, False), _shift(cont, 2, False)
        # byte t continues a character (see `characters`)
        inside = cont & ((lead1 >= 2) | (cont1 & (lead2 >= 3)) | (cont1 & cont2 & (lead3 == 4)))
        char_start = ~inside
        # first byte of the character that contains byte t; its class; is that character still open?
        first = torch.cummax(torch.where(char_start, pos, 0), dim=1).values
        first_byte = x.gather(1, first)
        self.open_char = pos - first + 1 < lead_lengths(first_byte)
        cls = byte_classes(first_byte)
        self.p = cls
        self.pp = _shift(cls, 1, NONE)
        self.p_joiner = (x == ord("'")) | (x == ord("."))
        # natural word starts (the rule without cuts), then offsets from them
        nat = char_start[:, 1:] & self._natural(cls[:, 1:], self.p[:, :-1], self.pp[:, :-1], self.p_joiner[:, :-1])
        nat = torch.cat([torch.ones_like(char_start[:, :1]), nat], dim=1)
        nat_start = torch.cummax(torch.where(nat, pos, 0), dim=1).values
        step = max_word_bytes - 3
        last_char_off = first - nat_start  # offset of the last character start <= t
        # the next character (at offset t+1-nat_start) would start a new piece
        self.cut = (pos + 1 - nat_start) // step > last_char_off // step
        self.starts = char_start & (nat | _shift(self.cut, 1, False))  # nat[:, 0] is True

    @staticmethod
    def _natural(c, p, pp, p_joiner):
        single_space = (p == SPACE) & (pp != SPACE)
        return torch.where(c == SPACE, p != SPACE,
               torch.where(c == BREAK, p != BREAK,
               torch.where(c == ALNUM, ~((p == ALNUM) | single_space | (p_joiner & (pp == ALNUM))),
               torch.where(c == CJK, ~single_space,
                           (p == BREAK) | ((p == SPACE) & (pp == SPACE))))))

    def next_starts(self, nxt: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Would byte nxt[b, t, k] at position t+1 start a new word? nxt: [B, T, K] -> bool [B, T, K].
        With `last`, only for the last position: nxt [B, K] -> [B, K]."""
        p, pp, p_joiner, open_char, cut = self.p, self.pp, self.p_joiner, self.open_char, self.cut
        if last:
            p, pp, p_joiner, open_char, cut = (v[:, -1] for v in (p, pp, p_joiner, open_char, cut))
        nxt = nxt.long()
        cont = (nxt >= 0x80) & (nxt <= 0xBF)
        char_start = ~(cont & open_char[..., None])
        natural = self._natural(byte_classes(nxt), p[..., None], pp[..., None], p_joiner[..., None])
        return char_start & (natural | cut[..., None])


def word_starts(x: torch.Tensor, max_word_bytes: int = 64) -> torch.Tensor:
    """bool [B, T]: byte t starts a word (byte 0 always does). Same rule as `split_words`."""
    return PrefixState(x, max_word_bytes).starts


def next_byte_starts(x: torch.Tensor, max_word_bytes: int = 64) -> torch.Tensor:
    """bool [B, T, 256]: would byte value v at position t+1 start a new word after x[:, :t+1]?"""
    state = PrefixState(x, max_word_bytes)
    values = torch.arange(256, device=x.device).expand(*x.shape, 256)
    return state.next_starts(values)


# ----- strict UTF-8, for sampling -----

def _second_byte_range(lead: int) -> tuple[int, int]:
    """Allowed second byte after a lead byte (no overlongs, no surrogates, nothing past U+10FFFF)."""
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))


def _open_character(tail: bytes) -> bytes:
    """The valid but incomplete character at the end of `tail`, or b"" at a character boundary."""
    for k in (1, 2, 3):
        piece = tail[-k:]
        if len(piece) < k or lead_length(piece[0]) <= k:
            continue
        lo, hi = _second_byte_range(piece[0])
        if k == 1 or (lo <= piece[1] <= hi and all(is_continuation(b) for b in piece[2:])):
            return piece
    return b""


def utf8_allowed_next(tail: bytes) -> list[bool]:
    """For each byte value, whether it keeps `tail` a valid UTF-8 prefix (strict: no overlong
    forms, surrogates or code points past U+10FFFF). A `tail` that ends in an invalid sequence
    counts as a character boundary."""
    open_char = _open_character(tail)
    if not open_char:
        return [b < 0x80 or 0xC2 <= b <= 0xF4 for b in range(256)]
    lo, hi = _second_byte_range(open_char[0]) if len(open_char) == 1 else (0x80, 0xBF)
    return [lo <= b <= hi for b in range(256)]
