"""aether.selection against brute-force definitions on random inputs (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from aether import reference as ref
from aether import selection as sel


def _gen(seed: int):
    return torch.Generator().manual_seed(seed)


def _qk(seed: int, batch=2, q_heads=6, kv_heads=2, seq=97, dim=16):
    g = _gen(seed)
    q = torch.randn(batch, q_heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    return q, k


# ----------------------------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------------------------

def test_bytes_by_hand():
    assert sel.stat_bytes("tight", 64) == (3 * 64 + 1) * 2
    assert sel.stat_bytes("mean", 64) == 128
    assert sel.stat_bytes("box", 128) == 512
    assert sel.kv_block_bytes(64, 64) == 16384
    assert sel.subblock_bytes("mean", 64, 64, 16) == 4 * 128
    # 64 tokens x 8 coefficients x 4 bits = 256 B, 8 x [lo, hi] bf16 = 32 B, centroid 128 B.
    assert sel.sketch_bytes(64, 64, 8, 4, True) == 256 + 32 + 128
    assert sel.sketch_bytes(64, 64, 8, 4, False) == 256 + 32
    assert sel.sketch_bytes(64, 64, 3, 1, False) == 24 + 12
    assert sel.sketch_bytes(64, 64, 4, 16, True) == 512 + 128
    with pytest.raises(ValueError, match="score="):
        sel.stat_bytes("nope", 64)


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_select_topk_matches_reference(seed):
    g = _gen(seed)
    batch, kv_heads, group, bs = 3, 2, 3, 8
    lens = torch.tensor([97, 64, 9], dtype=torch.int32)
    nb = ref.num_blocks_for(97, bs)
    # Integer scores make exact ties common, exercising the lower-index tie-break.
    scores = torch.randint(-4, 4, (batch, kv_heads * group, nb), generator=g).float()
    mlo = torch.zeros(batch, kv_heads * group)
    for sink, recent in ((1, 1), (0, 0), (2, 3)):
        for budget_blocks, frac in ((0, 0.125), (0, 0.3), (5, 0.0), (0, 1.0)):
            want = ref.select_blocks(scores, mlo, lens, bs, kv_heads, policy="topk",
                                     budget_blocks=budget_blocks, budget_fraction=frac,
                                     sink_blocks=sink, recent_blocks=recent)
            got = sel.select_topk(scores, lens, bs, kv_heads, budget_fraction=frac,
                                  budget_blocks=budget_blocks, sink_blocks=sink,
                                  recent_blocks=recent)
            assert torch.equal(got[1], want[1]), (sink, recent, budget_blocks, frac)
            assert torch.equal(got[0], want[0]), (sink, recent, budget_blocks, frac)


def test_select_topk_per_row_budget_and_mask_roundtrip():
    g = _gen(7)
    scores = torch.randn(2, 4, 13, generator=g)
    lens = torch.tensor([100, 41], dtype=torch.int32)
    fracs = torch.tensor([[0.2, 0.5], [0.3, 0.1]])
    mask = sel.select_topk(scores, lens, 8, 2, budget_fraction=fracs, return_mask=True)
    idx, num = sel.select_topk(scores, lens, 8, 2, budget_fraction=fracs)
    assert torch.equal(sel.mask_from_indices(idx, num, 13), mask)
    for b in range(2):
        for h in range(2):
            want = ref.select_blocks(scores[b:b + 1], torch.zeros(1, 4), lens[b:b + 1], 8, 2,
                                     budget_fraction=float(fracs[b, h]))
            assert int(num[b, h]) == int(want[1][0, h])


def test_group_priority_sum_brute_force():
    g = _gen(3)
    scores = torch.randn(2, 6, 5, generator=g) * 3
    scores[1, :, 4] = -math.inf
    got = sel.group_priority(scores, 2, "sum")
    for b in range(2):
        for h in range(2):
            for j in range(5):
                total = 0.0
                for gg in range(h * 3, h * 3 + 3):
                    row = [math.exp(x) for x in scores[b, gg].double().tolist()]
                    total += row[j] / sum(row)
                assert got[b, h, j].item() == pytest.approx(total, rel=1e-5, abs=1e-7)
    assert torch.equal(sel.group_priority(scores, 2, "max"),
                       scores.reshape(2, 2, 3, 5).amax(2))


def test_select_topk_sum_picks_top_mass_share():
    scores = torch.tensor([[[0.0, 5.0, 0.0, 0.0, 0.0, 0.0],     # head 0 wants block 1
                            [0.0, 0.0, 2.0, 2.1, 0.0, 0.0]]])   # head 1: blocks 2, 3
    lens = torch.tensor([48], dtype=torch.int32)
    mask = sel.select_topk(scores, lens, 8, 1, budget_blocks=4, sink_blocks=1,
                           recent_blocks=1, agg="sum", return_mask=True)
    # Forced: block 0 (sink) and block 5 (last complete); two more by summed shares: 1 and 3.
    assert mask[0, 0].tolist() == [True, True, False, True, False, True]


def test_select_pooled_brute_force():
    g = _gen(11)
    batch, kv_heads, group, bs = 2, 3, 2, 4
    lens = torch.tensor([50, 23], dtype=torch.int32)
    nb = ref.num_blocks_for(50, bs)
    scores = torch.randn(batch, kv_heads * group, nb, generator=g) * 2
    frac = 0.25
    mask = sel.select_pooled(scores, lens, bs, kv_heads, budget_fraction=frac)
    prio = sel.group_priority(scores.masked_fill(
        ~sel.forced_mask(lens, bs, nb, 1, 1)[1][:, None, :], -math.inf), kv_heads, "sum")
    for b in range(batch):
        n_blocks = ref.num_blocks_for(int(lens[b]), bs)
        forced = ref.forced_blocks(int(lens[b]), bs, 1, 1)
        total = max(1, math.ceil(frac * n_blocks - 1e-9)) * kv_heads
        cands = [(-prio[b, h, j].item(), h * nb + j) for h in range(kv_heads)
                 for j in range(n_blocks) if j not in forced]
        cands.sort()
        k_count = max(0, min(total - kv_heads * len(forced), len(cands)))
        want = torch.zeros(kv_heads, nb, dtype=torch.bool)
        for _, flat in cands[:k_count]:
            want[flat // nb, flat % nb] = True
        for j in forced:
            want[:, j] = True
        assert torch.equal(mask[b], want)
        assert int(mask[b].sum()) == min(max(total, kv_heads * len(forced)), kv_heads * n_blocks)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.999])
def test_select_mass_target_is_minimal(target):
    g = _gen(int(target * 1000))
    kv_heads, group, bs = 2, 3, 8
    lens = torch.tensor([120, 77], dtype=torch.int32)
    nb = ref.num_blocks_for(120, bs)
    scores = torch.randn(2, kv_heads * group, nb, generator=g) * 2
    mask = sel.select_mass_target(scores, lens, bs, kv_heads, mass=target)
    forced_all, valid = sel.forced_mask(lens, bs, nb, 1, 1)
    share = sel.group_priority(scores.masked_fill(~valid[:, None, :], -math.inf), kv_heads,
                               "sum") / group
    for b in range(2):
        for h in range(kv_heads):
            forced = forced_all[b]
            chosen = mask[b, h] & ~forced
            assert bool((mask[b, h] & forced).eq(forced).all())
            cand = valid[b] & ~forced
            sorted_share = share[b, h][cand].sort(descending=True).values
            k = int(chosen.sum())
            # The chosen candidates are the k largest shares.
            assert share[b, h][chosen].sum().item() == pytest.approx(
                sorted_share[:k].sum().item(), rel=1e-5)
            reached = share[b, h][forced].sum().item() + sorted_share[:k].sum().item()
            if k < int(cand.sum()):
                assert reached >= target - 1e-5
            if k > 0:
                assert reached - sorted_share[k - 1].item() < target + 1e-5
    capped = sel.select_mass_target(scores, lens, bs, kv_heads, mass=1.0, max_fraction=0.25)
    for b in range(2):
        n_blocks = ref.num_blocks_for(int(lens[b]), bs)
        assert int(capped[b, 0].sum()) == max(math.ceil(0.25 * n_blocks - 1e-9),
                                              int(forced_all[b].sum()))


def test_refine_candidates():
    g = _gen(5)
    coarse = torch.randn(1, 4, 12, generator=g)
    fine = torch.randn(1, 4, 12, generator=g)
    lens = torch.tensor([90], dtype=torch.int32)
    scores, cand = sel.refine_candidates(coarse, fine, lens, 8, 2, candidate_fraction=0.5)
    want = sel.select_topk(coarse, lens, 8, 2, budget_fraction=0.5, return_mask=True)
    assert torch.equal(cand, want)
    cand_h = cand.repeat_interleave(2, dim=1)
    assert torch.equal(scores[cand_h], fine[cand_h])
    assert bool(torch.isneginf(scores[~cand_h]).all())
    final = sel.select_topk(scores, lens, 8, 2, budget_fraction=0.25, return_mask=True)
    assert bool((final <= cand).all())


# ----------------------------------------------------------------------------------------------
# sub-block statistics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["mean", "ball", "tight"])
@pytest.mark.parametrize("agg", ["max", "lse"])
def test_subblock_scores_brute_force(score, agg):
    q, k = _qk(1, batch=2, q_heads=2, kv_heads=1, seq=75)
    lens = torch.tensor([75, 41], dtype=torch.int32)
    bs, sub = 16, 4
    stats = sel.subblock_stats(k, bs, sub, lens)
    got = sel.subblock_scores(q, stats, lens, bs, sub, score, agg)
    s = 1 / math.sqrt(q.shape[-1])
    nb = ref.num_blocks_for(75, bs)
    for b in range(2):
        for gq in range(q.shape[1]):
            qv = q[b, gq].double()
            keys = k[b, gq // 2].double()
            for j in range(nb):
                subs = []
                for i in range(bs // sub):
                    start = j * bs + i * sub
                    toks = keys[start:min(start + sub, int(lens[b]))]
                    if len(toks) == 0:
                        continue
                    mu = toks.mean(0)
                    ball = s * (qv @ mu + qv.norm() * (toks - mu).norm(dim=1).max())
                    box = s * torch.maximum(qv * toks.min(0).values, qv * toks.max(0).values).sum()
                    val = {"mean": s * qv @ mu, "ball": ball, "tight": min(ball, box)}[score]
                    subs.append((float(val), len(toks)))
                if not subs:
                    assert math.isinf(got[b, gq, j].item())
                    continue
                if agg == "max":
                    want = max(v for v, _ in subs)
                else:
                    want = math.log(sum(n * math.exp(v) for v, n in subs))
                assert got[b, gq, j].item() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_subblock_ball_max_is_upper_bound_and_degenerates():
    q, k = _qk(2, seq=97)
    lens = torch.tensor([97, 60], dtype=torch.int32)
    stats = sel.subblock_stats(k, 32, 8, lens)
    bound = sel.subblock_scores(q, stats, lens, 32, 8, "ball", "max")
    oracle_max = []
    logits = ref._masked_logits(q, k, lens, None)
    logits = torch.nn.functional.pad(logits, (0, 128 - 97), value=-math.inf)
    block_max = logits.reshape(2, 6, 4, 32).amax(-1)
    finite = torch.isfinite(block_max)
    assert bool((bound[finite] >= block_max[finite] - 1e-4).all())
    # sub_size == block_size: the plain radar score.
    same = sel.subblock_scores(q, sel.subblock_stats(k, 32, 32, lens), lens, 32, 32, "tight",
                               "max")
    want, _ = ref.head_scores(q, ref.block_stats(k, 32, lens), lens, 32, "tight")
    assert torch.allclose(same, want)
    with pytest.raises(ValueError, match="sub_size"):
        sel.subblock_stats(k, 32, 5, lens)


# ----------------------------------------------------------------------------------------------
# key sketches
# ----------------------------------------------------------------------------------------------

def test_quantize_blockwise_brute_force():
    g = _gen(9)
    x = torch.randn(2, 3, 5, 8, 4, generator=g) * 3
    valid = torch.ones(2, 1, 5, 8, 1, dtype=torch.bool)
    valid[1, :, 4, 5:] = False
    for bits in (1, 2, 4, 8):
        got = sel.quantize_blockwise(x, bits, valid)
        levels = 2 ** bits - 1
        for idx in [(0, 0, 0), (1, 2, 4), (1, 1, 3)]:
            b, h, n = idx
            n_valid = int(valid[b, 0, n, :, 0].sum())
            for r in range(4):
                col = x[b, h, n, :n_valid, r]
                lo = col.min().to(torch.bfloat16).float()
                hi = col.max().to(torch.bfloat16).float()
                step = (hi - lo) / levels
                for t in range(n_valid):
                    code = min(max(round(float((col[t] - lo) / step)), 0), levels)
                    assert got[b, h, n, t, r].item() == pytest.approx(
                        float(lo + code * step), rel=1e-6, abs=1e-6)
                    # Error: half a step plus the bf16 rounding of the range ends.
                    slack = 0.5 * float(step) + 2 ** -7 * float(col.abs().max())
                    assert abs(got[b, h, n, t, r].item() - float(col[t])) <= slack + 1e-6
            assert bool((got[b, h, n, n_valid:] == 0).all())
    assert torch.equal(sel.quantize_blockwise(x, 32, valid), x * valid)
    with pytest.raises(ValueError, match="bits"):
        sel.quantize_blockwise(x, 12, valid)


@pytest.mark.parametrize("mode", ["pca", "qpca", "channels", "full"])
def test_full_rank_sketch_is_exact(mode):
    """With rank D and exact coefficients every mode reproduces the true logits, so the ``lse``
    block score equals the oracle (true block log-mass)."""
    q, k = _qk(4, batch=2, seq=70, dim=8)
    lens = torch.tensor([70, 33], dtype=torch.int32)
    calib_q = torch.randn(6, 50, 8, generator=_gen(1)) * torch.linspace(0.2, 3, 8)
    calib = sel.calibrate_sketch(k[0], calib_q, 16, 8, mode)
    for use_centroid in (True, False):
        sketch = sel.build_sketch(k, calib, 16, 32, lens, use_centroid)
        got = sel.sketch_scores(q, sketch, calib, lens, 16, "lse")
        want = ref.oracle_head_scores(q, k, lens, 16)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4)
        got_max = sel.sketch_scores(q, sketch, calib, lens, 16, "max")
        logits = torch.nn.functional.pad(ref._masked_logits(q, k, lens, None), (0, 10),
                                         value=-math.inf).reshape(2, 6, 5, 16).amax(-1)
        assert torch.allclose(got_max[finite], logits[finite], atol=1e-4, rtol=1e-4)


def test_sketch_scores_brute_force():
    q, k = _qk(6, batch=1, q_heads=4, kv_heads=2, seq=45, dim=8)
    lens = torch.tensor([45], dtype=torch.int32)
    bs, rank, bits = 16, 3, 2
    calib = sel.calibrate_sketch(k[0], torch.randn(4, 30, 8, generator=_gen(2)), bs, rank, "qpca")
    sketch = sel.build_sketch(k, calib, bs, bits, lens)
    got = sel.sketch_scores(q, sketch, calib, lens, bs)
    s = 1 / math.sqrt(8)
    levels = 2 ** bits - 1
    for gq in range(4):
        h = gq // 2
        for j in range(3):
            toks = k[0, h, j * bs:min((j + 1) * bs, 45)]
            mu = toks.mean(0).to(torch.bfloat16).float()
            coeff = (toks - mu) @ calib.key_proj[h]
            lo = coeff.min(0).values.to(torch.bfloat16).float()
            hi = coeff.max(0).values.to(torch.bfloat16).float()
            step = (hi - lo) / levels
            deq = lo + torch.round((coeff - lo) / step).clamp(0, levels) * step
            u = q[0, gq] @ calib.query_proj[gq]
            logits = s * (q[0, gq] @ mu + deq @ u)
            want = torch.logsumexp(logits, 0).item()
            assert got[0, gq, j].item() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_calibration_properties():
    g = _gen(8)
    d, rank, group = 12, 4, 2
    # Keys and queries anisotropic along different, non-axis directions: qpca must reach the
    # optimum (the trailing eigenvalues of Sr^1/2 Sq Sr^1/2) and beat pca and channels.
    rot_k = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    rot_q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    k = (torch.randn(2, 256, d, generator=g) * torch.linspace(3, 0.1, d)) @ rot_k
    q = (torch.randn(4, 200, d, generator=g) * torch.linspace(0.1, 3, d)) @ rot_q
    pca = sel.calibrate_sketch(k, q, 16, rank, "pca", use_centroid=False)
    qpca = sel.calibrate_sketch(k, q, 16, rank, "qpca", use_centroid=False)
    chans = sel.calibrate_sketch(k, q, 16, rank, "channels", use_centroid=False)
    eye = torch.eye(rank)
    for h in range(2):
        w = pca.key_proj[h]
        assert torch.allclose(w.T @ w, eye, atol=1e-5)
        assert torch.equal(pca.query_proj[group * h], w)
        assert len(chans.key_proj[h].sum(1).nonzero().flatten()) == rank

    def logit_mse(c):
        err = 0.0
        for h in range(2):
            for gq in range(group * h, group * h + group):
                exact = q[gq].double() @ k[h].double().T
                approx = (q[gq] @ c.query_proj[gq]).double() @ (k[h] @ c.key_proj[h]).double().T
                err += float(((exact - approx) ** 2).mean())
        return err

    optimum = 0.0
    for h in range(2):
        kd = k[h].double()
        qd = q[group * h:group * h + group].reshape(-1, d).double()
        s_r, s_q = kd.T @ kd / kd.shape[0], qd.T @ qd / qd.shape[0]
        evals, evecs = torch.linalg.eigh(s_r)
        half = (evecs * evals.sqrt()) @ evecs.T
        optimum += group * float(torch.linalg.eigvalsh(half @ s_q @ half)[:d - rank].sum())
    assert logit_mse(qpca) == pytest.approx(optimum, rel=1e-3)
    assert logit_mse(qpca) < 0.8 * min(logit_mse(pca), logit_mse(chans))
    with pytest.raises(ValueError, match="mode"):
        sel.calibrate_sketch(k, q, 16, rank, "nope")
    with pytest.raises(ValueError, match="rank"):
        sel.calibrate_sketch(k, q, 16, 0, "pca")


def test_raw_sketch_centroid_weight_brute_force():
    q, k = _qk(12, batch=1, q_heads=4, kv_heads=2, seq=40, dim=8)
    lens = torch.tensor([40], dtype=torch.int32)
    bs, rank = 16, 3
    calib = sel.calibrate_sketch(k[0], torch.randn(4, 30, 8, generator=_gen(3)), bs, rank,
                                 "qpca", use_centroid=False)
    sketch = sel.build_sketch(k, calib, bs, 32, lens, use_centroid=False)
    assert not sketch.residual
    s = 1 / math.sqrt(8)
    for a in (0.0, 0.5, 1.0):
        got = sel.sketch_token_logits(q, sketch, calib, centroid_weight=a)
        for gq in range(4):
            h = gq // 2
            w, u_proj = calib.key_proj[h], calib.query_proj[gq]
            p_map = u_proj @ w.T  # q . P k = (U^T q) . (W^T k)
            for j in range(3):
                toks = k[0, h, j * bs:min((j + 1) * bs, 40)]
                mu = toks.mean(0).to(torch.bfloat16).float()
                want = s * (toks @ p_map.T @ q[0, gq] + a * (q[0, gq] @ mu - q[0, gq] @ p_map @ mu))
                assert torch.allclose(got[0, gq, j, :len(toks)], want, atol=1e-4, rtol=1e-4)


def test_calibrate_centroid_weight_matches_brute_force():
    g = _gen(13)
    kv_heads, group, d, seq, bs = 1, 2, 8, 96, 16
    k = torch.randn(kv_heads, seq, d, generator=g) * torch.linspace(2, 0.2, d)
    q = torch.randn(5, kv_heads * group, d, generator=g) * 2
    positions = torch.tensor([60, 70, 80, 90, 95])
    calib = sel.calibrate_sketch(k, q.permute(1, 0, 2), bs, 2, "qpca", use_centroid=False)
    sketch = sel.build_sketch(k[None], calib, bs, 4, use_centroid=False)
    best, recalled = sel.calibrate_centroid_weight(q, positions, k, sketch, calib, bs,
                                                   weights=(0.0, 1.0), budget_fraction=0.34)
    for a, got in zip((0.0, 1.0), recalled):
        total = 0.0
        for i, p in enumerate(positions.tolist()):
            lens = torch.tensor([p + 1], dtype=torch.int32)
            scores = sel.sketch_scores(q[i:i + 1], sketch, calib,
                                       torch.tensor([seq], dtype=torch.int32), bs,
                                       centroid_weight=a)
            idx, num = ref.select_blocks(scores, torch.zeros(1, 2), lens, bs, kv_heads,
                                         budget_fraction=0.34)
            chosen = idx[0, 0, :int(num[0, 0])].tolist()
            weights = torch.softmax(ref._masked_logits(q[i:i + 1], k[None, :, :p + 1], lens,
                                                       None)[0], -1)
            for gq in range(group):
                total += sum(float(weights[gq, j * bs:(j + 1) * bs].sum()) for j in chosen)
        assert got == pytest.approx(total / (len(positions) * group), rel=1e-5)
    assert best == (0.0, 1.0)[max(range(2), key=lambda i: (recalled[i], -i))]
