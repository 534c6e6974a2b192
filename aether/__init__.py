"""AETHER: query-aware block-sparse attention for long-context LLM decoding.

`sparse_attention` runs one decode step over a KV cache, reading only the blocks whose bound on
the attention logit says they matter. `block_stats` builds the per-block statistics it scores
with. `aether.reference` holds the pure-PyTorch oracle of the whole algorithm.
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

__all__ = [
    "POLICIES",
    "SCORES",
    "UPPER_BOUND_SCORES",
    "BlockStats",
    "Selection",
    "block_stats",
    "built_with_cuda",
    "extension_available",
    "reference",
    "sparse_attention",
]
__version__ = "0.1.0"
