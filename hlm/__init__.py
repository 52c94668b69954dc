"""hlm: byte-level and hierarchical language models."""


class HLMError(ValueError):
    """Bad user input (config, data, checkpoint, tokenizer): CLIs print it as one line and exit 1."""
