"""hlm: byte-level and hierarchical language models."""

import math
import os
from pathlib import Path

LN2 = math.log(2)  # nats per bit: bits per byte = nats / (LN2 * bytes)


class HLMError(ValueError):
    """Bad user input (config, data, checkpoint, tokenizer): CLIs print it as one line and exit 1."""


class ConfigError(HLMError):
    """A config file or override that cannot be used; the message names the key.

    Defined here rather than in hlm.config so that model files can raise it without importing the
    config loader (which imports the model registry). hlm.config re-exports it."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (one of another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def has_exact_bytes() -> bool:
    """Whether this copy of hlm has hlm/bytes (exact byte-level conversion): the rest runs without it.
    Looked up beside this file, not through the import system, which may find another copy's (an
    editable install's finder maps hlm.* to its own tree)."""
    return (Path(__file__).parent / "bytes" / "__init__.py").is_file()


def require_exact_bytes(what: str) -> None:
    """Refuse `what` with one line where hlm/bytes is absent."""
    if not has_exact_bytes():
        raise HLMError(f"{what} needs hlm/bytes (exact byte-level conversion), which this copy of hlm lacks")
