"""Corpus -> train.bin / val.bin / test.bin + meta.json (README: Data).

Inputs (--input):
  * a text file: one document, split by fraction at line boundaries;
  * a folder: if it holds train.*, valid.* (or val.*) and test.* files (also <name>.train.*
    etc.), those are the splits;
    otherwise every file in it (sorted by name) is one document and documents are split by
    fraction;
  * a JSONL file (.jsonl, .jsonl.xz, .jsonl.gz): one document per record's --text-field,
    read through `datasets` (the standard library where it is not installed); a folder of them
    works like a folder of text files;
  * a Hugging Face dataset name (needs network access).

Documents are joined by one separator: byte 0x00 in byte corpora (any bytes are kept as they
are, so a 0x00 inside a document reads back as a document boundary), the tokenizer's EOS id in
token corpora (counted as one byte for bits per byte). Sentencepiece tokenizers are trained
on the train split only, with byte-exact settings (identity normalisation, byte fallback, no
dummy prefix, no whitespace collapsing), on lines that keep their newline, so that no piece
reaches past a newline; every document is checked to decode back to its exact bytes.

Examples:
  python data_prep/prepare.py --input corpora/tinyshakespeare.txt --out data/shakespeare
  python data_prep/prepare.py --input enwiki_wv100M --out data/enwiki_bpe --tokenizer bpe --vocab-size 16384

--out is written whole or not at all: into a temporary folder beside it, then swapped in. An existing
--out is replaced only if it is empty or a previous output of this script (its meta.json says so and
it holds nothing but what prepare.py and boundaries.py write); anything else is refused untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find hlm and data_prep

from data_prep.out_folder import WRITTEN_BY, check_out_folder, clean_stale_temps, swap_folder_atomic  # noqa: E402
from hlm import HLMError  # noqa: E402

SPLIT_ALIASES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".json")
MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece skips longer lines in training
MAX_VOCAB = (1 << 31) - 1  # sentencepiece's vocab_size is a 32-bit int


class PrepareError(HLMError):
    pass


def _is_jsonl(path: Path) -> bool:
    return any(path.name.endswith(s) for s in JSONL_SUFFIXES)


def _split_of(path: Path) -> str | None:
    """The split a file names: `train.txt`, `valid.jsonl.xz` or `corpus.test.jsonl.xz` (a dotted part)."""
    parts = path.name.split(".")
    hits = {split for split, aliases in SPLIT_ALIASES.items() if any(p in aliases for p in parts[:-1] or parts)}
    return hits.pop() if len(hits) == 1 else None


def read_documents(path: Path, text_field: str) -> list[bytes]:
    """All documents of one file: a JSONL file gives one per record, any other file one."""
    if not _is_jsonl(path):
        return [path.read_bytes()]
    try:
        try:
            import datasets
        except ImportError:  # e.g. a GPU image without it: read the records with the standard library
            return _read_jsonl(path, text_field)
        return _read_jsonl_datasets(datasets, path, text_field)
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:  # e.g. a damaged .xz, text not UTF-8
        raise PrepareError(f"{path}: cannot read it as JSON lines ({e})") from None


def _read_jsonl_datasets(datasets, path: Path, text_field: str) -> list[bytes]:
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failure reports would add lines to ours
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as e:
        raise PrepareError(f"{path}: not valid JSON lines ({e.__cause__ or e})") from None
    if text_field not in ds.column_names:
        raise PrepareError(f"{path}: records have no field '{text_field}' (fields: {ds.column_names})")
    texts = ds[text_field]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise PrepareError(f"{path}: record {bad} has no text in '{text_field}' ({texts[bad]!r})")
    return [t.encode("utf-8") for t in texts]


def _read_jsonl(path: Path, text_field: str) -> list[bytes]:
    """JSON lines (plain, .xz or .gz) without `datasets`: one document per record's `text_field`."""
    import gzip

    opener = lzma.open if path.name.endswith(".xz") else gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(line for line in f if line.strip()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}: not valid JSON lines (record {i}: {e})") from None
            if not isinstance(record, dict):
                raise PrepareError(f"{path}: record {i} is not a JSON object ({line.strip()[:40]})")
            if text_field not in record:
                raise PrepareError(f"{path}: records have no field '{text_field}' (fields: {list(record)})")
            if not isinstance(record[text_field], str):
                raise PrepareError(f"{path}: record {i} has no text in '{text_field}' ({record[text_field]!r})")
            docs.append(record[text_field].encode("utf-8"))
    return docs


def split_by_fraction(docs: list[bytes], val_frac: float, test_frac: float) -> dict[str, list[bytes]]:
    """One document: cut train | val | test at line boundaries. Several: cut the document list."""
    if len(docs) == 1:
        data = docs[0]
        cuts = []
        for frac in (1 - val_frac - test_frac, 1 - test_frac):
            pos = int(len(data) * frac)
            nl = data.find(b"\n", pos)
            if 0 <= nl < len(data) - 1:
                pos = nl + 1
            while pos < len(data) and data[pos] & 0xC0 == 0x80:  # never cut inside a UTF-8 character
                pos += 1
            cuts.append(pos)
        a, b = cuts
        return {"train": [data[:a]], "val": [data[a:b]], "test": [data[b:]]}
    n = len(docs)
    n_val, n_test = max(1, round(n * val_frac)), max(1, round(n * test_frac))
    if n - n_val - n_test < 1:
        raise PrepareError(f"only {n} documents: too few to split into train/val/test")
    return {"train": docs[: n - n_val - n_test], "val": docs[n - n_val - n_test : n - n_test],
            "test": docs[n - n_test :]}


def load_splits(inp: str, text_field: str, val_frac: float, test_frac: float) -> tuple[dict, list[Path]]:
    """Documents per split, and the source files read."""
    path = Path(inp)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise PrepareError(f"input folder {path} has no files")
        named = {}
        for split in SPLIT_ALIASES:
            hits = [f for f in files if _split_of(f) == split]
            if len(hits) == 1:
                named[split] = hits[0]
        if len(named) == 3:
            return {s: read_documents(f, text_field) for s, f in named.items()}, list(named.values())
        docs = [d for f in tqdm(files, desc="reading", unit="file") for d in read_documents(f, text_field)]
        return split_by_fraction(docs, val_frac, test_frac), files
    if path.is_file():
        return split_by_fraction(read_documents(path, text_field), val_frac, test_frac), [path]
    if "/" in inp and not inp.startswith((".", "/")) and not path.parent.exists():  # owner/name
        try:
            import datasets
        except ImportError:
            raise PrepareError(f"input {inp} looks like a Hugging Face dataset: pip install datasets") from None
        ds = datasets.load_dataset(inp, split="train")
        if text_field not in ds.column_names:
            raise PrepareError(f"dataset {inp} has no field '{text_field}' (fields: {', '.join(ds.column_names)})")
        docs = [t.encode("utf-8") for t in ds[text_field]]
        return split_by_fraction(docs, val_frac, test_frac), []
    raise PrepareError(f"input not found: {inp}")


def sha256_of(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def decode_utf8(doc: bytes, where: str) -> str:
    try:
        return doc.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: invalid UTF-8 at byte {e.start}; a text tokenizer needs text "
                           "(prepare without --tokenizer to model raw bytes)") from None


def train_sentencepiece(docs: list[str], kind: str, vocab_size: int, out_file: Path, threads: int) -> None:
    import sentencepiece as spm

    def lines():
        for doc in docs:
            yield from doc.splitlines(keepends=True)

    if not any(len(line.encode()) <= MAX_SENTENCE_BYTES for line in lines()):
        raise PrepareError(f"every line of the train split is longer than {MAX_SENTENCE_BYTES:,} bytes and "
                           "sentencepiece trains on lines: break the text into lines or prepare bytes (no --tokenizer)")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=proto, model_type=kind, vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_by_whitespace=True, allow_whitespace_only_pieces=True,
            split_digits=False, character_coverage=1.0, max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=4_000_000, shuffle_input_sentence=True, max_sentencepiece_length=16,
            num_threads=threads, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False)
    except (RuntimeError, ValueError) as e:
        raise PrepareError(sentencepiece_message(str(e), vocab_size)) from None
    out_file.write_bytes(proto.getvalue())


def sentencepiece_message(error: str, vocab_size: int) -> str:
    """sentencepiece's training error as one line in our terms, without its source location."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", error)
    if too_small:
        return (f"--vocab-size {vocab_size:,} is too small for this corpus: the tokenizer needs at least "
                f"{int(too_small[1]):,} pieces (every character of the train split, 256 bytes, 3 special)")
    return "sentencepiece training failed: " + re.sub(r"^(\w+): \S+\(\d+\) ", r"\1: ", " ".join(error.split()))


def encode_documents(tok, docs: list[str], sep: int, threads: int, name: str) -> np.ndarray:
    """Encode line by line (what the tokenizer was trained on) and check each document round-trips."""
    out, failures = [], 0
    for i, doc in enumerate(tqdm(docs, desc=f"encoding {name}", unit="doc", disable=len(docs) < 2)):
        lines = doc.splitlines(keepends=True)
        ids = [t for line_ids in tok.encode_batch(lines, threads) for t in line_ids]
        if tok.decode(ids) != doc.encode("utf-8"):
            failures += 1
        if i:
            out.append(np.array([sep], dtype=np.int64))
        out.append(np.array(ids, dtype=np.int64))
    if failures:
        raise PrepareError(f"tokenizer does not round-trip: {failures} of {len(docs)} {name} documents "
                           "decode to different bytes")
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def check_values(args: argparse.Namespace) -> None:
    for flag, frac in (("--val-fraction", args.val_fraction), ("--test-fraction", args.test_fraction)):
        if not 0 < frac <= 0.5:
            raise PrepareError(f"{flag} must be in (0, 0.5], got {frac}")
    if args.val_fraction + args.test_fraction >= 1:
        raise PrepareError("--val-fraction and --test-fraction leave nothing to train on")
    if args.threads < 1:
        raise PrepareError(f"--threads must be at least 1, got {args.threads}")
    if args.tokenizer_model and not args.tokenizer:
        raise PrepareError("--tokenizer-model needs --tokenizer (bpe or unigram, the model's type)")
    if args.tokenizer and not args.tokenizer_model and not 1 <= args.vocab_size <= MAX_VOCAB:
        raise PrepareError(f"--vocab-size must be between 1 and {MAX_VOCAB:,} (sentencepiece's limit), "
                           f"got {args.vocab_size:,}")


def prepare(args: argparse.Namespace) -> dict:
    """Check the arguments and --out, read and split the input, tokenize, and swap the new folder in."""
    check_values(args)
    out_dir = Path(args.out).expanduser().resolve()
    inputs = [Path(args.input).expanduser().resolve()] if Path(args.input).expanduser().exists() else []
    clean_stale_temps(out_dir)
    check_out_folder(out_dir, inputs)
    splits, files = load_splits(args.input, args.text_field, args.val_fraction, args.test_fraction)
    for name, docs in splits.items():
        if not any(docs):
            raise PrepareError(f"split '{name}' is empty: the input is too short")
    meta = {"written_by": WRITTEN_BY,
            "source": {"input": str(args.input), "sha256": sha256_of(files) if files else None}, "splits": {}}
    out: dict[str, bytes | np.ndarray] = {}
    if args.tokenizer is None:
        meta.update(kind="bytes", dtype="uint8", vocab_size=256, tokenizer=None, separator_id=0,
                    doc_separator="byte 0x00 between documents")
        for name, docs in splits.items():
            data = b"\x00".join(docs)
            out[f"{name}.bin"] = np.frombuffer(data, dtype=np.uint8)
            meta["splits"][name] = {"documents": len(docs), "tokens": len(data), "bytes": len(data)}
    else:
        texts = {name: [decode_utf8(d, f"{name} document {i}") for i, d in enumerate(docs)]
                 for name, docs in splits.items()}
        with tempfile.TemporaryDirectory() as tmpdir:
            model_file = Path(args.tokenizer_model or Path(tmpdir) / "tokenizer.model")
            if not args.tokenizer_model:
                print(f"training sentencepiece {args.tokenizer} tokenizer, vocab {args.vocab_size}")
                train_sentencepiece(texts["train"], args.tokenizer, args.vocab_size, model_file, args.threads)
            from hlm.tokenizers import SentencePieceTokenizer  # (imported late: not before a quick failure)

            tok = SentencePieceTokenizer(model_file)
            if tok.model_type != args.tokenizer:
                raise PrepareError(f"--tokenizer-model {model_file} is a {tok.model_type} model, not {args.tokenizer}")
            if not args.tokenizer_model and tok.vocab_size < args.vocab_size:
                print(f"warning: --vocab-size {args.vocab_size:,} is more than the train split supports: "
                      f"the tokenizer has {tok.vocab_size:,} pieces", file=sys.stderr)
            out["tokenizer.model"] = model_file.read_bytes()
        dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
        meta.update(kind="tokens", dtype=dtype, vocab_size=tok.vocab_size, tokenizer="tokenizer.model",
                    tokenizer_type=args.tokenizer, separator_id=tok.eos_id,
                    doc_separator="EOS token between documents (counts as one byte)")
        for name, docs in texts.items():
            ids = encode_documents(tok, docs, tok.eos_id, args.threads, name)
            out[f"{name}.bin"] = ids.astype(dtype)
            nbytes = sum(len(d) for d in splits[name]) + len(docs) - 1
            meta["splits"][name] = {"documents": len(docs), "tokens": int(len(ids)), "bytes": nbytes}
    out["meta.json"] = json.dumps(meta, indent=2).encode()
    check_out_folder(out_dir, inputs)  # again: the folder may have changed while the input was read
    swap_folder_atomic(out_dir, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="text file, folder, JSONL file or HF dataset name")
    p.add_argument("--out", required=True, help="output folder (replaced only if empty or a previous output)")
    p.add_argument("--tokenizer", choices=["bpe", "unigram"], default=None, help="omit for raw bytes")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--tokenizer-model", help="reuse this sentencepiece .model instead of training one "
                   "(give --tokenizer too, naming its type)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="in (0, 0.5]")
    p.add_argument("--test-fraction", type=float, default=0.05, help="in (0, 0.5]")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        meta = prepare(args)
    except (ValueError, OSError, EOFError, lzma.LZMAError) as e:  # HLMError is a ValueError; JSON, UTF-8 too
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{k} {v['tokens']:,} tokens / {v['bytes']:,} bytes" for k, v in meta["splits"].items())
    print(f"wrote {args.out}: {meta['kind']}, vocab {meta['vocab_size']}; {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
