"""The qcodes channel pool: channel-major key codes stored for part of the channels only (the build,
appends, the per-step channel choice among the pool, the scores, sparse_attention and the cache),
CPU and CUDA operators against aether.reference on fresh random inputs, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from aether import reference as ref
from aether.refine import pool_slots
from conftest import DEVICES, make_case

pytestmark = pytest.mark.skipif(not aether.extension_available(), reason="aether._C is not built")


def _random_pool(batch, kv_heads, head_dim, stored, seed, device):
    """Distinct random channels per row, ascending, and their slot map."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.stack([torch.stack([torch.randperm(head_dim, generator=g)[:stored].sort().values
                                     for _ in range(kv_heads)]) for _ in range(batch)]).to(torch.int32)
    return pool.to(device), pool_slots(pool, head_dim).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_size,per,head_dim,stored", [(16, 8, 64, 32), (32, 2, 128, 17), (64, 1, 64, 64),
                                                            (128, 1, 256, 1), (16, 1, 128, 100)])
def test_pool_codes_match_reference(device, bits, block_size, per, head_dim, stored, poison_empty):
    """Each stored channel's run lands at its slot, bit for bit the full build's run; ranges cover
    every channel; a slot no channel names stays zero."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, lens = make_case(3, 4, 2, 333, head_dim, dtype, device, seed=block_size + bits + stored,
                              lens=[333, 1, 0])
    num_blocks = (math.ceil(333 / (block_size * per)) + 1) * per  # one empty group past the end
    pool, slots = _random_pool(3, 2, head_dim, stored, seed=stored, device=device)
    # row (0, 1) keeps its last pooled channel out (slot -1, and a slot beyond S): that slot stays 0
    slots = slots.clone()
    dropped = int(pool[0, 1, -1])
    slots[0, 1, dropped] = -1 if stored % 2 else stored + 3
    codes, ranges = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits, True, slots, stored)
    assert codes.shape == (3, 2, num_blocks // per, stored, block_size * per * bits // 8)
    rc, rr = ref.key_codes(k.cpu(), bits, block_size, lens.cpu(), num_blocks, blocks_per_group=per,
                           channel_major=True, channel_slots=slots.cpu(), stored_channels=stored)
    assert torch.equal(ranges.cpu().view(torch.int16), rr.view(torch.int16))
    assert torch.equal(codes.cpu(), rc)
    full, full_ranges = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits, True)
    assert torch.equal(full_ranges.view(torch.int16), ranges.view(torch.int16))
    for b in range(3):
        for h in range(2):
            for i, d in enumerate(pool[b, h].tolist()):
                want = torch.zeros_like(full[b, h, :, d]) if (b, h, d) == (0, 1, dropped) else full[b, h, :, d]
                assert torch.equal(codes[b, h, :, i], want), (b, h, i, d)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_update_equals_full_build(device):
    """Appends rebuild the last group of the pooled channels only; the result equals a full build with
    the same slots, and the pool stays the one chosen at the first build."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, _ = make_case(2, 2, 2, 300, 64, dtype, device, seed=3, lens=[300, 300])
    lens = torch.tensor([37, 5], dtype=torch.int32, device=device)
    codes = aether.key_codes(k[:, :, :40], 16, bits=4, seq_lens=lens, layout="channel", channel_pool=0.5)
    pool = codes.pool.clone()
    assert codes.codes.shape[3] == 32 and pool.shape == (2, 2, 32)
    for step in (1, 30, 64, 100):
        lens = (lens + step).clamp(max=300)
        codes.update(k, lens)
        nb = math.ceil(300 / 128) * 8
        full, ranges = torch.ops.aether.key_codes(k, lens, 16, nb, None, 8, 4, True, codes.channel_slots, 32)
        groups = full.shape[2]
        assert torch.equal(codes.codes[:, :, :groups], full)
        assert torch.equal(codes.ranges[:, :, :groups], ranges)
        assert torch.equal(codes.pool, pool)


@pytest.mark.parametrize("device", DEVICES)
def test_key_codes_channel_pool_picks_the_widest_channels(device):
    """channel_pool keeps, per (b, KV head), the channels with the largest sum over groups of
    (hi - lo)^2, ties to the lower channel: the reference's channel choice with a query of ones."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, lens = make_case(2, 4, 2, 900, 128, dtype, device, seed=5, lens=[900, 300])
    k = k.clone()
    k[..., 100:] = 0.25  # constant channels: width 0, tied; the lowest of them fill the pool's end
    k[1, 0, :, 7] *= 30.0  # a wide channel must be in row (1, 0)'s pool
    codes = aether.key_codes(k, 16, bits=4, seq_lens=lens, layout="channel", channel_pool=104)
    ones = torch.ones(2, 2, 128)
    want = ref.code_channels(ones, codes.ranges.cpu(), lens.cpu(), 128, 104)
    assert torch.equal(codes.pool.cpu(), want)
    assert 7 in codes.pool[1, 0].tolist()
    assert codes.pool[0, 0, -4:].tolist() == [100, 101, 102, 103]
    slots = codes.channel_slots.cpu()
    for b in range(2):
        for h in range(2):
            row = codes.pool[b, h].cpu().tolist()
            assert row == sorted(set(row))
            assert slots[b, h, row].tolist() == list(range(104))
            assert int((slots[b, h] >= 0).sum()) == 104
    assert aether.key_codes(k, 16, layout="channel", channel_pool=0.25).pool.shape == (2, 2, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,head_dim,stored,m", [(1, 64, 32, 8), (4, 128, 64, 16), (3, 256, 40, 40),
                                                     (2, 64, 10, 16)])
def test_code_channels_choose_among_the_pool(device, group, head_dim, stored, m, poison_empty):
    """Only stored channels are chosen (the reference's order and ties); with fewer of them than m
    (the last case, and a row whose pool lost channels) the list ends with -1."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(3, 2 * group, 2, 700, head_dim, dtype, device, seed=group + m, lens=[700, 129, 0])
    kc = aether.key_codes(k, 16, seq_lens=lens, layout="channel")
    _, slots = _random_pool(3, 2, head_dim, stored, seed=m, device=device)
    slots = slots.clone()
    slots[1, 0, slots[1, 0] >= stored // 2] = -1  # row (1, 0): half its pool not stored any more
    got = torch.ops.aether.code_channels(q, kc.ranges, lens, 16, 8, m, slots, stored)
    want = ref.code_channels(q.cpu(), kc.ranges.cpu(), lens.cpu(), 128, m, slots.cpu(), stored)
    assert got.shape == (3, 2, m)
    assert torch.equal(got.cpu(), want)
    in_pool = torch.gather(slots.cpu() >= 0, 2, got.cpu().clamp(min=0).long())
    assert bool(in_pool[got.cpu() >= 0].all())
    assert int((got[1, 0] >= 0).sum()) == min(m, stored // 2)
    assert int((got[0, 1] >= 0).sum()) == min(m, stored)
    # without the pool the free choice differs (the pool is really used)
    assert not torch.equal(got, torch.ops.aether.code_channels(q, kc.ranges, lens, 16, 8, m))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bs,per,group,head_dim,stored,m", [(16, 8, 4, 64, 32, 8), (32, 2, 3, 128, 64, 16),
                                                            (16, 4, 8, 256, 128, 32), (64, 1, 1, 64, 5, 5)])
def test_channel_scores_with_a_pool(device, bits, bs, per, group, head_dim, stored, m, poison_empty):
    """Scores from pooled codes: the reference's, and exactly the full codes' scores for the same
    channels; a listed channel the pool does not store is scored at its mid-range (ignored)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(3, 2 * group, 2, 517, head_dim, dtype, device, seed=bs + bits + stored,
                              lens=[517, 141, 0])
    pool, slots = _random_pool(3, 2, head_dim, stored, seed=bits + m, device=device)
    nb = math.ceil(517 / (bs * per)) * per
    codes, ranges = torch.ops.aether.key_codes(k, lens, bs, nb, None, per, bits, True, slots, stored)
    full, _ = torch.ops.aether.key_codes(k, lens, bs, nb, None, per, bits, True)
    channels = torch.ops.aether.code_channels(q, ranges, lens, bs, per, m, slots, stored)
    scale = 0.7 / math.sqrt(head_dim)
    got = torch.ops.aether.channel_scores(q, codes, ranges, lens, channels, bs, scale, per, bits, slots)
    same = torch.ops.aether.channel_scores(q, full, ranges, lens, channels, bs, scale, per, bits)
    assert torch.equal(got, same)
    want = ref.channel_head_scores(q.cpu(), codes.cpu(), ranges.cpu(), bits, lens.cpu(), bs, channels.cpu(), scale,
                                   slots.cpu())
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got.cpu()))
    torch.testing.assert_close(got.cpu()[finite], want[finite], atol=2e-4, rtol=2e-5)
    # a channel outside the pool listed: ignored, as if it were not listed
    outside = int(torch.nonzero(slots[0, 0] < 0)[0]) if stored < head_dim else None
    if outside is not None:
        listed = channels.clone()
        listed[0, 0, 0] = outside
        dropped = channels.clone()
        dropped[0, 0, 0] = -1
        a = torch.ops.aether.channel_scores(q, codes, ranges, lens, listed, bs, scale, per, bits, slots)
        b = torch.ops.aether.channel_scores(q, codes, ranges, lens, dropped, bs, scale, per, bits, slots)
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attention_with_a_pool_end_to_end(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(2, 8, 2, 2000, 64, dtype, device, seed=22, lens=[2000, 1405])
    codes = aether.key_codes(k, 16, bits=4, seq_lens=lens, layout="channel", channel_pool=0.5)
    out, sel = aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=8, seq_lens=lens,
                                       budget=0.2, return_selection=True)
    _, _, rsel, rcnt = ref.sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), block_size=16, score="qcodes", budget_fraction=0.2, seq_lens=lens.cpu(),
        group_agg="sum", qcodes=ref.QcodesRef(8, 4, 8, codes.codes.cpu(), codes.ranges.cpu(),
                                              codes.channel_slots.cpu()))
    assert torch.equal(sel.counts.cpu(), rcnt)
    agree = float((sel.indices.cpu() == rsel[..., :sel.indices.shape[-1]]).float().mean())
    assert agree > (0.999 if device == "cpu" else 0.95)
    want, _ = ref.sparse_decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(), 16,
                                sel.indices.cpu(), sel.counts.cpu())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="channel pool"):
        aether.sparse_attention(q, k, v, score="qcodes", codes=codes, code_channels=33, seq_lens=lens)


def test_cache_with_a_pool_equals_the_direct_call_and_the_reference_path(monkeypatch):
    import aether.cache as cache_mod
    q, k, v, _ = make_case(1, 8, 2, 700, 64, torch.float32, "cpu", seed=4, lens=[700])
    options = cache_mod.SparseOptions(score="qcodes", block_size=16, budget=0.2, code_pool=0.5)
    cache = cache_mod.AetherKVCache(options)
    cache.append(k[:, :, :650], v[:, :, :650])
    cache.attend(q)
    for t in range(650, 700):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    out = cache.attend(q)
    kept = cache.key_codes()[0]
    first = aether.key_codes(k[:, :, :650], 16, bits=4, layout="channel", channel_pool=0.5)
    assert torch.equal(kept.pool, first.pool)  # chosen at the first build, kept through the appends
    codes = aether.key_codes(k, 16, bits=4, layout="channel")  # the full store, same channels
    want, sel = aether.sparse_attention(q, k, v, score="qcodes", codes=kept, code_channels=8, budget=0.2,
                                        return_selection=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    monkeypatch.setattr(cache_mod, "_use_extension", lambda t: False)
    ref_codes = cache_mod.build_key_codes(k[:, :, :650], 16, 4, "channel", 0.5)
    assert torch.equal(ref_codes.pool, first.pool)
    ref_codes.update(k)
    assert torch.equal(ref_codes.codes[:, :, :kept.codes.shape[2]], kept.codes[:, :, :ref_codes.codes.shape[2]])
    ref_out, ref_sel = cache_mod.sparse_decode_step(q, k, v, options, codes=ref_codes)
    assert torch.equal(ref_sel, sel.indices)
    torch.testing.assert_close(ref_out, want, atol=1e-5, rtol=1e-5)
    assert codes.codes.shape[3] == 2 * kept.codes.shape[3]


def test_pool_errors():
    q, k, v, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    import aether.cache as cache_mod
    with pytest.raises(ValueError, match="layout='channel'"):
        aether.key_codes(k, 16, channel_pool=0.5)
    for bad, err in ((0, ValueError), (65, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError),
                     ("8", TypeError)):
        with pytest.raises(err, match="channel_pool"):
            aether.key_codes(k, 16, layout="channel", channel_pool=bad)
    for bad in (0.0, 1.5, 1, True):
        with pytest.raises(ValueError, match="code_pool"):
            cache_mod.SparseOptions(score="qcodes", code_pool=bad)
    with pytest.raises(ValueError, match="qcodes option"):
        cache_mod.SparseOptions(score="tight", code_pool=0.5)
    with pytest.raises(ValueError, match="must not exceed code_pool"):
        cache_mod.SparseOptions(score="qcodes", code_pool=0.25, code_channels=0.5)
    with pytest.raises(ValueError, match="by default"):  # 2-bit codes read a quarter of the channels by default
        cache_mod.SparseOptions(score="qcodes", code_pool=0.2, code_bits=2)
    cache_mod.SparseOptions(score="qcodes", code_pool=0.125)  # 4-bit codes read an eighth by default
    pooled = aether.key_codes(k, 16, bits=4, layout="channel", channel_pool=16)
    slots = pooled.channel_slots
    # op-level errors name the argument
    with pytest.raises(RuntimeError, match="channel-major"):
        torch.ops.aether.key_codes(k, lens, 16, 16, None, 8, 4, False, slots, 16)
    with pytest.raises(RuntimeError, match="stored_channels"):
        torch.ops.aether.key_codes(k, lens, 16, 16, None, 8, 4, True, slots, 65)
    with pytest.raises(TypeError, match="channel_slots must be int32"):
        torch.ops.aether.key_codes(k, lens, 16, 16, None, 8, 4, True, slots.long(), 16)
    with pytest.raises(RuntimeError, match="channel_slots must be contiguous"):
        torch.ops.aether.code_channels(q, pooled.ranges, lens, 16, 8, 4, slots[:, :1], 16)
    with pytest.raises(RuntimeError, match="1 to head_dim"):
        torch.ops.aether.code_channels(q, pooled.ranges, lens, 16, 8, 4, slots, 0)
    channels = torch.ops.aether.code_channels(q, pooled.ranges, lens, 16, 8, 4, slots, 16)
    with pytest.raises(RuntimeError, match="channel_slots must be contiguous"):
        torch.ops.aether.channel_scores(q, pooled.codes, pooled.ranges, lens, channels, 16, 0.1, 8, 4,
                                        slots.transpose(1, 2).contiguous())
    with pytest.raises(RuntimeError, match="channel-major"):
        torch.ops.aether.key_codes_update(k, lens, torch.zeros(1, dtype=torch.int32), 16, None, pooled.codes,
                                          pooled.ranges, 8, 4, False, slots)
    # an offset view: the CUDA kernels write runs a word at a time and read them 16 bytes at a time
    buffer = torch.zeros(pooled.codes.numel() + 1, dtype=torch.uint8)
    shifted = buffer[1:].view(pooled.codes.shape)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        torch.ops.aether.key_codes_update(k, lens, torch.zeros(1, dtype=torch.int32), 16, None, shifted,
                                          pooled.ranges, 8, 4, True, slots)


def test_pool_fake_kernels_trace():
    q, k, _, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    pooled = aether.key_codes(k, 32, layout="channel", channel_pool=0.5)
    slots = pooled.channel_slots
    torch.library.opcheck(torch.ops.aether.key_codes.default, (k, lens, 32, 8, None, 4, 2, True, slots, 32))
    torch.library.opcheck(torch.ops.aether.code_channels.default, (q, pooled.ranges, lens, 32, 4, 16, slots, 32))
    channels = torch.ops.aether.code_channels(q, pooled.ranges, lens, 32, 4, 16, slots, 32)
    torch.library.opcheck(torch.ops.aether.channel_scores.default,
                          (q, pooled.codes, pooled.ranges, lens, channels, 32, 0.125, 4, 2, slots))


def test_pool_eval_entries():
    """`python -m aether.eval --code-pool P` names and builds pooled qcodes configs only."""
    from aether.eval import Config, EvalSettings, check_settings, configs_for
    settings = EvalSettings(scores=("qcodes", "tight"), budgets=(0.135,), block_sizes=(16,), code_pool=0.5)
    configs = configs_for(settings)
    names = [c.name for c in configs]
    assert "qcodes bs16 ch0.125q4 pool0.5 topk 0.135" in names
    assert all(c.code_pool is None for c in configs if c.score != "qcodes")
    assert Config("qcodes", 0.1, 16).name == "qcodes bs16 ch0.125q4 topk 0.1"  # no pool: the old name
    for bad in (0.1, 1.5, 1):  # below the channels read, above 1, not a fraction
        with pytest.raises(ValueError, match="code_pool"):
            check_settings(EvalSettings(scores=("qcodes",), budgets=(0.135,), block_sizes=(16,), code_pool=bad))
    check_settings(settings)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_on_a_paged_cache_equals_contiguous(device):
    """A paged cache (shuffled pages and a block table) gives the same pool, codes and ranges."""
    from test_kernels import _to_paged
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, v, lens = make_case(2, 4, 2, 300, 64, dtype, device, seed=9, lens=[300, 170])
    kp, _, table = _to_paged(k, v, 16, seed=2)
    flat = aether.key_codes(k, 16, bits=4, seq_lens=lens, layout="channel", channel_pool=24)
    paged = aether.key_codes(kp, 16, bits=4, seq_lens=lens, block_table=table, layout="channel", channel_pool=24)
    assert torch.equal(flat.pool, paged.pool)
    groups = flat.codes.shape[2]
    assert torch.equal(paged.codes[:, :, :groups], flat.codes)
    assert torch.equal(paged.ranges[:, :, :groups].view(torch.int16), flat.ranges.view(torch.int16))
