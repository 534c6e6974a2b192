"""A small case of every kernel (all paths: stats, sketch and key-code build + append (1 and 2 blocks per sketch block),
two-stage refine (with the union of the last selection), qcodes (channel-major codes), each score, policy and
group aggregation, dense and
sparse decode with and without splits, paged, the row-per-cluster selection) for
compute-sanitizer memcheck/racecheck."""

import dataclasses
import math

import torch

import aether

torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    for head_dim, bs, group in ((64, 16, 1), (128, 64, 4), (256, 32, 8)):
        q = torch.randn(2, 2 * group, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(2, 2, 300, head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        lens = torch.tensor([300, 97], dtype=torch.int32, device="cuda")
        stats = aether.block_stats(k, bs, seq_lens=lens)
        stats.update(k, lens)
        for rank, weight, per in ((8, 0.5, 2), (2, 0.0, 1), (16, 1.0, 1), (4, 0.0, 2)):
            calib = aether.SketchCalibration(torch.randn(2, head_dim, rank, device="cuda"),
                                             torch.randn(2 * group, head_dim, rank, device="cuda"), weight)
            sketch = aether.key_sketch(k, calib, bs, seq_lens=lens - 40, blocks_per_sketch=per)
            sketch.update(k, lens)
            for policy in ("topk", "adaptive"):
                aether.sparse_attention(q, k, v, seq_lens=lens, score="qsketch", sketch=sketch,
                                        policy=policy, budget=3)
        for bits in (2, 4):  # two-stage selection: key codes build + append, refine scores
            codes = aether.key_codes(k, bs, bits=bits, seq_lens=lens - 40)
            codes.update(k, lens)
            _, last = aether.sparse_attention(q, k, v, seq_lens=lens, score="qsketch", sketch=sketch, budget=3,
                                              refine=codes, refine_candidates=7, return_selection=True)
            aether.sparse_attention(q, k, v, seq_lens=lens, score="qsketch", sketch=sketch, budget=3,  # + union_blocks
                                    refine=codes, refine_candidates=7, refine_extra=last)
        for bits in (2, 4):  # qcodes: channel-major codes build + append, channel choice and scores, select
            codes = aether.key_codes(k, bs, bits=bits, seq_lens=lens - 40, layout="channel")
            codes.update(k, lens)
            for policy, channels in (("topk", 0.25), ("adaptive", head_dim)):
                aether.sparse_attention(q, k, v, seq_lens=lens, score="qcodes", codes=codes, policy=policy, budget=3,
                                        code_channels=channels)
            # without running spreads: the code_channels launch, then channel_scores given its list
            aether.sparse_attention(q, k, v, seq_lens=lens, score="qcodes", budget=3, code_channels=0.25,
                                    codes=dataclasses.replace(codes, spreads=None))
            # a channel pool: a third of the runs stored, the choice among them
            pooled = aether.key_codes(k, bs, bits=bits, seq_lens=lens - 40, layout="channel", channel_pool=0.3)
            pooled.update(k, lens)
            aether.sparse_attention(q, k, v, seq_lens=lens, score="qcodes", codes=pooled, budget=3, code_channels=0.25)
        for score in aether.SCORES:
            if score in ("qsketch", "qcodes"):
                continue
            for policy in aether.POLICIES:
                if policy == "threshold" and score not in aether.UPPER_BOUND_SCORES:
                    continue
                group_aggs = ("max", "sum") if policy == "topk" else (None,)
                for agg in group_aggs:
                    aether.sparse_attention(q, k, v, stats=stats, seq_lens=lens, score=score, policy=policy,
                                            budget=3, group_agg=agg)
        aether.sparse_attention(q, k, v, stats=stats, seq_lens=lens, budget=1.0)
        pages = math.ceil(300 / bs)
        kp = k.new_zeros(2 * pages, bs, 2, head_dim)
        table = torch.arange(2 * pages, dtype=torch.int32, device="cuda").view(2, pages)
        aether.sparse_attention(q, kp, kp, seq_lens=lens, block_table=table, block_size=bs, budget=0.5)
        if bs <= 64:  # paged qsketch with 2 blocks per sketch block (the sketch rounds its capacity up)
            calib = aether.SketchCalibration(torch.randn(2, head_dim, 8, device="cuda"),
                                             torch.randn(2 * group, head_dim, 8, device="cuda"), 0.5)
            sketch = aether.key_sketch(kp, calib, bs, seq_lens=lens - 40, block_table=table, blocks_per_sketch=2)
            sketch.update(kp, lens, block_table=table)
            aether.sparse_attention(q, kp, kp, seq_lens=lens, block_table=table, block_size=bs, score="qsketch",
                                    sketch=sketch, budget=3)
            codes = aether.key_codes(kp, bs, seq_lens=lens - 40, block_table=table)
            codes.update(kp, lens, block_table=table)
            aether.sparse_attention(q, kp, kp, seq_lens=lens, block_table=table, block_size=bs, score="qsketch",
                                    sketch=sketch, budget=3, refine=codes, refine_candidates=0.5)
# A long case so that sparse_decode splits the KV sequence and merges.
q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
aether.sparse_attention(q, k, k, budget=0.25)
aether.sparse_attention(q, k, k, budget=1.0)
# Rows long enough for the row-per-cluster selection (batch 1: select_blocks / radar_select over 8
# CTAs per row) to give every CTA of a cluster blocks.
k = torch.randn(1, 8, 20000, 128, device="cuda", dtype=torch.bfloat16)  # 1250 blocks of 16 tokens
lens = torch.tensor([19000], dtype=torch.int32, device="cuda")
codes = aether.key_codes(k, 16, bits=4, seq_lens=lens, layout="channel")
for agg in ("sum", "max"):
    aether.sparse_attention(q, k, k, seq_lens=lens, block_size=16, score="qcodes", codes=codes, budget=0.135,
                            group_agg=agg)
    aether.sparse_attention(q, k, k, seq_lens=lens, block_size=16, budget=0.125, group_agg=agg)
torch.cuda.synchronize()
print("sanitize_case: done")
