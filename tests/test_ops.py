"""Operator registration: opcheck (schemas, fake kernels, autograd registration) and
torch.compile(fullgraph=True) through the public API."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from conftest import DEVICES, make_case


def _sample(device):
    q, k, v, seq_lens = make_case(2, 4, 2, 100, 64, torch.float16, device, seed=1)
    stats = torch.ops.aether.block_stats(k, seq_lens, 16, math.ceil(100 / 16), None)
    return q, k, v, seq_lens, stats


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_block_stats(device):
    q, k, v, seq_lens, stats = _sample(device)
    torch.library.opcheck(torch.ops.aether.block_stats.default, (k, seq_lens, 16, 7, None))
    first = torch.zeros_like(seq_lens)
    tensors = [t.clone() for t in stats]
    torch.library.opcheck(torch.ops.aether.block_stats_update.default, (k, seq_lens, first, 16, None, *tensors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("return_scores", [False, True])
def test_opcheck_radar_select(device, return_scores):
    q, k, v, seq_lens, stats = _sample(device)
    args = (q, *stats, seq_lens, 16, 0.125, "tight", "topk", 3, 0.0, 1e-3, 0.9, 1, 0, 1, 1, return_scores, None, None)
    torch.library.opcheck(torch.ops.aether.radar_select.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sparse_decode(device):
    q, k, v, seq_lens, stats = _sample(device)
    sel, cnt, _, _ = torch.ops.aether.radar_select(q, *stats, seq_lens, 16, 0.125, "tight", "topk", 3, 0.0, 1e-3,
                                                   0.9, 1, 0, 1, 1)
    torch.library.opcheck(torch.ops.aether.sparse_decode.default, (q, k, v, seq_lens, 16, 0.125, sel, cnt, None, 3))
    torch.library.opcheck(torch.ops.aether.sparse_decode.default, (q, k, v, seq_lens, 16, 0.125))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=device)
    n = torch.ops.aether.sparse_decode_workspace_numel(q, k, v, seq_lens, 16, 0.125, sel, cnt, None, 3)
    ws = torch.empty(max(n, 1), device=device)
    torch.library.opcheck(torch.ops.aether.sparse_decode_out.default,
                          (q, k, v, seq_lens, 16, 0.125, sel, cnt, None, 3, out, lse, ws))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, seq_lens, _ = _sample(device)
    stats = aether.block_stats(k, 16, seq_lens=seq_lens)

    def step(q, k, v):
        return aether.sparse_attention(q, k, v, stats=stats, seq_lens=seq_lens, block_size=16, budget=3,
                                       return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(q, k, v)
    got = compiled(q, k, v)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
