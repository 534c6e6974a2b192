"""Two-stage selection: key codes (build, append, paged), refine scores, and sparse_attention with
refine=, CPU and CUDA operators against aether.reference on fresh random inputs, and the errors."""

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


def _candidates(batch, kv_heads, length, n_blocks, seed, device, extra_invalid=True):
    """Random ascending candidate lists of random sizes, padded with -1; some rows also list a
    block past the end of the sequence (the kernels must skip it) and one row is empty."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.full((batch, kv_heads, length), -1, dtype=torch.int32)
    count = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            n = n_blocks[b]
            if (b, h) == (0, kv_heads - 1) or n == 0:
                continue
            size = int(torch.randint(1, n + 1, (1,), generator=g))
            picked = torch.randperm(n, generator=g)[:size].sort().values.tolist()
            if extra_invalid and n < length and size < length:
                picked.append(length - 1)  # past this sequence's end
            cand[b, h, :len(picked)] = torch.tensor(picked, dtype=torch.int32)
            count[b, h] = len(picked)
    return cand.to(device), count.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_size,per,head_dim", [(16, 8, 64), (32, 2, 128), (64, 1, 64), (128, 1, 256),
                                                     (16, 1, 128), (32, 4, 64)])
def test_key_codes_match_reference(device, bits, block_size, per, head_dim, poison_empty):
    for dtype in _dtypes(device):
        _, k, _, lens = make_case(3, 4, 2, 333, head_dim, dtype, device, seed=block_size + bits, lens=[333, 1, 0])
        num_blocks = (math.ceil(333 / (block_size * per)) + 1) * per  # one empty group past the end
        codes, ranges = torch.ops.aether.key_codes(k, lens, block_size, num_blocks, None, per, bits)
        assert codes.shape == (3, 2, num_blocks, block_size, head_dim * bits // 8)
        assert ranges.shape == (3, 2, num_blocks // per, 2, head_dim)
        rc, rr = ref.key_codes(k.cpu(), bits, block_size, lens.cpu(), num_blocks, blocks_per_group=per)
        # min / max, bf16 rounding, one IEEE division and rint: bit-identical on every device
        assert torch.equal(ranges.cpu().view(torch.int16), rr.view(torch.int16))
        assert torch.equal(codes.cpu(), rc)
        # the codes reproduce the keys to within half a step (+ the bf16 rounding of the range)
        deq = ref.unpack_key_codes(rc, rr, bits).reshape(3, 2, -1, head_dim)[:, :, :333]
        lo, hi = rr[:, :, :, 0].float(), rr[:, :, :, 1].float()
        step = ((hi - lo) / ((1 << bits) - 1)).repeat_interleave(block_size * per, dim=2)[:, :, :333]
        err = (deq[0] - k[0].cpu().float()).abs()
        assert bool((err <= step[0] / 2 + lo.abs().amax() * 2 ** -7 + 1e-6).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,per", [(2, 2), (4, 1)])
@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("narrow", [False, True])  # 64-thread CTAs on CUDA (the update beside the decode)
def test_key_codes_update_equals_full_build(device, bits, per, layout, narrow):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, _, _ = make_case(2, 2, 2, 300, 64, dtype, device, seed=3, lens=[300, 300])
    lens = torch.tensor([37, 5], dtype=torch.int32, device=device)
    codes = aether.key_codes(k[:, :, :40], 32, bits=bits, blocks_per_group=per, seq_lens=lens, layout=layout)
    for step in (1, 30, 64, 100):
        lens = (lens + step).clamp(max=300)
        codes.update(k, lens, _beside_decode=narrow)
        full = aether.key_codes(k, 32, bits=bits, blocks_per_group=per, seq_lens=lens, layout=layout)
        groups = full.num_blocks // per
        n = full.num_blocks if layout == "token" else groups  # codes per block or per group
        assert torch.equal(codes.codes[:, :, :n], full.codes)
        assert torch.equal(codes.ranges[:, :, :groups], full.ranges)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["token", "channel"])
def test_key_codes_paged_equals_contiguous(device, layout):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bs = 16
    _, k, _, lens = make_case(2, 2, 2, 96, 64, dtype, device, seed=9, lens=[96, 50])
    pages = 96 // bs
    table = torch.randperm(2 * pages, generator=torch.Generator().manual_seed(0)).reshape(2, pages)
    table = table.to(torch.int32).to(device)
    paged = torch.zeros(2 * pages, bs, 2, 64, dtype=dtype, device=device)
    for b in range(2):
        for p in range(pages):
            paged[int(table[b, p])] = k[b, :, p * bs:(p + 1) * bs].transpose(0, 1)
    a = aether.key_codes(k, bs, bits=2, seq_lens=lens, layout=layout)
    c = aether.key_codes(paged, bs, bits=2, seq_lens=lens, block_table=table, layout=layout)
    assert a.blocks_per_group == 8
    assert torch.equal(a.codes, c.codes) and torch.equal(a.ranges, c.ranges)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("bs,per,group,head_dim", [(16, 8, 4, 64), (32, 2, 3, 128), (64, 1, 1, 64),
                                                   (16, 4, 8, 256), (128, 1, 2, 64)])
def test_refine_scores_match_reference(device, bits, bs, per, group, head_dim, poison_empty):
    for dtype in _dtypes(device):
        seq = 517
        q, k, _, lens = make_case(2, 2 * group, 2, seq, head_dim, dtype, device, seed=bs + group + bits,
                                  lens=[seq, 141])
        kc = aether.key_codes(k, bs, bits=bits, blocks_per_group=per, seq_lens=lens)
        length = math.ceil(seq / bs)  # the first selection's rows (here shorter than the codes')
        n_blocks = [math.ceil(int(x) / bs) for x in lens.cpu()]
        cand, count = _candidates(2, 2, length, n_blocks, seed=bs, device=device)
        scale = 0.7 / math.sqrt(head_dim)
        got = torch.ops.aether.refine_scores(q, kc.codes, kc.ranges, lens, cand, count, bs, scale, per, bits)
        want = ref.refine_head_scores(q.cpu(), kc.codes.cpu(), kc.ranges.cpu(), bits, lens.cpu(), bs, cand.cpu(),
                                      count.cpu(), scale)
        assert got.shape == want.shape == (2, 2 * group, length)
        got = got.cpu()
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), "scores written outside the candidates (or missing)"
        assert int(finite.sum()) > 0
        assert bool(torch.isneginf(got[~finite]).all())
        torch.testing.assert_close(got[finite], want[finite], atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,per,bits", [(16, 8, 2), (32, 2, 4), (64, 1, 2)])
def test_sparse_attention_refine_end_to_end(device, bs, per, bits):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(2, 8, 2, 2000, 64, dtype, device, seed=21, lens=[2000, 1405])
    g = torch.Generator().manual_seed(5)
    kp = (torch.randn(2, 64, 8, generator=g) / 8).to(device)
    qp = (torch.randn(8, 64, 8, generator=g) / 8).to(device)
    calib = aether.SketchCalibration(kp, qp, 0.5)
    sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
    codes = aether.key_codes(k, bs, bits=bits, seq_lens=lens)
    out, sel = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=0.2,
                                       refine=codes, refine_candidates=0.5, return_selection=True)
    # the first stage alone, at the candidates' budget: the final blocks are among its candidates
    _, cand = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=0.5,
                                      return_selection=True)
    _, one_stage = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=0.2,
                                           return_selection=True)
    assert torch.equal(sel.counts, one_stage.counts)
    for b in range(2):
        for h in range(2):
            final = set(sel.indices[b, h, :int(sel.counts[b, h])].tolist())
            assert final <= set(cand.indices[b, h, :int(cand.counts[b, h])].tolist())
    assert not torch.equal(sel.indices, one_stage.indices), "the second stage changed nothing"
    _, _, rsel, rcnt = ref.sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), block_size=bs, score="qsketch", budget_fraction=0.2, seq_lens=lens.cpu(),
        group_agg="sum", sketch=(kp.cpu(), qp.cpu(), 0.5, per),
        refine=ref.RefineRef(bits=bits, candidate_fraction=0.5, blocks_per_group=128 // bs))
    assert torch.equal(sel.counts.cpu(), rcnt)
    # scores agree to rounding; a near-tie may flip a block
    assert float((sel.indices.cpu() == rsel).float().mean()) > 0.95
    want, _ = ref.sparse_decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(), bs,
                                sel.indices.cpu(), sel.counts.cpu())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_refine_with_a_bound_score_and_block_counts(device):
    """refine also follows the statistics' scores (tight), with int budgets."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(1, 4, 1, 640, 64, dtype, device, seed=2, lens=[640])
    codes = aether.key_codes(k, 64, bits=4, seq_lens=lens)
    out, sel = aether.sparse_attention(q, k, v, score="tight", seq_lens=lens, budget=3, refine=codes,
                                       refine_candidates=6, return_selection=True)
    _, _, rsel, rcnt = ref.sparse_attention(q.cpu(), k.cpu(), v.cpu(), block_size=64, score="tight",
                                            budget_blocks=3, seq_lens=lens.cpu(),
                                            refine=ref.RefineRef(bits=4, candidate_blocks=6, blocks_per_group=2))
    assert int(sel.counts[0, 0]) == int(rcnt[0, 0]) == 3
    assert torch.equal(sel.indices.cpu(), rsel)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_union_blocks_equals_the_set_union(seed):
    """reference.union_blocks: ascending, -1 padded, counts; entries past a row's count or outside
    [0, num_blocks) are ignored (random lists with duplicates across the two inputs)."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, nb, length = 3, 2, 37, 12
    a = torch.randint(-2, nb + 3, (batch, heads, length), generator=g, dtype=torch.int32)
    b = torch.randint(-2, nb + 3, (batch, heads, length + 5), generator=g, dtype=torch.int32)
    ca = torch.randint(0, length + 1, (batch, heads), generator=g, dtype=torch.int32)
    cb = torch.randint(0, length + 6, (batch, heads), generator=g, dtype=torch.int32)
    ca[0, 0] = 0
    cb[0, 0] = 0  # an empty row
    idx, cnt = ref.union_blocks(a, ca, b, cb, nb)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.shape == (batch, heads, nb)
    for i in range(batch):
        for h in range(heads):
            want = sorted({int(x) for x in a[i, h, :int(ca[i, h])] if 0 <= x < nb}
                          | {int(x) for x in b[i, h, :int(cb[i, h])] if 0 <= x < nb})
            assert int(cnt[i, h]) == len(want)
            assert idx[i, h, :len(want)].tolist() == want and bool((idx[i, h, len(want):] == -1).all())


def _random_lists(g, batch, heads, nb, length, extra_length):
    """Two random block lists with duplicates within and across them, entries outside [0, nb), counts
    past the row length or negative, and an empty row."""
    a = torch.randint(-2, nb + 3, (batch, heads, length), generator=g, dtype=torch.int32)
    b = torch.randint(-2, nb + 3, (batch, heads, extra_length), generator=g, dtype=torch.int32)
    ca = torch.randint(-1, length + 3, (batch, heads), generator=g, dtype=torch.int32)
    cb = torch.randint(-1, extra_length + 3, (batch, heads), generator=g, dtype=torch.int32)
    ca[0, 0] = 0
    cb[0, 0] = 0
    return a, ca, b, cb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nb,length,extra_length", [(1, 3, 1), (37, 12, 17), (2048, 1024, 195), (20011, 9000, 700),
                                                    (400_003, 3000, 50)])
def test_union_blocks_op_equals_the_reference(device, nb, length, extra_length):
    """torch.ops.aether.union_blocks (CPU and CUDA kernels) equals reference.union_blocks, every entry
    of the row (the padding too). 20011 blocks give each CUDA thread several bitmap words; 400,003
    blocks need more than the default 48 KiB of shared memory."""
    g = torch.Generator().manual_seed(nb)
    batch, heads = (3, 2) if nb < 100_000 else (1, 2)
    a, ca, b, cb = _random_lists(g, batch, heads, nb, length, extra_length)
    want_idx, want_cnt = ref.union_blocks(a, ca, b, cb, nb)
    idx, cnt = torch.ops.aether.union_blocks(a.to(device), ca.to(device), b.to(device), cb.to(device), nb)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.shape == (batch, heads, nb)
    assert torch.equal(cnt.cpu(), want_cnt)
    assert torch.equal(idx.cpu(), want_idx)
    # a list of the candidates' own kind: every valid block of a dense row plus nothing
    full = torch.arange(nb, dtype=torch.int32).expand(batch, heads, nb).contiguous()
    n = torch.full((batch, heads), nb, dtype=torch.int32)
    idx2, cnt2 = torch.ops.aether.union_blocks(full.to(device), n.to(device), b.to(device), cb.to(device), nb)
    assert torch.equal(idx2.cpu(), full) and bool((cnt2.cpu() == nb).all())


@pytest.mark.parametrize("device", DEVICES)
def test_union_blocks_op_errors(device):
    a = torch.zeros(2, 3, 5, dtype=torch.int32, device=device)
    c = torch.ones(2, 3, dtype=torch.int32, device=device)
    op = torch.ops.aether.union_blocks
    with pytest.raises(TypeError, match="extra must be int32"):
        op(a, c, a.long(), c, 8)
    with pytest.raises(TypeError, match="counts must be int32"):
        op(a, c.long(), a, c, 8)
    with pytest.raises(RuntimeError, match=r"extra must be \[2, 3, length\]"):
        op(a, c, a[:1].contiguous(), c[:1].contiguous(), 8)
    with pytest.raises(RuntimeError, match=r"extra_counts must be contiguous \[2, 3\]"):
        op(a, c, a, c[:, :2].contiguous(), 8)
    with pytest.raises(RuntimeError, match="indices must be 3-D"):
        op(a[0], c, a, c, 8)
    with pytest.raises(RuntimeError, match="num_blocks must be >= 0"):
        op(a, c, a, c, -1)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="extra and extra_counts must be on cuda"):
            op(a, c, a.cpu(), c.cpu(), 8)


@pytest.mark.parametrize("device", DEVICES)
def test_refine_extra_joins_the_candidates(device):
    """refine_extra: with every valid non-candidate block as extra the union is every block, so the
    result equals refining all blocks (refine_candidates=1.0) exactly; a partial extra list selects
    as the reference does, and the final blocks come from the candidates and the extra list."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bs = 16
    q, k, v, lens = make_case(2, 8, 2, 1500, 64, dtype, device, seed=23, lens=[1500, 977])
    g = torch.Generator().manual_seed(7)
    kp = (torch.randn(2, 64, 8, generator=g) / 8).to(device)
    qp = (torch.randn(8, 64, 8, generator=g) / 8).to(device)
    calib = aether.SketchCalibration(kp, qp, 0.5)
    sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=8)
    codes = aether.key_codes(k, bs, bits=2, seq_lens=lens)
    kwargs = dict(score="qsketch", sketch=sketch, seq_lens=lens, budget=0.15, refine=codes, return_selection=True)
    _, cand = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=0.4,
                                      return_selection=True)
    n_blocks = [math.ceil(int(n) / bs) for n in lens.cpu()]
    nb = cand.indices.shape[-1]
    rest = torch.full((2, 2, nb), -1, dtype=torch.int32)
    rest_counts = torch.zeros(2, 2, dtype=torch.int32)
    half = torch.full((2, 2, nb), -1, dtype=torch.int32)
    half_counts = torch.zeros(2, 2, dtype=torch.int32)
    for b in range(2):
        for h in range(2):
            taken = set(cand.indices[b, h, :int(cand.counts[b, h])].tolist())
            others = [j for j in range(n_blocks[b]) if j not in taken]
            rest[b, h, :len(others)] = torch.tensor(others, dtype=torch.int32)
            rest_counts[b, h] = len(others)
            some = others[::2]
            half[b, h, :len(some)] = torch.tensor(some, dtype=torch.int32)
            half_counts[b, h] = len(some)
    everything = aether.Selection(rest.to(device), rest_counts.to(device))
    out_all, sel_all = aether.sparse_attention(q, k, v, refine_candidates=0.4, refine_extra=everything, **kwargs)
    out_full, sel_full = aether.sparse_attention(q, k, v, refine_candidates=1.0, **kwargs)
    assert torch.equal(sel_all.indices, sel_full.indices) and torch.equal(sel_all.counts, sel_full.counts)
    torch.testing.assert_close(out_all, out_full, atol=0, rtol=0)

    extra = (half.to(device), half_counts.to(device))
    out, sel = aether.sparse_attention(q, k, v, refine_candidates=0.4, refine_extra=extra, **kwargs)
    _, plain = aether.sparse_attention(q, k, v, refine_candidates=0.4, **kwargs)
    assert not torch.equal(sel.indices, plain.indices), "the extra blocks changed nothing"
    for b in range(2):
        for h in range(2):
            final = set(sel.indices[b, h, :int(sel.counts[b, h])].tolist())
            allowed = set(cand.indices[b, h, :int(cand.counts[b, h])].tolist()) | set(half[b, h, :int(half_counts[b, h])].tolist())
            assert final <= allowed
    _, _, rsel, rcnt = ref.sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), block_size=bs, score="qsketch", budget_fraction=0.15, seq_lens=lens.cpu(),
        group_agg="sum", sketch=(kp.cpu(), qp.cpu(), 0.5, 8),
        refine=ref.RefineRef(bits=2, candidate_fraction=0.4, blocks_per_group=8, extra=(half, half_counts)))
    assert torch.equal(sel.counts.cpu(), rcnt)
    assert float((sel.indices.cpu() == rsel).float().mean()) > 0.95  # scores agree to rounding


def test_refine_errors():
    q, k, v, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    codes = aether.key_codes(k, 64, seq_lens=lens)
    with pytest.raises(TypeError, match="refine must be an aether.KeyCodes"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=k)
    with pytest.raises(ValueError, match="needs policy='topk'"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, policy="adaptive")
    with pytest.raises(ValueError, match=r"refine_candidates \(0.1\) must be >= budget \(0.25\)"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_candidates=0.1, budget=0.25)
    with pytest.raises(ValueError, match="refine_candidates as a fraction"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_candidates=1.5)
    with pytest.raises(ValueError, match="refine_candidates as a block count"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_candidates=0)
    with pytest.raises(ValueError, match="built with block_size 64 but block_size is 32"):
        aether.sparse_attention(q, k, v, seq_lens=lens, block_size=32, refine=codes)
    with pytest.raises(ValueError, match="other sequence lengths"):
        aether.sparse_attention(q, k, v, seq_lens=lens - 1, refine=codes)
    other = aether.key_codes(k[:, :1].contiguous(), 64)
    with pytest.raises(ValueError, match="built for another cache"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=other)
    sel = aether.Selection(torch.zeros(1, 2, 4, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="refine_extra .* needs refine= key codes"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine_extra=sel)
    with pytest.raises(TypeError, match="refine_extra must be an aether.Selection or a tuple"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_extra=sel.indices)
    with pytest.raises(TypeError, match="refine_extra indices must be an int32 tensor"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_extra=(sel.indices.long(), sel.counts))
    with pytest.raises(ValueError, match=r"refine_extra counts must be \[1, 2\]"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_extra=(sel.indices, sel.counts[:, :1]))
    with pytest.raises(ValueError, match=r"refine_extra indices must be \[1, 2, L\]"):
        aether.sparse_attention(q, k, v, seq_lens=lens, refine=codes, refine_extra=(sel.indices[0], sel.counts))
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4\)"):
        aether.key_codes(k, 64, bits=3)
    with pytest.raises(ValueError, match="blocks_per_group must be 1, 2, 4 or 8"):
        aether.key_codes(k, 64, blocks_per_group=4)
    with pytest.raises(ValueError, match="seq_lens must not shrink"):
        codes.update(k, lens - 1)
    # the operator checks again
    cand = torch.zeros(1, 2, 4, dtype=torch.int32)
    count = torch.ones(1, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="candidates must be int32"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand.long(), count, 64, 0.1, 2, 2)
    with pytest.raises(RuntimeError, match="num_candidates must be contiguous"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand, count[:, :1], 64, 0.1, 2, 2)
    with pytest.raises(RuntimeError, match="key code bits must be 2 or 4"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand, count, 64, 0.1, 2, 8)
    with pytest.raises(RuntimeError, match="key codes must be contiguous"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand, count, 64, 0.1, 2, 4)
    with pytest.raises(RuntimeError, match="key code ranges must be contiguous"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand, count, 64, 0.1, 1, 2)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.aether.refine_scores(q, codes.codes, codes.ranges, lens, cand, count, 64, float("nan"), 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_key_codes_update_on_a_side_stream_equals_the_current_stream():
    """update(stream=...) rebuilds beside the first stage; sparse_attention waits for it: same codes
    and output as an update on the current stream, eagerly and replayed as a CUDA graph."""
    q, k, v, lens = make_case(2, 8, 2, 3000, 128, torch.bfloat16, "cuda", seed=8, lens=[3000, 2900])
    g = torch.Generator().manual_seed(6)
    calib = aether.SketchCalibration((torch.randn(2, 128, 8, generator=g) / 11).cuda(),
                                     (torch.randn(8, 128, 8, generator=g) / 11).cuda(), 0.5)
    short = lens - 40
    sketch = aether.key_sketch(k, calib, 16, seq_lens=lens, blocks_per_sketch=8)
    here = aether.key_codes(k, 16, seq_lens=short)
    side = aether.key_codes(k, 16, seq_lens=short)
    stream = torch.cuda.Stream()
    here.update(k, lens)
    side.update(k, lens, stream=stream)
    assert side._pending is not None
    kwargs = dict(score="qsketch", sketch=sketch, seq_lens=lens, budget=0.1, refine_candidates=0.5,
                  return_selection=True)
    want, want_sel = aether.sparse_attention(q, k, v, refine=here, **kwargs)
    got, got_sel = aether.sparse_attention(q, k, v, refine=side, **kwargs)
    assert side._pending is None
    assert torch.equal(side.codes, here.codes) and torch.equal(side.ranges, here.ranges)
    assert torch.equal(got_sel.indices, want_sel.indices)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    # Captured: the fork and the join become graph edges. Replays rebuild from `start` each time;
    # before each, the groups the rebuild covers are poisoned.
    start = short.clone()
    side = aether.key_codes(k, 16, seq_lens=start)
    rebuilt = [int(n) // 16 // 8 * 8 for n in start]  # first block of each row's rebuilt groups
    graph_out = torch.full_like(want, float("nan"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side.seq_lens.copy_(start)
        side.update(k, lens, stream=stream)
        out, _ = aether.sparse_attention(q, k, v, refine=side, **kwargs)
        graph_out.copy_(out)
    for _ in range(2):
        for b, first in enumerate(rebuilt):
            side.codes[b, :, first:].random_(0, 256)
            side.ranges[b, :, first // 8:].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graph_out, want)


def test_key_codes_update_stream_errors():
    _, k, _, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    codes = aether.key_codes(k, 64, seq_lens=lens - 10)
    with pytest.raises(TypeError, match="stream must be a torch.cuda.Stream or None"):
        codes.update(k, lens, stream="side")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="stream must be a CUDA stream of the cache's device"):
            codes.update(k, lens, stream=torch.cuda.Stream())
    assert codes._pending is None and codes.wait() is codes


def test_refine_fake_kernels_trace():
    """The fake (meta) kernels describe the ops' outputs (torch.compile, opcheck)."""
    q, k, _, lens = make_case(1, 4, 2, 256, 64, torch.float32, "cpu", seed=1, lens=[256])
    codes = aether.key_codes(k, 32, seq_lens=lens)
    cand = torch.arange(5, dtype=torch.int32).repeat(1, 2, 1)
    count = torch.full((1, 2), 5, dtype=torch.int32)
    torch.library.opcheck(torch.ops.aether.key_codes.default, (k, lens, 32, 8, None, 4, 2))
    torch.library.opcheck(torch.ops.aether.refine_scores.default,
                          (q, codes.codes, codes.ranges, lens, cand, count, 32, 0.125, 4, 2))
    extra = torch.tensor([[[7, 2, -1], [0, 9, 9]]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.aether.union_blocks.default, (cand, count, extra, torch.tensor([[3, 2]],
                                                                                                  dtype=torch.int32), 8))


def test_cache_two_stage_equals_the_direct_call_and_the_reference_path(monkeypatch):
    """AetherKVCache with refine_candidates: its codes follow appends, its step equals
    aether.sparse_attention with the same codes, the pure-PyTorch fallback gives the same
    selection, and the read counter adds the candidates' code bytes."""
    import aether.cache as cache_mod
    q, k, v, _ = make_case(1, 8, 2, 700, 64, torch.float32, "cpu", seed=4, lens=[700])
    options = cache_mod.SparseOptions(score="tight", block_size=16, budget=0.2, refine_candidates=0.5)
    cache = cache_mod.AetherKVCache(options)
    cache.append(k[:, :, :650], v[:, :, :650])
    cache.attend(q)
    for t in range(650, 700):  # decode steps: the codes' last group is rebuilt each time
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    out = cache.attend(q)
    codes = aether.key_codes(k, 16)
    assert torch.equal(cache.key_codes()[0].codes, codes.codes)
    want, sel = aether.sparse_attention(q, k, v, block_size=16, score="tight", budget=0.2, refine=codes,
                                        refine_candidates=0.5, return_selection=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    one_stage = aether.sparse_attention(q, k, v, block_size=16, score="tight", budget=0.2)
    assert not torch.equal(out, one_stage)
    # bytes: 2 steps, 2 rows, ceil(0.5 * blocks) candidates' codes + the ranges of every 128-token group
    reads = cache.reads
    blocks = [math.ceil(650 / 16), math.ceil(700 / 16)]
    assert reads.refine_bytes == sum(2 * (math.ceil(0.5 * n) * 16 * 64 * 2 / 8 + math.ceil(n / 8) * 4 * 64)
                                     for n in blocks)
    # the reference fallback (no extension) selects the same blocks
    monkeypatch.setattr(cache_mod, "_use_extension", lambda t: False)
    ref_out, ref_sel = cache_mod.sparse_decode_step(q, k, v, options, codes=cache_mod.build_key_codes(k, 16, 2))
    assert torch.equal(ref_sel, sel.indices)
    torch.testing.assert_close(ref_out, want, atol=1e-5, rtol=1e-5)


def test_cache_refine_reuse_passes_the_last_selection(monkeypatch):
    """refine_reuse: at the next token the cache passes its last selection as refine_extra (its step
    equals the direct call with it), the read counter counts the union's codes, more than one new
    token means no reuse, and the reference fallback selects the same blocks."""
    import aether.cache as cache_mod
    q1, k, v, _ = make_case(1, 8, 2, 703, 64, torch.float32, "cpu", seed=9, lens=[703])
    q2 = make_case(1, 8, 2, 16, 64, torch.float32, "cpu", seed=10, lens=[16])[0]
    options = cache_mod.SparseOptions(score="tight", block_size=16, budget=0.2, refine_candidates=0.3,
                                      refine_reuse=True)
    cache = cache_mod.AetherKVCache(options)
    direct = dict(block_size=16, score="tight", budget=0.2, refine_candidates=0.3, return_selection=True,
                  return_candidates=True)

    def bytes_of(counts, n):  # KeyCodes.bytes_read per row: codes of the candidates + their groups' ranges
        return sum(int(c) * 16 * 64 * 2 / 8 + min(int(c), math.ceil(math.ceil(n / 16) / 8)) * 4 * 64
                   for c in counts.flatten())

    cache.append(k[:, :, :700], v[:, :, :700])
    out1 = cache.attend(q1)
    want1, sel1, cand1 = aether.sparse_attention(q1, k[:, :, :700], v[:, :, :700],
                                                 refine=aether.key_codes(k[:, :, :700], 16), **direct)
    torch.testing.assert_close(out1, want1, atol=0, rtol=0)
    cache.append(k[:, :, 700:701], v[:, :, 700:701])
    out2 = cache.attend(q2)
    want2, sel2, cand2 = aether.sparse_attention(q2, k[:, :, :701], v[:, :, :701],
                                                 refine=aether.key_codes(k[:, :, :701], 16), refine_extra=sel1,
                                                 **direct)
    torch.testing.assert_close(out2, want2, atol=0, rtol=0)
    _, plain_cand = aether.sparse_attention(q2, k[:, :, :701], v[:, :, :701], block_size=16, score="tight",
                                            budget=0.3, return_selection=True)
    assert bool((cand2.counts > plain_cand.counts).any()), "the last selection added no candidate"
    expected = bytes_of(cand1.counts, 700) + bytes_of(cand2.counts, 701)
    assert math.isclose(float(cache.reads.refine_bytes), expected, rel_tol=1e-12)
    # two tokens at once: not the next token, so no reuse
    cache.append(k[:, :, 701:703], v[:, :, 701:703])
    out3 = cache.attend(q1)
    want3 = aether.sparse_attention(q1, k, v, block_size=16, score="tight", budget=0.2, refine_candidates=0.3,
                                    refine=aether.key_codes(k, 16))
    torch.testing.assert_close(out3, want3, atol=0, rtol=0)
    # the reference fallback with the same extra blocks
    monkeypatch.setattr(cache_mod, "_use_extension", lambda t: False)
    ref_out, ref_sel, ref_count = cache_mod.sparse_decode_step(
        q2, k[:, :, :701], v[:, :, :701], options, codes=cache_mod.build_key_codes(k[:, :, :701], 16, 2),
        refine_extra=(sel1.indices, sel1.counts), return_candidates=True)
    assert torch.equal(ref_sel, sel2.indices) and torch.equal(ref_count, cand2.counts)
    torch.testing.assert_close(ref_out, want2, atol=1e-5, rtol=1e-5)


def test_two_stage_options_and_eval_entries():
    from aether.cache import SparseOptions, sparse_decode_step
    from aether.eval import Config, EvalSettings, configs_for, parse_refine
    with pytest.raises(ValueError, match=r"refine_candidates \(0.1\) must be >= budget \(0.2\)"):
        SparseOptions(budget=0.2, refine_candidates=0.1)
    with pytest.raises(ValueError, match="needs policy='topk'"):
        SparseOptions(policy="adaptive", refine_candidates=0.5)
    with pytest.raises(ValueError, match="refine_candidates must be None or a float"):
        SparseOptions(refine_candidates=3)
    with pytest.raises(ValueError, match="refine_bits must be 2 or 4"):
        SparseOptions(refine_candidates=0.5, refine_bits=8)
    q, k, v, _ = make_case(1, 4, 2, 128, 64, torch.float32, "cpu", seed=1, lens=[128])
    with pytest.raises(ValueError, match="key codes .* needed exactly when"):
        sparse_decode_step(q, k, v, SparseOptions(block_size=16, refine_candidates=0.5))
    assert parse_refine("none") == (None, 2, False) and parse_refine("0.3:4") == (0.3, 4, False)
    assert parse_refine("0.5:2:reuse") == (0.5, 2, True)
    with pytest.raises(ValueError, match="'none', 'C:bits' or 'C:bits:reuse'"):
        parse_refine("0.3")
    with pytest.raises(ValueError, match="'none', 'C:bits' or 'C:bits:reuse'"):
        parse_refine("0.3:2:again")
    with pytest.raises(ValueError, match="refine_reuse .* needs refine_candidates"):
        SparseOptions(refine_reuse=True)
    with pytest.raises(TypeError, match="refine_reuse must be a bool"):
        SparseOptions(refine_candidates=0.5, refine_reuse=1)
    with pytest.raises(ValueError, match="refine_extra and return_candidates need two-stage selection"):
        sparse_decode_step(q, k, v, SparseOptions(block_size=16), return_candidates=True)
    with pytest.raises(ValueError, match="bits 2 or 4"):
        parse_refine("0.3:3")
    settings = EvalSettings(scores=("qsketch", "oracle"), budgets=(0.1, 0.4), block_sizes=(16,),
                            refines=("none", "0.3:2"))
    names = [c.name for c in configs_for(settings)]
    assert "qsketch bs16 refine0.3q2 topk 0.1" in names and "qsketch bs16 topk 0.1" in names
    assert not any("refine" in n for n in names if n.startswith("oracle"))  # the oracle needs no refinement
    assert "qsketch bs16 refine0.3q2 topk 0.4" not in names  # candidates below the budget: skipped
    assert Config("tight", 0.1, 16, refine_candidates=0.3).name == "tight bs16 refine0.3q2 topk 0.1"
    reuse = configs_for(EvalSettings(scores=("qsketch",), budgets=(0.1,), block_sizes=(16,), refines=("0.5:2:reuse",)))
    assert [c.name for c in reuse] == ["dense", "qsketch bs16 refine0.5q2+reuse topk 0.1"] and reuse[1].refine_reuse
