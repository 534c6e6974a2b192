"""Tests of the pure-PyTorch reference (aether/reference.py) against docs/architecture.md.

The reference is the oracle of every other implementation, so it is checked here against
independent, deliberately naive computations (per-sequence loops, plain torch softmax, float64)
and against hand-built selection cases whose answer follows from the documented rules.
"""

from __future__ import annotations

import math

import pytest
import torch

from aether import reference as ref

SEEDS = (0, 1)
BOUND_SCORES = ("ball", "box", "tight")


def make_gen(seed: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + salt)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def mixed_seq_lens(gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """Full length, empty, and random lengths in between (batch >= 3)."""
    lens = torch.randint(0, seq_len + 1, (batch,), generator=gen)
    lens[0] = seq_len
    lens[1] = 0
    return lens.to(torch.int32)


def naive_dense(q, k, v, seq_lens, scale=None):
    """Plain torch softmax attention, fp32, one (sequence, query head) at a time."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(batch, q_heads, v.shape[-1])
    lse = torch.full((batch, q_heads), -math.inf)
    for b in range(batch):
        length = int(seq_lens[b])
        if length == 0:
            continue
        for h in range(q_heads):
            keys = k[b, h // group, :length].float()
            values = v[b, h // group, :length].float()
            logits = s * (keys @ q[b, h].float())
            out[b, h] = torch.softmax(logits, dim=0) @ values
            lse[b, h] = torch.logsumexp(logits, dim=0)
    return out, lse


def true_logits64(q, k, scale=None):
    """``[B, Hq, S]`` float64 logits of every query head with every key slot."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.shape[1]
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    keys = k.double().repeat_interleave(group, dim=1)
    return s * torch.einsum("bhd,bhsd->bhs", q.double(), keys)


def true_block_max64(q, k, seq_lens, block_size, scale=None):
    """``[B, Hq, NB]`` float64 true max logit of each block (-inf for invalid blocks)."""
    logits = true_logits64(q, k, scale)
    batch, q_heads, seq_len = logits.shape
    nb = ref.num_blocks_for(seq_len, block_size)
    valid = torch.arange(seq_len)[None, :] < seq_lens[:, None]
    logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    logits = torch.nn.functional.pad(logits, (0, nb * block_size - seq_len), value=-math.inf)
    return logits.reshape(batch, q_heads, nb, block_size).amax(dim=-1)


def check_selection_layout(selected, num_selected, seq_lens, block_size):
    """Ascending unique valid indices, then -1 padding; counts within [0, n_blocks]."""
    batch, kv_heads, nb = selected.shape
    assert selected.dtype == torch.int32 and num_selected.dtype == torch.int32
    for b in range(batch):
        n_blocks = ref.num_blocks_for(int(seq_lens[b]), block_size)
        for h in range(kv_heads):
            count = int(num_selected[b, h])
            row = selected[b, h].tolist()
            assert 0 <= count <= n_blocks
            assert row[count:] == [-1] * (nb - count)
            chosen = row[:count]
            assert chosen == sorted(set(chosen))
            assert all(0 <= j < n_blocks for j in chosen)


def selected_sets(selected, num_selected):
    return [[selected[b, h, :int(num_selected[b, h])].tolist() for h in range(selected.shape[1])]
            for b in range(selected.shape[0])]


# ---------------------------------------------------------------------------------------------
# Keeping every block is dense attention.

DENSE_CASES = [
    # (seq, group, head_dim, block_size)
    (1, 1, 64, 16),
    (63, 2, 64, 32),
    (97, 4, 128, 64),
    (97, 8, 256, 32),
    (63, 4, 256, 128),
    (1025, 8, 128, 16),
    (1025, 1, 64, 128),
    (1025, 2, 64, 64),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq,group,head_dim,block_size", DENSE_CASES)
def test_keep_everything_equals_dense(seed, seq, group, head_dim, block_size):
    gen = make_gen(seed, seq + group + head_dim + block_size)
    batch, kv_heads = 3, 2
    q = randn(gen, batch, kv_heads * group, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    v = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    nb = ref.num_blocks_for(seq, block_size)
    expected_out, expected_lse = naive_dense(q, k, v, seq_lens)

    out, lse = ref.dense_attention(q, k, v, seq_lens)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)

    keep_all = [
        dict(policy="topk", budget_fraction=1.0),
        dict(policy="topk", budget_blocks=nb + 3, sink_blocks=0, recent_blocks=0),
        dict(policy="threshold", eps=0.0),
        dict(policy="adaptive", mass=2.0),  # unreachable mass: every block is added
    ]
    for score in ("ball", "box", "tight", "mean", "variance", "oracle"):
        for options in keep_all:
            if options["policy"] == "threshold" and score not in BOUND_SCORES:
                continue
            out, lse, selected, num_selected = ref.sparse_attention(
                q, k, v, block_size=block_size, score=score, seq_lens=seq_lens, **options)
            check_selection_layout(selected, num_selected, seq_lens, block_size)
            n_blocks = [(int(n) + block_size - 1) // block_size for n in seq_lens]
            assert num_selected.tolist() == [[n] * kv_heads for n in n_blocks], (score, options)
            torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(seed, dtype):
    gen = make_gen(seed, 7)
    batch, kv_heads, group, seq, head_dim, block_size = 3, 2, 4, 97, 64, 16
    q = randn(gen, batch, kv_heads * group, head_dim).to(dtype)
    k = randn(gen, batch, kv_heads, seq, head_dim).to(dtype)
    v = randn(gen, batch, kv_heads, seq, head_dim).to(dtype)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    expected_out, expected_lse = naive_dense(q.float(), k.float(), v.float(), seq_lens)

    fp32_out, fp32_lse = ref.dense_attention(q.float(), k.float(), v.float(), seq_lens)
    torch.testing.assert_close(fp32_out, expected_out, rtol=1e-5, atol=1e-6)

    out, lse = ref.dense_attention(q, k, v, seq_lens)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # Same fp32 computation, rounded once at the end.
    assert torch.equal(out, fp32_out.to(dtype)) and torch.equal(lse, fp32_lse)

    nb = ref.num_blocks_for(seq, block_size)
    selected = torch.arange(nb, dtype=torch.int32).expand(batch, kv_heads, nb).contiguous()
    num_selected = torch.full((batch, kv_heads), nb, dtype=torch.int32)
    out, lse = ref.sparse_decode(q, k, v, seq_lens, block_size, selected, num_selected)
    assert out.dtype == dtype
    assert torch.equal(out, fp32_out.to(dtype)) and torch.equal(lse, fp32_lse)


def test_float64_inputs_stay_float64():
    gen = make_gen(0, 9)
    q = randn(gen, 3, 4, 64).double()
    k = randn(gen, 3, 2, 97, 64).double()
    v = randn(gen, 3, 2, 97, 64).double()
    seq_lens = mixed_seq_lens(gen, 3, 97)
    out, lse = ref.dense_attention(q, k, v, seq_lens)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    expected_out, _ = naive_dense(q, k, v, seq_lens)  # float32: agrees to float32 rounding only
    torch.testing.assert_close(out.float(), expected_out, rtol=1e-5, atol=1e-6)
    for b in range(3):
        length = int(seq_lens[b])
        if length:
            logits = (k[b, 0, :length] @ q[b, 0]) / 8.0
            want = torch.softmax(logits, 0) @ v[b, 0, :length]
            torch.testing.assert_close(out[b, 0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq,group,block_size", [(97, 2, 16), (1025, 4, 64), (63, 1, 32)])
def test_sparse_decode_reads_exactly_the_selected_blocks(seed, seq, group, block_size):
    """Only the first num_selected entries count; indices outside [0, n_blocks) are ignored."""
    gen = make_gen(seed, 11 + seq)
    batch, kv_heads, head_dim = 4, 2, 64
    q = randn(gen, batch, kv_heads * group, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    v = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    nb = ref.num_blocks_for(seq, block_size)
    # Garbage everywhere, including in-range indices past num_selected and duplicates.
    selected = torch.randint(-2, nb + 3, (batch, kv_heads, nb), generator=gen, dtype=torch.int32)
    num_selected = torch.randint(0, nb + 1, (batch, kv_heads), generator=gen, dtype=torch.int32)

    out, lse = ref.sparse_decode(q, k, v, seq_lens, block_size, selected, num_selected)

    s = 1.0 / math.sqrt(head_dim)
    for b in range(batch):
        length = int(seq_lens[b])
        n_blocks = ref.num_blocks_for(length, block_size)
        for h in range(kv_heads * group):
            kv = h // group
            blocks = {j for j in selected[b, kv, :int(num_selected[b, kv])].tolist()
                      if 0 <= j < n_blocks}
            tokens = [t for t in range(length) if t // block_size in blocks]
            if not tokens:
                assert torch.all(out[b, h] == 0) and lse[b, h] == -math.inf
                continue
            logits = s * (k[b, kv, tokens] @ q[b, h])
            torch.testing.assert_close(out[b, h], torch.softmax(logits, 0) @ v[b, kv, tokens],
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[b, h], torch.logsumexp(logits, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["topk", "threshold", "adaptive"])
@pytest.mark.parametrize("score", ["tight", "mean", "oracle"])
def test_empty_sequence_gives_zero_output_and_neg_inf_lse(policy, score):
    if policy == "threshold" and score == "mean":
        pytest.skip("threshold needs an upper-bound score")
    gen = make_gen(3, 5)
    q = randn(gen, 3, 4, 64)
    k = randn(gen, 3, 2, 97, 64)
    v = randn(gen, 3, 2, 97, 64)
    seq_lens = torch.tensor([0, 97, 0], dtype=torch.int32)
    out, lse, selected, num_selected = ref.sparse_attention(
        q, k, v, block_size=32, score=score, policy=policy, seq_lens=seq_lens)
    for b in (0, 2):
        assert torch.all(out[b] == 0)
        assert torch.all(torch.isneginf(lse[b]))
        assert torch.all(num_selected[b] == 0)
        assert torch.all(selected[b] == -1)
    assert torch.all(torch.isfinite(lse[1])) and torch.all(num_selected[1] >= 1)


# ---------------------------------------------------------------------------------------------
# Statistics.


def naive_block_stats(k, block_size, seq_lens, num_blocks):
    """Float64 statistics block by block, straight from the formulas."""
    batch, kv_heads, _, head_dim = k.shape
    centroid = torch.zeros(batch, kv_heads, num_blocks, head_dim, dtype=torch.float64)
    lo = torch.zeros_like(centroid)
    hi = torch.zeros_like(centroid)
    radius = torch.zeros(batch, kv_heads, num_blocks, dtype=torch.float64)
    spread = torch.zeros_like(radius)
    for b in range(batch):
        length = int(seq_lens[b])
        for j in range(ref.num_blocks_for(length, block_size)):
            keys = k[b, :, j * block_size:min(length, (j + 1) * block_size)].double()
            mu = keys.mean(dim=1)
            dist = (keys - mu[:, None, :]).norm(dim=-1)
            centroid[b, :, j] = mu
            lo[b, :, j] = keys.amin(dim=1)
            hi[b, :, j] = keys.amax(dim=1)
            radius[b, :, j] = dist.amax(dim=1)
            spread[b, :, j] = (dist ** 2).mean(dim=1)
    return ref.BlockStatsRef(centroid, lo, hi, radius, spread)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq,head_dim,block_size,extra_blocks", [
    (1, 64, 16, 0), (63, 128, 32, 2), (97, 64, 16, 0), (1025, 128, 128, 1), (97, 256, 64, 0)])
def test_block_stats_match_the_formulas(seed, seq, head_dim, block_size, extra_blocks):
    gen = make_gen(seed, 21 + seq)
    batch, kv_heads = 3, 2
    k = randn(gen, batch, kv_heads, seq, head_dim) * 3 + 1
    seq_lens = mixed_seq_lens(gen, batch, seq)
    nb = ref.num_blocks_for(seq, block_size) + extra_blocks
    stats = ref.block_stats(k.to(torch.bfloat16), block_size, seq_lens, num_blocks=nb)
    expected = naive_block_stats(k.to(torch.bfloat16), block_size, seq_lens, nb)
    for name, got, want in zip(ref.BlockStatsRef._fields, stats, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("seq,block_size", [(97, 16), (1025, 64), (63, 128)])
def test_block_stats_of_prefix_equal_stats_of_truncated_cache(seed, seq, block_size):
    gen = make_gen(seed, 31 + seq)
    batch, kv_heads, head_dim = 4, 2, 64
    k = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    nb = ref.num_blocks_for(seq, block_size)
    stats = ref.block_stats(k, block_size, seq_lens)
    for b in range(batch):
        length = int(seq_lens[b])
        truncated = ref.block_stats(k[b:b + 1, :, :length], block_size, num_blocks=nb)
        for name, full, part in zip(ref.BlockStatsRef._fields, stats, truncated):
            assert torch.equal(full[b:b + 1], part), (name, b, length)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_to_contiguous_round_trip(seed, dtype):
    gen = make_gen(seed, 41)
    batch, kv_heads, head_dim, page_size, max_pages = 4, 2, 64, 16, 7
    seq_lens = mixed_seq_lens(gen, batch, max_pages * page_size - 5)
    k = randn(gen, batch, kv_heads, max_pages * page_size, head_dim).to(dtype)
    pages_used = [ref.num_blocks_for(int(n), page_size) for n in seq_lens]
    num_pages = sum(pages_used) + 3  # spare pages hold garbage that must not leak
    k_pages = randn(gen, num_pages, page_size, kv_heads, head_dim).to(dtype)
    order = torch.randperm(num_pages, generator=gen).tolist()
    block_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    for b in range(batch):
        for p in range(pages_used[b]):
            page = order.pop()
            block_table[b, p] = page
            k_pages[page] = k[b, :, p * page_size:(p + 1) * page_size].transpose(0, 1)

    contiguous = ref.paged_to_contiguous(k_pages, block_table, seq_lens)
    expected = k.clone()
    for b in range(batch):
        expected[b, :, int(seq_lens[b]):] = 0
    assert contiguous.dtype == dtype
    assert torch.equal(contiguous, expected)


# ---------------------------------------------------------------------------------------------
# Scores.


def adversarial_inputs(kind: str, gen, batch, q_heads, kv_heads, seq, head_dim):
    q = randn(gen, batch, q_heads, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    group = q_heads // kv_heads
    if kind == "outlier_channels":
        channels = torch.randperm(head_dim, generator=gen)[:3]
        k[..., channels] *= 100.0
        q[..., channels[:1]] *= 20.0
    elif kind == "query_aligned_with_a_key":
        for b in range(batch):
            for h in range(q_heads):
                t = int(torch.randint(0, seq, (1,), generator=gen))
                q[b, h] = 3.0 * k[b, h // group, t]
    elif kind == "all_equal_keys":
        k[:] = randn(gen, batch, kv_heads, 1, head_dim)
    elif kind == "negative_queries":
        q = -q.abs()
        k = k.abs()
    elif kind == "tiny_norms":
        q *= 1e-3
        k *= 1e-4
    elif kind == "huge_norms":
        q *= 1e2
        k *= 1e3
    else:
        assert kind == "random"
    return q, k


ADVERSARIAL = ("random", "outlier_channels", "query_aligned_with_a_key", "all_equal_keys",
               "negative_queries", "tiny_norms", "huge_norms")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("seq,group,head_dim,block_size", [
    (97, 4, 64, 16), (1025, 2, 128, 64), (63, 8, 256, 32), (1, 1, 64, 128)])
def test_bounds_hold(seed, kind, seq, group, head_dim, block_size):
    gen = make_gen(seed, 51 + seq + block_size)
    batch, kv_heads = 3, 2
    q, k = adversarial_inputs(kind, gen, batch, kv_heads * group, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    stats = ref.block_stats(k, block_size, seq_lens)
    scores = {name: ref.head_scores(q, stats, seq_lens, block_size, name) for name in ref.SCORES}

    true_max = true_block_max64(q, k, seq_lens, block_size)
    valid = torch.isfinite(true_max)
    # float32 rounding of the score arithmetic: relative to the largest possible |logit|.
    s = 1.0 / math.sqrt(head_dim)
    magnitude = s * q.abs().sum(-1).double()[:, :, None] * k.abs().amax().double()
    tol = 1e-5 * magnitude
    for name in ("ball", "box", "tight", "variance"):
        got = scores[name][0].double()
        assert torch.all(got[valid] >= true_max[valid] - tol.expand_as(got)[valid]), name
    mean = scores["mean"][0].double()
    assert torch.all(mean[valid] <= true_max[valid] + tol.expand_as(mean)[valid])

    ball, box, tight = scores["ball"][0], scores["box"][0], scores["tight"][0]
    assert torch.equal(tight, torch.minimum(ball, box))
    for name, (got, mlo) in scores.items():
        assert got.dtype == torch.float32 and mlo.dtype == torch.float32
        assert torch.all(torch.isneginf(got[~valid])), name
        assert torch.all(torch.isfinite(got[valid])), name
        # M_g is the largest mean score over the valid blocks, whatever the selected score.
        expected_mlo = scores["mean"][0].amax(dim=-1) if got.shape[-1] else mlo
        assert torch.equal(mlo, expected_mlo), name
    true_head_max = true_max.amax(dim=-1)
    empty = seq_lens == 0
    mlo = scores["mean"][1].double()
    assert torch.all(torch.isneginf(mlo[empty]))
    assert torch.all(mlo[~empty] <= true_head_max[~empty] + tol[~empty][..., 0])


@pytest.mark.parametrize("seed", SEEDS)
def test_scores_match_the_formulas(seed):
    gen = make_gen(seed, 61)
    batch, kv_heads, group, seq, head_dim, block_size, scale = 2, 2, 3, 97, 64, 16, 0.37
    q = randn(gen, batch, kv_heads * group, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = torch.tensor([97, 40], dtype=torch.int32)
    stats = ref.block_stats(k, block_size, seq_lens)
    for name in ref.SCORES:
        got, _ = ref.head_scores(q, stats, seq_lens, block_size, name, scale=scale)
        for b in range(batch):
            for h in range(kv_heads * group):
                for j in range(ref.num_blocks_for(int(seq_lens[b]), block_size)):
                    qv = q[b, h].double()
                    kvh = h // group
                    mu = stats.centroid[b, kvh, j].double()
                    r = float(stats.radius[b, kvh, j])
                    ball = scale * (qv @ mu + qv.norm() * r)
                    box = scale * torch.maximum(qv * stats.lo[b, kvh, j].double(),
                                                qv * stats.hi[b, kvh, j].double()).sum()
                    want = {
                        "ball": ball, "box": box, "tight": min(ball, box), "mean": scale * qv @ mu,
                        "variance": scale * (qv @ mu + qv.norm() * r
                                             * (1 + math.sqrt(float(stats.spread[b, kvh, j])))),
                    }[name]
                    error = abs(float(got[b, h, j]) - float(want))
                    assert error <= 1e-4 * (1 + abs(float(want))), (name, b, h, j)


@pytest.mark.parametrize("seed", SEEDS)
def test_oracle_scores_are_block_log_mass(seed):
    gen = make_gen(seed, 71)
    batch, kv_heads, group, seq, head_dim, block_size = 3, 2, 2, 97, 64, 32
    q = randn(gen, batch, kv_heads * group, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    got = ref.oracle_head_scores(q, k, seq_lens, block_size)
    logits = true_logits64(q, k)
    for b in range(batch):
        length = int(seq_lens[b])
        for j in range(got.shape[-1]):
            tokens = slice(j * block_size, min(length, (j + 1) * block_size))
            if j * block_size >= length:
                assert torch.all(torch.isneginf(got[b, :, j]))
            else:
                want = torch.logsumexp(logits[b, :, tokens], dim=-1)
                torch.testing.assert_close(got[b, :, j].double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The threshold policy's certificate.


def hot_block_inputs(gen, batch, q_heads, kv_heads, seq, head_dim, block_size):
    """Quiet keys plus a few blocks aligned with the query: a certified drop becomes possible."""
    group = q_heads // kv_heads
    # The heads of a group share a direction, as in trained GQA models, so one hot block is hot
    # for the whole group.
    shared = randn(gen, batch, kv_heads, 1, head_dim).expand(-1, -1, group, -1)
    q = shared + 0.5 * randn(gen, batch, kv_heads, group, head_dim)
    q = q.reshape(batch, q_heads, head_dim)
    k = 0.3 * randn(gen, batch, kv_heads, seq, head_dim)
    nb = ref.num_blocks_for(seq, block_size)
    s = 1.0 / math.sqrt(head_dim)
    for b in range(batch):
        for kv in range(kv_heads):
            direction = q[b, kv * group:(kv + 1) * group].sum(0)
            direction = direction / direction.norm()
            for j in torch.randperm(nb, generator=gen)[:3].tolist():
                strength = float(torch.empty(1).uniform_(12.0, 24.0, generator=gen))
                tokens = slice(j * block_size, (j + 1) * block_size)
                k[b, kv, tokens] += strength / (s * math.sqrt(head_dim)) * direction
    return q, k


def dropped_mass(q, k, seq_lens, block_size, selected, num_selected):
    """``[B, Hq]`` float64 softmax mass over all valid tokens that the selection misses."""
    logits = true_logits64(q, k)
    batch, q_heads, seq_len = logits.shape
    group = q_heads // k.shape[1]
    valid = torch.arange(seq_len)[None, :] < seq_lens[:, None]
    probs = torch.softmax(logits.masked_fill(~valid[:, None, :], -math.inf), dim=-1)
    result = torch.zeros(batch, q_heads, dtype=torch.float64)
    for b in range(batch):
        if int(seq_lens[b]) == 0:
            continue
        for h in range(q_heads):
            blocks = selected[b, h // group, :int(num_selected[b, h // group])]
            kept = torch.zeros(seq_len, dtype=torch.bool)
            for j in blocks.tolist():
                kept[j * block_size:(j + 1) * block_size] = True
            result[b, h] = probs[b, h][~kept].sum()
    return result


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", BOUND_SCORES)
@pytest.mark.parametrize("seq,group,head_dim,block_size", [
    (1025, 4, 64, 16), (97, 2, 128, 16), (1025, 8, 128, 64), (63, 1, 256, 32)])
def test_threshold_dropped_mass_is_certified(seed, score, seq, group, head_dim, block_size):
    gen = make_gen(seed, 81 + seq + group)
    batch, kv_heads = 3, 2
    q, k = hot_block_inputs(gen, batch, kv_heads * group, kv_heads, seq, head_dim, block_size)
    v = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    n_blocks = torch.tensor([ref.num_blocks_for(int(n), block_size) for n in seq_lens])
    stats = ref.block_stats(k, block_size, seq_lens)
    dropped_any = 0
    for eps in (0.3, 1e-2, 1e-3, 1e-4, 1e-6):
        _, _, selected, num_selected = ref.sparse_attention(
            q, k, v, stats=stats, block_size=block_size, score=score, policy="threshold",
            eps=eps, seq_lens=seq_lens)
        check_selection_layout(selected, num_selected, seq_lens, block_size)
        lost = dropped_mass(q, k, seq_lens, block_size, selected, num_selected)
        assert torch.all(lost <= eps * (1 + 1e-4) + 1e-9), (eps, lost.max().item())
        dropped_any += int((n_blocks[:, None] - num_selected).sum())
    if seq >= 97:
        assert dropped_any > 0, "inputs too easy: the threshold never dropped a block"


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_on_random_inputs(seed):
    gen = make_gen(seed, 91)
    batch, kv_heads, group, seq, head_dim, block_size = 3, 2, 4, 1025, 64, 16
    q = 3 * randn(gen, batch, kv_heads * group, head_dim)
    k = randn(gen, batch, kv_heads, seq, head_dim)
    v = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    for eps in (0.5, 1e-2, 1e-3):
        _, _, selected, num_selected = ref.sparse_attention(
            q, k, v, block_size=block_size, score="tight", policy="threshold", eps=eps,
            seq_lens=seq_lens)
        lost = dropped_mass(q, k, seq_lens, block_size, selected, num_selected)
        assert torch.all(lost <= eps * (1 + 1e-4) + 1e-9), (eps, lost.max().item())


# ---------------------------------------------------------------------------------------------
# Selection rules on hand-built scores.


def select(scores, seq_len, block_size, mlo=None, kv_heads=1, **options):
    """Run select_blocks for one sequence; scores ``[Hq, NB]`` as a nested list."""
    scores = torch.tensor(scores, dtype=torch.float32)[None]
    nb = scores.shape[-1]
    n_blocks = ref.num_blocks_for(seq_len, block_size)
    scores[..., n_blocks:] = -math.inf
    mlo = torch.zeros(scores.shape[:2]) if mlo is None else torch.tensor([mlo], dtype=torch.float32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    selected, num_selected = ref.select_blocks(scores, mlo, seq_lens, block_size, kv_heads,
                                               **options)
    check_selection_layout(selected, num_selected, seq_lens, block_size)
    assert selected.shape == (1, kv_heads, nb)
    return [selected[0, h, :int(num_selected[0, h])].tolist() for h in range(kv_heads)]


@pytest.mark.parametrize("fraction,n_blocks,expected", [
    (0.1, 10, 1), (0.07, 100, 7), (0.25, 10, 3), (0.01, 10, 1), (0.0, 10, 1), (1.0, 10, 10),
    (0.3, 10, 3), (0.125, 9, 2)])
def test_topk_budget_fraction_rounding(fraction, n_blocks, expected):
    gen = make_gen(0, n_blocks)
    scores = randn(gen, 1, n_blocks).tolist()
    chosen = select(scores, n_blocks * 4, 4, policy="topk", budget_fraction=fraction,
                    sink_blocks=0, recent_blocks=0)[0]
    assert len(chosen) == expected
    order = sorted(range(n_blocks), key=lambda j: (-scores[0][j], j))
    assert chosen == sorted(order[:expected])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("budget,expected_count", [(1, 6), (6, 6), (8, 8), (100, 10)])
def test_topk_counts_forced_blocks_and_keeps_them(seed, budget, expected_count):
    """10 blocks, len = 9*bs + 5: sink 2 -> {0, 1}; recent 3 -> {6, 7, 8}; tail {9}."""
    gen = make_gen(seed, 101)
    block_size = 8
    scores = randn(gen, 2, 10)
    scores[:, [0, 1, 6, 7, 8, 9]] = -1e30  # forced blocks are kept even when scored lowest
    chosen = select(scores.tolist(), 9 * block_size + 5, block_size, policy="topk",
                    budget_blocks=budget, sink_blocks=2, recent_blocks=3)[0]
    assert len(chosen) == expected_count
    group_score = scores.amax(0)
    candidates = sorted([2, 3, 4, 5], key=lambda j: (-float(group_score[j]), j))
    assert chosen == sorted([0, 1, 6, 7, 8, 9] + candidates[:expected_count - 6])


def test_forced_blocks_edge_cases():
    scores = [[float(j) for j in range(6)]]
    # Sink and recent larger than the sequence: everything forced, nothing past n_blocks.
    assert select(scores, 3 * 4, 4, policy="topk", budget_blocks=1, sink_blocks=5,
                  recent_blocks=5) == [[0, 1, 2]]
    # No forced block when len % bs == 0 and sink = recent = 0: the top score wins.
    assert select(scores, 6 * 4, 4, policy="topk", budget_blocks=1, sink_blocks=0,
                  recent_blocks=0) == [[5]]
    # The partial tail is forced even with sink = recent = 0.
    assert select([[5.0, 4.0, 3.0, -9.0]], 3 * 4 + 1, 4, policy="topk", budget_blocks=2,
                  sink_blocks=0, recent_blocks=0) == [[0, 3]]
    # recent counts complete blocks only: len 13, bs 4 -> n_full 3, recent 1 -> block 2, tail 3.
    assert select([[0.0, 9.0, -9.0, -9.0]], 13, 4, policy="topk", budget_blocks=1,
                  sink_blocks=0, recent_blocks=1) == [[2, 3]]
    # A single token: one partial block, always selected.
    assert select([[1.0, 2.0]], 1, 4, policy="topk", budget_blocks=1) == [[0]]


def test_topk_ties_break_to_the_lower_index():
    assert select([[2.0] * 8], 32, 4, policy="topk", budget_blocks=3, sink_blocks=0,
                  recent_blocks=0) == [[0, 1, 2]]
    assert select([[5.0, 1.0, 5.0, 5.0, 1.0, 5.0, 0.0]], 28, 4, policy="topk", budget_blocks=2,
                  sink_blocks=0, recent_blocks=0) == [[0, 2]]
    assert select([[5.0, 1.0, 5.0, 5.0, 1.0, 5.0, 0.0]], 28, 4, policy="topk", budget_blocks=6,
                  sink_blocks=0, recent_blocks=0) == [[0, 1, 2, 3, 4, 5]]


def test_topk_group_score_is_the_max_over_the_group():
    # KV head 0 owns query heads 0, 1; KV head 1 owns 2, 3.
    scores = [[9.0, 0.0, 0.0, 0.0, 0.0],
              [0.0, 0.0, 0.0, 8.0, 0.0],
              [0.0, 1.0, 0.0, 0.0, 0.0],
              [0.0, 0.0, 2.0, 0.0, 0.0]]
    assert select(scores, 20, 4, kv_heads=2, policy="topk", budget_blocks=2, sink_blocks=0,
                  recent_blocks=0) == [[0, 3], [1, 2]]


def threshold_scores(bounds, n_tokens):
    """Scores whose block bound n_j * exp(score - 0) equals ``bounds`` (M_g = 0)."""
    return [math.log(b / n_tokens) for b in bounds]


def test_threshold_walk():
    bounds = [0.5, 1e-3, 2e-3, 3e-3, 1e-3, 0.2]
    scores = [threshold_scores(bounds, 4)]
    options = dict(policy="threshold", sink_blocks=0, recent_blocks=0)
    # Ascending priority: 4, 1 (tie: higher index dropped first), 2, 3, 5, 0.
    assert select(scores, 24, 4, eps=4.5e-3, **options) == [[0, 3, 5]]
    assert select(scores, 24, 4, eps=1.5e-3, **options) == [[0, 1, 2, 3, 5]]
    assert select(scores, 24, 4, eps=0.5e-3, **options) == [[0, 1, 2, 3, 4, 5]]
    # Everything but the top block: 7e-3 + 0.2 <= eps < 0.707.
    assert select(scores, 24, 4, eps=0.21 + 9.5e-3, **options) == [[0]]
    assert select(scores, 24, 4, eps=10.0, **options) == [[]]
    # Forced blocks are never dropped and do not count toward the dropped mass.
    assert select(scores, 24, 4, eps=4.5e-3, policy="threshold", sink_blocks=1,
                  recent_blocks=1) == [[0, 3, 5]]
    assert select(scores, 24, 4, eps=4.5e-3, policy="threshold", sink_blocks=2,
                  recent_blocks=2) == [[0, 1, 3, 4, 5]]


def test_threshold_priority_uses_block_sizes_and_each_heads_own_bound():
    # Two heads with different M_g (0 and 5). Block 1 is negligible for head 0 but not for
    # head 1, so the group keeps it; block 2 is negligible for both and is dropped.
    head0 = threshold_scores([0.5, 1e-4, 1e-4, 0.5], 4)
    head1 = [5.0 + x for x in threshold_scores([0.5, 0.3, 1e-4, 0.5], 4)]
    chosen = select([head0, head1], 16, 4, mlo=[0.0, 5.0], policy="threshold", eps=1e-3,
                    sink_blocks=0, recent_blocks=0)
    assert chosen == [[0, 1, 3]]


def adaptive_scores(weights):
    return [math.log(w) for w in weights]


def test_adaptive_mass_and_clamps():
    weights = [0.1, 0.4, 0.2, 0.25, 0.05]
    scores = [adaptive_scores(weights)]
    base = dict(policy="adaptive", sink_blocks=0, recent_blocks=0)
    assert select(scores, 20, 4, mass=0.5, **base) == [[1, 3]]
    assert select(scores, 20, 4, mass=0.39, **base) == [[1]]
    assert select(scores, 20, 4, mass=0.9, **base) == [[0, 1, 2, 3]]
    assert select(scores, 20, 4, mass=0.39, min_blocks=3, **base) == [[1, 2, 3]]
    assert select(scores, 20, 4, mass=0.9, max_blocks=2, **base) == [[1, 3]]
    assert select(scores, 20, 4, mass=0.9, min_blocks=100, **base) == [[0, 1, 2, 3, 4]]
    assert select(scores, 20, 4, mass=0.0, min_blocks=0, **base) == [[]]
    # Forced mass counts: sink block 0 brings 0.1, then block 1 reaches 0.5 >= 0.45.
    assert select(scores, 20, 4, mass=0.45, policy="adaptive", sink_blocks=1,
                  recent_blocks=0) == [[0, 1]]
    # Never below the forced blocks, even with max_blocks smaller.
    assert select(scores, 20, 4, mass=0.99, max_blocks=1, policy="adaptive", sink_blocks=1,
                  recent_blocks=1) == [[0, 4]]
    # Ties by the lower index: equal weights, two blocks needed.
    assert select([[0.0] * 4], 16, 4, mass=0.45, **base) == [[0, 1]]


def test_adaptive_weights_blocks_by_token_count_and_averages_the_group():
    # 4 blocks, len 13: n = 4, 4, 4, 1. Equal scores -> masses 4/13, 4/13, 4/13, 1/13.
    # The partial tail (block 3) is forced; it alone brings 1/13.
    assert select([[0.0] * 4], 13, 4, mass=0.3, policy="adaptive", sink_blocks=0,
                  recent_blocks=0) == [[0, 3]]
    # Group mean: head 0 puts all its mass on block 0, head 1 all of its on block 2, so blocks 0
    # and 2 tie at 0.5 and the lower index comes first.
    big = 50.0
    scores = [[big, 0.0, 0.0, 0.0], [0.0, 0.0, big + 1.0, 0.0]]
    assert select(scores, 16, 4, mass=0.45, policy="adaptive", sink_blocks=0,
                  recent_blocks=0) == [[0]]
    assert select(scores, 16, 4, mass=0.9, policy="adaptive", sink_blocks=0,
                  recent_blocks=0) == [[0, 2]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("policy", ["topk", "threshold", "adaptive"])
def test_pipeline_selections_are_well_formed(seed, policy):
    gen = make_gen(seed, 111)
    batch, kv_heads, group, seq, head_dim, block_size = 4, 2, 4, 1025, 64, 32
    q, k = hot_block_inputs(gen, batch, kv_heads * group, kv_heads, seq, head_dim, block_size)
    v = randn(gen, batch, kv_heads, seq, head_dim)
    seq_lens = mixed_seq_lens(gen, batch, seq)
    for score in ("tight", "box", "variance", "oracle"):
        if policy == "threshold" and score == "variance":
            continue
        out, lse, selected, num_selected = ref.sparse_attention(
            q, k, v, block_size=block_size, score=score, policy=policy, sink_blocks=2,
            recent_blocks=2, budget_fraction=0.2, min_blocks=3, max_blocks=9, mass=0.9,
            eps=1e-2, seq_lens=seq_lens)
        check_selection_layout(selected, num_selected, seq_lens, block_size)
        for b, rows in enumerate(selected_sets(selected, num_selected)):
            forced = ref.forced_blocks(int(seq_lens[b]), block_size, 2, 2)
            for row in rows:
                assert set(forced) <= set(row), (score, b)
        expected_out, expected_lse = ref.sparse_decode(q, k, v, seq_lens, block_size, selected,
                                                       num_selected)
        assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_precomputed_stats_with_spare_capacity_give_the_same_result():
    gen = make_gen(0, 121)
    q = randn(gen, 2, 4, 64)
    k = randn(gen, 2, 2, 97, 64)
    v = randn(gen, 2, 2, 97, 64)
    seq_lens = torch.tensor([97, 50], dtype=torch.int32)
    stats = ref.block_stats(k, 16, seq_lens, num_blocks=10)
    with_stats = ref.sparse_attention(q, k, v, stats=stats, block_size=16, seq_lens=seq_lens,
                                      budget_blocks=3)
    without = ref.sparse_attention(q, k, v, block_size=16, seq_lens=seq_lens, budget_blocks=3)
    assert torch.equal(with_stats[0], without[0]) and torch.equal(with_stats[1], without[1])
    assert with_stats[2].shape == (2, 2, 10)
    assert torch.equal(with_stats[2][..., :7], without[2])
    assert torch.all(with_stats[2][..., 7:] == -1)
