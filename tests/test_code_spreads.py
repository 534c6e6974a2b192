"""The running channel spreads of the qcodes score (`code_spreads`, `code_spreads_update`), the channel
choice read from them (`code_channels(..., spreads=)`) and made inside `channel_scores` (no channel
list), against aether.reference and against the two-launch path, CPU and CUDA, on fresh random
inputs; appends equal a build; KeyCodes and sparse_attention use them; the errors."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from aether import reference as ref
from aether.refine import pool_slots
from conftest import DEVICES, make_case

pytestmark = pytest.mark.skipif(not aether.extension_available(), reason="aether._C is not built")


def _random_pool(batch, kv_heads, stored, seed, device, head_dim=128):
    """A channel pool of `stored` random channels per (b, kv head) and its slot map."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.stack([torch.stack([torch.randperm(head_dim, generator=g)[:stored].sort().values
                                     for _ in range(kv_heads)]) for _ in range(batch)]).to(torch.int32)
    return pool_slots(pool, head_dim).to(device), stored


def _built(device, batch, kv_heads, group, head_dim, seq, block_size, per, bits, lens, seed):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(batch, kv_heads * group, kv_heads, seq, head_dim, dtype, device, seed=seed, lens=lens)
    # uneven channel scales, so that the spreads (and the choice) differ clearly between channels
    g = torch.Generator().manual_seed(seed)
    k = k * (0.2 + 3 * torch.rand(head_dim, generator=g)).to(device=device, dtype=dtype)
    num_blocks = (math.ceil(seq / (block_size * per)) + 1) * per  # one group past the end
    codes, ranges = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits, True)
    return q, k, lens, codes, ranges, num_blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,per,head_dim", [(16, 8, 128), (32, 2, 64), (64, 1, 256), (16, 1, 64)])
def test_spreads_match_reference(device, block_size, per, head_dim):
    """Every valid group's running sum of (hi - lo)^2 in float64, zero past the end (lengths 0, 1,
    odd and full)."""
    _, _, lens, _, ranges, _ = _built(device, 4, 2, 2, head_dim, 333, block_size, per, 4, [333, 1, 0, 200], seed=per)
    spreads = torch.ops.aether.code_spreads(ranges, lens, block_size, per)
    assert spreads.dtype == torch.float64 and spreads.shape == (4, 2, ranges.shape[2], head_dim)
    want = ref.code_spreads(ranges.cpu(), lens.cpu(), block_size * per)
    torch.testing.assert_close(spreads.cpu(), want, rtol=1e-15, atol=0)
    assert torch.equal(spreads[2], torch.zeros_like(spreads[2]))  # length 0: nothing valid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_spreads_cuda_equal_cpu_bit_for_bit():
    """Same rounding steps (no fused multiply-add) on both: the same bits."""
    _, _, lens, _, ranges, _ = _built("cuda", 3, 4, 1, 128, 5000, 16, 8, 4, [5000, 4097, 129], seed=5)
    gpu = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    cpu = torch.ops.aether.code_spreads(ranges.cpu(), lens.cpu(), 16, 8)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_spreads_update_equals_build(device):
    """Appends rebuild the groups from each row's previous last block on; earlier groups are read,
    never written, and groups past the new end stay as they were."""
    _, k, _, _ = make_case(2, 4, 2, 700, 64, torch.bfloat16 if device == "cuda" else torch.float32, device,
                           seed=9, lens=[700, 700])
    lens = torch.tensor([100, 0], dtype=torch.int32, device=device)
    num_blocks = math.ceil(700 / 128) * 8
    codes, ranges = torch.ops.aether.key_codes(k, lens, 16, num_blocks, None, 8, 4, True)
    spreads = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    for step in (1, 27, 128, 300, 1):
        first = torch.div(lens, 16, rounding_mode="floor").to(torch.int32)
        new = (lens + step).clamp(max=700).to(torch.int32)
        n_before = (lens.long() + 127) // 128
        poison_from = torch.div(first.long(), 8, rounding_mode="floor")  # the rebuilt groups: poisoned first
        for b in range(2):
            spreads[b, :, int(poison_from[b]):] = float("nan")
        torch.ops.aether.key_codes_update(k, new, first, 16, None, codes, ranges, 8, 4, True)
        torch.ops.aether.code_spreads_update(ranges, new, first, 16, 8, spreads)
        built = torch.ops.aether.code_spreads(ranges, new, 16, 8)
        for b in range(2):
            n = int((new[b] + 127) // 128)
            assert torch.equal(spreads[b, :, :n], built[b, :, :n]), (step, b)
            assert spreads[b, :, n:].isnan().all()  # past the end: not touched
        assert n_before.le((new.long() + 127) // 128).all()
        lens = new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooled", [False, True])
def test_code_channels_from_spreads(device, pooled):
    """The choice read from the spreads equals the one summed from the ranges and the reference's."""
    q, _, lens, _, ranges, _ = _built(device, 3, 2, 4, 128, 900, 16, 8, 4, [900, 17, 0], seed=11)
    slots, stored = None, 0
    if pooled:
        slots, stored = _random_pool(3, 2, 40, 2, device)
    spreads = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    for m in (1, 16, 24, 40, 128 if not pooled else 41):
        summed = torch.ops.aether.code_channels(q, ranges, lens, 16, 8, m, slots, stored)
        read = torch.ops.aether.code_channels(q, ranges, lens, 16, 8, m, slots, stored, spreads)
        want = ref.code_channels(q.cpu(), ranges.cpu(), lens.cpu(), 128, m,
                                 None if slots is None else slots.cpu(), stored)
        assert torch.equal(read, summed), m
        assert torch.equal(read.cpu(), want), m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,block_size,per,head_dim,group,m,pooled",
                         [(4, 16, 8, 128, 4, 16, False), (4, 16, 8, 128, 4, 24, True), (2, 32, 4, 64, 1, 16, False),
                          (4, 64, 2, 256, 8, 32, True), (2, 128, 1, 128, 2, 1, False), (4, 16, 1, 64, 4, 64, False)])
def test_channel_scores_choose_like_code_channels(device, bits, block_size, per, head_dim, group, m, pooled):
    """channel_scores without a list scores exactly as with code_channels' list (same channels, same
    kernel path), and the scores match the reference."""
    q, _, lens, codes_full, ranges, num_blocks = _built(device, 3, 2, group, head_dim, 777, block_size, per, bits,
                                                        [777, 200, 0], seed=bits + m)
    slots, stored, codes = None, 0, codes_full
    if pooled:
        slots, stored = _random_pool(3, 2, m + 5, m, device, head_dim)
        _, k, _, _ = make_case(3, 2 * group, 2, 777, head_dim, torch.bfloat16 if device == "cuda" else torch.float32,
                               device, seed=bits + m, lens=[777, 200, 0])
        gen = torch.Generator().manual_seed(bits + m)
        k = k * (0.2 + 3 * torch.rand(head_dim, generator=gen)).to(device=device, dtype=k.dtype)
        codes, _ = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits, True, slots, stored)
    spreads = torch.ops.aether.code_spreads(ranges, lens, block_size, per)
    channels = torch.ops.aether.code_channels(q, ranges, lens, block_size, per, m, slots, stored)
    listed = torch.ops.aether.channel_scores(q, codes, ranges, lens, channels, block_size, 0.125, per, bits, slots)
    chosen = torch.ops.aether.channel_scores(q, codes, ranges, lens, None, block_size, 0.125, per, bits, slots,
                                             spreads, m)
    assert torch.equal(chosen, listed)
    assert chosen[2].isneginf().all()  # length 0
    want = ref.channel_head_scores(q.cpu(), codes.cpu(), ranges.cpu(), bits, lens.cpu(), block_size, channels.cpu(),
                                   0.125, None if slots is None else slots.cpu())
    torch.testing.assert_close(chosen.cpu(), want, rtol=5e-5, atol=5e-4)  # the MMA path: ~1e-6 relative


@pytest.mark.parametrize("device", DEVICES)
def test_key_codes_keep_spreads_and_sparse_attention_uses_them(device):
    """aether.key_codes(layout="channel") builds the spreads, KeyCodes.update keeps them equal to a
    build, and sparse_attention with them equals the two-launch path (a KeyCodes without spreads)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, _ = make_case(2, 8, 2, 600, 128, dtype, device, seed=21, lens=[600, 600])
    lens = torch.tensor([300, 1], dtype=torch.int32, device=device)
    codes = aether.key_codes(k, 16, bits=4, seq_lens=lens, layout="channel", channel_pool=0.5)
    assert codes.spreads is not None and codes.spreads.shape == (2, 2, codes.ranges.shape[2], 128)
    assert aether.key_codes(k, 16, bits=2).spreads is None  # token layout: not read by anything
    for step in (1, 130, 1, 100):
        lens = (lens + step).clamp(max=600).to(torch.int32)
        codes.update(k, lens)
        n = codes.ranges.shape[2]
        built = torch.ops.aether.code_spreads(codes.ranges, lens, 16, 8)
        for b in range(2):
            valid = int((lens[b] + 127) // 128)
            assert torch.equal(codes.spreads[b, :, :valid], built[b, :, :valid])
        assert codes.spreads.shape[2] == n
        got, sel = aether.sparse_attention(q, k, v, seq_lens=lens, score="qcodes", codes=codes, budget=0.2,
                                           return_selection=True)
        plain = aether.KeyCodes(codes.codes, codes.ranges, codes.bits, codes.block_size, codes.seq_lens,
                                blocks_per_group=codes.blocks_per_group, layout="channel", pool=codes.pool,
                                channel_slots=codes.channel_slots)
        want, want_sel = aether.sparse_attention(q, k, v, seq_lens=lens, score="qcodes", codes=plain, budget=0.2,
                                                 return_selection=True)
        assert torch.equal(sel.indices, want_sel.indices) and torch.equal(sel.counts, want_sel.counts)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_spreads_errors(device):
    q, _, lens, codes, ranges, _ = _built(device, 2, 2, 2, 64, 300, 16, 8, 4, [300, 5], seed=1)
    spreads = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    first = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="spreads must be float64"):
        torch.ops.aether.code_spreads_update(ranges, lens, first, 16, 8, spreads.float())
    with pytest.raises(RuntimeError, match=r"spreads must be contiguous \[batch, kv_heads, groups, head_dim\]"):
        torch.ops.aether.code_spreads_update(ranges, lens, first, 16, 8, spreads[:, :, :1])
    with pytest.raises(RuntimeError, match="first_block"):
        torch.ops.aether.code_spreads_update(ranges, lens, first[:1], 16, 8, spreads)
    with pytest.raises(RuntimeError, match="5-D"):
        torch.ops.aether.code_spreads(ranges[0], lens, 16, 8)
    with pytest.raises(TypeError, match="ranges must be bfloat16"):
        torch.ops.aether.code_spreads(ranges.float(), lens, 16, 8)
    with pytest.raises(RuntimeError, match="blocks_per_group"):
        torch.ops.aether.code_spreads(ranges, lens, 16, 3)
    with pytest.raises(RuntimeError, match="seq_lens"):
        torch.ops.aether.code_spreads(ranges, lens[:1], 16, 8)
    with pytest.raises(TypeError, match="spreads must be float64"):
        torch.ops.aether.code_channels(q, ranges, lens, 16, 8, 4, None, 0, spreads.float())
    with pytest.raises(RuntimeError, match="either channels or spreads"):
        torch.ops.aether.channel_scores(q, codes, ranges, lens, torch.zeros(2, 2, 4, dtype=torch.int32,
                                                                            device=device), 16, 0.1, 8, 4, None,
                                        spreads, 4)
    with pytest.raises(RuntimeError, match="needs channels, or spreads"):
        torch.ops.aether.channel_scores(q, codes, ranges, lens, None, 16, 0.1, 8, 4, None, None, 4)
    with pytest.raises(RuntimeError, match="num_channels must be in"):
        torch.ops.aether.channel_scores(q, codes, ranges, lens, None, 16, 0.1, 8, 4, None, spreads, 0)
    with pytest.raises(RuntimeError, match=r"spreads must be contiguous"):
        torch.ops.aether.channel_scores(q, codes, ranges, lens, None, 16, 0.1, 8, 4, None, spreads[:1], 4)


@pytest.mark.parametrize("device", DEVICES)
def test_spreads_opcheck(device):
    q, _, lens, codes, ranges, _ = _built(device, 2, 2, 2, 64, 300, 32, 4, 4, [300, 33], seed=2)
    spreads = torch.ops.aether.code_spreads(ranges, lens, 32, 4)
    first = torch.tensor([3, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.aether.code_spreads.default, (ranges, lens, 32, 4))
    torch.library.opcheck(torch.ops.aether.code_spreads_update.default, (ranges, lens, first, 32, 4, spreads.clone()))
    torch.library.opcheck(torch.ops.aether.code_channels.default, (q, ranges, lens, 32, 4, 8, None, 0, spreads))
    torch.library.opcheck(torch.ops.aether.channel_scores.default,
                          (q, codes, ranges, lens, None, 32, 0.125, 4, 4, None, spreads, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_choice_with_nan_and_inf_queries(device):
    """Channel weights that are NaN (a NaN query channel, or an infinite one times a zero spread)
    still give exactly m channels, ranked in the order-preserving integer order the kernels use,
    the same on every path of a device; nothing is written past the list."""
    q, _, lens, codes, ranges, _ = _built(device, 2, 2, 4, 64, 300, 16, 8, 4, [300, 130], seed=41)
    q = q.clone()
    q[0, 0, [3, 9, 17, 40, 41]] = float("nan")
    q[1, 5, [2, 60]] = float("inf")
    ranges = ranges.clone()
    ranges[1, 1, :, 1, 60] = ranges[1, 1, :, 0, 60]  # channel 60 of row (1, 1): zero spread, inf * 0 = NaN
    spreads = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    for m in (1, 4, 7, 16):
        summed = torch.ops.aether.code_channels(q, ranges, lens, 16, 8, m)
        read = torch.ops.aether.code_channels(q, ranges, lens, 16, 8, m, None, 0, spreads)
        assert torch.equal(read, summed)
        assert bool((read >= 0).all()) and bool((read[..., 1:] > read[..., :-1]).all())  # m distinct, ascending
        if device == "cpu":  # a NaN weight takes the top key on the CPU (on the GPU: its NaN's sign)
            if m >= 5:  # the NaN channels of row (0, 0)
                assert {3, 9, 17, 40, 41} <= set(read[0, 0].tolist())
            assert 60 in read[1, 1].tolist()  # inf * 0 = NaN (negative on x86): the top key too
        listed = torch.ops.aether.channel_scores(q, codes, ranges, lens, summed, 16, 0.125, 8, 4)
        chosen = torch.ops.aether.channel_scores(q, codes, ranges, lens, None, 16, 0.125, 8, 4, None, spreads, m)
        torch.testing.assert_close(chosen, listed, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
def test_key_codes_update_keeps_spreads_in_the_same_call(device, pooled, narrow):
    """key_codes_update given the spreads writes what code_spreads_update would after it, bit for
    bit, for one-token appends and for chunks spanning several groups; the codes and ranges are
    those of the call without spreads. narrow=True (64-thread CTAs on CUDA, the update beside the
    decode) writes the same bits."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, _ = make_case(3, 4, 2, 900, 128, dtype, device, seed=31, lens=[900, 900, 900])
    lens = torch.tensor([100, 0, 255], dtype=torch.int32, device=device)
    num_blocks = math.ceil(900 / 128) * 8
    slots, stored = None, 0
    if pooled:
        slots, stored = _random_pool(3, 2, 48, 5, device)
    codes, ranges = torch.ops.aether.key_codes(k, lens, 16, num_blocks, None, 8, 4, True, slots,
                                               stored if pooled else 0)
    spreads = torch.ops.aether.code_spreads(ranges, lens, 16, 8)
    codes2, ranges2, spreads2 = codes.clone(), ranges.clone(), spreads.clone()
    for step in (1, 1, 300, 1, 130, 1):
        first = torch.div(lens, 16, rounding_mode="floor").to(torch.int32)
        new = (lens + step).clamp(max=900).to(torch.int32)
        for b in range(3):  # the groups the call rewrites: poisoned first
            spreads2[b, :, int(first[b]) // 8:] = float("nan")
        torch.ops.aether.key_codes_update(k, new, first, 16, None, codes, ranges, 8, 4, True, slots)
        torch.ops.aether.code_spreads_update(ranges, new, first, 16, 8, spreads)
        torch.ops.aether.key_codes_update(k, new, first, 16, None, codes2, ranges2, 8, 4, True, slots, spreads2,
                                          narrow)
        assert torch.equal(codes2, codes) and torch.equal(ranges2.view(torch.int16), ranges.view(torch.int16))
        for b in range(3):
            n = int((new[b] + 127) // 128)
            assert torch.equal(spreads2[b, :, :n], spreads[b, :, :n]), (step, b)
        lens = new
    with pytest.raises(TypeError, match="spreads must be float64"):
        torch.ops.aether.key_codes_update(k, lens, first, 16, None, codes, ranges, 8, 4, True, slots, spreads.float())
