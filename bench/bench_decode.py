"""Decode-step benchmark: torch SDPA (dense) vs AETHER, same GPU, same run.

For each (batch, context) shape with a Llama-3-8B attention layout (32 q heads, 8 kv heads,
head_dim 128, bf16) it times, with CUDA events after warm-up, the median of many calls:
- dense: torch.nn.functional.scaled_dot_product_attention(enable_gqa=True) on one decode query;
- aether dense: sparse_decode over every block (the keep-all path);
- aether step at each (score, budget): the per-token append (block_stats_update of the last
  block; for qsketch key_sketch_update instead: its sketch carries the centroid) + radar_select
  (top-k, group_agg as given) + sparse_decode (+ merge), called through the operators and
  replayed as a CUDA graph, plus each stage alone. qsketch uses rank 8, centroid weight 0.5 (it
  reads the centroid: the costlier case), --blocks-per-sketch blocks per sketch block and random
  projections (timing does not depend on their values). A score "S+refine" is two-stage selection
  (aether.refine): the append also rebuilds the last group of the key codes (in CUDA graphs on a
  side stream, as KeyCodes.update(stream=...) does: in the step it runs beside the first stage
  and the refinement waits for it; eagerly inline), and the select is radar_select at --refine-candidates, refine_scores over those candidates and
  radar_select given the refined scores; its bytes add the candidates' codes and ranges.
  The score "qcodes" appends to channel-major --code-bits key codes (the last 128-token group) and
  selects with code_channels (--code-channels of head_dim per KV head), channel_scores over every
  block and select_blocks; its bytes are the chosen channels' codes and every group's ranges.
  "qcodes+behind" is the same work with the append forked to a side stream after the selection, in
  64-thread CTAs beside the decode (the codes trail the cache by the newest token, whose block is
  forced: sparse_attention(..., update_codes=True, codes_stream=...)).
Several copies of the cache are rotated so that L2 (50 MB) never holds the one being read.
Bytes are counted as K/V of the selected blocks plus the statistics or sketch the radar reads;
"of ideal" = speedup / (dense bytes / bytes read), the share of the byte saving turned into time.
Writes a json with the GPU, versions and the exact command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import aether

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SKETCH_RANK, SKETCH_CENTROID_WEIGHT = 8, 0.5
L2_BYTES = 50 * 2**20


def _median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), 20)
    return 2 * n / ms / 1e6


class Case:
    """One shape: rotated caches, statistics, queries and preallocated outputs."""

    def __init__(self, batch: int, ctx: int, block_size: int, dtype=torch.bfloat16, blocks_per_sketch: int = 1):
        self.batch, self.ctx, self.block_size = batch, ctx, block_size
        self.per = blocks_per_sketch
        kv_bytes = 2 * batch * KV_HEADS * ctx * HEAD_DIM * 2
        self.copies = max(2, math.ceil(3 * L2_BYTES / kv_bytes))
        g = torch.Generator(device="cuda").manual_seed(0)
        self.k = [torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
                  for _ in range(self.copies)]
        self.v = [torch.randn_like(k) for k in self.k]
        self.q = [torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
                  for _ in range(self.copies)]
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.stats = [aether.block_stats(k, block_size, seq_lens=self.lens) for k in self.k]
        gen = torch.Generator(device="cuda").manual_seed(1)
        key_proj = torch.randn(KV_HEADS, HEAD_DIM, SKETCH_RANK, device="cuda", generator=gen) / HEAD_DIM ** 0.5
        query_proj = torch.randn(Q_HEADS, HEAD_DIM, SKETCH_RANK, device="cuda", generator=gen) / HEAD_DIM ** 0.5
        self.calib = aether.SketchCalibration(key_proj, query_proj, SKETCH_CENTROID_WEIGHT)
        self.sketch = [aether.key_sketch(k, self.calib, block_size, seq_lens=self.lens, blocks_per_sketch=self.per)
                       for k in self.k]
        self.group_agg = "sum"
        self.refine_candidates, self.refine_bits = 0.3, 2
        self.codes = None
        self.qcodes, self.code_channels = None, 0  # score "qcodes": channel-major codes, channels read
        self.last_final = {}  # (copy, budget) -> the last final selection (scores "...+refine+reuse")
        self.first_block = torch.full((batch,), (ctx - 1) // block_size, dtype=torch.int32, device="cuda")
        self.num_blocks = math.ceil(ctx / block_size)
        self.scale = 1.0 / math.sqrt(HEAD_DIM)
        self.i = 0
        self.kv_bytes = kv_bytes

    def next(self) -> int:
        self.i = (self.i + 1) % self.copies
        return self.i

    def sdpa(self):
        i = self.next()
        q = self.q[i].unsqueeze(2)
        return F.scaled_dot_product_attention(q, self.k[i], self.v[i], enable_gqa=True)

    def enable_refine(self, candidates: float, bits: int) -> None:
        self.refine_candidates, self.refine_bits = candidates, bits
        self.codes = [aether.key_codes(k, self.block_size, bits=bits, seq_lens=self.lens) for k in self.k]
        # As KeyCodes.update(stream=...) does, in CUDA graphs: the codes are rebuilt on a side stream
        # beside the first selection stage; the refinement waits for them.
        self.codes_stream, self.codes_ready, self.codes_pending = torch.cuda.Stream(), torch.cuda.Event(), False

    def enable_qcodes(self, fraction: float, bits: int, pool: float | None = None, choice: str = "spreads") -> None:
        self.qcodes = [aether.key_codes(k, self.block_size, bits=bits, seq_lens=self.lens, layout="channel",
                                        channel_pool=pool) for k in self.k]
        if choice == "launch":  # the channel choice as its own code_channels launch over every group's ranges
            for kc in self.qcodes:
                kc.spreads = None
        self.code_channels = aether.api._resolve_code_channels(fraction, HEAD_DIM, bits)  # the library's rule
        self.append_stream = torch.cuda.Stream()  # score "qcodes+behind": the append beside the decode
        self.selected = torch.cuda.Event()  # ... after the selection

    def qcodes_scores(self, i, stage: str = "scores"):
        """The qcodes score of copy i up to `stage`: "channels" (the code_channels launch; None when
        channel_scores chooses from the running spreads) or "scores" (the block scores)."""
        kc = self.qcodes[i]
        if kc.spreads is not None:  # one launch: channel_scores chooses the channels itself
            if stage == "channels":
                return None
            return torch.ops.aether.channel_scores(self.q[i], kc.codes, kc.ranges, self.lens, None, self.block_size,
                                                   self.scale, kc.blocks_per_group, kc.bits, kc.channel_slots,
                                                   kc.spreads, self.code_channels)
        stored = 0 if kc.pool is None else kc.pool.shape[-1]
        channels = torch.ops.aether.code_channels(self.q[i], kc.ranges, self.lens, self.block_size,
                                                  kc.blocks_per_group, self.code_channels, kc.channel_slots, stored)
        if stage == "channels":
            return channels
        return torch.ops.aether.channel_scores(self.q[i], kc.codes, kc.ranges, self.lens, channels, self.block_size,
                                               self.scale, kc.blocks_per_group, kc.bits, kc.channel_slots)

    def stats_append(self, i, score="tight", join=True, narrow=False):
        """The per-token metadata append. In a CUDA-graph capture a two-stage score's key-code
        rebuild forks to the side stream; join=False leaves it running there (select() waits for it
        before the refinement)."""
        score = score.removesuffix("+reuse").removesuffix("+behind")
        if score == "qcodes":  # the channel-major codes' last group only
            kc = self.qcodes[i]
            # with the last group's running spreads, in the same launch (KeyCodes.update does the same)
            torch.ops.aether.key_codes_update(self.k[i], self.lens, self.first_block, self.block_size, None, kc.codes,
                                              kc.ranges, kc.blocks_per_group, kc.bits, True, kc.channel_slots,
                                              kc.spreads, narrow)
            return
        if score.endswith("+refine"):
            kc = self.codes[i]
            args = (self.k[i], self.lens, self.first_block, self.block_size, None, kc.codes, kc.ranges,
                    kc.blocks_per_group, kc.bits)
            if torch.cuda.is_current_stream_capturing():
                self.codes_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.codes_stream):
                    torch.ops.aether.key_codes_update(*args)
                    self.codes_ready.record(self.codes_stream)
                self.codes_pending = True
                if join:
                    self.wait_codes()
            else:  # eagerly inline: a fork costs more host time than it hides (docs/api.md)
                torch.ops.aether.key_codes_update(*args)
            score = score[:-len("+refine")]
        if score == "qsketch":  # the sketch carries its centroid: no block statistics
            sk = self.sketch[i]
            torch.ops.aether.key_sketch_update(self.k[i], self.lens, self.first_block, self.calib.key_proj,
                                               self.block_size, None, sk.codes, sk.ranges, sk.centroid, self.per)
        else:
            torch.ops.aether.block_stats_update(self.k[i], self.lens, self.first_block, self.block_size, None,
                                                *self.stats[i].tensors)

    def wait_codes(self) -> None:
        if self.codes_pending:
            torch.cuda.current_stream().wait_event(self.codes_ready)
            self.codes_pending = False

    def candidates(self, i, budget_blocks, score):
        """The first stage's candidates of a two-stage score; "+reuse" joins the last final selection
        of copy i to them (union_blocks), as AetherKVCache(refine_reuse=True) does at each token."""
        reuse = score.endswith("+reuse")
        first = score.removesuffix("+reuse").removesuffix("+refine")
        cand_blocks = max(budget_blocks, math.ceil(self.refine_candidates * self.num_blocks - 1e-9))
        cand, num, _, _ = self.select(i, cand_blocks, first)
        if reuse:
            key = (i, budget_blocks)
            if key not in self.last_final:  # the step before, once per copy (outside any capture): the
                # captured graphs keep reading these tensors, so they are never replaced
                self.last_final[key] = self.select(i, budget_blocks, score.removesuffix("+reuse"))[:2]
            cand, num = torch.ops.aether.union_blocks(cand, num, *self.last_final[key], self.num_blocks)
        return cand, num

    def select(self, i, budget_blocks, score="tight", head_scores=None):
        """radar_select (given head_scores: M_g is not passed, topk does not read it)."""
        if score.endswith("+reuse") or score.endswith("+refine"):
            first = score.removesuffix("+reuse").removesuffix("+refine")
            cand, num = self.candidates(i, budget_blocks, score)
            self.wait_codes()
            kc = self.codes[i]
            scores = torch.ops.aether.refine_scores(self.q[i], kc.codes, kc.ranges, self.lens, cand, num,
                                                    self.block_size, self.scale, kc.blocks_per_group, kc.bits)
            return self.select(i, budget_blocks, first, scores)  # M_g: -inf, topk does not read it
        if score.startswith("qcodes"):
            scores = self.qcodes_scores(i) if head_scores is None else head_scores
            sel, cnt = torch.ops.aether.select_blocks(self.q[i], scores, self.lens, KV_HEADS, self.block_size, "topk",
                                                      budget_blocks, 0.0, 0.95, 1, 0, 1, 1, self.group_agg)
            return sel, cnt, None, None
        if score == "qsketch":
            sk = self.sketch[i]
            empty = self.q[i].new_empty((0,), dtype=torch.float32)
            return torch.ops.aether.radar_select(
                self.q[i], *(empty,) * 5, self.lens, self.block_size, self.scale, score, "topk", budget_blocks, 0.0,
                1e-3, 0.95, 1, 0, 1, 1, False, head_scores, None, self.group_agg, sk.codes, sk.ranges,
                self.calib.key_proj,
                self.calib.query_proj, self.calib.centroid_weight, sk.centroid, self.per)
        return torch.ops.aether.radar_select(self.q[i], *self.stats[i].tensors, self.lens, self.block_size, self.scale,
                                             score, "topk", budget_blocks, 0.0, 1e-3, 0.95, 1, 0, 1, 1, False,
                                             head_scores, None, self.group_agg)

    def meta_bytes_per_block(self, score: str) -> float:
        """Bytes the radar reads per block and KV head (the first stage's, for a two-stage score)."""
        score = score.removesuffix("+reuse").removesuffix("+refine")
        if score.startswith("qcodes"):  # the chosen channels' runs and every group's ranges
            return self.qcodes[0].qcodes_bytes(self.code_channels, self.num_blocks) / self.num_blocks
        if score == "qsketch":  # codes; ranges and bf16 centroid shared by the sketch block's blocks
            centroid = 2 * HEAD_DIM if self.calib.centroid_weight != 0.0 else 0
            return self.block_size * SKETCH_RANK // 2 + (4 * SKETCH_RANK + centroid) / self.per
        return (3 * HEAD_DIM + 2) * 4  # tight: centroid, lo, hi + radius (+ spread), float32

    def decode(self, i, sel, cnt, max_selected):
        return torch.ops.aether.sparse_decode(self.q[i], self.k[i], self.v[i], self.lens, self.block_size,
                                              self.scale, sel, cnt, None, max_selected)

    def step(self, budget_blocks, score="tight"):
        i = self.next()
        if score == "qcodes+behind":
            # sparse_attention(..., update_codes=True, codes_stream=...): the codes trail the cache by
            # the newest token (its block is forced), so the append runs on a side stream beside the
            # decode, after the selection, in 64-thread CTAs that fit beside the decode's (as the
            # library does; forked before the selection its 256-thread CTAs held the select back);
            # joined at the end.
            scores = self.qcodes_scores(i)
            sel, cnt, _, _ = self.select(i, budget_blocks, "qcodes", scores)
            current = torch.cuda.current_stream()
            self.selected.record(current)
            out = self.decode(i, sel, cnt, budget_blocks)  # enqueued first: its CTAs take the SMs first
            self.append_stream.wait_event(self.selected)
            with torch.cuda.stream(self.append_stream):
                self.stats_append(i, "qcodes", narrow=True)
            current.wait_stream(self.append_stream)
            return out
        self.stats_append(i, score, join=False)
        sel, cnt, _, _ = self.select(i, budget_blocks, score)
        return self.decode(i, sel, cnt, budget_blocks)


def capture_graphs(call, copies: int) -> list:
    """One CUDA graph per input copy, each captured after a warm-up call (call(i) runs the work on
    copy i); bench/trace_step.py replays them too."""
    graphs = []
    for i in range(copies):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(i)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call(i)
        graphs.append(g)
    return graphs


def _graph_ms(call, copies: int, iters: int) -> float:
    """Median time of replaying one CUDA graph per input copy (call(i) runs the work on copy i)."""
    graphs = capture_graphs(call, copies)
    k = [0]

    def replay():
        k[0] = (k[0] + 1) % len(graphs)
        graphs[k[0]].replay()

    return _median_ms(replay, iters)


def bench_case(batch: int, ctx: int, block_size: int, budgets: list[float], scores: list[str], iters: int,
               group_agg: str, blocks_per_sketch: int = 1, refine: tuple[float, int] = (0.3, 2),
               code_channels: float = 0.25, code_bits: int = 2, code_pool: float | None = None,
               code_choice: str = "spreads") -> dict:
    c = Case(batch, ctx, block_size, blocks_per_sketch=blocks_per_sketch)
    c.group_agg = group_agg
    two_stage = [s for s in scores if s.endswith("+refine") or s.endswith("+refine+reuse")]
    assert all(s.endswith("+refine") or "+refine" not in s for s in scores if s not in two_stage), scores
    if two_stage:
        c.enable_refine(*refine)
    if any(s.startswith("qcodes") for s in scores):
        c.enable_qcodes(code_channels, code_bits, code_pool, code_choice)
    row = dict(batch=batch, ctx=ctx, block_size=block_size, kv_bytes=c.kv_bytes, copies=c.copies)
    row["sdpa_ms"] = _median_ms(c.sdpa, iters)
    row["aether_dense_ms"] = _median_ms(lambda: c.decode(c.next(), None, None, 0), iters)
    row["graph_sdpa_ms"] = _graph_ms(lambda i: F.scaled_dot_product_attention(
        c.q[i].unsqueeze(2), c.k[i], c.v[i], enable_gqa=True), c.copies, iters)
    row["graph_aether_dense_ms"] = _graph_ms(lambda i: c.decode(i, None, None, 0), c.copies, iters)
    row["budgets"] = []
    for score in scores:
        for frac in budgets:
            if frac >= 1.0 and score != scores[0]:
                continue  # keep-all reads no score: one row is enough
            nb = max(1, math.ceil(frac * c.num_blocks - 1e-9))
            r = dict(score=score, group_agg=group_agg, fraction=frac, blocks=nb)
            if score.startswith("qsketch"):
                r["blocks_per_sketch"] = blocks_per_sketch
            if score in two_stage:
                r["refine_candidates"], r["refine_bits"] = c.refine_candidates, c.refine_bits
            if score.startswith("qcodes"):
                r["code_channels"], r["code_bits"] = c.code_channels, c.qcodes[0].bits
                r["code_pool"] = None if c.qcodes[0].pool is None else c.qcodes[0].pool.shape[-1]
            r["step_ms"] = _median_ms(lambda: c.step(nb, score), iters)
            # Stage times (each on rotated inputs).
            sels = [c.select(i, nb, score) for i in range(c.copies)]
            r["append_ms"] = _median_ms(lambda: c.stats_append(c.next(), score), iters)
            r["radar_ms"] = _median_ms(lambda: c.select(c.next(), nb, score), iters)
            r["decode_ms"] = _median_ms(lambda: (lambda i: c.decode(i, sels[i][0], sels[i][1], nb))(c.next()), iters)
            # CUDA graphs (no host launch overhead): the whole step and each stage alone.
            r["graph_step_ms"] = _graph_ms(lambda i: (setattr(c, "i", i - 1), c.step(nb, score)), c.copies, iters)
            r["graph_append_ms"] = _graph_ms(lambda i: c.stats_append(i, score), c.copies, iters)
            r["graph_radar_ms"] = _graph_ms(lambda i: c.select(i, nb, score), c.copies, iters)
            r["graph_decode_ms"] = _graph_ms(lambda i: c.decode(i, sels[i][0], sels[i][1], nb), c.copies, iters)
            counts = sels[0][1].float().mean().item()
            kv_read = counts * block_size * HEAD_DIM * 2 * 2 * batch * KV_HEADS
            meta = 0 if frac >= 1.0 else c.num_blocks * c.meta_bytes_per_block(score) * batch * KV_HEADS
            if score in two_stage:  # the candidates' codes and their groups' ranges
                first = score.removesuffix("+reuse").removesuffix("+refine")
                cands = [c.candidates(i, nb, score) for i in range(c.copies)]
                r["candidates_mean"] = cands[0][1].float().mean().item()
                meta += c.codes[0].bytes_read(cands[0][1], c.num_blocks).sum().item()
                r["refine_ms"] = _graph_ms(lambda i: c.select(i, nb, score), c.copies, iters) - _graph_ms(
                    lambda i: c.select(i, nb, first), c.copies, iters)
                if score.endswith("+reuse"):  # the union alone: the kernel, and torch ops (the reference)
                    last, n_cand = c.last_final, math.ceil(c.refine_candidates * c.num_blocks - 1e-9)
                    cand0 = [c.select(i, max(nb, n_cand), first)[:2] for i in range(c.copies)]
                    r["union_kernel_ms"] = _graph_ms(lambda i: torch.ops.aether.union_blocks(
                        *cand0[i], *last[i, nb], c.num_blocks), c.copies, iters)
                    r["union_torch_ms"] = _graph_ms(lambda i: aether.reference.union_blocks(
                        *cand0[i], *last[i, nb], c.num_blocks), c.copies, iters)
            if score.startswith("qcodes"):  # the three kernels of the select stage, each alone
                r["code_choice"] = "spreads" if c.qcodes[0].spreads is not None else "launch"
                r["channels_ms"] = (0.0 if r["code_choice"] == "spreads" else
                                    _graph_ms(lambda i: c.qcodes_scores(i, "channels"), c.copies, iters))
                r["channel_scores_ms"] = _graph_ms(lambda i: c.qcodes_scores(i), c.copies, iters) - r["channels_ms"]
                given = [c.qcodes_scores(i) for i in range(c.copies)]
                r["select_ms"] = _graph_ms(lambda i: c.select(i, nb, score, given[i]), c.copies, iters)
            r["bytes_read"] = kv_read + meta
            r["decode_gbps"] = kv_read / r["graph_decode_ms"] / 1e6
            # Same-mode ratios: eager step vs eager SDPA, graph step vs graph SDPA.
            r["speedup_vs_sdpa"] = row["sdpa_ms"] / r["step_ms"]
            r["graph_speedup_vs_sdpa"] = row["graph_sdpa_ms"] / r["graph_step_ms"]
            r["ideal_speedup"] = c.kv_bytes / r["bytes_read"]
            r["of_ideal"] = r["graph_speedup_vs_sdpa"] / r["ideal_speedup"]
            row["budgets"].append(r)
    del c
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1x16384,1x32768,1x131072,8x32768,32x16384")
    parser.add_argument("--budgets", default="1.0,0.25,0.125")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--scores", default="tight,qsketch")
    parser.add_argument("--group-agg", default="sum", choices=["max", "sum"])
    parser.add_argument("--blocks-per-sketch", type=int, default=1, help="qsketch: blocks per sketch block")
    parser.add_argument("--refine", default="0.3:2", help="for scores S+refine: candidate fraction:bits")
    parser.add_argument("--code-channels", type=float, default=0.25, help="score qcodes: fraction of head_dim read")
    parser.add_argument("--code-bits", type=int, default=2, choices=(2, 4), help="score qcodes: bits per code")
    parser.add_argument("--code-pool", type=float, default=None,
                        help="score qcodes: store codes for this fraction of head_dim only (channel_pool)")
    parser.add_argument("--code-choice", default="spreads", choices=("spreads", "launch"),
                        help="score qcodes: the channel choice inside channel_scores from the running spreads (the "
                             "library's path), or its own code_channels launch over every group's ranges")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_decode.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    budgets = [float(b) for b in args.budgets.split(",")]
    result = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), command=" ".join([sys.executable] + sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S"), copy_gbps=_copy_bandwidth(), heads=[Q_HEADS, KV_HEADS, HEAD_DIM],
        dtype="bfloat16", blocks_per_sketch=args.blocks_per_sketch, rows=[],
        pdl=os.environ.get("AETHER_PDL", "1") != "0")  # programmatic dependent launch (csrc common.cuh)
    for shape in args.shapes.split(","):
        batch, ctx = (int(x) for x in shape.split("x"))
        cand, bits = args.refine.split(":")
        result["rows"].append(bench_case(batch, ctx, args.block_size, budgets, args.scores.split(","), args.iters,
                                         args.group_agg, args.blocks_per_sketch, (float(cand), int(bits)),
                                         args.code_channels, args.code_bits, args.code_pool, args.code_choice))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{result['gpu']}  copy {result['copy_gbps']:.0f} GB/s  torch {result['torch']}  PDL {result['pdl']}  "
          f"{Q_HEADS}q/{KV_HEADS}kv d{HEAD_DIM} bf16 block {args.block_size} (qsketch: {args.blocks_per_sketch} "
          "per sketch block)")
    print(f"{'shape':>9} {'sdpa':>6} {'keep':>6} {'score':>20} {'budget':>6} {'step':>6} {'x':>5} | graph: {'sdpa':>6} "
          f"{'step':>6} {'x':>5} {'append':>6} {'radar':>6} {'decode':>6} {'GB/s':>5} | ideal of-ideal")
    for row in result["rows"]:
        for r in row["budgets"]:
            print(f"{row['batch']:>3}x{row['ctx']:<5} {row['sdpa_ms']*1e3:6.1f} {row['aether_dense_ms']*1e3:6.1f} "
                  f"{r['score']:>20} {r['fraction']:6.3f} {r['step_ms']*1e3:6.1f} {r['speedup_vs_sdpa']:5.2f} | "
                  f"{row['graph_sdpa_ms']*1e3:12.1f} {r['graph_step_ms']*1e3:6.1f} {r['graph_speedup_vs_sdpa']:5.2f} "
                  f"{r['graph_append_ms']*1e3:6.1f} {r['graph_radar_ms']*1e3:6.1f} {r['graph_decode_ms']*1e3:6.1f} "
                  f"{r['decode_gbps']:5.0f} | {r['ideal_speedup']:5.2f} {r['of_ideal']:5.2f}")
    for row in result["rows"]:
        for r in row["budgets"]:
            if "union_kernel_ms" in r:
                print(f"{row['batch']:>3}x{row['ctx']:<5} {r['score']} {r['fraction']:.3f}: candidates "
                      f"{r['candidates_mean']:.1f} per row; the union alone (graph): union_blocks kernel "
                      f"{r['union_kernel_ms']*1e3:.1f} us, torch ops (reference.union_blocks) {r['union_torch_ms']*1e3:.1f} us")
    for row in result["rows"]:
        for r in row["budgets"]:
            if "channels_ms" in r:
                choice = ("chosen in channel_scores" if r["code_choice"] == "spreads" else
                          f"code_channels {r['channels_ms']*1e3:.1f} us")
                print(f"{row['batch']:>3}x{row['ctx']:<5} {r['score']} {r['fraction']:.3f}: channels {r['code_channels']} of "
                      f"{HEAD_DIM}; graph: {choice}, channel_scores "
                      f"{r['channel_scores_ms']*1e3:.1f} us, select_blocks {r['select_ms']*1e3:.1f} us")
    print("times in us (median, CUDA events); x = speedup over SDPA in the same mode; GB/s = selected K/V bytes"
          " / graph decode time; ideal = dense bytes / bytes read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
