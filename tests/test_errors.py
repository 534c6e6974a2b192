"""Every bad input gets a ValueError/TypeError naming the argument, its value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import aether
from conftest import make_case


@pytest.fixture
def case():
    q, k, v, seq_lens = make_case(2, 4, 2, 96, 64, torch.float32, "cpu", seed=0)
    return q, k, v, seq_lens


def call(case, **kw):
    q, k, v, seq_lens = case
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in kw:
            args[name] = kw.pop(name)
    return aether.sparse_attention(args["q"], args["k"], args["v"], **kw)


BAD = [
    # (kwargs overriding the good call, exception type, regex the message must match)
    (dict(q="not a tensor"), TypeError, r"q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 4, 64, 1)), ValueError, r"q must be 3-D"),
    (dict(k=torch.randn(2, 96, 64)), ValueError, r"k must be 4-D"),
    (dict(q=torch.randn(2, 3, 64)), ValueError, r"q_heads \(3\) must be a multiple of kv_heads \(2\)"),
    (dict(q=torch.randn(2, 4, 32)), ValueError, r"q has head_dim 32 but k has head_dim 64"),
    (dict(q=torch.randn(3, 4, 64)), ValueError, r"q has batch 3 but the cache has batch 2"),
    (dict(q=torch.randn(2, 4, 64, dtype=torch.float64)), TypeError, r"q must be float32, float16 or bfloat16"),
    (dict(q=torch.randn(2, 4, 64, dtype=torch.float16)), TypeError, r"same dtype"),
    (dict(v=torch.randn(2, 2, 95, 64)), ValueError, r"k and v must have the same shape"),
    (dict(k=torch.randn(2, 2, 64, 96).transpose(2, 3)), ValueError, r"contiguous last"),
    (dict(block_size=48), ValueError, r"block_size must be a power of two in \[16, 128\].*got 48"),
    (dict(block_size=256), ValueError, r"block_size .* got 256"),
    (dict(block_size=8), ValueError, r"block_size .* got 8"),
    (dict(block_size=64.0), TypeError, r"block_size must be an int"),
    (dict(budget=0), ValueError, r"budget as a block count must be >= 1, got 0"),
    (dict(budget=1.5), ValueError, r"budget as a fraction must be in \(0, 1\], got 1.5"),
    (dict(budget=0.0), ValueError, r"budget as a fraction must be in \(0, 1\], got 0.0"),
    (dict(budget=True), TypeError, r"budget must be an int"),
    (dict(budget="8"), TypeError, r"budget must be an int"),
    (dict(policy="threshold", eps=0.0), ValueError, r"eps must be in \(0, 1\), got 0.0"),
    (dict(policy="threshold", eps=1.0), ValueError, r"eps must be in \(0, 1\), got 1.0"),
    (dict(policy="adaptive", mass=0.0), ValueError, r"mass must be in \(0, 1\], got 0.0"),
    (dict(policy="adaptive", mass=1.01), ValueError, r"mass must be in \(0, 1\], got 1.01"),
    (dict(score="cosine"), ValueError, r"score must be one of .*'cosine'"),
    (dict(policy="random"), ValueError, r"policy must be one of .*'random'"),
    (dict(policy="threshold", score="mean"), ValueError, r"needs an upper-bound score"),
    (dict(policy="threshold", score="variance"), ValueError, r"needs an upper-bound score"),
    (dict(min_blocks=0), ValueError, r"min_blocks must be >= 1, got 0"),
    (dict(min_blocks=4, max_blocks=2), ValueError, r"max_blocks \(2\) must be >= min_blocks \(4\)"),
    (dict(sink_blocks=-1), ValueError, r"sink_blocks must be >= 0, got -1"),
    (dict(recent_blocks=1.0), TypeError, r"recent_blocks must be an int"),
    (dict(scale=0.0), ValueError, r"scale must be a finite float > 0"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite float > 0"),
    (dict(seq_lens=torch.tensor([10, 97])), ValueError, r"seq_lens values must be in \[0, 96\].*\[10, 97\]"),
    (dict(seq_lens=torch.tensor([-1, 5])), ValueError, r"seq_lens values must be in \[0, 96\]"),
    (dict(seq_lens=torch.tensor([1, 2, 3])), ValueError, r"seq_lens must have shape \[2\]"),
    (dict(seq_lens=torch.tensor([1.0, 2.0])), TypeError, r"seq_lens must be int32 or int64"),
    (dict(seq_lens=[1, 2]), TypeError, r"seq_lens must be a torch.Tensor"),
    (dict(stats="nope"), TypeError, r"stats must be an aether.BlockStats"),
]


@pytest.mark.parametrize("kw,exc,pattern", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_rejected_by_name(case, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(case, **dict(kw))


def test_stats_with_other_block_size(case):
    q, k, v, seq_lens = case
    stats = aether.block_stats(k, 32)
    with pytest.raises(ValueError, match=r"stats were built with block_size 32 but block_size is 64"):
        aether.sparse_attention(q, k, v, stats=stats, block_size=64)


def test_stats_for_another_cache(case):
    q, k, v, seq_lens = case
    other = aether.block_stats(torch.randn(2, 2, 96, 128), 32)
    with pytest.raises(ValueError, match=r"stats were built for another cache"):
        aether.sparse_attention(q, k, v, stats=other)


def test_stale_stats(case):
    q, k, v, _ = case
    stats = aether.block_stats(k, 16, seq_lens=torch.tensor([50, 60]))
    with pytest.raises(ValueError, match=r"stats were computed for other sequence lengths"):
        aether.sparse_attention(q, k, v, stats=stats, seq_lens=torch.tensor([51, 60]))
    with pytest.raises(ValueError, match=r"must not shrink"):
        stats.update(k, torch.tensor([40, 60]))


def test_bad_block_table(case):
    q, k, v, _ = case
    pages = torch.randn(10, 16, 2, 64)
    table = torch.arange(12, dtype=torch.int32).view(2, 6)
    with pytest.raises(ValueError, match=r"block_table holds page ids in \[0, 11\] but k has 10 pages"):
        aether.sparse_attention(q, pages, pages, block_table=table, block_size=16)
    with pytest.raises(TypeError, match=r"block_table must be int32"):
        aether.sparse_attention(q, pages, pages, block_table=table.long(), block_size=16)
    with pytest.raises(ValueError, match=r"page_size 16 .* block_size is 32"):
        aether.sparse_attention(q, pages, pages, block_table=table % 10, block_size=32)


def test_block_stats_errors():
    k = torch.randn(2, 2, 40, 64)
    with pytest.raises(ValueError, match=r"block_size must be a power of two"):
        aether.block_stats(k, 100)
    with pytest.raises(ValueError, match=r"head_dim must be a multiple of 8"):
        aether.block_stats(torch.randn(2, 2, 40, 12), 16)
    with pytest.raises(TypeError, match=r"k must be float32, float16 or bfloat16"):
        aether.block_stats(k.double(), 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_rejected_on_cuda(case):
    q, k, v, _ = case
    with pytest.raises(TypeError, match=r"float16 or bfloat16 on CUDA, got float32"):
        aether.sparse_attention(q.cuda(), k.cuda(), v.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices(case):
    q, k, v, _ = case
    with pytest.raises(ValueError, match=r"same device"):
        aether.sparse_attention(q.cuda(), k, v)
    with pytest.raises(ValueError, match=r"seq_lens is on cpu but the cache is on cuda"):
        aether.sparse_attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), seq_lens=torch.tensor([1, 2]))


def test_ops_reject_out_of_contract_input_without_crashing():
    """The raw operators check too (a caller bypassing the Python API must not crash): value
    problems raise RuntimeError, type problems TypeError, each naming the argument."""
    q = torch.randn(2, 4, 64)
    k = torch.randn(2, 2, 32, 64)
    lens = torch.tensor([32, 32], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"seq_lens must have shape \[2\]"):
        torch.ops.aether.sparse_decode(q, k, k, lens[:1], 16, 0.1)
    with pytest.raises(TypeError, match=r"seq_lens must be int32"):
        torch.ops.aether.sparse_decode(q, k, k, lens.long(), 16, 0.1)
    with pytest.raises(RuntimeError, match=r"block_size must be a power of two"):
        torch.ops.aether.block_stats(k, lens, 24, 2)
    with pytest.raises(RuntimeError, match=r"scale must be > 0"):
        torch.ops.aether.sparse_decode(q, k, k, lens, 16, -1.0)
    stats = torch.ops.aether.block_stats(k, lens, 16, 2)
    with pytest.raises(RuntimeError, match=r"score must be one of"):
        torch.ops.aether.radar_select(q, *stats, lens, 16, 0.1, "x", "topk", 1, 0.0, 1e-3, 0.9, 1, 0, 1, 1)
    short = torch.zeros(2, 2, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"rows must cover every block"):
        torch.ops.aether.sparse_decode(q, k, k, lens, 16, 0.1, short, torch.ones(2, 2, dtype=torch.int32))
