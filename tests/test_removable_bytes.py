"""Exact byte-level conversion is removable as a unit: in a copy of the repository without hlm/bytes/,
every other hlm module imports, the CLIs train, evaluate and sample byte and BPE models, and they
refuse the exact-bytes flags with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import ROOT, assert_one_line_error

# Runs inside the copy (one interpreter for every CLI call, to keep the test fast); prints a JSON report.
CHECK = r"""
import contextlib, io, json, sys
from pathlib import Path
import hlm
from hlm import has_exact_bytes

def cli(name, *args):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        rc = module.main([str(a) for a in args])
        stdout.flush()
    return {"rc": rc, "out": out.getvalue().decode("utf-8", "replace"), "err": err.getvalue()}

byte_data, bpe_data, runs = sys.argv[1:4]
steps = ["train.max_steps=2", "train.ckpt_interval=2", "eval.interval=2", "log.tensorboard=false"]
report = {"hlm": hlm.__file__, "has_exact_bytes": has_exact_bytes(), "unimportable": []}
import importlib, pkgutil
for info in pkgutil.walk_packages(hlm.__path__, "hlm."):
    try:
        importlib.import_module(info.name)
    except ImportError as e:
        report["unimportable"].append(f"{info.name}: {e}")
for name, config, data in (("byte", "configs/smoke/byte_gpt.yaml", byte_data),
                           ("bpe", "configs/smoke/bpe_gpt.yaml", bpe_data)):
    ckpt = f"{runs}/{name}/ckpt.pt"
    report[name] = {
        "train": cli("train", config, f"data.path={data}", f"train.out_dir={runs}/{name}", *steps),
        "eval": cli("eval", ckpt, "--data", data, "--split", "val", "--max-bytes", "1500",
                    "--json", f"{runs}/{name}.json"),
        "sample": cli("sample", ckpt, "--prompt", "The ", "--max-bytes", "24", "--seed", "1"),
        "exact_flag": cli("eval", ckpt, "--data", data, "--split", "val", "--exact-bytes"),
        "byte_level": cli("sample", ckpt, "--prompt", "The ", "--byte-level"),
    }
report["modules"] = sorted(m for m in sys.modules if m == "hlm.bytes" or m.startswith("hlm.bytes."))
print(json.dumps(report))
"""


def copy_without_bytes(dest):
    """The CLIs, hlm/ without hlm/bytes/, and configs/: everything training, eval and sampling read."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "hlm", dest / "hlm", ignore=lambda d, names: [*ignore(d, names),
                                                                        *(["bytes"] if d.endswith("hlm") else [])])
    shutil.copytree(ROOT / "configs", dest / "configs")
    for script in ("train.py", "eval.py", "sample.py"):
        shutil.copy(ROOT / script, dest / script)


def test_training_eval_and_sampling_run_without_hlm_bytes(tmp_path, byte_corpus, bpe_corpus):
    repo = tmp_path / "repo"
    copy_without_bytes(repo)
    assert not (repo / "hlm" / "bytes").exists() and (repo / "hlm" / "models" / "gpt.py").is_file()
    proc = subprocess.run([sys.executable, "-c", CHECK, str(byte_corpus), str(bpe_corpus), str(tmp_path / "runs")],
                          cwd=repo, env={"PATH": "", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"},
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["hlm"].startswith(str(repo)) and not report["has_exact_bytes"]
    assert report["unimportable"] == [] and report["modules"] == []
    for name in ("byte", "bpe"):
        runs = report[name]
        for step in ("train", "eval", "sample"):
            assert runs[step]["rc"] == 0, (name, step, runs[step]["err"])
        (row,) = json.loads((tmp_path / "runs" / f"{name}.json").read_text())
        assert row["bytes"] == 1500 and 0 < row["bpb"] < 16
        assert runs["sample"]["out"].startswith("The ")
        assert_one_line_error(runs["exact_flag"]["rc"], runs["exact_flag"]["err"], "--exact-bytes", "hlm/bytes")
        assert_one_line_error(runs["byte_level"]["rc"], runs["byte_level"]["err"], "--byte-level", "hlm/bytes")
    assert "token prompting" in report["bpe"]["sample"]["err"] and "native bytes" in report["byte"]["sample"]["err"]
