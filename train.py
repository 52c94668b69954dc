"""Train any hlm model: `python train.py CONFIG.yaml [section.key=value ...]`, or under
`torchrun --nproc_per_node=N train.py ...` for DDP."""

import sys

from hlm import HLMError
from hlm.config import load_config


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        from hlm.trainer import train  # after the config is checked: a bad one fails before the heavy imports

        train(cfg)
    except (HLMError, OSError) as e:  # bad input or an unusable path: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
