"""hlm: byte-level and hierarchical language models."""

import math

LN2 = math.log(2)  # nats per bit: bits per byte = nats / (LN2 * bytes)


class HLMError(ValueError):
    """Bad user input (config, data, checkpoint, tokenizer): CLIs print it as one line and exit 1."""


class ConfigError(HLMError):
    """A config file or override that cannot be used; the message names the key.

    Defined here rather than in hlm.config so that model files can raise it without importing the
    config loader (which imports the model registry). hlm.config re-exports it."""
