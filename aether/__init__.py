"""AETHER: query-aware block-sparse attention for long-context LLM decoding.

`sparse_attention` runs one decode step over a KV cache, reading only the blocks whose bound on
the attention logit says they matter. `block_stats` builds the per-block statistics it scores
with; `calibrate_sketch` and `key_sketch` build the 4-bit key sketch of the "qsketch" score (the
most accurate ranking, docs/selection.md). `aether.reference` holds the pure-PyTorch oracle of the whole algorithm.
"""

from aether import reference
from aether._ops import built_with_cuda, extension_available
from aether.api import (
    POLICIES,
    SCORES,
    UPPER_BOUND_SCORES,
    BlockStats,
    Selection,
    block_stats,
    sparse_attention,
)
from aether.refine import KeyCodes, key_codes
from aether.sketch import KeySketch, SketchCalibration, calibrate_sketch, key_sketch

__all__ = [
    "POLICIES",
    "SCORES",
    "UPPER_BOUND_SCORES",
    "BlockStats",
    "KeyCodes",
    "KeySketch",
    "Selection",
    "SketchCalibration",
    "block_stats",
    "built_with_cuda",
    "calibrate_sketch",
    "extension_available",
    "key_codes",
    "key_sketch",
    "reference",
    "sparse_attention",
]
__version__ = "0.1.0"
