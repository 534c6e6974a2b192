"""The qcodes score: channel-major key codes (build, append; paged in test_refine.py), the channel choice, every
block's score from the chosen channels, selection from given scores, sparse_attention(score=
"qcodes") and the cache, CPU and CUDA operators against aether.reference on fresh random inputs,
and the errors."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from aether import reference as ref
from conftest import DEVICES, make_case

pytestmark = pytest.mark.skipif(not aether.extension_available(), reason="aether._C is not built")


def _dtypes(device):
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_size,per,head_dim", [(16, 8, 64), (32, 2, 128), (64, 1, 64), (128, 1, 256),
                                                     (16, 1, 128), (32, 4, 64)])
def test_channel_major_codes_match_reference(device, bits, block_size, per, head_dim, poison_empty):
    for dtype in _dtypes(device):
        _, k, _, lens = make_case(3, 4, 2, 333, head_dim, dtype, device, seed=block_size + bits, lens=[333, 1, 0])
        num_blocks = (math.ceil(333 / (block_size * per)) + 1) * per  # one empty group past the end
        codes, ranges = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits, True)
        gt = block_size * per
        assert codes.shape == (3, 2, num_blocks // per, head_dim, gt * bits // 8)
        rc, rr = ref.key_codes(k.cpu(), bits, block_size, lens.cpu(), num_blocks, blocks_per_group=per,
                               channel_major=True)
        assert torch.equal(ranges.cpu().view(torch.int16), rr.view(torch.int16))
        assert torch.equal(codes.cpu(), rc)
        # the same codes as the token-major layout, only moved: unpack both and compare
        tc, _ = ref.key_codes(k.cpu(), bits, block_size, lens.cpu(), num_blocks, blocks_per_group=per)
        shifts = torch.arange(8 // bits, dtype=torch.int32) * bits
        levels = (1 << bits) - 1
        by_channel = ((rc.to(torch.int32)[..., None] >> shifts) & levels).flatten(-2)  # [B, H, NG, D, gt]
        by_token = ((tc.to(torch.int32)[..., None] >> shifts) & levels).flatten(-2)    # [B, H, NB, bs, D]
        by_token = by_token.reshape(3, 2, num_blocks // per, gt, head_dim)
        assert torch.equal(by_channel.transpose(3, 4), by_token)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_major_update_equals_full_build(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, _ = make_case(2, 2, 2, 300, 64, dtype, device, seed=3, lens=[300, 300])
    lens = torch.tensor([37, 5], dtype=torch.int32, device=device)
    codes = aether.key_codes(k[:, :, :40], 16, seq_lens=lens, layout="channel")
    for step in (1, 30, 64, 100):
        lens = (lens + step).clamp(max=300)
        codes.update(k, lens)
        full = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
        assert full.num_blocks == full.codes.shape[2] * 8
        groups = full.codes.shape[2]
        assert torch.equal(codes.codes[:, :, :groups], full.codes)
        assert torch.equal(codes.ranges[:, :, :groups], full.ranges)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,m", [(1, 64, 1), (3, 64, 16), (4, 128, 32), (8, 256, 200), (2, 64, 64)])
def test_code_channels_match_reference(device, group, head_dim, m, poison_empty):
    for dtype in _dtypes(device):
        q, k, _, lens = make_case(3, 2 * group, 2, 700, head_dim, dtype, device, seed=group + m, lens=[700, 129, 0])
        kc = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
        # garbage in the ranges past each row's valid groups must not count
        ranges = kc.ranges.clone()
        ranges[1, :, 2:] = 1e4
        got = torch.ops.aether.code_channels(q, ranges, lens, 16, 8, m)
        want = ref.code_channels(q.cpu(), ranges.cpu(), lens.cpu(), 128, m)
        assert got.shape == (3, 2, m) and got.dtype == torch.int32
        assert torch.equal(got.cpu(), want)
        assert torch.equal(got[2].cpu(), torch.arange(m, dtype=torch.int32).expand(2, m))  # empty row: w = 0
        assert bool((got[:, :, 1:] > got[:, :, :-1]).all()), "ascending and distinct"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_code_channels_long_rows_match_reference(device, head_dim, poison_empty):
    """Rows of 313 and 184 groups (several load batches per thread slice of the CUDA kernel, the
    last one partial): exactly the reference's channels."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(2, 8, 2, 40000, head_dim, dtype, device, seed=head_dim, lens=[40000, 23456])
    kc = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
    for m in (1, 16, head_dim // 2):
        got = torch.ops.aether.code_channels(q, kc.ranges, lens, 16, 8, m)
        want = ref.code_channels(q.cpu(), kc.ranges.cpu(), lens.cpu(), 128, m)
        assert torch.equal(got.cpu(), want), m


@pytest.mark.parametrize("device", DEVICES)
def test_code_channels_prefers_heavy_channels_and_breaks_ties_low(device):
    """A channel with a large q^2 x range^2 wins; constant channels (range 0) tie at 0 and the lower
    index goes first."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(1, 2, 1, 256, 64, dtype, device, seed=1, lens=[256])
    k = k.clone()
    k[..., 10:] = 0.5  # channels 10.. constant: zero range
    k[..., 3] *= 20.0
    kc = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
    got = torch.ops.aether.code_channels(q, kc.ranges, lens, 16, 8, 12).cpu()[0, 0].tolist()
    assert 3 in got
    assert got[-2:] == [10, 11]  # 10 varying channels, then the two lowest constant ones


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bs,per,group,head_dim,m", [(16, 8, 4, 64, 16), (32, 2, 3, 128, 32), (64, 1, 1, 64, 5),
                                                     (16, 4, 8, 256, 64), (128, 1, 2, 64, 64), (16, 1, 2, 128, 1)])
@pytest.mark.parametrize("spread", [0.7, 25.0])
def test_channel_scores_match_reference(device, bits, bs, per, group, head_dim, m, spread, poison_empty):
    """spread 25: logits ~100 log2 units apart inside a group, so that some blocks lie far below
    the group's max (the CUDA kernel then takes its per-m-tile log-sum-exp instead of the group's
    max as the reference: both must agree with the reference). The CUDA weights carry ~16
    significant bits (a bf16 and its bf16 residual), so the absolute tolerance grows with the
    logits' scale."""
    for dtype in _dtypes(device):
        seq = 517
        q, k, _, lens = make_case(3, 2 * group, 2, seq, head_dim, dtype, device, seed=bs + group + bits,
                                  lens=[seq, 141, 0])
        kc = aether.key_codes(k, bs, bits=bits, blocks_per_group=per, seq_lens=lens, layout="channel")
        channels = torch.ops.aether.code_channels(q, kc.ranges, lens, bs, per, m)
        scale = spread / math.sqrt(head_dim)
        got = torch.ops.aether.channel_scores(q, kc.codes, kc.ranges, lens, channels, bs, scale, per, bits)
        want = ref.channel_head_scores(q.cpu(), kc.codes.cpu(), kc.ranges.cpu(), bits, lens.cpu(), bs,
                                       channels.cpu(), scale)
        assert got.shape == want.shape == (3, 2 * group, kc.num_blocks)
        got = got.cpu()
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), "a block past the end was scored (or one missing)"
        assert int(finite.sum()) == 2 * group * (math.ceil(seq / bs) + math.ceil(141 / bs))
        assert bool(torch.isneginf(got[~finite]).all())
        torch.testing.assert_close(got[finite], want[finite], atol=2e-4 * max(1.0, spread / 0.7), rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_scores_with_every_channel_equal_the_full_codes(device):
    """Listing every channel (in any order, with duplicates and out-of-range entries, which are
    ignored) scores every block exactly as two-stage selection's refine_scores scores it from the
    token-major codes: an independent check of the layout and of the dequantisation."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(2, 8, 2, 400, 64, dtype, device, seed=7, lens=[400, 213])
    cm = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
    tm = aether.key_codes(k, 16, seq_lens=lens)
    every = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    channels = every[None, None].expand(2, 2, -1).contiguous().to(device)
    scale = 1 / 8
    got = torch.ops.aether.channel_scores(q, cm.codes, cm.ranges, lens, channels, 16, scale, 8, 2)
    nb = tm.num_blocks
    cand = torch.arange(nb, dtype=torch.int32, device=device).expand(2, 2, nb).contiguous()
    count = torch.full((2, 2), nb, dtype=torch.int32, device=device)
    want = torch.ops.aether.refine_scores(q, tm.codes, tm.ranges, lens, cand, count, 16, scale, 8, 2)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], atol=2e-4, rtol=2e-5)
    # a list with duplicates and out-of-range ids (ignored): the op agrees with the reference
    noisy = torch.cat([every[:56], every[:5], torch.tensor([-1, 64, 999], dtype=torch.int32)])
    noisy = noisy[None, None].expand(2, 2, -1).contiguous().to(device)
    got = torch.ops.aether.channel_scores(q, cm.codes, cm.ranges, lens, noisy, 16, scale, 8, 2).cpu()
    want = ref.channel_head_scores(q.cpu(), cm.codes.cpu(), cm.ranges.cpu(), 2, lens.cpu(), 16, noisy.cpu(), scale)
    torch.testing.assert_close(got[finite.cpu()], want[finite.cpu()], atol=2e-4, rtol=2e-5)
    assert torch.equal(torch.isfinite(got), finite.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy,budget", [("topk", 0.15), ("topk", 7), ("adaptive", None)])
def test_select_blocks_equals_radar_select_given_the_scores(device, policy, budget):
    q, k, _, lens = make_case(2, 8, 2, 900, 64, torch.bfloat16 if device == "cuda" else torch.float32, device,
                              seed=4, lens=[900, 333])
    g = torch.Generator().manual_seed(2)
    nb = math.ceil(900 / 16)
    scores = (torch.randn(2, 8, nb, generator=g) * 3).to(device)
    scores[1, :, math.ceil(333 / 16):] = -math.inf
    blocks, fraction = ((budget, 0.0) if isinstance(budget, int) else (0, budget or 0.25))
    for agg in ("sum", "max"):
        sel, cnt = torch.ops.aether.select_blocks(q, scores, lens, 2, 16, policy, blocks, fraction, 0.9, 1, 0, 1, 1,
                                                  agg)
        mlo = torch.full((2, 8), -math.inf)
        rsel, rcnt = ref.select_blocks(scores.cpu(), mlo, lens.cpu(), 16, 2, policy=policy, budget_blocks=blocks,
                                       budget_fraction=fraction, mass=0.9, min_blocks=1, max_blocks=0,
                                       sink_blocks=1, recent_blocks=1, group_agg=agg)
        assert torch.equal(cnt.cpu(), rcnt)
        assert torch.equal(sel.cpu(), rsel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [0.0, 800.0, -900.0])
def test_select_blocks_sum_far_scores_select_as_reference(device, shift):
    """The sum aggregation with scores moved far from 0: exp(s) overflows (+800) or underflows
    (-900) in double, so the CUDA select cannot take the unshifted exps of its first kernel for those
    rows and computes the shifted ones itself. Batch 0 has every head moved, batch 1 one head of one
    row (its other row takes the unshifted exps), batch 2 none. Exactly the reference's blocks."""
    g = torch.Generator().manual_seed(5)
    batch, kv_heads, group, nb, bs = 3, 2, 4, 700, 16
    lens = torch.tensor([nb * bs, nb * bs - 100, 333], dtype=torch.int32)
    scores = torch.randn(batch, kv_heads * group, nb, generator=g) * 3
    scores[0] += shift
    scores[1, 1] += shift
    for b, n in enumerate(lens.tolist()):
        scores[b, :, math.ceil(n / bs):] = -math.inf
    q = torch.zeros(batch, kv_heads * group, 64, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    mlo = torch.full((batch, kv_heads * group), -math.inf)
    for blocks, fraction in [(0, 0.135), (7, 0.0)]:
        sel, cnt = torch.ops.aether.select_blocks(q.to(device), scores.to(device), lens.to(device), kv_heads, bs,
                                                  "topk", blocks, fraction, 0.9, 1, 0, 2, 3, "sum")
        rsel, rcnt = ref.select_blocks(scores, mlo, lens, bs, kv_heads, policy="topk", budget_blocks=blocks,
                                       budget_fraction=fraction, sink_blocks=2, recent_blocks=3, group_agg="sum")
        assert torch.equal(cnt.cpu(), rcnt), (blocks, fraction)
        assert torch.equal(sel.cpu(), rsel), (blocks, fraction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,kv_heads,group,nb", [(3, 2, 4, 3001), (2, 1, 1, 9000), (2, 3, 6, 1100),
                                                     (1, 4, 8, 2000), (40, 8, 4, 300), (20, 1, 1, 5000),
                                                     (20, 1, 2, 3000), (9, 2, 4, 2500), (17, 1, 8, 1000)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_long_rows_select_as_reference(device, batch, kv_heads, group, nb, ties):
    """topk over rows long enough to be split over a cluster of CTAs (CUDA on an H100 / H200: 8 CTAs
    per row for up to 16 rows of >= 1024 blocks, else one CTA per row, as in the last case), with
    odd lengths, a short row (mostly empty CTAs), an empty one, and (ties) scores on a coarse grid
    so that the boundary key is shared: exactly the reference's blocks, ties to the lower index,
    for both aggregations and several budgets. The cases of more than 16 rows run one CTA per row
    at group sizes 1, 2, 4 and 8, with rows of 300 to 5000 blocks."""
    g = torch.Generator().manual_seed(nb + group)
    bs = 16
    lens_list = [nb * bs - int(x) for x in torch.randint(0, nb * bs // 3, (batch,), generator=g)]
    lens_list[0] = nb * bs
    lens_list[-1] = 0 if batch > 2 else 37
    lens = torch.tensor(lens_list, dtype=torch.int32)
    scores = torch.randn(batch, kv_heads * group, nb, generator=g) * 3
    if ties:
        scores = torch.round(scores * 2) / 2
    for b, n in enumerate(lens_list):
        scores[b, :, math.ceil(n / bs):] = -math.inf
    q = torch.zeros(batch, kv_heads * group, 64, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    mlo = torch.full((batch, kv_heads * group), -math.inf)
    for budget_blocks, fraction in [(0, 0.135), (7, 0.0), (0, 0.97), (1, 0.0)]:
        for agg in ("sum", "max"):
            sel, cnt = torch.ops.aether.select_blocks(q.to(device), scores.to(device), lens.to(device), kv_heads, bs,
                                                      "topk", budget_blocks, fraction, 0.9, 1, 0, 2, 3, agg)
            rsel, rcnt = ref.select_blocks(scores, mlo, lens, bs, kv_heads, policy="topk", budget_blocks=budget_blocks,
                                           budget_fraction=fraction, sink_blocks=2, recent_blocks=3, group_agg=agg)
            assert torch.equal(cnt.cpu(), rcnt), (budget_blocks, fraction, agg)
            assert torch.equal(sel.cpu(), rsel), (budget_blocks, fraction, agg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,bits,channels", [(16, 2, 0.25), (32, 4, 0.5), (64, 2, 3)])
def test_sparse_attention_qcodes_end_to_end(device, bs, bits, channels):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(2, 8, 2, 2000, 64, dtype, device, seed=21, lens=[2000, 1405])
    codes = aether.key_codes(k, bs, bits=bits, seq_lens=lens, layout="channel")
    out, sel = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=channels, seq_lens=lens,
                                       budget=0.2, return_selection=True)
    m = channels if isinstance(channels, int) else round(channels * 64)
    _, _, rsel, rcnt = ref.sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), block_size=bs, score="qcodes", budget_fraction=0.2, seq_lens=lens.cpu(),
        group_agg="sum", qcodes=ref.QcodesRef(m, bits, 128 // bs))
    assert torch.equal(sel.counts.cpu(), rcnt)
    # scores agree to rounding; a near-tie may flip a block (exact on the CPU's float32)
    agree = float((sel.indices.cpu() == rsel[..., :sel.indices.shape[-1]]).float().mean())
    assert agree > (0.999 if device == "cpu" else 0.95)
    want, _ = ref.sparse_decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(), bs,
                                sel.indices.cpu(), sel.counts.cpu())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    # the ranking differs from the statistics' bound: the score is really used
    _, tight = aether.sparse_attention(q, k, v, block_size=bs, score="tight", seq_lens=lens, budget=0.2,
                                       return_selection=True)
    assert not torch.equal(tight.indices, sel.indices)


@pytest.mark.parametrize("bits,channels", [(2, 16), (4, 8)])
def test_qcodes_default_channels_follow_the_bits(bits, channels):
    """code_channels=None reads head_dim / (2 bits) channels: the same code bytes per token."""
    q, k, v, lens = make_case(2, 8, 2, 900, 64, torch.float32, "cpu", seed=3, lens=[900, 517])
    codes = aether.key_codes(k, 16, bits=bits, seq_lens=lens, layout="channel")
    default = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, seq_lens=lens, budget=0.2,
                                      return_selection=True)
    explicit = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=channels, seq_lens=lens,
                                       budget=0.2, return_selection=True)
    other = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=channels * 2, seq_lens=lens,
                                    budget=0.2, return_selection=True)
    assert torch.equal(default[1].indices, explicit[1].indices) and torch.equal(default[0], explicit[0])
    assert not torch.equal(default[0], other[0])


def test_qcodes_errors():
    q, k, v, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    token = aether.key_codes(k, 16)
    chan = aether.key_codes(k, 16, layout="channel")
    with pytest.raises(TypeError, match="layout='channel'"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=token)
    with pytest.raises(TypeError, match="layout='channel'"):
        aether.sparse_attention(q, k, v, score="qcodes")
    with pytest.raises(ValueError, match="only read by score='qcodes'"):
        aether.sparse_attention(q, k, v, score="tight", codes=chan)
    with pytest.raises(ValueError, match="token-major"):
        aether.sparse_attention(q, k, v, score="tight", refine=chan)
    with pytest.raises(ValueError, match="do not combine"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=chan, refine=token)
    with pytest.raises(ValueError, match="upper-bound"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=chan, policy="threshold")
    with pytest.raises(ValueError, match="stats are not read"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=chan, stats=aether.block_stats(k, 16))
    for bad, err in ((0, ValueError), (65, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError),
                     ("8", TypeError)):
        with pytest.raises(err, match="code_channels"):
            aether.sparse_attention(q, k, v, score="qcodes", codes=chan, code_channels=bad)
    with pytest.raises(ValueError, match="layout must be one of"):
        aether.key_codes(k, 16, layout="rows")
    with pytest.raises(ValueError, match="were built for"):
        aether.sparse_attention(q[:, :2], k[:, :1], v[:, :1], score="qcodes", codes=chan)
    # op-level errors name the argument
    channels = torch.ops.aether.code_channels(q, chan.ranges, lens, 16, 8, 16)
    with pytest.raises(RuntimeError, match="num_channels"):
        torch.ops.aether.code_channels(q, chan.ranges, lens, 16, 8, 65)
    with pytest.raises(TypeError, match="channels must be int32"):
        torch.ops.aether.channel_scores(q, chan.codes, chan.ranges, lens, channels.long(), 16, 0.1, 8, 2)
    with pytest.raises(RuntimeError, match="channels must be contiguous"):
        torch.ops.aether.channel_scores(q, chan.codes, chan.ranges, lens, channels[:, :1], 16, 0.1, 8, 2)
    with pytest.raises(RuntimeError, match="key codes must be contiguous"):
        torch.ops.aether.channel_scores(q, token.codes, token.ranges, lens, channels, 16, 0.1, 8, 2)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.aether.channel_scores(q, chan.codes, chan.ranges, lens, channels, 16, -1.0, 8, 2)
    scores = torch.zeros(1, 4, 16)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.aether.select_blocks(q, scores, lens, 2, 16, "threshold", 0, 0.5, 0.9, 1, 0, 1, 1, "sum")
    with pytest.raises(RuntimeError, match="head_scores must be contiguous"):
        torch.ops.aether.select_blocks(q, scores[:, :2], lens, 2, 16, "topk", 0, 0.5, 0.9, 1, 0, 1, 1, "sum")
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        torch.ops.aether.select_blocks(q, scores, lens, 3, 16, "topk", 0, 0.5, 0.9, 1, 0, 1, 1, "sum")


def test_qcodes_fake_kernels_trace():
    q, k, _, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    chan = aether.key_codes(k, 32, layout="channel")
    torch.library.opcheck(torch.ops.aether.key_codes.default, (k, lens, 32, 8, None, 4, 2, True))
    torch.library.opcheck(torch.ops.aether.code_channels.default, (q, chan.ranges, lens, 32, 4, 16))
    channels = torch.ops.aether.code_channels(q, chan.ranges, lens, 32, 4, 16)
    torch.library.opcheck(torch.ops.aether.channel_scores.default,
                          (q, chan.codes, chan.ranges, lens, channels, 32, 0.125, 4, 2))
    scores = torch.randn(1, 4, 8)
    torch.library.opcheck(torch.ops.aether.select_blocks.default,
                          (q, scores, lens, 2, 32, "topk", 0, 0.5, 0.9, 1, 0, 1, 1, "sum"))


def test_cache_qcodes_equals_the_direct_call_and_the_reference_path(monkeypatch):
    """AetherKVCache with score="qcodes": its channel-major codes follow appends, its step equals
    aether.sparse_attention with the same codes, the pure-PyTorch fallback gives the same
    selection, and the read counter adds the chosen channels' runs and every group's ranges."""
    import aether.cache as cache_mod
    q, k, v, _ = make_case(1, 8, 2, 700, 64, torch.float32, "cpu", seed=4, lens=[700])
    options = cache_mod.SparseOptions(score="qcodes", block_size=16, budget=0.2)  # 4-bit codes, 1/8 of the channels
    cache = cache_mod.AetherKVCache(options)
    cache.append(k[:, :, :650], v[:, :, :650])
    cache.attend(q)
    for t in range(650, 700):  # decode steps: the codes' last group is rebuilt each time
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    out = cache.attend(q)
    codes = aether.key_codes(k, 16, bits=4, layout="channel")
    kept = cache.key_codes()[0]
    assert kept.layout == "channel" and kept.bits == 4
    assert torch.equal(kept.codes[:, :, :codes.codes.shape[2]], codes.codes)
    want, sel = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=8, budget=0.2,
                                        return_selection=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    # bytes: 2 steps, 2 rows, per 128-token group 8 channels x 64 bytes (4 bits) + 4 x 64 range bytes,
    # and per row the channel choice's 64 running spreads (8 bytes each)
    reads = cache.reads
    groups = [math.ceil(650 / 128), math.ceil(700 / 128)]
    assert reads.refine_bytes == sum(2 * (n * (8 * 64 + 4 * 64) + 8 * 64) for n in groups)
    frac = reads.fractions(64, "qcodes")
    assert frac["metadata"] == pytest.approx(reads.refine_bytes / (reads.tokens_total * 2 * 64 * 2))
    # the reference fallback (no extension) selects the same blocks
    monkeypatch.setattr(cache_mod, "_use_extension", lambda t: False)
    ref_out, ref_sel = cache_mod.sparse_decode_step(q, k, v, options,
                                                    codes=cache_mod.build_key_codes(k, 16, 4, "channel"))
    assert torch.equal(ref_sel, sel.indices)
    torch.testing.assert_close(ref_out, want, atol=1e-5, rtol=1e-5)


def test_qcodes_options_and_eval_entries():
    import aether.cache as cache_mod
    from aether.eval import Config, EvalSettings, configs_for
    with pytest.raises(ValueError, match="does not combine"):
        cache_mod.SparseOptions(score="qcodes", refine_candidates=0.5)
    for bad in (0.0, 1.5, 1, True):
        with pytest.raises(ValueError, match="code_channels"):
            cache_mod.SparseOptions(score="qcodes", code_channels=bad)
    with pytest.raises(ValueError, match="code_bits"):
        cache_mod.SparseOptions(score="qcodes", code_bits=3)
    with pytest.raises(ValueError, match="upper-bound"):
        cache_mod.SparseOptions(score="qcodes", policy="threshold")
    settings = EvalSettings(scores=("qcodes", "tight"), budgets=(0.135,), block_sizes=(16,),
                            code_channels=(0.25, 0.5), code_bits=2, refines=("none", "0.5:2"))
    names = [c.name for c in configs_for(settings)]
    assert "qcodes bs16 ch0.25q2 topk 0.135" in names and "qcodes bs16 ch0.5q2 topk 0.135" in names
    assert not any("qcodes" in n and "refine" in n for n in names)  # qcodes is one stage
    assert Config("qcodes", 0.1, 16, code_channels=0.5).name == "qcodes bs16 ch0.5q4 topk 0.1"
