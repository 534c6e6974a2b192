"""One AETHER decode step (8 x 32k, 32q/8kv, d128, bf16, keep 1/8 of 64-token blocks), repeated,
for Nsight Compute: `ncu --clock-control none --launch-skip 20 --launch-count 10 python3 bench/profile_step.py`.
Arguments: [batch ctx block_size [score [blocks_per_sketch]]], score "tight" (default) or "qsketch"
(rank 8, centroid weight 0.5, random projections, blocks_per_sketch blocks per sketch block,
default 1; its append is key_sketch_update instead of block_stats_update), or "qcodes" (4-bit
channel-major key codes, an eighth of the channels, keep 0.135: key_codes_update (with the running spreads),
channel_scores choosing the channels from the spreads, select_blocks; v12's ncu times were taken with 2-bit codes of a quarter)."""

import math
import sys

import torch

import aether

batch, ctx, bs = (int(x) for x in (sys.argv[1:4] if len(sys.argv) > 3 else (8, 32768, 64)))
score = sys.argv[4] if len(sys.argv) > 4 else "tight"
per = int(sys.argv[5]) if len(sys.argv) > 5 else 1
k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
stats = torch.ops.aether.block_stats(k, lens, bs, math.ceil(ctx / bs), None)
first = torch.full((batch,), (ctx - 1) // bs, dtype=torch.int32, device="cuda")
calib = aether.SketchCalibration(torch.randn(8, 128, 8, device="cuda") / 11, torch.randn(32, 128, 8, device="cuda") / 11,
                                 0.5)
sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
extra = (None, None, None, None, 0.0)
stat_args = stats
if score == "qsketch":  # reads no block statistics: its sketch carries the centroid
    extra = (sketch.codes, sketch.ranges, calib.key_proj, calib.query_proj, calib.centroid_weight, sketch.centroid, per)
    stat_args = (q.new_empty((0,), dtype=torch.float32),) * 5
nb = math.ceil(ctx / bs / 8)
if score == "qcodes":
    nb = math.ceil(0.135 * ctx / bs)
    codes = aether.key_codes(k, bs, bits=4, seq_lens=lens, layout="channel")
for _ in range(6):
    if score == "qcodes":
        torch.ops.aether.key_codes_update(k, lens, first, bs, None, codes.codes, codes.ranges, codes.blocks_per_group,
                                          4, True, None, codes.spreads)  # the running spreads in the same launch
        # the library's path: channel_scores chooses the 16 channels from the running spreads
        scores = torch.ops.aether.channel_scores(q, codes.codes, codes.ranges, lens, None, bs, 0.088,
                                                 codes.blocks_per_group, 4, None, codes.spreads, 16)
        sel, cnt = torch.ops.aether.select_blocks(q, scores, lens, 8, bs, "topk", nb, 0.0, 0.95, 1, 0, 1, 1, "sum")
        out, lse = torch.ops.aether.sparse_decode(q, k, v, lens, bs, 0.088, sel, cnt, None, nb)
        continue
    if score == "qsketch":
        torch.ops.aether.key_sketch_update(k, lens, first, calib.key_proj, bs, None, sketch.codes, sketch.ranges,
                                           sketch.centroid, per)
    else:
        torch.ops.aether.block_stats_update(k, lens, first, bs, None, *stats)
    sel, cnt, _, _ = torch.ops.aether.radar_select(q, *stat_args, lens, bs, 0.088, score, "topk", nb, 0.0, 1e-3, 0.95,
                                                   1, 0, 1, 1, False, None, None, "sum", *extra)
    out, lse = torch.ops.aether.sparse_decode(q, k, v, lens, bs, 0.088, sel, cnt, None, nb)
torch.cuda.synchronize()
print("profile_step: done")
