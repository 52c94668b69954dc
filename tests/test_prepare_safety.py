"""Bad inputs to data_prep/prepare.py and damaged data folders opened by train.py, through the real
CLIs: each ends in one `error:` line naming the problem and changes nothing on disk. Also what
prepare replaces (its own outputs, empty folders) and which leftovers of a killed run it removes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import ROOT, SHAKESPEARE, SMOKE_BYTE, cli_env, prepare, read_meta

from data_prep.out_folder import HOST, WRITTEN_BY
from hlm.data import DataError, Split
from hlm.data import read_meta as open_meta  # checked; conftest.read_meta only parses

TEXT = SHAKESPEARE.read_bytes()[:6000]


def run(script: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, timeout=300)


def snapshot(root: Path) -> dict[str, str]:
    """Every file (by sha256) and folder under root, hidden ones included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def assert_one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_bytes(TEXT)
    out = src.parent / "data"
    assert prepare("--input", src, "--out", out) == 0
    return out


@pytest.fixture
def root(tmp_path, good_corpus) -> Path:
    """A corpus file, a prepared data folder and an unrelated file: all must survive every bad input."""
    (tmp_path / "corpus.txt").write_bytes(TEXT)
    (tmp_path / "readme.txt").write_text("not a corpus folder\n")
    shutil.copytree(good_corpus, tmp_path / "data")
    return tmp_path


def args(root: Path, *extra: str, inp: str = "corpus.txt", out: str = "new") -> list:
    return ["--input", root / inp, "--out", root / out, *extra]


def make_folder(path: Path, files: dict[str, bytes | str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def edit_meta(root: Path, change) -> None:
    meta = read_meta(root / "data")
    (root / "data" / "meta.json").write_text(json.dumps(change(meta)))


def without(meta: dict, key: str) -> dict:
    del meta[key]
    return meta


def resize(path: Path, delta: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + b"x" * delta)


class Case(NamedTuple):
    argv: Callable[[Path], list]  # prepare.py's arguments, given the case's root folder
    needle: str  # a word of the error line that names the problem
    make: dict[str, str | bytes | None] = {}  # files to create under root first (None: a folder)
    cwd: str | None = None  # run in this folder under root (default: the repository)


PREPARE_CASES = {
    "out-unrelated-folder": Case(lambda r: args(r, out="notes"), "no meta.json", {"notes/notes.txt": "mine"}),
    "out-foreign-meta-json": Case(lambda r: args(r, out="other"), "does not say so", {"other/meta.json": '{"a": 1}'}),
    "out-meta-json-a-list": Case(lambda r: args(r, out="other"), "does not say so", {"other/meta.json": "[1]"}),
    "out-output-plus-user-file": Case(lambda r: args(r, out="data"), "notes.md", {"data/notes.md": "x"}),
    "out-output-plus-subfolder": Case(lambda r: args(r, out="data"), "runs", {"data/runs": None}),
    "input-is-out": Case(lambda r: args(r, out="corpus.txt"), "overlap"),
    "input-folder-is-out": Case(lambda r: args(r, inp="docs", out="docs"), "overlap", {"docs/a.txt": "a"}),
    "out-inside-input": Case(lambda r: args(r, inp="docs", out="docs/bytes"), "overlap", {"docs/a.txt": "a"}),
    "input-inside-out": Case(lambda r: args(r, inp="data/train.bin", out="data"), "overlap"),
    "out-dot": Case(lambda r: ["--input", r / "corpus.txt", "--out", "."], "current folder", {"work": None}, "work"),
    "out-holds-cwd": Case(lambda r: args(r, out="work"), "current folder", {"work/sub": None}, "work/sub"),
    "out-is-a-file": Case(lambda r: args(r, out="readme.txt"), "is a file"),
    "out-under-a-file": Case(lambda r: args(r, out="readme.txt/c"), "is a file"),
    "val-fraction-zero": Case(lambda r: args(r, "--val-fraction", "0"), "--val-fraction"),
    "val-fraction-above-half": Case(lambda r: args(r, "--val-fraction", "0.6"), "--val-fraction"),
    "test-fraction-nan": Case(lambda r: args(r, "--test-fraction", "nan"), "--test-fraction"),
    "threads-zero": Case(lambda r: args(r, "--threads", "0"), "--threads"),
    "vocab-absurd": Case(lambda r: args(r, "--tokenizer", "bpe", "--vocab-size", "99999999999"), "--vocab-size"),
    "vocab-negative": Case(lambda r: args(r, "--tokenizer", "bpe", "--vocab-size", "-5"), "--vocab-size"),
    "vocab-too-small": Case(lambda r: args(r, "--tokenizer", "bpe", "--vocab-size", "50", "--threads", "1"), "vocab"),
    "bpe-one-huge-line": Case(lambda r: args(r, "--tokenizer", "bpe", "--vocab-size", "300", inp="line.txt"), "lines",
                              {"line.txt": b"word " * 22000}),
    "input-missing": Case(lambda r: args(r, inp="nowhere.txt"), "not found"),
    "jsonl-damaged-xz": Case(lambda r: args(r, inp="c.jsonl.xz"), "c.jsonl.xz", {"c.jsonl.xz": b"not xz"}),
}

# a damaged copy of a good corpus in root/data, opened by train.py
TRAIN_CASES = {
    "truncated-train-bin": (lambda r: resize(r / "data" / "train.bin", -100), "truncated"),
    "val-bin-longer-than-meta": (lambda r: resize(r / "data" / "val.bin", 7), "val.bin"),
    "meta-json-a-list": (lambda r: (r / "data" / "meta.json").write_text("[1, 2]"), "list"),
    "meta-json-missing-dtype": (lambda r: edit_meta(r, lambda m: without(m, "dtype")), "'dtype'"),
}


@pytest.mark.parametrize("case", PREPARE_CASES, ids=list(PREPARE_CASES))
def test_prepare_refuses_and_touches_nothing(root, case):
    argv, needle, make, cwd = PREPARE_CASES[case]
    for name, content in make.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
    before = snapshot(root)
    assert_one_line(run("data_prep/prepare.py", *argv(root), cwd=root / cwd if cwd else ROOT), needle)
    assert snapshot(root) == before


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_train_refuses_a_damaged_data_folder(root, case):
    damage, needle = TRAIN_CASES[case]
    damage(root)
    before = snapshot(root)
    proc = run("train.py", SMOKE_BYTE, f"data.path={root / 'data'}", f"train.out_dir={root / 'run'}",
               "log.tensorboard=false")
    assert_one_line(proc, needle)
    assert snapshot(root) == before


@pytest.mark.parametrize(("change", "needle"), [
    (lambda m: without(m, "splits"), "'splits'"),
    (lambda m: {**m, "dtype": "float32"}, "'dtype'"),
    (lambda m: {**m, "kind": "words"}, "'kind'"),
    (lambda m: {**m, "vocab_size": 70000}, "'vocab_size'"),
    (lambda m: {**m, "separator_id": 256}, "'separator_id'"),
    (lambda m: {**m, "splits": {**m["splits"], "train": {"tokens": "many"}}}, "splits.train.tokens"),
    (lambda m: {**m, "splits": [1]}, "'splits'"),
    (lambda m: {**m, "kind": "tokens"}, "'tokenizer'"),
], ids=["no-splits", "dtype", "kind", "vocab-over-dtype", "separator", "split-tokens", "splits-list", "no-tokenizer"])
def test_meta_json_checked_key_by_key(root, change, needle):
    edit_meta(root, change)
    with pytest.raises(DataError, match="meta.json") as e:
        open_meta(root / "data")
    assert needle in str(e.value)


def test_meta_json_not_utf8(root):
    (root / "data" / "meta.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="not valid JSON"):
        open_meta(root / "data")


def test_every_split_checked_when_opened(root):
    n = read_meta(root / "data")["splits"]["test"]["tokens"]
    resize(root / "data" / "test.bin", -1)
    Split(root / "data", "train")  # the others are intact
    with pytest.raises(DataError, match=rf"test\.bin is truncated: {n - 1} bytes, expected {n} "):
        Split(root / "data", "test")


# ----- what prepare replaces, and leftovers -----

def test_rerun_replaces_own_output(root):
    before = read_meta(root / "data")
    (root / "other.txt").write_bytes(TEXT[:3000] + b"\nanother corpus\n" * 50)
    proc = run("data_prep/prepare.py", *args(root, inp="other.txt", out="data"))
    assert proc.returncode == 0, proc.stderr.decode()
    after = read_meta(root / "data")
    assert after["written_by"] == WRITTEN_BY
    assert after["source"]["sha256"] == hashlib.sha256((root / "other.txt").read_bytes()).hexdigest()
    assert after["source"]["sha256"] != before["source"]["sha256"]
    assert sorted(p.name for p in root.iterdir()) == ["corpus.txt", "data", "other.txt", "readme.txt"]


def test_rerun_replaces_own_output_with_its_side_files(root):
    """Boundary targets and BLT entropies written beside the splits belong to the old corpus: replaced too."""
    for name in ("train.entropy.bin", "val.boundaries.unigram.bin", "patches.entropy.json"):
        (root / "data" / name).write_bytes(b"old")
    proc = run("data_prep/prepare.py", *args(root, out="data"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert not any((root / "data" / n).exists() for n in ("train.entropy.bin", "patches.entropy.json"))


def test_empty_folder_is_used(root):
    (root / "empty").mkdir()
    proc = run("data_prep/prepare.py", *args(root, out="empty"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_meta(root / "empty")["splits"]["train"]["bytes"] > 0


def test_vocab_above_what_the_corpus_supports_warns(root, capsys):
    assert prepare(*args(root, "--tokenizer", "bpe", "--vocab-size", "5000", "--threads", "1")) == 0
    lines = capsys.readouterr().err.splitlines()
    vocab = read_meta(root / "new")["vocab_size"]
    assert vocab < 5000
    assert lines == [f"warning: --vocab-size 5,000 is more than the train split supports: the tokenizer has "
                     f"{vocab:,} pieces"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_runs_removed(root):
    """Only prepare's own temporary folders of --out, of this host, whose process is gone, are removed."""
    dead, live = dead_pid(), os.getpid()
    output = {"meta.json": "{}", "train.bin": b"\x00" * 10}
    stale = make_folder(root / f".new.tmp.{HOST}.{dead}.abc_12", output)
    kept = [
        make_folder(root / f".new.tmp.{HOST}.{live}.xyz", output),  # a live process's
        make_folder(root / f".new.tmp.otherhost.{dead}.xyz", output),  # another machine's
        make_folder(root / f".new.tmp.{HOST}.{dead}.mine", {"notes.txt": "x"}),  # holds a file prepare never writes
        make_folder(root / f".data.tmp.{HOST}.{dead}.xyz", output),  # another --out's
        make_folder(root / ".new.backup", output),  # not a name prepare gives
    ]
    before = {p.name: snapshot(p) for p in kept}
    proc = run("data_prep/prepare.py", *args(root))
    assert proc.returncode == 0, proc.stderr.decode()
    assert not stale.exists()
    assert {p.name: snapshot(p) for p in kept} == before
    assert read_meta(root / "new")["written_by"] == WRITTEN_BY


def test_output_moved_aside_by_a_killed_swap_is_restored(root):
    """A kill between moving the old output aside and renaming the new one in leaves no --out: the next run
    puts the old one back first, so a run that then fails has lost nothing."""
    original = snapshot(root / "data")
    (root / "data").rename(root / f".data.old.{HOST}.{dead_pid()}")
    (root / "empty.txt").write_bytes(b"")
    proc = run("data_prep/prepare.py", *args(root, inp="empty.txt", out="data"))
    assert proc.returncode == 1
    assert snapshot(root / "data") == original
    assert sorted(p.name for p in root.iterdir()) == ["corpus.txt", "data", "empty.txt", "readme.txt"]


def test_failed_swap_puts_the_original_back(root, monkeypatch):
    """If renaming the new folder into place fails, the original is moved back and no temporary is left."""
    before = snapshot(root)
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".data.tmp."):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    assert prepare(*args(root, out="data")) == 1
    assert snapshot(root) == before


@pytest.mark.parametrize(("out", "needle"), [("data", "is read-only"), ("sub/new", "cannot write in")])
def test_read_only_out_checked_before_touching(root, monkeypatch, capsys, out, needle):
    """Root may write anywhere, so the permission answer is faked: the check itself is what is tested."""
    (root / "sub").mkdir()
    denied = {root / "data", root / "sub"}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) not in denied and real_access(p, mode))
    before = snapshot(root)
    assert prepare(*args(root, out=out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert snapshot(root) == before


def test_disk_full_while_writing_leaves_nothing(root, monkeypatch):
    """A write that fails halfway (disk full) removes the temporary folder and the parents made for --out."""
    import data_prep.out_folder as out_folder

    before = snapshot(root)

    def disk_full(path, content):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(out_folder, "_write_synced", disk_full)
    assert prepare(*args(root, out="a/b/c")) == 1
    assert prepare(*args(root, out="data")) == 1
    assert snapshot(root) == before


@pytest.mark.parametrize(("extra", "damage", "needle"), [
    (["--threads", "0"], None, "--threads"),
    (["--vocab-size", "-1"], None, "--vocab-size"),
    ([], lambda r: resize(r / "data" / "train.bin", -5), "truncated"),
], ids=["threads", "vocab", "truncated-train"])
def test_boundaries_refuses_and_touches_nothing(root, capsys, extra, damage, needle):
    from data_prep import boundaries

    if damage:
        damage(root)
    before = snapshot(root)
    assert boundaries.main(["unigram", "--data", str(root / "data"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert snapshot(root) == before


KILL_DURING = {  # python run with prepare's main, SIGKILLed at one moment of the write
    "write": "import data_prep.out_folder as o\n"
             "def write(path, content):\n    path.write_bytes(b'partial'); os.kill(os.getpid(), signal.SIGKILL)\n"
             "o._write_synced = write\n",
    "swap": "from pathlib import Path\nrename = Path.rename\n"
            "def kill_on_swap(self, target):\n"
            "    if '.tmp.' in self.name: os.kill(os.getpid(), signal.SIGKILL)\n    return rename(self, target)\n"
            "Path.rename = kill_on_swap\n",
}


@pytest.mark.parametrize("moment", KILL_DURING)
def test_killed_prepare_is_cleaned_up_by_the_next_run(root, moment):
    """kill -9 while writing leaves a temporary folder, and between moving the old output aside and moving
    the new one in leaves no --out: the next run removes the one and restores the other before replacing it."""
    original = snapshot(root / "data")
    code = ("import os, signal, sys\n" + KILL_DURING[moment] + "from data_prep.prepare import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    argv = [str(a) for a in args(root, out="data")]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=cli_env(), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".data."))
    assert [name.split(".")[2] for name in leftovers] == (["tmp"] if moment == "write" else ["old", "tmp"])
    if moment == "write":
        assert snapshot(root / "data") == original
    else:
        assert not (root / "data").exists()
        assert snapshot(root / leftovers[0]) == original
    proc = run("data_prep/prepare.py", *argv)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(p.name for p in root.iterdir()) == ["corpus.txt", "data", "readme.txt"]
    assert read_meta(root / "data")["written_by"] == WRITTEN_BY
