"""qcodes with key codes that trail the cache: sparse_attention(score="qcodes") accepts codes built
before the newest tokens were appended when every token they miss lies in a block the call keeps
anyway, scores from the codes' own lengths, and with update_codes=True (on codes_stream on CUDA)
brings them up to date after the scores, so that a decode step needs no append launch before its
scores. CPU and CUDA against the operators and aether.reference on fresh random inputs; errors."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from aether import reference as ref
from conftest import DEVICES, lowp_attention_error_bound, make_case

pytestmark = pytest.mark.skipif(not aether.extension_available(), reason="aether._C is not built")

# last block full (kept as the recent block), partial tails of 13 and of 1 token (the newest alone)
LENS = [2000, 1405, 17, 48]


def _case(device, bs=16, seed=3):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(len(LENS), 8, 2, max(LENS), 64, dtype, device, seed=seed, lens=LENS)
    return q, k, v, lens


def _behind(lens, tokens):
    """Lengths `tokens` short of `lens` (per sequence; never below 0)."""
    return (lens - torch.tensor(tokens, dtype=lens.dtype, device=lens.device)).clamp(min=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("behind,recent,policy,agg", [
    ([1, 1, 1, 1], 1, "topk", "sum"),
    # 20 behind a full 2000-token sequence needs two recent blocks (block 123 and 124); the
    # 17-token one trails by all its tokens: block 0 is a sink, block 1 the partial tail
    ([20, 5, 17, 16], 2, "topk", "sum"),
    ([1, 1, 1, 1], 1, "topk", "max"),
    ([16, 1, 1, 1], 1, "adaptive", None),  # 16 behind at 2000 (a multiple of 16): the recent block
])
def test_codes_behind_select_from_their_own_lengths(device, behind, recent, policy, agg):
    """Codes trailing every sequence by tokens that all lie in forced blocks: the call selects what
    select_blocks selects from channel_scores over the codes' lengths, and its output equals the
    reference decode of that selection."""
    bs, m = 16, 8
    q, k, v, lens = _case(device, bs)
    code_lens = _behind(lens, behind)
    codes = aether.key_codes(k, bs, bits=4, seq_lens=code_lens, layout="channel")
    kw = dict(budget=0.2) if policy == "topk" else dict(mass=0.9, min_blocks=1)
    out, sel = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=m, seq_lens=lens,
                                       policy=policy, group_agg=agg, recent_blocks=recent, return_selection=True,
                                       **kw)
    scores = torch.ops.aether.channel_scores(q, codes.codes, codes.ranges, code_lens, None, bs, 1 / 8, 8, 4, None,
                                             codes.spreads, m)
    mlo = torch.full(scores.shape[:2], -math.inf)
    rkw = (dict(budget_fraction=0.2, group_agg=agg) if policy == "topk"
           else dict(mass=0.9, min_blocks=1, max_blocks=0))
    want_sel, want_cnt = ref.select_blocks(scores.cpu(), mlo, lens.cpu(), bs, 2, policy=policy, sink_blocks=1,
                                           recent_blocks=recent, **rkw)
    assert torch.equal(sel.counts.cpu(), want_cnt)
    assert torch.equal(sel.indices.cpu(), want_sel)
    want_out, _ = ref.sparse_decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(), bs, want_sel,
                                    want_cnt, 1 / 8)
    bound = 2 * lowp_attention_error_bound(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), want_sel, want_cnt, bs, 1 / 8,
                                           want_out) + 1e-5
    assert (out.cpu().double() - want_out).abs().max() <= bound
    # the codes were only read
    assert torch.equal(codes.seq_lens.cpu(), code_lens.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_update_codes_brings_the_codes_up_to_date(device):
    """update_codes=True (on CUDA on a side stream): the same output as without it, and afterwards
    the codes, ranges, running spreads and lengths equal codes built for the call's lengths."""
    bs = 16
    q, k, v, lens = _case(device, bs, seed=8)
    codes = aether.key_codes(k, bs, bits=4, seq_lens=lens - 1, layout="channel")
    plain = aether.key_codes(k, bs, bits=4, seq_lens=lens - 1, layout="channel")
    stream = torch.cuda.Stream() if device == "cuda" else None
    out = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, seq_lens=lens, budget=0.2, update_codes=True,
                                  codes_stream=stream)
    want = aether.sparse_attention(q, k, v, score="qcodes", codes=plain, seq_lens=lens, budget=0.2)
    assert torch.equal(out, want)
    fresh = aether.key_codes(k, bs, bits=4, seq_lens=lens, layout="channel")
    assert torch.equal(codes.seq_lens, fresh.seq_lens)
    assert torch.equal(codes.codes, fresh.codes)
    assert torch.equal(codes.ranges, fresh.ranges)
    assert torch.equal(codes.spreads, fresh.spreads)
    # the next step (one more token where the cache has room) accepts them, one behind again, and
    # leaves them current once more
    lens2 = (lens + 1).clamp(max=k.shape[2])
    aether.sparse_attention(q, k, v, score="qcodes", codes=codes, seq_lens=lens2, budget=0.2, update_codes=True,
                            codes_stream=stream)
    fresh2 = aether.key_codes(k, bs, bits=4, seq_lens=lens2, layout="channel")
    assert torch.equal(codes.codes, fresh2.codes) and torch.equal(codes.ranges, fresh2.ranges)
    assert torch.equal(codes.spreads, fresh2.spreads) and torch.equal(codes.seq_lens, fresh2.seq_lens)


@pytest.mark.parametrize("device", DEVICES)
def test_update_codes_updates_after_the_scores(device):
    """With update_codes=True the scores still come from the trailing codes (the update is enqueued
    after them): the selection equals the one without the update, seed after seed, while codes
    brought up to date first would select differently for some of them (checked, so that the
    comparison can fail)."""
    bs = 16
    stream = torch.cuda.Stream() if device == "cuda" else None
    differs = 0
    for seed in range(12):
        q, k, v, lens = _case(device, bs, seed=100 + seed)
        # the newest token of each sequence is an outlier in channels 2-9, so that codes which
        # include it choose other channels and quantize their group differently (without it,
        # one Gaussian token more rarely changes a bf16 selection)
        for b, n in enumerate(lens.tolist()):
            k[b, :, n - 1, 2:10] = 12.0 * (k[b, :, n - 1, 2:10].sign() + (k[b, :, n - 1, 2:10] == 0).to(k.dtype))
        kw = dict(score="qcodes", seq_lens=lens, budget=0.135, return_selection=True)
        behind = aether.key_codes(k, bs, bits=4, seq_lens=lens - 1, layout="channel")
        _, sel = aether.sparse_attention(q, k, v, codes=behind, update_codes=True, codes_stream=stream, **kw)
        _, want = aether.sparse_attention(q, k, v, codes=aether.key_codes(k, bs, bits=4, seq_lens=lens - 1,
                                                                          layout="channel"), **kw)
        _, current = aether.sparse_attention(q, k, v, codes=aether.key_codes(k, bs, bits=4, seq_lens=lens,
                                                                             layout="channel"), **kw)
        assert torch.equal(sel.indices, want.indices) and torch.equal(sel.counts, want.counts), seed
        differs += int(not torch.equal(current.indices, want.indices))
    assert differs > 0, "trailing and current codes selected alike for every seed: the test cannot tell them apart"


@pytest.mark.parametrize("device", DEVICES)
def test_codes_behind_errors(device):
    bs = 16
    q, k, v, lens = _case(device, bs, seed=9)
    # 20 tokens behind in a 2000-token sequence: block 123 is neither the recent block nor the tail
    codes = aether.key_codes(k, bs, bits=4, seq_lens=lens - torch.tensor([20, 0, 0, 0], dtype=lens.dtype,
                                                                           device=lens.device), layout="channel")
    with pytest.raises(ValueError, match="not kept by sink_blocks / recent_blocks"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=codes, seq_lens=lens)
    longer = aether.key_codes(k, bs, bits=4, seq_lens=lens, layout="channel")
    with pytest.raises(ValueError, match="computed for 1405 tokens of sequence 1 but it holds 1400"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=longer,
                                seq_lens=lens - torch.tensor([0, 5, 0, 0], dtype=lens.dtype, device=lens.device))
    # one behind a full last block (2000 = 125 x 16) with recent_blocks=0: that block is not forced
    one = aether.key_codes(k, bs, bits=4, seq_lens=_behind(lens, [1, 0, 0, 0]), layout="channel")
    with pytest.raises(ValueError, match="block 124 .not kept"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=one, seq_lens=lens, recent_blocks=0)
    aether.sparse_attention(q, k, v, score="qcodes", codes=one, seq_lens=lens, recent_blocks=1)  # kept: accepted
    # the 17-token sequence trailing by all its tokens with no recent block: block 0 is a sink,
    # block 1 the partial tail; without the sink it is refused
    sink = aether.key_codes(k, bs, bits=4, seq_lens=_behind(lens, [0, 0, 17, 0]), layout="channel")
    aether.sparse_attention(q, k, v, score="qcodes", codes=sink, seq_lens=lens, recent_blocks=0)
    with pytest.raises(ValueError, match="block 0 .not kept"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=sink, seq_lens=lens, recent_blocks=0, sink_blocks=0)
    with pytest.raises(ValueError, match="update_codes brings the qcodes score's codes"):
        aether.sparse_attention(q, k, v, score="tight", seq_lens=lens, update_codes=True)
    with pytest.raises(ValueError, match="codes_stream is where update_codes=True"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=longer, seq_lens=lens, codes_stream=object())
    with pytest.raises(TypeError, match="update_codes must be a bool"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=longer, seq_lens=lens, update_codes=1)
    with pytest.raises(TypeError, match="codes_stream must be a torch.cuda.Stream"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=longer, seq_lens=lens, update_codes=True,
                                codes_stream=object())


def test_cache_with_trailing_codes():
    """AetherKVCache with codes_behind=True, token by token across a group boundary (640 = 5 x
    128, where the codes must grow): each attend equals sparse_attention over codes of the tokens
    before the newest (bit for bit), and the codes end current."""
    from aether.cache import AetherKVCache, SparseOptions
    q, k, v, _ = make_case(1, 8, 2, 700, 64, torch.float32, "cpu", seed=4, lens=[700])
    cache = AetherKVCache(SparseOptions(score="qcodes", block_size=16, budget=0.2, codes_behind=True))
    cache.append(k[:, :, :600], v[:, :, :600])
    cache.attend(q)  # the first build, current
    for t in range(600, 700):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        out = cache.attend(q)
        kt, vt = k[:, :, :t + 1], v[:, :, :t + 1]
        before = aether.key_codes(kt, 16, bits=4, seq_lens=torch.tensor([t], dtype=torch.int32), layout="channel")
        want = aether.sparse_attention(q, kt, vt, score="qcodes", codes=before, budget=0.2)
        assert torch.equal(out, want), t
    kept = cache.key_codes()[0]
    fresh = aether.key_codes(k, 16, bits=4, layout="channel")
    assert torch.equal(kept.seq_lens.cpu(), fresh.seq_lens.cpu())
    n = fresh.codes.shape[2]
    assert torch.equal(kept.codes[:, :, :n], fresh.codes) and torch.equal(kept.ranges[:, :, :n], fresh.ranges)


def test_codes_behind_option_errors():
    from aether.cache import SparseOptions
    with pytest.raises(ValueError, match="codes_behind is a qcodes option"):
        SparseOptions(score="tight", codes_behind=True)
    with pytest.raises(TypeError, match="codes_behind must be a bool"):
        SparseOptions(score="qcodes", block_size=16, codes_behind=1)
