"""The causal word splitter: reference properties, and vectorised == reference."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlm import HLMError
from hlm.splitter import (
    byte_class,
    byte_classes,
    lead_length,
    lead_lengths,
    next_byte_starts,
    split_words,
    utf8_allowed_next,
    word_starts,
)

# arbitrary bytes, UTF-8 text (all scripts), and mixtures of both with spaces and newlines
chunks = st.one_of(st.binary(max_size=12), st.text(max_size=12).map(str.encode),
                   st.sampled_from([b" ", b"  ", b"\n", b"\n\n", b"'", b".", b"\x00", "日本".encode()]))
byte_strings = st.lists(chunks, max_size=8).map(b"".join)
max_bytes = st.integers(min_value=4, max_value=12)
SETTINGS = settings(max_examples=150, deadline=None)


def start_flags(words: list[bytes]) -> list[bool]:
    return [i == 0 for w in words for i in range(len(w))]


def valid_characters(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every multi-byte character that a strict UTF-8 decoder accepts."""
    out, i = [], 0
    while i < len(data):
        for n in (2, 3, 4):
            try:
                if len(data[i : i + n].decode("utf-8")) == 1:
                    out.append((i, i + n))
                    i += n - 1
                    break
            except UnicodeDecodeError:
                pass
        i += 1
    return out


@pytest.mark.parametrize("text, words", [
    (b"Hello, world!", [b"Hello,", b" world!"]),
    (b"a  b\n\nc", [b"a", b"  ", b"b", b"\n\n", b"c"]),
    (b"don't (stop) 3.14", [b"don't", b" (", b"stop)", b" 3.14"]),
    ("日本語 text".encode(), ["日".encode(), "本".encode(), "語".encode(), b" text"]),
    ("naïve café".encode(), ["naïve".encode(), " café".encode()]),
    (b"\xff\x80abc", [b"\xff\x80abc"]),
    (b"\tx\x00Title", [b"\t", b"x", b"\x00", b"Title"]),
])
def test_documented_examples(text, words):
    assert split_words(text) == words


def test_tensor_tables_match_reference():
    values = torch.arange(256)
    assert byte_classes(values).tolist() == [byte_class(b) for b in range(256)]
    assert lead_lengths(values).tolist() == [lead_length(b) for b in range(256)]


def test_long_words_are_cut_at_character_starts():
    assert split_words(b"abcdefgh", 5) == [b"ab", b"cd", b"ef", b"gh"]
    # 2-byte characters: a piece starts at the first character at or past each multiple of 2 bytes
    assert split_words("ééé".encode(), 5) == ["é".encode()] * 3
    with pytest.raises(HLMError, match="max_word_bytes"):
        split_words(b"abc", 3)


@SETTINGS
@given(byte_strings, max_bytes)
def test_words_concatenate_fit_and_never_split_a_character(data, m):
    words = split_words(data, m)
    assert b"".join(words) == data
    assert all(0 < len(w) <= m for w in words)
    starts = start_flags(words)
    for a, b in valid_characters(data):
        assert not any(starts[a + 1 : b]), (data, words)


@SETTINGS
@given(byte_strings, max_bytes)
def test_decision_is_causal(data, m):
    full = start_flags(split_words(data, m))
    for end in range(1, len(data)):
        assert start_flags(split_words(data[:end], m)) == full[:end]


@SETTINGS
@given(st.lists(byte_strings, min_size=1, max_size=3), max_bytes)
def test_vectorised_equals_reference(rows, m):
    width = max(len(r) for r in rows) or 1
    rows = [r.ljust(width, b"x") for r in rows]
    x = torch.tensor([list(r) for r in rows], dtype=torch.long).view(len(rows), width)
    starts = word_starts(x, m)
    for r, row in enumerate(rows):
        assert starts[r].tolist() == start_flags(split_words(row, m))[:width] + [True] * (width - len(row))
    # the next-byte table agrees with splitting the extended strings
    nxt = next_byte_starts(x, m)
    for r, row in enumerate(rows):
        for t in range(len(row)):
            for v in (0x20, 0x0A, ord("a"), ord("."), 0x80, 0xA9, 0xC3, 0xE6, 0xFF):
                assert bool(nxt[r, t, v]) == start_flags(split_words(row[: t + 1] + bytes([v]), m))[t + 1]


@SETTINGS
@given(st.text(max_size=10).map(str.encode), st.lists(st.integers(0, 255), max_size=20))
def test_utf8_mask_keeps_output_decodable(prompt, choices):
    """Bytes chosen only where utf8_allowed_next allows them never reach a dead end, and closing
    the last character with allowed bytes gives text that a strict decoder accepts."""
    boundary = utf8_allowed_next(b"")
    out = prompt
    for c in choices:
        allowed = [b for b, ok in enumerate(utf8_allowed_next(out)) if ok]
        assert len(allowed) >= 16  # F4 allows only 80-8F next
        out += bytes([allowed[c % len(allowed)]])
    while utf8_allowed_next(out) != boundary:
        out += bytes([utf8_allowed_next(out).index(True)])
    out.decode("utf-8")


def test_utf8_mask_is_strict():
    assert utf8_allowed_next(b"\xed") == [0x80 <= b <= 0x9F for b in range(256)]  # no surrogates
    assert utf8_allowed_next(b"\xe0") == [0xA0 <= b <= 0xBF for b in range(256)]  # no overlongs
    assert utf8_allowed_next(b"\xf4\x8f") == [0x80 <= b <= 0xBF for b in range(256)]
    assert utf8_allowed_next(b"ok\xff")[0x80] is False  # after an invalid byte: a character boundary
