"""Exact byte-level views of tokenized LMs, byte-level sampling and ensembles.

    from hlm.bytes import ByteLM, as_byte_lm, Ensemble
    blm = ByteLM(token_model, tok)                 # or as_byte_lm(model, tok)
    blm.next_byte_logprobs(b"The hist")            # Tensor[257]: bytes, then end of text
    blm.logprob(b"The history", eot=True)

covers.py: cover bookkeeping and validity rules (merge_tables.py: reachability and canonical
adjacency of a BPE's tokens); byte_lm.py: ByteLM, native byte models, as_byte_lm; exact_eval.py:
exact bpb in one batched tree pass (plan.py, layout.py, score.py; tree_attention.py: the TreeMask
attention pattern); canonical.py, cut.py: canonicalized and cut-prefix scoring; sampling.py;
ensemble.py. Nothing outside this package imports it at module level: deleting it leaves
training, canonical evaluation and sampling of native models working.
"""

from hlm.bytes.byte_lm import ByteLM, CallableByteLM, NativeByteLM, as_byte_lm, byte_lm_from_checkpoint
from hlm.bytes.covers import ConversionRules, CoverTracker, MissingCoverError, VocabIndex
from hlm.bytes.ensemble import Ensemble
from hlm.bytes.exact_eval import exact_bpb, exact_prefix_logprobs
from hlm.bytes.sampling import sample_bytes, sample_prompt_boundary

__all__ = ["ByteLM", "CallableByteLM", "ConversionRules", "CoverTracker", "Ensemble", "MissingCoverError",
           "NativeByteLM", "VocabIndex", "as_byte_lm", "byte_lm_from_checkpoint", "exact_bpb",
           "exact_prefix_logprobs", "sample_bytes", "sample_prompt_boundary"]
