"""Entropies and calibrated thresholds for BLT entropy patches (hlm/models/blt.py).

For every split of a prepared byte corpus, writes `<split>.<name>.bin` beside `<split>.bin`:
one float16 per byte, H[t] = the entropy (nats) of a trained byte GPT's next-byte
distribution for byte t given the `block_size` bytes before it (the conventions of
hlm/models/entropy_patcher.py). A BLT config with `model.entropy_file: <name>` trains on them.

With `--target-bytes-per-patch P [P ...]` it also finds, by bisection on the first
`--calibration-bytes` of train, the threshold θ whose mean patch size is P, and reports the
achieved bytes per patch on that sample, val and test. Everything goes to
`patches.<name>.json` (prepare.py's meta.json is left alone), where train.py finds θ for a BLT
config's `model.target_bytes_per_patch` (or pass the θ it prints as `model.entropy_threshold`).
`--reuse` recalibrates from entropy files already written.

Example:
  python data_prep/entropy_patches.py runs/entropy_gpt/ckpt.pt --data data/enwiki_bytes \\
      --target-bytes-per-patch 4.5 6
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: find hlm

from hlm import HLMError  # noqa: E402
from hlm.checkpoint import write_atomic  # noqa: E402
from hlm.data import Split, read_meta  # noqa: E402
from hlm.models.entropy_patcher import (  # noqa: E402
    PATCHING_MODES,
    EntropyModel,
    calibrate_threshold,
    mean_patch_size,
    stream_entropies,
)


def split_bytes(folder: Path, name: str) -> np.ndarray:
    split = Split(folder, name)
    if split.meta["kind"] != "bytes":
        raise HLMError(f"{folder} is a token corpus: entropy patches are made for byte corpora")
    return np.asarray(split.memmap())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint of a trained hlm byte GPT (the entropy model)")
    p.add_argument("--data", required=True, help="byte corpus folder written by data_prep/prepare.py")
    p.add_argument("--name", default="entropy", help="files <split>.<name>.bin and patches.<name>.json")
    p.add_argument("--target-bytes-per-patch", type=float, nargs="*", default=[], metavar="P")
    p.add_argument("--mode", choices=PATCHING_MODES, default="global")
    p.add_argument("--max-patch-len", type=int, default=0, help="0: no limit")
    p.add_argument("--calibration-bytes", type=int, default=10_000_000, help="sample of train for θ")
    p.add_argument("--reuse", action="store_true", help="read the entropy files already written")
    p.add_argument("--chunk", type=int, default=4096, help="bytes scored per row")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    folder = Path(args.data)
    try:
        if any(t < 1 for t in args.target_bytes_per_patch):
            raise HLMError("--target-bytes-per-patch must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name) or args.name.startswith("boundaries"):
            raise HLMError(f"--name {args.name!r}: letters, digits, '_' and '-' only, not starting with "
                           "'boundaries' (boundaries.py's files)")
        meta = read_meta(folder)
        splits = {s: split_bytes(folder, s) for s in meta["splits"]}
        entropies = {}
        if args.reuse:
            for s, data in splits.items():
                path = folder / f"{s}.{args.name}.bin"
                if not path.is_file() or path.stat().st_size != 2 * len(data):
                    raise HLMError(f"--reuse: {path} is missing or not one float16 per byte")
                entropies[s] = np.fromfile(path, dtype=np.float16)
        else:
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise HLMError(f"device {args.device}: no CUDA device is available here (use --device cpu)")
            device = torch.device(args.device)
            model = EntropyModel.from_checkpoint(args.model, args.chunk).to(device).eval()
            for s, data in splits.items():
                entropies[s] = stream_entropies(model, data, args.batch_size, device, args.chunk)
                write_atomic(folder / f"{s}.{args.name}.bin", entropies[s].tofile)
                mean = float(entropies[s].astype(np.float64).mean()) if len(data) else float("nan")
                print(f"{s}: {len(data):,} bytes, mean entropy {mean:.3f} nats")
        info: dict = {"entropy_model": str(args.model), "dtype": "float16",
                      "convention": "H[t] = entropy (nats) of p(byte t | the entropy model's block_size bytes "
                                    "before it); H[0] = H[1]",
                      "calibration": []}
        sample = entropies["train"][: args.calibration_bytes] if "train" in entropies else None
        for target in args.target_bytes_per_patch:
            if sample is None:
                raise HLMError(f"{folder} has no train split to calibrate on")
            theta, achieved = calibrate_threshold(sample, target, args.mode, args.max_patch_len)
            sizes = {"train_sample": achieved}
            sizes.update({s: mean_patch_size(entropies[s], args.mode, theta, args.max_patch_len)
                          for s in ("val", "test") if s in entropies})
            info["calibration"].append({"target_bytes_per_patch": target, "mode": args.mode, "threshold": theta,
                                        "max_patch_len": args.max_patch_len, "sample_bytes": len(sample),
                                        "bytes_per_patch": sizes})
            print(f"target {target}: model.entropy_threshold={theta:.6g} model.patching={args.mode} -> "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sizes.items()) + " bytes per patch")
        write_atomic(folder / f"patches.{args.name}.json", json.dumps(info, indent=2).encode())
    except (HLMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
