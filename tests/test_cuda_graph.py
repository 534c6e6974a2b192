"""A whole decode step (stats append + radar + select + decode) captured in a CUDA graph and
replayed on new inputs of the same shape: results equal the eager call and the reference."""

from __future__ import annotations

import pytest
import torch

import aether
from aether import reference as ref
from conftest import HAS_CUDA, make_case

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of aether._C")


def _warm_and_capture(step):
    """Runs `step()` once on a side stream (the warm-up CUDA graphs want), then captures it:
    returns the graph and the captured call's outputs (rewritten by every replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def test_decode_step_graph_capture_and_replay():
    batch, q_heads, kv_heads, capacity, head_dim, bs = 2, 8, 2, 1024, 128, 64
    q, k, v, _ = make_case(batch, q_heads, kv_heads, capacity, head_dim, torch.bfloat16, "cuda", seed=0)
    lens = torch.tensor([700, 389], dtype=torch.int32, device="cuda")
    stats = aether.block_stats(k, bs, seq_lens=lens)
    static_q = q.clone()
    new_k = torch.zeros(batch, kv_heads, head_dim, dtype=k.dtype, device="cuda")
    new_v = torch.zeros_like(new_k)
    kw = dict(block_size=bs, score="tight", policy="topk", budget=4)

    def step():
        # Append one token per sequence at position lens (in place, device-side indices), refresh
        # the statistics of the last block, then attend.
        rows = torch.arange(batch, device="cuda")
        k[rows, :, lens.long()] = new_k
        v[rows, :, lens.long()] = new_v
        lens.add_(1)
        stats.update(k, lens)
        return aether.sparse_attention(static_q, k, v, stats=stats, seq_lens=lens, return_lse=True, **kw)

    graph, (static_out, static_lse) = _warm_and_capture(step)  # the warm-up advances lens by one

    for trial in range(4):
        static_q.copy_(torch.randn_like(static_q))
        new_k.copy_(torch.randn_like(new_k))
        new_v.copy_(torch.randn_like(new_v))
        graph.replay()
        torch.cuda.synchronize()
        # Eager recomputation from scratch on the same cache and lengths.
        fresh = aether.block_stats(k, bs, seq_lens=lens)
        for a, b in zip(stats.tensors, fresh.tensors):
            assert torch.equal(a, b), "graph-updated statistics differ from a rebuild"
        out, lse = aether.sparse_attention(static_q, k, v, stats=fresh, seq_lens=lens, return_lse=True, **kw)
        assert torch.equal(static_out, out)
        assert torch.equal(static_lse, lse)
        r_out, r_lse, _, _ = ref.sparse_attention(static_q.cpu(), k.cpu(), v.cpu(), seq_lens=lens.cpu(),
                                                  block_size=bs, budget_blocks=4, budget_fraction=0.0)
        torch.testing.assert_close(out.cpu().float(), r_out.float(), rtol=2e-2, atol=2e-2)
    assert int(lens[0]) == 700 + 1 + 4  # the warm-up and 4 replays ran; the capture itself does not


def test_qsketch_step_with_sketch_blocks_graph_capture_and_replay():
    """qsketch with 32-token blocks and 64-token sketch blocks: the sketch append (one kernel,
    the sketch carries its centroid) + score + select + decode captured once and replayed."""
    batch, q_heads, kv_heads, capacity, head_dim, bs, per = 2, 8, 2, 1024, 128, 32, 2
    q, k, v, _ = make_case(batch, q_heads, kv_heads, capacity, head_dim, torch.bfloat16, "cuda", seed=4)
    lens = torch.tensor([700, 389], dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(0)
    calib = aether.SketchCalibration((torch.randn(kv_heads, head_dim, 8, generator=g) / 11).cuda(),
                                     (torch.randn(q_heads, head_dim, 8, generator=g) / 11).cuda(), 0.5)
    sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
    static_q = q.clone()
    new_k = torch.zeros(batch, kv_heads, head_dim, dtype=k.dtype, device="cuda")
    kw = dict(block_size=bs, score="qsketch", budget=6)

    def step():
        rows = torch.arange(batch, device="cuda")
        k[rows, :, lens.long()] = new_k
        lens.add_(1)
        sketch.update(k, lens)
        return aether.sparse_attention(static_q, k, v, sketch=sketch, seq_lens=lens, **kw)

    graph, static_out = _warm_and_capture(step)
    for trial in range(3):
        static_q.copy_(torch.randn_like(static_q))
        new_k.copy_(torch.randn_like(new_k))
        graph.replay()
        torch.cuda.synchronize()
        fresh = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
        assert torch.equal(sketch.codes, fresh.codes) and torch.equal(sketch.ranges, fresh.ranges)
        assert torch.equal(sketch.centroid, fresh.centroid), "graph-updated sketch differs from a rebuild"
        out = aether.sparse_attention(static_q, k, v, sketch=fresh, seq_lens=lens, **kw)
        assert torch.equal(static_out, out)
    assert int(lens[0]) == 700 + 1 + 3


@pytest.mark.parametrize("trailing", [False, True])
def test_qcodes_step_graph_capture_and_replay(trailing):
    """qcodes with 16-token blocks: the channel-major codes' append + channel choice + scores +
    select + decode captured once and replayed; equal to the eager call on a fresh build.
    trailing: the codes stay one token behind the cache; the step scores from them and brings them
    up to date on a side stream after the selection, beside the decode (update_codes=True,
    codes_stream): each replay equals the eager call on codes built for the lengths before the
    step's token, and leaves the codes current."""
    batch, q_heads, kv_heads, capacity, head_dim, bs = 2, 8, 2, 1024, 128, 16
    q, k, v, _ = make_case(batch, q_heads, kv_heads, capacity, head_dim, torch.bfloat16, "cuda", seed=6)
    lens = torch.tensor([700, 389], dtype=torch.int32, device="cuda")
    codes = aether.key_codes(k, bs, seq_lens=lens, layout="channel")
    static_q = q.clone()
    new_k = torch.zeros(batch, kv_heads, head_dim, dtype=k.dtype, device="cuda")
    kw = dict(block_size=bs, score="qcodes", budget=9, code_channels=0.25)
    codes_stream = torch.cuda.Stream() if trailing else None

    def step():
        rows = torch.arange(batch, device="cuda")
        k[rows, :, lens.long()] = new_k
        lens.add_(1)  # trailing: the codes now miss this token, which sits in a forced block
        if not trailing:
            codes.update(k, lens)
        return aether.sparse_attention(static_q, k, v, codes=codes, seq_lens=lens, return_selection=True,
                                       update_codes=trailing, codes_stream=codes_stream, **kw)

    graph, (static_out, static_sel) = _warm_and_capture(step)
    for trial in range(3):
        static_q.copy_(torch.randn_like(static_q))
        new_k.copy_(torch.randn_like(new_k))
        before = aether.key_codes(k, bs, seq_lens=lens, layout="channel")  # what a trailing replay scores from
        graph.replay()
        torch.cuda.synchronize()
        fresh = aether.key_codes(k, bs, seq_lens=lens, layout="channel")
        assert torch.equal(codes.codes, fresh.codes) and torch.equal(codes.ranges, fresh.ranges)
        assert torch.equal(codes.spreads, fresh.spreads) and torch.equal(codes.seq_lens, lens)
        out, sel = aether.sparse_attention(static_q, k, v, codes=before if trailing else fresh, seq_lens=lens,
                                           return_selection=True, **kw)
        assert torch.equal(static_sel.indices, sel.indices) and torch.equal(static_sel.counts, sel.counts)
        assert torch.equal(static_out, out)
    assert int(lens[0]) == 700 + 1 + 3


def test_sparse_decode_out_is_allocation_free_under_capture():
    q, k, v, lens = make_case(2, 8, 2, 2048, 128, torch.float16, "cuda", seed=1, lens=[2048, 1500])
    sel_stats = aether.block_stats(k, 64, seq_lens=lens)
    sel, cnt, _, _ = torch.ops.aether.radar_select(q, *sel_stats.tensors, lens, 64, 0.088, "tight", "topk", 5, 0.0,
                                                   1e-3, 0.9, 1, 0, 1, 1)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device="cuda")
    n = torch.ops.aether.sparse_decode_workspace_numel(q, k, v, lens, 64, 0.088, sel, cnt, None, 5)
    ws = torch.empty(max(n, 1), device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # Measured inside the capture: starting a capture itself allocates the graph's RNG state.
    with torch.cuda.graph(graph):
        before = torch.cuda.memory_allocated()
        torch.ops.aether.sparse_decode_out(q, k, v, lens, 64, 0.088, sel, cnt, None, 5, out, lse, ws)
        after = torch.cuda.memory_allocated()
    assert after == before
    q.copy_(torch.randn_like(q))
    graph.replay()
    want, want_lse = torch.ops.aether.sparse_decode(q, k, v, lens, 64, 0.088, sel, cnt, None, 5)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
