"""Two-stage selection (aether.refine) at 8 x 32k, 32q/8kv, d128, bf16, 16-token blocks, 128-token
sketch blocks, 30% candidates, 2-bit key codes, keep 0.112, repeated for Nsight Compute:
`ncu --clock-control none --launch-skip 30 --launch-count 20 --metrics gpu__time_duration.sum
python3 bench/profile_refine.py [candidates keep]` (one step: key_codes + key_sketch appends, radar_select for the
candidates, refine_scores, radar_select given the refined scores, sparse_decode)."""

import math
import sys

import torch

import aether

batch, ctx, bs, per = 8, 32768, 16, 8
# optional: candidates and keep (default the 0.3 / 0.112 point of the kernel history)
candidates, keep = (float(sys.argv[1]), float(sys.argv[2])) if len(sys.argv) == 3 else (0.3, 0.112)
k = torch.randn(batch, 8, ctx, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
calib = aether.SketchCalibration(torch.randn(8, 128, 8, device="cuda") / 11, torch.randn(32, 128, 8, device="cuda") / 11,
                                 0.5)
sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
codes = aether.key_codes(k, bs, bits=2, seq_lens=lens)
for _ in range(12):
    sketch.update(k, lens)
    codes.update(k, lens)
    aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=keep, refine=codes,
                            refine_candidates=candidates)
torch.cuda.synchronize()
