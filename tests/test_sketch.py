"""qsketch (key sketch build, sketch scores) and the sum group aggregation: CPU and CUDA operators
against aether.reference on fresh random inputs, the public API, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

import aether
from aether import reference as ref
from conftest import DEVICES, make_case

pytestmark = pytest.mark.skipif(not aether.extension_available(), reason="aether._C is not built")


def _projections(kv_heads, q_heads, head_dim, rank, seed, device):
    g = torch.Generator().manual_seed(seed)
    kp = torch.randn(kv_heads, head_dim, rank, generator=g) / math.sqrt(head_dim)
    qp = torch.randn(q_heads, head_dim, rank, generator=g) / math.sqrt(head_dim)
    return kp.to(device), qp.to(device)


def _dtypes(device):
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]


def _check_codes(codes, ranges, centroid, k, kp, block_size, seq_lens, per=1):
    """Ranges equal the reference's; codes equal it except at a rounding tie of (x - lo) / step
    (the coefficient sums are ordered differently), where they may differ by one. The centroid
    (a float32 sum in token order, then bf16) equals the reference exactly."""
    rc, rr, rm = ref.key_sketch(k.cpu(), kp.cpu(), block_size, seq_lens.cpu(), codes.shape[2], blocks_per_sketch=per)
    assert rr.shape == ranges.shape and rm.shape == centroid.shape
    assert torch.equal(centroid.cpu(), rm), "sketch centroids differ from the reference"
    codes, ranges = codes.cpu(), ranges.cpu()
    lo_ok = (ranges.float() - rr.float()).abs() <= rr.float().abs() * 2 ** -7 + 1e-30  # within 1 bf16 ulp
    assert bool(lo_ok.all()), "sketch ranges differ from the reference by more than one bf16 ulp"
    frac_equal = float((ranges == rr).float().mean())
    assert frac_equal > 0.99, f"only {frac_equal:.4f} of the ranges equal the reference"
    got = torch.stack([codes & 0xF, codes >> 4], -1).int()
    want = torch.stack([rc & 0xF, rc >> 4], -1).int()
    assert int((got - want).abs().max()) <= 1
    assert float((got == want).float().mean()) > 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,rank,head_dim,per", [(64, 8, 64, 1), (16, 4, 128, 2), (32, 16, 64, 4),
                                                         (128, 2, 64, 1), (16, 8, 256, 8), (32, 8, 64, 2)])
def test_key_sketch_matches_reference(device, block_size, rank, head_dim, per, poison_empty):
    for dtype in _dtypes(device):
        _, k, _, lens = make_case(3, 4, 2, 300, head_dim, dtype, device, seed=block_size + rank, lens=[300, 1, 171])
        kp, _ = _projections(2, 4, head_dim, rank, 1, device)
        num_blocks = (math.ceil(300 / (block_size * per)) + 1) * per  # one empty sketch block past the end
        codes, ranges, centroid = torch.ops.aether.key_sketch(k, lens, kp, block_size, num_blocks, None, per)
        assert codes.shape[2] == num_blocks and ranges.shape[2] == num_blocks // per
        _check_codes(codes, ranges, centroid, k, kp, block_size, lens, per)
        # blocks sharing a sketch block: the same ranges, whatever their own tokens' spread
        sketch = aether.key_sketch(k, aether.SketchCalibration(kp, torch.zeros(4, head_dim, rank, device=device),
                                                               0.0), block_size, blocks_per_sketch=per, seq_lens=lens)
        assert sketch.blocks_per_sketch == per and torch.equal(sketch.ranges, ranges[:, :, :sketch.ranges.shape[2]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per", [1, 2])
def test_key_sketch_update_equals_full_build(device, per):
    dtype = torch.bfloat16
    _, k, _, _ = make_case(2, 4, 2, 256, 64, dtype, device, seed=5, lens=[256, 256])
    kp, qp = _projections(2, 4, 64, 8, 2, device)
    calib = aether.SketchCalibration(kp, qp, 0.0)
    lens = torch.tensor([100, 37], dtype=torch.int32, device=device)
    sketch = aether.key_sketch(k, calib, 32, seq_lens=lens, blocks_per_sketch=per)
    for step in ([101, 38], [128, 64], [200, 65], [256, 256]):
        new = torch.tensor(step, dtype=torch.int32, device=device)
        sketch.update(k, new)
        full = aether.key_sketch(k, calib, 32, seq_lens=new, blocks_per_sketch=per)
        assert torch.equal(sketch.codes, full.codes) and torch.equal(sketch.ranges, full.ranges)
        assert torch.equal(sketch.centroid, full.centroid)
        assert torch.equal(sketch.seq_lens, new)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per", [1, 2])
def test_key_sketch_paged_equals_contiguous(device, per):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bs = 16
    _, k, _, lens = make_case(2, 2, 2, 96, 64, dtype, device, seed=9, lens=[96, 50])
    kp, qp = _projections(2, 2, 64, 8, 3, device)
    calib = aether.SketchCalibration(kp, qp, 0.0)
    pages_per_seq = 96 // bs
    perm = torch.randperm(2 * pages_per_seq, generator=torch.Generator().manual_seed(0))
    table = perm.reshape(2, pages_per_seq).to(torch.int32).to(device)
    paged = torch.zeros(2 * pages_per_seq, bs, 2, 64, dtype=dtype, device=device)
    for b in range(2):
        for p in range(pages_per_seq):
            paged[int(table[b, p])] = k[b, :, p * bs:(p + 1) * bs].transpose(0, 1)
    a = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
    c = aether.key_sketch(paged, calib, bs, seq_lens=lens, block_table=table, blocks_per_sketch=per)
    assert torch.equal(a.codes, c.codes) and torch.equal(a.ranges, c.ranges) and torch.equal(a.centroid, c.centroid)


def _op_scores(q, sketch, lens, bs, scale, policy="topk", group_agg="max", budget=0.5):
    calib = sketch.calibration
    empty = q.new_empty((0,), dtype=torch.float32)  # qsketch reads no statistics
    return torch.ops.aether.radar_select(
        q, *(empty,) * 5, lens, bs, scale, "qsketch", policy, 0, budget, 1e-3, 0.9, 1, 0, 1, 1, True, None, None,
        group_agg, sketch.codes, sketch.ranges, calib.key_proj, calib.query_proj, float(calib.centroid_weight),
        sketch.centroid, sketch.blocks_per_sketch)


def _ref_scores(q, sketch, lens, bs, scale=None):
    calib = sketch.calibration
    return ref.sketch_head_scores(q.cpu(), sketch.codes.cpu(), sketch.ranges.cpu(), calib.key_proj.cpu(),
                                  calib.query_proj.cpu(), lens.cpu(), bs, centroid=sketch.centroid.cpu(),
                                  centroid_weight=float(calib.centroid_weight), scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
# (16, 128, 8, 256): the largest per-block stage (17 KB with a centroid): the CUDA launch drops to
# fewer warps per CTA to fit shared memory.
@pytest.mark.parametrize("rank,bs,group,head_dim,per", [(8, 64, 4, 64, 1), (4, 32, 3, 128, 2), (16, 16, 1, 64, 4),
                                                        (2, 128, 2, 64, 1), (16, 128, 8, 256, 1), (8, 32, 4, 128, 2),
                                                        (8, 16, 6, 256, 8)])
def test_sketch_scores_match_reference(device, weight, rank, bs, group, head_dim, per, poison_empty):
    kv_heads = 2
    for dtype in _dtypes(device):
        if dtype == torch.float32 and device == "cuda":
            continue
        q, k, _, lens = make_case(3, kv_heads * group, kv_heads, 333, head_dim, dtype, device, seed=rank * bs,
                                  lens=[333, 0, 150])
        kp, qp = _projections(kv_heads, kv_heads * group, head_dim, rank, 4, device)
        calib = aether.SketchCalibration(kp, qp, weight)
        sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
        scale = 0.7 / math.sqrt(head_dim)
        selected, counts, scores, mlo = _op_scores(q, sketch, lens, bs, scale)
        want = _ref_scores(q, sketch, lens, bs, scale)
        torch.testing.assert_close(scores.cpu(), want, atol=2e-4, rtol=2e-5)
        assert bool(torch.isinf(mlo).all() & (mlo < 0).all()), "qsketch has no M_g: it must be -inf"
        # Given the op's own scores, the selection is exactly the reference's.
        rs, rn = ref.select_blocks(scores.cpu(), mlo.cpu(), lens.cpu(), bs, kv_heads, budget_fraction=0.5)
        assert torch.equal(selected.cpu(), rs) and torch.equal(counts.cpu(), rn)


@pytest.mark.parametrize("device", DEVICES)
def test_sketch_scores_many_rows_refill_the_stages(device, poison_empty):
    """Enough (batch x KV heads) rows that the CUDA launch runs one CTA slice per row, so every warp
    scores several spans and refills its shared-memory stage while reading the other one; an odd
    block count leaves a partial last span."""
    if device != "cuda":
        pytest.skip("the staging pipeline is CUDA's; the CPU kernel is covered by the other cases")
    kv_heads, group, head_dim, bs, rank = 8, 2, 64, 16, 8
    lens = [3203 - 37 * i for i in range(48)]
    q, k, _, lens = make_case(48, kv_heads * group, kv_heads, 3203, head_dim, torch.bfloat16, device, seed=21,
                              lens=lens)
    kp, qp = _projections(kv_heads, kv_heads * group, head_dim, rank, 8, device)
    for weight in (0.0, 0.5):
        for per in (1, 2):
            calib = aether.SketchCalibration(kp, qp, weight)
            sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
            assert sketch.num_blocks == (201 if per == 1 else 202)
            scale = 1.0 / math.sqrt(head_dim)
            _, _, scores, _ = _op_scores(q, sketch, lens, bs, scale)
            want = _ref_scores(q, sketch, lens, bs, scale)
            torch.testing.assert_close(scores.cpu(), want, atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank,bs", [(8, 64), (2, 16), (16, 128)])
def test_sketch_scores_large_logits_and_constant_blocks(device, rank, bs, poison_empty):
    """Logit spreads of hundreds (the CUDA kernel shifts by an upper bound of each block's logits
    and falls back to the true maximum when every term underflows) and blocks whose keys are all
    equal (zero-width ranges) score as the reference does."""
    kv_heads, group, head_dim = 2, 4, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, _, lens = make_case(2, kv_heads * group, kv_heads, 300, head_dim, dtype, device, seed=rank + bs,
                              lens=[300, 201])
    k[:, :, :bs] = k[:, :, :1]  # block 0: one key repeated
    q = (q.float() * 300).to(dtype)  # spreads of hundreds of logits per block
    kp, qp = _projections(kv_heads, kv_heads * group, head_dim, rank, 7, device)
    for weight in (0.0, 0.5):
        calib = aether.SketchCalibration(kp, qp, weight)
        sketch = aether.key_sketch(k, calib, bs, seq_lens=lens)
        assert bool((sketch.ranges[:, :, 0, 0] == sketch.ranges[:, :, 0, 1]).all()), "block 0 must have zero-width ranges"
        scale = 1.0 / math.sqrt(head_dim)
        _, _, scores, _ = _op_scores(q, sketch, lens, bs, scale)
        want = _ref_scores(q, sketch, lens, bs, scale)
        assert float(want[torch.isfinite(want)].abs().max()) > 100, "the case must reach large logits"
        torch.testing.assert_close(scores.cpu(), want, atol=1e-3, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_sum_aggregation_matches_reference(device, group, poison_empty):
    kv_heads, nb, bs = 2, 37, 16
    g = torch.Generator().manual_seed(group)
    scores = torch.randn(3, kv_heads * group, nb, generator=g) * 3
    scores[0, 0, 5] = float("nan")           # a NaN head: that head adds nothing
    scores[1, :, 7] = scores[1, :, 8]        # exact ties: lower index first
    scores[2, 0] = -math.inf                 # a head with no finite score
    lens = torch.tensor([nb * bs, nb * bs - 5, 20 * bs + 3], dtype=torch.int32)
    mlo = torch.full((3, kv_heads * group), -math.inf)
    q = torch.randn(3, kv_heads * group, 64).to(device)
    stats = aether.block_stats(torch.randn(3, kv_heads, nb * bs, 64).to(device), bs)
    for budget in (0.1, 0.3, 0.77):
        sel, cnt, _, _ = torch.ops.aether.radar_select(
            q, *stats.tensors, lens.to(device), bs, 0.125, "tight", "topk", 0, budget, 1e-3, 0.9, 1, 0, 1, 1, False,
            scores.to(device), mlo.to(device), "sum")
        rs, rn = ref.select_blocks(scores, mlo, lens, bs, kv_heads, budget_fraction=budget, group_agg="sum")
        assert torch.equal(sel.cpu(), rs) and torch.equal(cnt.cpu(), rn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bs,per", [(64, 1), (32, 2)])
def test_sparse_attention_qsketch_end_to_end(device, bs, per):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, lens = make_case(2, 8, 2, 700, 64, dtype, device, seed=11, lens=[700, 333])
    kp, qp = _projections(2, 8, 64, 8, 5, device)
    calib = aether.SketchCalibration(kp, qp, 0.5)
    sketch = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
    out, sel = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=lens, budget=0.3,
                                       return_selection=True)
    assert sel.indices.shape[2] == sketch.num_blocks
    # the reference builds its own sketch from k
    _, _, rsel, rcnt = ref.sparse_attention(q.cpu(), k.cpu(), v.cpu(), block_size=bs, score="qsketch",
                                            budget_fraction=0.3, seq_lens=lens.cpu(), group_agg="sum",
                                            sketch=(kp.cpu(), qp.cpu(), 0.5, per))
    scores = _ref_scores(q, sketch, lens, bs)
    mlo = torch.full(scores.shape[:2], -math.inf)
    rs, rn = ref.select_blocks(scores, mlo, lens.cpu(), bs, 2, budget_fraction=0.3, group_agg="sum")
    assert torch.equal(rcnt, rn) and float((rsel == rs).float().mean()) > 0.95
    # Scores agree to ~1e-5; a near-tie could flip one block, so compare the selection only
    # where the reference's sum priorities are separated.
    assert torch.equal(sel.counts.cpu(), rn)
    assert float((sel.indices.cpu() == rs).float().mean()) > 0.95
    want, _ = ref.sparse_decode(q.cpu().double(), k.cpu().double(), v.cpu().double(), lens.cpu(), bs,
                                sel.indices.cpu(), sel.counts.cpu())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)


def test_calibrate_sketch_fits_logits_and_picks_a_weight():
    q, k, _, _ = make_case(1, 6, 2, 512, 64, torch.float32, "cpu", seed=3)
    qs = torch.randn(6, 64, 64) + q[0][:, None, :]  # queries near the decode query
    calib = aether.calibrate_sketch(k[0], qs, rank=8, block_size=32, max_queries=16)
    assert calib.key_proj.shape == (2, 64, 8) and calib.query_proj.shape == (6, 64, 8)
    assert calib.centroid_weight in aether.sketch.CENTROID_WEIGHTS
    # The rank-8 bilinear form approximates the logits far better than a random rank-8 one.
    logits = torch.einsum("gnd,gsd->gns", qs, k[0].repeat_interleave(3, 0))
    def err(kp, qp):
        c = torch.einsum("hsd,hdr->hsr", k[0], kp).repeat_interleave(3, 0)
        u = torch.einsum("gnd,gdr->gnr", qs, qp)
        return float(((torch.einsum("gnr,gsr->gns", u, c) - logits) ** 2).mean())
    rkp, rqp = _projections(2, 6, 64, 8, 0, "cpu")
    assert err(calib.key_proj, calib.query_proj) < 0.5 * err(rkp, rqp)


@pytest.mark.parametrize("per", [1, 2])
def test_recalled_masses_equal_the_reference_scores_path(per):
    """The calibration's recalled masses (shared dequantised sketch per chunk) equal the ones from
    reference.sketch_head_scores called per query, for every centroid weight and budget."""
    from aether import selection
    from aether.sketch import _recalled_masses
    seq, bs, group = 600, 16, 3
    q, k, _, _ = make_case(1, 6, 2, seq, 64, torch.float32, "cpu", seed=2, lens=[seq])
    k = k[0]
    q = torch.randn(6, 20, 64, generator=torch.Generator().manual_seed(3)) + q[0][:, None, :]
    kp, qp = _projections(2, 6, 64, 8, 1, "cpu")
    calib = aether.SketchCalibration(kp, qp, 0.0)
    codes, ranges, centroid = ref.key_sketch(k[None], kp, bs, blocks_per_sketch=per)
    weights, budgets = (0.0, 0.5, 1.0), (0.15, 0.35)
    got = _recalled_masses(q, k, calib, bs, budgets, weights, centroid, codes, ranges, chunk=7)
    nb = codes.shape[2]
    want = [[0.0] * len(budgets) for _ in weights]
    for i in range(q.shape[1]):
        pos = seq - q.shape[1] + i
        lens = torch.tensor([pos + 1], dtype=torch.int32)
        qi = q[:, i][None]
        logits = torch.einsum("bgd,gsd->bgs", qi, k.repeat_interleave(group, 0)) / 8.0
        probs = torch.softmax(logits.masked_fill(torch.arange(seq) > pos, -math.inf), dim=-1)
        mass = torch.nn.functional.pad(probs, (0, nb * bs - seq)).reshape(1, 6, nb, bs).sum(-1)
        for a, w in enumerate(weights):
            scores = ref.sketch_head_scores(qi, codes, ranges, kp, qp, lens, bs, centroid=centroid, centroid_weight=w)
            for b, budget in enumerate(budgets):
                mask = selection.select_topk(scores, lens, bs, 2, budget_fraction=budget, sink_blocks=1,
                                             recent_blocks=1, agg="sum", return_mask=True)
                want[a][b] += float((mass * mask.repeat_interleave(group, 1)).sum()) / (q.shape[1] * 6)
    assert len({tuple(row) for row in want}) == len(weights), "the centroid weights must select differently"
    for a in range(len(weights)):
        assert got[a] == pytest.approx(want[a], abs=1e-6)


def test_qsketch_errors():
    q, k, v, lens = make_case(1, 4, 2, 128, 64, torch.float32, "cpu", seed=1, lens=[128])
    kp, qp = _projections(2, 4, 64, 8, 0, "cpu")
    calib = aether.SketchCalibration(kp, qp, 0.0)
    sketch = aether.key_sketch(k, calib, 32)
    with pytest.raises(TypeError, match="sketch"):
        aether.sparse_attention(q, k, v, score="qsketch")
    with pytest.raises(ValueError, match="threshold"):
        aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, policy="threshold")
    with pytest.raises(ValueError, match="block_size"):
        aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, block_size=64)
    with pytest.raises(ValueError, match="group_agg"):
        aether.sparse_attention(q, k, v, policy="adaptive", group_agg="sum")
    with pytest.raises(ValueError, match="group_agg"):
        aether.sparse_attention(q, k, v, group_agg="mean")
    with pytest.raises(ValueError, match="only read by score='qsketch'"):
        aether.sparse_attention(q, k, v, sketch=sketch)
    with pytest.raises(ValueError, match="rank"):
        aether.key_sketch(k, aether.SketchCalibration(kp[..., :7], qp[..., :7], 0.0), 32)
    with pytest.raises(ValueError, match="other sequence lengths"):
        aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, seq_lens=torch.tensor([100]))
    with pytest.raises(ValueError, match="shrink"):
        sketch.update(k, torch.tensor([10]))
    # The operator checks too (never trusting the caller).
    with pytest.raises(RuntimeError, match="qsketch"):
        torch.ops.aether.radar_select(q, *aether.block_stats(k, 32).tensors, lens, 32, 0.125, "qsketch", "topk", 0,
                                      0.5, 1e-3, 0.9, 1, 0, 1, 1)
    with pytest.raises(RuntimeError, match="threshold"):
        _op_scores(q, sketch, lens, 32, 0.125, policy="threshold")
    with pytest.raises(RuntimeError, match="group_agg"):
        _op_scores(q, sketch, lens, 32, 0.125, group_agg="avg")
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.aether.key_sketch_update(k, lens, torch.zeros(1, dtype=torch.int32), kp, 32, None,
                                           sketch.codes.int(), sketch.ranges, sketch.centroid)
    with pytest.raises(TypeError, match="centroid must be bfloat16"):
        torch.ops.aether.key_sketch_update(k, lens, torch.zeros(1, dtype=torch.int32), kp, 32, None,
                                           sketch.codes, sketch.ranges, sketch.centroid.float())
    # blocks_per_sketch: powers of two up to 8, sketch blocks of at most 128 tokens
    for per, bs in ((3, 16), (16, 16), (0, 16), (8, 32)):
        with pytest.raises(ValueError, match="blocks_per_sketch"):
            aether.key_sketch(k, calib, bs, blocks_per_sketch=per)
        with pytest.raises(RuntimeError, match="blocks_per_sketch"):
            torch.ops.aether.key_sketch(k, lens, kp, bs, 8 * 16, None, per)
    with pytest.raises(RuntimeError, match="multiple of blocks_per_sketch"):
        torch.ops.aether.key_sketch(k, lens, kp, 16, 9, None, 2)
    # tensors whose shapes disagree with the P passed: rejected, never reinterpreted
    paired = aether.key_sketch(k, calib, 16, blocks_per_sketch=2)
    for codes, ranges, centroid, per, what in ((paired.codes[:, :, :7], paired.ranges, paired.centroid, 2, "multiple"),
                                               (paired.codes, paired.ranges, paired.centroid, 4, "ranges"),
                                               (paired.codes, paired.ranges, paired.centroid, 1, "ranges"),
                                               (paired.codes, paired.ranges, paired.centroid[:, :, :3], 2, "centroid")):
        with pytest.raises(RuntimeError, match=what):
            torch.ops.aether.radar_select(
                q, *(q.new_empty((0,)),) * 5, lens, 16, 0.125, "qsketch", "topk", 0, 0.5, 1e-3, 0.9, 1, 0, 1, 1,
                False, None, None, "sum", codes, ranges, kp, qp, 0.0, centroid, per)
        if codes.shape[2] % per == 0:
            with pytest.raises(RuntimeError, match=what):
                torch.ops.aether.key_sketch_update(k, lens, torch.zeros(1, dtype=torch.int32), kp, 16, None,
                                                   codes.clone(), ranges.clone(), centroid.clone(), per)
    with pytest.raises(RuntimeError, match="sketch_centroid"):
        torch.ops.aether.radar_select(
            q, *(q.new_empty((0,)),) * 5, lens, 32, 0.125, "qsketch", "topk", 0, 0.5, 1e-3, 0.9, 1, 0, 1, 1, False,
            None, None, "sum", sketch.codes, sketch.ranges, kp, qp, 0.0)
    with pytest.raises(ValueError, match="stats are not read"):
        aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, stats=aether.block_stats(k, 32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per", [1, 2])
def test_sketch_of_an_empty_cache_keeps_its_sketch_block_size(device, per):
    """A sketch built over 0 slots has no shape that shows P: it is kept as a field, so that the
    first update grows the capacity to a multiple of P and equals a full build."""
    _, k, _, _ = make_case(1, 4, 2, 40, 64, torch.float32 if device == "cpu" else torch.bfloat16, device, seed=3)
    kp, qp = _projections(2, 4, 64, 8, 2, device)
    calib = aether.SketchCalibration(kp, qp, 0.5)
    empty = aether.key_sketch(k[:, :, :0], calib, 16, blocks_per_sketch=per)
    assert empty.num_blocks == 0 and empty.blocks_per_sketch == per and empty.bytes_per_block() > 0
    lens = torch.tensor([40], dtype=torch.int32, device=device)
    empty.update(k, lens)
    full = aether.key_sketch(k, calib, 16, blocks_per_sketch=per, seq_lens=lens)
    assert empty.num_blocks == full.num_blocks == math.ceil(40 / (16 * per)) * per
    assert torch.equal(empty.codes, full.codes) and torch.equal(empty.ranges, full.ranges)
    assert torch.equal(empty.centroid, full.centroid)
    # the reference scores an empty cache too (every score -inf)
    codes, ranges, centroid = ref.key_sketch(k[:, :, :0].cpu(), kp.cpu(), 16, blocks_per_sketch=per)
    scores = ref.sketch_head_scores(torch.randn(1, 4, 64), codes, ranges, kp.cpu(), qp.cpu(),
                                    torch.zeros(1, dtype=torch.int32), 16, centroid=centroid, centroid_weight=0.5)
    assert scores.shape == (1, 4, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_sketch_update_with_shared_metadata(device, poison_empty):
    """Paged cache, 5 pages per sequence (the sketch rounds to 6 blocks with P = 2): appends equal a
    full build, and qsketch on the paged cache selects and attends as on the contiguous one."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bs, pages_per_seq, per = 16, 5, 2
    q, k, v, _ = make_case(2, 4, 2, bs * pages_per_seq, 64, dtype, device, seed=13)
    kp, qp = _projections(2, 4, 64, 8, 6, device)
    calib = aether.SketchCalibration(kp, qp, 0.5)
    perm = torch.randperm(2 * pages_per_seq, generator=torch.Generator().manual_seed(1))
    table = perm.reshape(2, pages_per_seq).to(torch.int32).to(device)
    kp_pages = torch.zeros(2 * pages_per_seq, bs, 2, 64, dtype=dtype, device=device)
    vp_pages = torch.zeros_like(kp_pages)
    for b in range(2):
        for p in range(pages_per_seq):
            kp_pages[int(table[b, p])] = k[b, :, p * bs:(p + 1) * bs].transpose(0, 1)
            vp_pages[int(table[b, p])] = v[b, :, p * bs:(p + 1) * bs].transpose(0, 1)
    lens = torch.tensor([20, 3], dtype=torch.int32, device=device)
    paged = aether.key_sketch(kp_pages, calib, bs, seq_lens=lens, block_table=table, blocks_per_sketch=per)
    assert paged.num_blocks == 6
    for step in ([33, 17], [64, 40], [80, 79]):
        lens = torch.tensor(step, dtype=torch.int32, device=device)
        paged.update(kp_pages, lens, block_table=table)
        contiguous = aether.key_sketch(k, calib, bs, seq_lens=lens, blocks_per_sketch=per)
        assert torch.equal(paged.codes, contiguous.codes) and torch.equal(paged.ranges, contiguous.ranges)
        assert torch.equal(paged.centroid, contiguous.centroid)
        out_p, sel_p = aether.sparse_attention(q, kp_pages, vp_pages, score="qsketch", sketch=paged, seq_lens=lens,
                                               block_table=table, budget=3, return_selection=True)
        out_c, sel_c = aether.sparse_attention(q, k, v, score="qsketch", sketch=contiguous, seq_lens=lens, budget=3,
                                               return_selection=True)
        assert torch.equal(sel_p.indices, sel_c.indices) and torch.equal(out_p, out_c)
