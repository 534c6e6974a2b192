"""The key quantisation and byte accounting behind the two-stage study (bench/refine_study.py,
docs/selection.md "Two-stage selection"): its numbers rest on these."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "refine_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("refine_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seq", [1, 127, 128, 300])
def test_quantized_keys_within_half_a_step_of_the_keys(study, bits, seq):
    torch.manual_seed(seq * 10 + bits)
    k = (torch.randn(2, 3, seq, 16) * torch.rand(16) * 4).to(torch.bfloat16)
    deq = study.quantize_keys(k, bits, group=128)
    assert deq.shape == k.shape and torch.isfinite(deq).all()
    levels = (1 << bits) - 1
    kf = k.float()
    for start in range(0, seq, 128):
        part = kf[:, :, start:start + 128]
        lo = part.amin(2, keepdim=True).to(torch.bfloat16).float()
        hi = part.amax(2, keepdim=True).to(torch.bfloat16).float()
        step = (hi - lo) / levels
        err = (deq[:, :, start:start + 128] - part).abs()
        # half a step, plus the bf16 rounding of the range ends (values outside [lo, hi] are clamped)
        slack = step / 2 + (part.abs().amax(2, keepdim=True) * 2 ** -8)
        assert (err <= slack + 1e-6).all()
        codes = torch.round((deq[:, :, start:start + 128] - lo) / torch.where(step > 0, step, 1.0))
        assert (codes >= 0).all() and (codes <= levels).all()
        # b bits: at most 2^b distinct values per (b, h, group, channel)
        flat = deq[:, :, start:start + 128].permute(0, 1, 3, 2).reshape(-1, part.shape[2])
        assert max(len(torch.unique(row)) for row in flat) <= levels + 1


def test_constant_channel_is_exact(study):
    k = torch.full((1, 1, 200, 4), 0.75)
    k[..., 1] = torch.arange(200.0)[None, None]  # one varying channel
    deq = study.quantize_keys(k, 4, group=128)
    assert torch.equal(deq[..., 0], k[..., 0]) and torch.equal(deq[..., 2:], k[..., 2:])
    assert not torch.equal(deq[..., 1], k[..., 1])


def test_candidate_byte_accounting(study):
    exact = study.refine_info(0.25, 0, 0.25)
    assert math.isclose(exact["candidate_key_bytes"], 0.125)  # K is half of K+V
    four = study.refine_info(0.25, 4, 0.25)
    assert math.isclose(four["candidate_key_bytes"], round(0.25 * (4 / 32 + 1 / 128), 5))
    two = study.refine_info(0.3, 2, 0.3)
    assert math.isclose(two["candidate_key_bytes"], round(0.3 * (2 / 32 + 1 / 128), 5))


def test_key_channels_byte_accounting(study):
    half = study.refine_info(0.5, 2, 0.5, key_channels=0.5)
    assert math.isclose(half["candidate_key_bytes"], round(0.5 * (2 / 32 * 0.5 + 1 / 128), 5))
    assert half["key_channels"] == 0.5 and "key_channels" not in study.refine_info(0.5, 2, 0.5)


@pytest.mark.parametrize("seq", [5, 128, 300])
def test_channel_subset_keeps_the_querys_heaviest_channels(study, seq):
    """--key-channels: per (b, KV head) exactly m channels keep their codes, the ones with the
    largest sum_g q^2 x mean range^2; the others sit at their group's bf16 mid-range."""
    torch.manual_seed(seq)
    dim, group = 16, 128
    k = (torch.randn(2, 3, seq, dim) * torch.rand(dim) * 3).to(torch.bfloat16)
    q = torch.randn(2, 6, dim).to(torch.bfloat16)
    deq = study.quantize_keys(k, 2, group=group).to(k.dtype)
    assert torch.equal(study.channel_subset_keys(q, k, deq, 1.0), deq)
    sub = study.channel_subset_keys(q, k, deq, 0.25).float()
    lo, hi = study.group_ranges(k, group)
    mid = ((lo + hi) / 2).repeat_interleave(group, dim=2)[:, :, :seq]
    weight = q.float().reshape(2, 3, 2, dim).pow(2).sum(2) * (hi - lo).pow(2).mean(2)
    for b in range(2):
        for h in range(3):
            kept = set(weight[b, h].topk(4).indices.tolist())
            for d in range(dim):
                want = deq[b, h, :, d].float() if d in kept else mid[b, h, :, d].to(torch.bfloat16).float()
                assert torch.equal(sub[b, h, :, d], want), (b, h, d)


@pytest.mark.parametrize("seq", [5, 300])
def test_channel_pool_restricts_the_choice_to_the_widest_channels(study, seq):
    """--channel-pool: the pool is the channels of largest mean range^2 (query-independent), and
    the per-step choice takes the heaviest m inside it (a full pool changes nothing)."""
    torch.manual_seed(seq + 1)
    dim = 16
    k = (torch.randn(2, 3, seq, dim) * torch.rand(dim) * 3).to(torch.bfloat16)
    q = torch.randn(2, 6, dim).to(torch.bfloat16)
    pool = study.channel_pool(k, 0.5)
    lo, hi = study.group_ranges(k, 128)
    spread = (hi - lo).pow(2).mean(2)
    assert pool.sum(-1).eq(8).all()
    for b in range(2):
        for h in range(3):
            assert set(pool[b, h].nonzero().flatten().tolist()) == set(spread[b, h].topk(8).indices.tolist())
    chosen = study.channel_choice(q, k, 0.25, pool=pool)
    weight = q.float().reshape(2, 3, 2, dim).pow(2).sum(2) * spread
    assert chosen.sum(-1).eq(4).all() and not (chosen & ~pool).any()
    for b in range(2):
        for h in range(3):
            inside = weight[b, h].masked_fill(~pool[b, h], -math.inf)
            assert set(chosen[b, h].nonzero().flatten().tolist()) == set(inside.topk(4).indices.tolist())
    assert torch.equal(study.channel_choice(q, k, 0.25, pool=torch.ones_like(pool)), study.channel_choice(q, k, 0.25))


@pytest.mark.parametrize("seq", [16, 200, 256])
def test_value_means_per_span(study, seq):
    torch.manual_seed(seq)
    v = torch.randn(2, 3, seq, 8)
    means = study.value_means(v, seq, 16, 64)
    nb = math.ceil(seq / 16)
    assert means.shape == (2, 3, nb, 8)
    for j in range(nb):
        start = (j * 16) // 64 * 64
        want = v[:, :, start:min(start + 64, seq)].mean(2)  # the span's valid tokens only
        torch.testing.assert_close(means[:, :, j], want)


def test_add_tail_equals_attention_over_the_union(study):
    """With the exact block log-masses and each block's own value mean standing for a block whose
    values are all equal, the tail merge is exact attention over read + estimated blocks."""
    from aether import reference
    torch.manual_seed(3)
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 1, 64, 8)
    v = torch.randn(1, 1, 4, 8).repeat_interleave(16, dim=2)  # constant values within each 16-token block
    lens = torch.tensor([64], dtype=torch.int32)
    selected = torch.tensor([[[0, 2, -1, -1]]], dtype=torch.int32)
    count = torch.tensor([[2]], dtype=torch.int32)
    out, lse = reference.sparse_decode(q, k, v, lens, 16, selected, count)
    est = reference.oracle_head_scores(q, k, lens, 16)
    est[:, :, [0, 2]] = -math.inf  # read blocks are not estimated
    means = study.value_means(v, 64, 16, 16).repeat_interleave(2, dim=1)
    got = study.add_tail(out, lse, est, means)
    want, _ = reference.dense_attention(q, k, v, lens)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    # nothing estimated: the read blocks' attention unchanged
    none = study.add_tail(out, lse, torch.full_like(est, -math.inf), means)
    torch.testing.assert_close(none, out.float())


def test_code_noise_variance_matches_uniform_error(study):
    """scale^2 sum_c q_c^2 step_c^2 / 12 with the step of each block's 128-token group."""
    torch.manual_seed(5)
    q = torch.randn(1, 2, 4)
    k = torch.randn(1, 1, 256, 4)
    var = study.code_noise_variance(q, k, 2, 16, 0.5, 16)
    assert var.shape == (1, 2, 16)
    for grp in range(2):
        part = k[0, 0, grp * 128:(grp + 1) * 128]
        step = (part.amax(0) - part.amin(0)) / 3
        want = 0.25 * (q[0] ** 2 * step ** 2).sum(-1) / 12
        for j in range(grp * 8, grp * 8 + 8):
            torch.testing.assert_close(var[0, :, j], want)


def test_final_mass_step_takes_the_fewest_candidates_reaching_the_mass(study):
    """--final-mass: per KV head the final blocks are forced blocks plus candidates only, at most
    --final-max of the blocks; at mass 1 without a cap every candidate with mass is read."""
    import aether
    import aether.cache as cache_mod
    g = torch.Generator().manual_seed(3)
    batch, kv_heads, group, seq, dim, bs = 1, 2, 4, 700, 64, 16
    q = torch.randn(batch, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g)
    calib = aether.SketchCalibration(torch.randn(kv_heads, dim, 8, generator=g) / 8,
                                     torch.randn(kv_heads * group, dim, 8, generator=g) / 8, 0.5)
    sketch = aether.key_sketch(k, calib, bs, blocks_per_sketch=8)
    options = cache_mod.SparseOptions(score="qsketch", block_size=bs, budget=0.1, blocks_per_sketch=8)
    nb = math.ceil(seq / bs)
    counts = {"candidate_tokens": 0, "tokens": 0}
    topk_out, topk_sel = study.make_step(0.5, 2, False, counts)(q, k, v, options, sketch=sketch)
    read = []
    for mass, cap in ((0.5, 0.25), (0.9, 0.25), (1.0, 1.0)):
        out, sel = study.make_step(0.5, 2, False, counts, final_mass=mass, final_max=cap)(q, k, v, options,
                                                                                         sketch=sketch)
        assert out.shape == topk_out.shape and bool(torch.isfinite(out).all())
        for h in range(kv_heads):
            picked = [int(j) for j in sel[0, h] if j >= 0]
            assert picked == sorted(set(picked))
            assert len(picked) <= max(1, math.ceil(cap * nb)) + 2  # + the forced sink and tail blocks
            if mass == 1.0:  # half the non-forced blocks are candidates, all of them with mass
                assert len(picked) >= (nb - 2) // 2
        read.append(int((sel >= 0).sum()))
    assert read[0] <= read[1] < read[2]  # more mass, more blocks
    assert int((topk_sel >= 0).sum()) == kv_heads * (math.ceil(0.1 * nb))  # the top-k path is unchanged


def test_rank_priority_unites_each_heads_own_ranking(study):
    """Top-k by the max of rank_priority takes every head's best block, then every head's second:
    a head whose scores are tiny still gets its own first choices."""
    scores = torch.tensor([[[9.0, 8.0, 7.0, -1.0, -2.0, -math.inf],      # head 0: blocks 0, 1, 2
                            [-50.0, -51.0, -52.0, -40.0, -45.0, -math.inf]]])  # head 1: 3, 4 (tiny logits)
    prio = study.rank_priority(scores)
    assert bool(torch.isneginf(prio[..., 5]).all())
    best = prio.amax(dim=1)[0]
    top4 = best.argsort(descending=True)[:4].sort().values.tolist()
    assert top4 == [0, 1, 3, 4]  # ranks 0 and 1 of both heads
    # within a rank, the larger share goes first: head 1's block 3 (share ~0.99) before head 0's
    # block 0 (~0.67), and both before any second choice
    assert float(best[3]) > float(best[0]) > float(best[4])


def test_reuse_adds_the_previous_final_blocks_to_the_candidates(study):
    """--reuse: the first step equals the plain step; the next token's candidates are the plain
    candidates plus the last step's final blocks (counted in the candidate bytes); a step that is
    not the next token of the same sequence does not reuse."""
    import aether
    import aether.cache as cache_mod
    g = torch.Generator().manual_seed(5)
    batch, kv_heads, group, seq, dim, bs = 1, 2, 4, 701, 64, 16
    q1 = torch.randn(batch, kv_heads * group, dim, generator=g)
    q2 = torch.randn(batch, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g)
    calib = aether.SketchCalibration(torch.randn(kv_heads, dim, 8, generator=g) / 8,
                                     torch.randn(kv_heads * group, dim, 8, generator=g) / 8, 0.5)
    sketches = {n: aether.key_sketch(k[:, :, :n], calib, bs, blocks_per_sketch=8) for n in (699, 700, 701)}
    options = cache_mod.SparseOptions(score="qsketch", block_size=bs, budget=0.1, blocks_per_sketch=8)
    everything = cache_mod.SparseOptions(score="qsketch", block_size=bs, budget=0.3, blocks_per_sketch=8)

    def call(step, q, n, opts=options):
        return step(q, k[:, :, :n], v[:, :, :n], opts, sketch=sketches[n])

    def blocks(sel):
        return {(h, int(j)) for h in range(kv_heads) for j in sel[0, h] if j >= 0}

    plain_counts, reuse_counts = {"candidate_tokens": 0, "tokens": 0}, {"candidate_tokens": 0, "tokens": 0}
    plain = study.make_step(0.3, 2, False, plain_counts)
    reuse = study.make_step(0.3, 2, False, reuse_counts, reuse=True)
    out1, sel1 = call(plain, q1, 700)
    rout1, rsel1 = call(reuse, q1, 700)
    assert torch.equal(out1, rout1) and torch.equal(sel1, rsel1) and plain_counts == reuse_counts
    # AetherKVCache.attend passes the library's two-stage arguments too (None / False here)
    kout1, ksel1 = plain(q1, k[:, :, :700], v[:, :, :700], options, sketch=sketches[700], refine_extra=None,
                         return_candidates=False)
    assert torch.equal(out1, kout1) and torch.equal(sel1, ksel1)
    plain_counts.update(candidate_tokens=reuse_counts["candidate_tokens"], tokens=reuse_counts["tokens"])

    before = dict(plain_counts), dict(reuse_counts)
    out2, sel2 = call(plain, q2, 701)
    rout2, rsel2 = call(reuse, q2, 701)
    # the plain candidates of step 2: keeping the candidate fraction itself keeps all of them
    cands = blocks(study.make_step(0.3, 2, False, {"candidate_tokens": 0, "tokens": 0})(
        q2, k, v, everything, sketch=sketches[701])[1])
    added = blocks(sel1) - cands
    assert added, "the test needs last-step blocks outside the plain candidates"
    assert blocks(rsel2) <= cands | blocks(sel1)
    nb = math.ceil(seq / bs)
    tokens = {j: min(bs, seq - j * bs) for j in range(nb)}
    plain_step = plain_counts["candidate_tokens"] - before[0]["candidate_tokens"]
    reuse_step = reuse_counts["candidate_tokens"] - before[1]["candidate_tokens"]
    assert reuse_step - plain_step == sum(tokens[j] for _, j in added)

    # not the next token (699 after 701): no reuse
    out3, sel3 = call(plain, q1, 699)
    rout3, rsel3 = call(reuse, q1, 699)
    assert torch.equal(out3, rout3) and torch.equal(sel3, rsel3)


def test_channel_subset_uses_a_given_choice(study):
    """--channel-refresh: a given channel mask (an earlier step's choice) replaces the query's own."""
    torch.manual_seed(4)
    dim, seq = 16, 200
    k = (torch.randn(1, 2, seq, dim) * torch.rand(dim) * 3).to(torch.bfloat16)
    q = torch.randn(1, 4, dim).to(torch.bfloat16)
    deq = study.quantize_keys(k, 4).to(k.dtype)
    own = study.channel_choice(q, k, 0.25)
    assert own.shape == (1, 2, dim) and torch.equal(own.sum(-1), torch.full((1, 2), 4))
    assert torch.equal(study.channel_subset_keys(q, k, deq, 0.25, chosen=own), study.channel_subset_keys(q, k, deq, 0.25))
    other = ~own  # every other channel: the codes follow the given mask, not the query
    sub = study.channel_subset_keys(q, k, deq, 0.25, chosen=other)
    assert torch.equal(sub[..., other[0, 0]][0, 0], deq[..., other[0, 0]][0, 0])
    assert not torch.equal(sub, study.channel_subset_keys(q, k, deq, 0.25))
