"""Exact byte-level views of tokenized LMs, byte-level sampling and ensembles (DESIGN §9)."""

from hlm.bytes.byte_lm import ByteLM, CallableByteLM, NativeByteLM, as_byte_lm, byte_lm_from_checkpoint
from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError, VocabIndex
from hlm.bytes.ensemble import Ensemble
from hlm.bytes.sampling import sample_bytes, sample_prompt_boundary

__all__ = ["ByteLM", "CallableByteLM", "ConversionRules", "CoverTracker", "Ensemble", "MissingCoverError",
           "NativeByteLM", "VocabIndex", "as_byte_lm", "byte_lm_from_checkpoint", "sample_bytes",
           "sample_prompt_boundary"]
