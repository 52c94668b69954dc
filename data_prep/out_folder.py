"""The output folder of data_prep/prepare.py: which existing folder it may replace, how the new one is
swapped in whole, and which leftovers of a killed run it removes.

prepare replaces an --out only if it is empty or a previous prepare output: its meta.json carries
WRITTEN_BY (or, from before the marker, every key prepare has always written) and it holds nothing
but files prepare.py and boundaries.py write. The new folder is written beside it under a name that
says which host and process wrote it, then renamed into place; a killed run's folders are removed by
the next run for the same --out once their process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np

from hlm import HLMError, pid_alive

WRITTEN_BY = "hlm data_prep/prepare.py"  # meta.json marker: a folder prepare may replace
LEGACY_META_KEYS = {"source", "splits", "kind", "dtype", "vocab_size", "tokenizer", "separator_id"}
# what prepare.py, boundaries.py and entropy_patches.py write into a corpus folder (splits and the per-byte
# side files beside them, boundary and patch records), and write_atomic's hidden temporaries of them
OUTPUT_FILE = re.compile(r"\.?(meta\.json|tokenizer\.model|(train|val|test)(\.[\w.-]+)?\.bin"
                         r"|boundaries\.[\w.-]+\.(json|model)|patches\.[\w.-]+\.json)(\.tmp\d+)?")
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


class OutFolderError(HLMError):
    """An --out that prepare may not replace or cannot write."""


def check_out_folder(out: Path, inputs: list[Path]) -> None:
    """Refuse, before anything is read or written, an --out that prepare may not replace or cannot write.
    `out` and `inputs` are resolved paths."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutFolderError(f"--out {out} is the current folder or holds it: choose a folder for the corpus")
    for inp in inputs:
        if inp == out or out in inp.parents or inp in out.parents:
            raise OutFolderError(f"--input {inp} and --out {out} overlap: replacing the output would destroy the "
                                 "input; choose an --out outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutFolderError(f"--out {out} is a file, not a folder: choose another --out")
        entries = sorted(out.iterdir())
        if entries:
            if not is_prepare_output(out):
                why = "its meta.json does not say so" if (out / "meta.json").exists() else "it has no meta.json"
                raise OutFolderError(f"--out {out} is not a folder written by data_prep/prepare.py ({why}): "
                                     "prepare replaces only its own outputs; choose another --out")
            foreign = [p.name for p in entries if not (OUTPUT_FILE.fullmatch(p.name) and p.is_file())]
            if foreign:
                raise OutFolderError(f"--out {out} holds files prepare did not write ({', '.join(foreign[:3])}"
                                     f"{', ...' if len(foreign) > 3 else ''}): move them away or choose another --out")
            if not os.access(out, os.W_OK | os.X_OK):
                raise OutFolderError(f"--out {out} is read-only: prepare cannot replace it")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutFolderError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutFolderError(f"--out {out}: cannot write in {parent} (read-only)")


def is_prepare_output(folder: Path) -> bool:
    """Whether `folder`'s meta.json was written by prepare: it carries the marker, or (outputs from before
    the marker) every key prepare has always written."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("written_by") == WRITTEN_BY or LEGACY_META_KEYS <= meta.keys())


def _temp_name(folder: Path, kind: str) -> str:
    """`.NAME.tmp.HOST.PID.` (a prefix for mkdtemp) or `.NAME.old.HOST.PID`: the names prepare gives the
    folders it writes beside `folder`, so that a later run can tell whose they are."""
    return f".{folder.name}.{kind}.{HOST}.{os.getpid()}" + ("." if kind == "tmp" else "")


def clean_stale_temps(folder: Path) -> None:
    """Remove the temporary folders that a killed prepare left beside `folder`: only folders named by
    `_temp_name` for this host, whose process is gone, holding nothing but prepare's files. A killed swap
    can leave the previous output moved aside with no `folder`: that one is moved back."""
    if not folder.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)\.{re.escape(HOST)}\.(\d+)(\.\w+)?")
    for entry in sorted(folder.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or (m[1] == "old") == bool(m[3]) or pid_alive(int(m[2])) or entry.is_symlink() or not entry.is_dir():
            continue
        if not all(OUTPUT_FILE.fullmatch(p.name) and p.is_file() for p in entry.iterdir()):
            continue
        if m[1] == "old" and not folder.exists():
            entry.rename(folder)
            print(f"restored {folder} from an interrupted run", file=sys.stderr)
        else:
            shutil.rmtree(entry)


def _write_synced(path: Path, content: bytes | np.ndarray) -> None:
    with open(path, "wb") as f:
        if isinstance(content, np.ndarray):
            content.tofile(f)
        else:
            f.write(content)
        f.flush()
        os.fsync(f.fileno())


def swap_folder_atomic(folder: Path, files: dict[str, bytes | np.ndarray]) -> None:
    """Write all files into a temporary folder beside `folder`, then swap it in. On any failure the
    temporary folder and the parents this made are removed and `folder` is as it was."""
    made = [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]  # deepest first
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(folder, "tmp"), dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name, content in files.items():
            _write_synced(tmp / name, content)
        if folder.exists() and any(folder.iterdir()):
            old = folder.with_name(_temp_name(folder, "old"))
            folder.rename(old)
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the swap is done; a leftover goes on the next run
        else:
            tmp.rename(folder)  # over an empty folder too (POSIX rename)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
