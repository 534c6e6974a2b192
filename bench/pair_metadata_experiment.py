"""Experiment (docs/selection.md): qsketch selecting 32-token blocks while its metadata is that of
64-token blocks. The eval harness runs with --block-sizes 32, and every sketch / statistics build
is post-processed so that each pair of 32-token blocks shares one set of sketch ranges (lo, hi
over the pair's 64 tokens) and one centroid (the pair's mean key): exactly the bytes of a
64-token qsketch, with the selection granularity of 32 tokens. The harness still counts the
metadata of 32-token blocks (5%); a kernel that reads the shared ranges and centroid once per pair
reads that of 64-token blocks (3.3%). Blocks completed during decode keep their own 32-token
ranges (the sketch update is per block); they are the recent blocks, which are always kept.

Usage: python bench/pair_metadata_experiment.py <aether.eval flags, with --block-sizes 32>
"""

import sys

import aether.cache as cache_mod
from aether import reference

_build_sketch, _build_stats = cache_mod.build_key_sketch, cache_mod.build_block_stats


def pair_sketch(k, calibration, block_size):
    sketch = _build_sketch(k, calibration, block_size)
    codes, ranges = reference.key_sketch(k, calibration.key_proj.to(k.device), 2 * block_size)
    batch, heads, pairs = codes.shape[:3]
    n = min(sketch.num_blocks, 2 * pairs)
    sketch.codes[:, :, :n] = codes.reshape(batch, heads, 2 * pairs, block_size, -1)[:, :, :n].to(sketch.codes.dtype)
    sketch.ranges[:, :, :n] = ranges.repeat_interleave(2, dim=2)[:, :, :n].to(sketch.ranges.dtype)
    return sketch


def pair_stats(k, block_size):
    stats = _build_stats(k, block_size)
    centroid = reference.block_stats(k, 2 * block_size).centroid.repeat_interleave(2, dim=2)
    n = min(stats.centroid.shape[2], centroid.shape[2])
    stats.centroid[:, :, :n] = centroid[:, :, :n].to(stats.centroid.dtype)
    return stats


if __name__ == "__main__":
    cache_mod.build_key_sketch, cache_mod.build_block_stats = pair_sketch, pair_stats
    from aether import eval as ev

    sys.exit(ev.main(sys.argv[1:]))
