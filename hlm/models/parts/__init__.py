"""Hierarchy as parts (DESIGN.md §12): the pieces hlm's hierarchical byte models compose.

    bytes -> embed -> encoder (byte layers) -> boundary source -> downsample -> main network
          -> upsample -> decoder (byte layers) -> head

  boundaries.py   boundary sources and the one convention (ends) with converters to starts
  downsample.py   group vectors: mean, boundary byte's state, learned query, cross-attention;
                  the static group cap and what it costs
  upsample.py     what a byte reads back: last completed group, H-Net's smoothing with STE
                  confidence, cross-attention to the group
  decoding.py     the cached decoder of "byte stack -> groups -> byte stack" models

Every part is causal: a boundary at byte t depends on bytes <= t, and no byte reads a group
vector computed from a later byte (tests/test_parts.py checks each one).
"""
