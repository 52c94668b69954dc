"""hlm: byte-level and hierarchical language models."""

import math

LN2 = math.log(2)  # nats per bit: bits per byte = nats / (LN2 * bytes)


class HLMError(ValueError):
    """Bad user input (config, data, checkpoint, tokenizer): CLIs print it as one line and exit 1."""
