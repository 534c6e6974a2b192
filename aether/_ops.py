"""Thin wrappers over the `torch.ops.aether` operators, and their fake (meta) kernels.

The fake kernels describe output shapes and dtypes without computing anything, so
`torch.compile(fullgraph=True)` can trace through AETHER and `torch.library.opcheck` can check
the registrations. The operators themselves live in csrc/torch/ops.cpp.
"""

from __future__ import annotations

import torch

try:
    from aether import _C  # noqa: F401  (loading the library registers torch.ops.aether)

    _IMPORT_ERROR: Exception | None = None
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    _IMPORT_ERROR = err


def extension_available() -> bool:
    """True when the compiled extension `aether._C` is importable."""
    return _IMPORT_ERROR is None


def require_extension() -> None:
    """Raise a clear error when the compiled extension is missing."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(
            "aether._C is not built; install with `pip install -e . --no-build-isolation` "
            f"(import failed with: {_IMPORT_ERROR})"
        )


# Read once at import: a plain Python constant is free to query and invisible to torch.compile.
_BUILT_WITH_CUDA = bool(torch.ops.aether.built_with_cuda()) if _IMPORT_ERROR is None else False


def built_with_cuda() -> bool:
    """True when the extension contains the CUDA kernels."""
    require_extension()
    return _BUILT_WITH_CUDA


def _cache_shape(k: torch.Tensor, block_table: torch.Tensor | None, block_size: int):
    if block_table is None:
        return k.shape[0], k.shape[1], k.shape[2], k.shape[3]
    return block_table.shape[0], k.shape[2], block_table.shape[1] * k.shape[1], k.shape[3]


if _IMPORT_ERROR is None:

    @torch.library.register_fake("aether::block_stats")
    def _block_stats_fake(k, seq_lens, block_size, num_blocks, block_table=None):
        batch, kv_heads, _, head_dim = _cache_shape(k, block_table, block_size)
        centroid = k.new_empty((batch, kv_heads, num_blocks, head_dim), dtype=torch.float32)
        radius = k.new_empty((batch, kv_heads, num_blocks), dtype=torch.float32)
        return centroid, torch.empty_like(centroid), torch.empty_like(centroid), radius, torch.empty_like(radius)

    @torch.library.register_fake("aether::block_stats_update")
    def _block_stats_update_fake(k, seq_lens, first_block, block_size, block_table, centroid, lo, hi, radius, spread):
        return None

    @torch.library.register_fake("aether::radar_select")
    def _radar_select_fake(q, centroid, lo, hi, radius, spread, seq_lens, block_size, scale, score, policy,
                           budget_blocks, budget_fraction, eps, mass, min_blocks, max_blocks, sink_blocks,
                           recent_blocks, return_scores=False, head_scores=None, head_mlo=None, group_agg="max",
                           sketch_codes=None, sketch_ranges=None, sketch_key_proj=None, sketch_query_proj=None,
                           centroid_weight=0.0, sketch_centroid=None, blocks_per_sketch=1):
        shaped = sketch_codes if score == "qsketch" else centroid
        batch, kv_heads, num_blocks = shaped.shape[0], shaped.shape[1], shaped.shape[2]
        q_heads = q.shape[1]
        selected = q.new_empty((batch, kv_heads, num_blocks), dtype=torch.int32)
        num_selected = q.new_empty((batch, kv_heads), dtype=torch.int32)
        if return_scores:
            scores = q.new_empty((batch, q_heads, num_blocks), dtype=torch.float32)
            mlo = q.new_empty((batch, q_heads), dtype=torch.float32)
        else:
            scores = q.new_empty((0,), dtype=torch.float32)
            mlo = q.new_empty((0,), dtype=torch.float32)
        return selected, num_selected, scores, mlo

    @torch.library.register_fake("aether::key_sketch")
    def _key_sketch_fake(k, seq_lens, key_proj, block_size, num_blocks, block_table=None, blocks_per_sketch=1):
        batch, kv_heads, _, head_dim = _cache_shape(k, block_table, block_size)
        rank = key_proj.shape[2]
        sketch_blocks = num_blocks // blocks_per_sketch
        codes = k.new_empty((batch, kv_heads, num_blocks, block_size, rank // 2), dtype=torch.uint8)
        ranges = k.new_empty((batch, kv_heads, sketch_blocks, 2, rank), dtype=torch.bfloat16)
        centroid = k.new_empty((batch, kv_heads, sketch_blocks, head_dim), dtype=torch.bfloat16)
        return codes, ranges, centroid

    @torch.library.register_fake("aether::key_sketch_update")
    def _key_sketch_update_fake(k, seq_lens, first_block, key_proj, block_size, block_table, codes, ranges, centroid,
                                blocks_per_sketch=1):
        return None

    @torch.library.register_fake("aether::key_codes")
    def _key_codes_fake(k, seq_lens, block_size, num_blocks, block_table=None, blocks_per_group=1, bits=2,
                        channel_major=False, channel_slots=None, stored_channels=0):
        batch, kv_heads, _, head_dim = _cache_shape(k, block_table, block_size)
        runs = stored_channels if channel_slots is not None else head_dim
        shape = ((batch, kv_heads, num_blocks // blocks_per_group, runs, blocks_per_group * block_size * bits // 8)
                 if channel_major else (batch, kv_heads, num_blocks, block_size, head_dim * bits // 8))
        codes = k.new_empty(shape, dtype=torch.uint8)
        ranges = k.new_empty((batch, kv_heads, num_blocks // blocks_per_group, 2, head_dim), dtype=torch.bfloat16)
        return codes, ranges

    @torch.library.register_fake("aether::key_codes_update")
    def _key_codes_update_fake(k, seq_lens, first_block, block_size, block_table, codes, ranges, blocks_per_group=1,
                               bits=2, channel_major=False, channel_slots=None, spreads=None, narrow=False):
        return None

    @torch.library.register_fake("aether::select_blocks")
    def _select_blocks_fake(q, head_scores, seq_lens, kv_heads, block_size, policy, budget_blocks, budget_fraction,
                            mass, min_blocks, max_blocks, sink_blocks, recent_blocks, group_agg):
        rows = (q.shape[0], kv_heads)
        return q.new_empty((*rows, head_scores.shape[2]), dtype=torch.int32), q.new_empty(rows, dtype=torch.int32)

    @torch.library.register_fake("aether::code_spreads")
    def _code_spreads_fake(ranges, seq_lens, block_size, blocks_per_group=1):
        return ranges.new_empty((ranges.shape[0], ranges.shape[1], ranges.shape[2], ranges.shape[4]),
                                dtype=torch.float64)

    @torch.library.register_fake("aether::code_spreads_update")
    def _code_spreads_update_fake(ranges, seq_lens, first_block, block_size, blocks_per_group, spreads):
        return None

    @torch.library.register_fake("aether::code_channels")
    def _code_channels_fake(q, ranges, seq_lens, block_size, blocks_per_group, num_channels, channel_slots=None,
                            stored_channels=0, spreads=None):
        return q.new_empty((ranges.shape[0], ranges.shape[1], num_channels), dtype=torch.int32)

    @torch.library.register_fake("aether::channel_scores")
    def _channel_scores_fake(q, codes, ranges, seq_lens, channels, block_size, scale, blocks_per_group=1, bits=2,
                             channel_slots=None, spreads=None, num_channels=0):
        return q.new_empty((codes.shape[0], q.shape[1], codes.shape[2] * blocks_per_group), dtype=torch.float32)

    @torch.library.register_fake("aether::refine_scores")
    def _refine_scores_fake(q, codes, ranges, seq_lens, candidates, num_candidates, block_size, scale,
                            blocks_per_group=1, bits=2):
        return q.new_empty((codes.shape[0], q.shape[1], candidates.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("aether::union_blocks")
    def _union_blocks_fake(indices, counts, extra, extra_counts, num_blocks):
        rows = indices.shape[:2]
        return indices.new_empty((*rows, num_blocks)), indices.new_empty(rows)

    @torch.library.register_fake("aether::sparse_decode")
    def _sparse_decode_fake(q, k, v, seq_lens, block_size, scale, selected=None, num_selected=None,
                            block_table=None, max_selected=0):
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("aether::sparse_decode_out")
    def _sparse_decode_out_fake(q, k, v, seq_lens, block_size, scale, selected, num_selected, block_table,
                                max_selected, out, lse, workspace):
        return None
