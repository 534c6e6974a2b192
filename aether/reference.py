"""Pure-PyTorch reference of AETHER: the executable form of docs/architecture.md ("Semantics").

Every function here is written for clarity, not speed: it is the oracle the C++ CPU kernels and
the CUDA kernels are tested against, so it follows the documented rules literally: float32 maths
whatever the input dtype (except that attention over float64 inputs stays in float64, so tests
can measure low-precision error against a more accurate oracle), the selection walks in double,
ties broken by the lower block index.
Selection loops over (batch, kv head) and blocks in Python because the rules are sequential walks;
everything per token is vectorised.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads, ``G = Hq // Hkv`` query heads per KV
head (query head ``g`` reads KV head ``g // G``), ``S`` token slots, ``D`` head_dim, ``NB`` blocks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

SCORES = ("ball", "box", "tight", "mean", "variance")
# qsketch reads a key sketch (key_sketch below), not the block statistics alone.
SKETCH_SCORE = "qsketch"
POLICIES = ("topk", "threshold", "adaptive")
GROUP_AGGS = ("max", "sum")
SKETCH_LEVELS = 15  # 4-bit codes
# The threshold policy certifies a bound on the dropped mass only when scores are upper bounds.
UPPER_BOUND_SCORES = ("ball", "box", "tight")


class BlockStatsRef(NamedTuple):
    """Per-block key statistics, float32: vectors ``[B, Hkv, NB, D]``, scalars ``[B, Hkv, NB]``."""

    centroid: Tensor
    lo: Tensor
    hi: Tensor
    radius: Tensor
    spread: Tensor


def num_blocks_for(seq_len: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` tokens needed for ``seq_len`` tokens (ceil)."""
    return (seq_len + block_size - 1) // block_size


def _default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _default_seq_lens(batch: int, seq_len: int, seq_lens: Tensor | None, device) -> Tensor:
    if seq_lens is None:
        return torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    return seq_lens


def _token_valid(seq_lens: Tensor, num_tokens: int) -> Tensor:
    """``[B, num_tokens]`` bool: slot t holds a token of sequence b (t < seq_lens[b])."""
    positions = torch.arange(num_tokens, device=seq_lens.device)
    return positions[None, :] < seq_lens.to(torch.int64)[:, None]


def _block_token_counts(seq_lens: Tensor, block_size: int, num_blocks: int) -> Tensor:
    """``[B, NB]`` int64: n_j, the number of tokens of block j (0 for invalid blocks)."""
    starts = torch.arange(num_blocks, device=seq_lens.device, dtype=torch.int64) * block_size
    lens = seq_lens.to(torch.int64)[:, None]
    return (lens - starts[None, :]).clamp(min=0, max=block_size)


def paged_to_contiguous(k_pages: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
    """Gather a paged cache into a contiguous one.

    Args:
        k_pages: ``[num_pages, page_size, Hkv, D]``.
        block_table: ``[B, max_pages]`` int32; page p of sequence b is
            ``k_pages[block_table[b, p]]``.
        seq_lens: ``[B]`` tokens per sequence.

    Returns:
        ``[B, Hkv, max_pages * page_size, D]`` in the dtype of ``k_pages``; slots at or past
        ``seq_lens[b]`` are zero (their block-table entries are never dereferenced, so they may
        hold anything, e.g. -1).
    """
    num_pages, page_size, kv_heads, head_dim = k_pages.shape
    batch, max_pages = block_table.shape
    pages_used = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    page_in_use = torch.arange(max_pages, device=block_table.device)[None, :] < pages_used[:, None]
    # Unused entries are replaced by page 0 for the gather and zeroed below by the token mask.
    table = block_table.to(torch.int64)
    safe_table = torch.where(page_in_use, table, torch.zeros_like(table))
    if safe_table.numel():
        assert 0 <= int(safe_table.min()) and int(safe_table.max()) < num_pages
    gathered = k_pages[safe_table]  # [B, max_pages, page_size, Hkv, D]
    tokens = gathered.reshape(batch, max_pages * page_size, kv_heads, head_dim)
    valid = _token_valid(seq_lens, max_pages * page_size)
    tokens = tokens.masked_fill(~valid[:, :, None, None], 0)
    return tokens.permute(0, 2, 1, 3).contiguous()


def block_stats(k: Tensor, block_size: int, seq_lens: Tensor | None = None,
                num_blocks: int | None = None) -> BlockStatsRef:
    """Statistics of every KV block (docs/architecture.md, "Block statistics").

    Args:
        k: keys ``[B, Hkv, S, D]``, any float dtype (converted to float32 first).
        block_size: tokens per block.
        seq_lens: ``[B]`` valid tokens per sequence (default ``S``); ``seq_lens[b] <= S``.
        num_blocks: capacity NB of the outputs (default ``ceil(S / block_size)``); blocks past
            ``ceil(seq_lens[b] / block_size)`` are written as zeros.
    """
    batch, kv_heads, seq_len, head_dim = k.shape
    seq_lens = _default_seq_lens(batch, seq_len, seq_lens, k.device)
    nb = num_blocks_for(seq_len, block_size) if num_blocks is None else num_blocks
    assert all(0 <= int(n) <= min(seq_len, nb * block_size) for n in seq_lens)

    capacity = nb * block_size
    keys = k.float()
    if seq_len < capacity:
        keys = torch.nn.functional.pad(keys, (0, 0, 0, capacity - seq_len))
    else:
        keys = keys[:, :, :capacity]
    keys = keys.reshape(batch, kv_heads, nb, block_size, head_dim)

    token_valid = _token_valid(seq_lens, capacity).reshape(batch, 1, nb, block_size)
    counts = _block_token_counts(seq_lens, block_size, nb)  # [B, NB]
    block_valid = (counts > 0)[:, None, :]  # [B, 1, NB]
    # Empty blocks divide by 1 so their statistics come out as exact zeros, not NaN.
    denom = counts.clamp(min=1).to(torch.float32)[:, None, :]

    masked_keys = keys.masked_fill(~token_valid[..., None], 0.0)
    centroid = masked_keys.sum(dim=3) / denom[..., None]

    sq_dist = ((keys - centroid[:, :, :, None, :]) ** 2).sum(dim=-1)  # [B, Hkv, NB, bs]
    sq_dist = sq_dist.masked_fill(~token_valid, 0.0)
    radius = sq_dist.sqrt().amax(dim=-1)
    spread = sq_dist.sum(dim=-1) / denom

    lo = keys.masked_fill(~token_valid[..., None], math.inf).amin(dim=3)
    hi = keys.masked_fill(~token_valid[..., None], -math.inf).amax(dim=3)
    lo = lo.masked_fill(~block_valid[..., None], 0.0)
    hi = hi.masked_fill(~block_valid[..., None], 0.0)
    return BlockStatsRef(centroid.contiguous(), lo.contiguous(), hi.contiguous(),
                         radius.contiguous(), spread.contiguous())


def _expand_to_query_heads(x: Tensor, group: int) -> Tensor:
    """Repeat each KV head ``group`` times along dim 1 (Hugging Face ``repeat_kv`` order)."""
    return x.repeat_interleave(group, dim=1)


def head_scores(q: Tensor, stats: BlockStatsRef, seq_lens: Tensor, block_size: int,
                score: str, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Radar score of every block for every query head (docs/architecture.md, "Scores").

    Args:
        q: ``[B, Hq, D]`` decode queries.
        stats: statistics from :func:`block_stats` with NB blocks.
        seq_lens: ``[B]`` valid tokens per sequence.
        score: one of ``ball``, ``box``, ``tight``, ``mean``, ``variance``.

    Returns:
        ``(scores [B, Hq, NB] float32, -inf for invalid blocks;
        mlo [B, Hq] float32 = M_g = max over valid blocks of s * q.centroid, -inf when empty)``.
    """
    assert score in SCORES, score
    batch, q_heads, head_dim = q.shape
    kv_heads, nb = stats.centroid.shape[1], stats.centroid.shape[2]
    assert q_heads % kv_heads == 0
    group = q_heads // kv_heads
    s = _default_scale(head_dim, scale)

    qf = q.float()
    centroid = _expand_to_query_heads(stats.centroid, group)  # [B, Hq, NB, D]
    lo = _expand_to_query_heads(stats.lo, group)
    hi = _expand_to_query_heads(stats.hi, group)
    radius = _expand_to_query_heads(stats.radius, group)  # [B, Hq, NB]
    spread = _expand_to_query_heads(stats.spread, group)

    dot = torch.einsum("bhd,bhnd->bhn", qf, centroid)
    q_norm = qf.norm(dim=-1)[:, :, None]
    mean_score = s * dot
    ball = s * (dot + q_norm * radius)
    box = s * torch.maximum(qf[:, :, None, :] * lo, qf[:, :, None, :] * hi).sum(dim=-1)
    if score == "ball":
        scores = ball
    elif score == "box":
        scores = box
    elif score == "tight":
        scores = torch.minimum(ball, box)
    elif score == "mean":
        scores = mean_score
    else:  # variance: the seed's heuristic, ranking only (not a bound)
        scores = s * (dot + q_norm * radius * (1.0 + spread.sqrt()))

    block_valid = (_block_token_counts(seq_lens, block_size, nb) > 0)[:, None, :]  # [B, 1, NB]
    scores = scores.masked_fill(~block_valid, -math.inf)
    if nb == 0:
        mlo = torch.full((batch, q_heads), -math.inf, dtype=torch.float32, device=q.device)
    else:
        mlo = mean_score.masked_fill(~block_valid, -math.inf).amax(dim=-1)
    return scores.contiguous(), mlo.contiguous()


# ----------------------------------------------------------------------------------------------
# Key sketch ("qsketch", docs/architecture.md "Key sketch")
# ----------------------------------------------------------------------------------------------

def _quantise_groups(x: Tensor, valid: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per (group, channel) of ``x [B, H, NG, T, C]`` over the valid tokens (``valid [B, 1, NG, T,
    1]``): ``lo = bf16(min)``, ``hi = bf16(max)`` (0 for an empty group), ``step = (hi - lo) /
    levels`` (float32) and ``code = clamp(rint((x - lo) / step), 0, levels)`` where ``step > 0``,
    else 0 (also for invalid tokens). Returns ``(lo, hi, codes)`` with float codes."""
    group_valid = valid.any(dim=3)
    lo = x.masked_fill(~valid, math.inf).amin(dim=3).masked_fill(~group_valid, 0.0).to(torch.bfloat16)
    hi = x.masked_fill(~valid, -math.inf).amax(dim=3).masked_fill(~group_valid, 0.0).to(torch.bfloat16)
    step = (hi.float() - lo.float()) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))[:, :, :, None, :]
    codes = torch.round((x - lo.float()[:, :, :, None, :]) / safe).clamp(0, levels)
    codes = torch.where((step > 0)[:, :, :, None, :] & valid, codes, torch.zeros_like(codes))
    return lo, hi, codes


def sketch_num_blocks(seq_len: int, block_size: int, blocks_per_sketch: int = 1) -> int:
    """Blocks of a sketch covering ``seq_len`` tokens: a multiple of ``blocks_per_sketch``."""
    sb = block_size * blocks_per_sketch
    return num_blocks_for(seq_len, sb) * blocks_per_sketch


def key_sketch(k: Tensor, key_proj: Tensor, block_size: int, seq_lens: Tensor | None = None,
               num_blocks: int | None = None, blocks_per_sketch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The 4-bit key sketch of every block.

    A *sketch block* is ``P = blocks_per_sketch`` consecutive blocks (``P * block_size`` tokens);
    its ranges and centroid are shared by its blocks. Token t of KV head h has ``R`` coefficients
    ``x_tr = sum_d key_proj[h, d, r] k_td`` (float32). Per (sketch block, coefficient) over its
    valid tokens: ``lo = bf16(min x)``, ``hi = bf16(max x)`` (round to nearest even),
    ``step = (hi - lo) / 15`` (float32) and ``code = clamp(rint((x - lo) / step), 0, 15)`` where
    ``step > 0``, else 0; the centroid is ``bf16(mean of the valid keys)`` (float32 sum). Invalid
    tokens get code 0, empty sketch blocks zero ranges and a zero centroid.

    Args:
        k: ``[B, Hkv, S, D]`` keys. key_proj: ``[Hkv, D, R]`` float32, R even.
        num_blocks: capacity NB in blocks, a multiple of P (default: the fewest covering S).

    Returns:
        ``(codes [B, Hkv, NB, block_size, R // 2] uint8``, coefficient 2i in the low nibble of
        byte i and 2i + 1 in the high nibble; ``ranges [B, Hkv, NB / P, 2, R] bfloat16``: lo, hi;
        ``centroid [B, Hkv, NB / P, D] bfloat16)``.
    """
    batch, kv_heads, seq_len, head_dim = k.shape
    rank = key_proj.shape[2]
    assert key_proj.shape == (kv_heads, head_dim, rank) and rank % 2 == 0
    per = blocks_per_sketch
    seq_lens = _default_seq_lens(batch, seq_len, seq_lens, k.device)
    nb = sketch_num_blocks(seq_len, block_size, per) if num_blocks is None else num_blocks
    assert nb % per == 0, "num_blocks must be a multiple of blocks_per_sketch"
    ns, sb = nb // per, block_size * per
    capacity = nb * block_size
    keys = k.float()
    keys = torch.nn.functional.pad(keys, (0, 0, 0, capacity - seq_len)) if seq_len < capacity \
        else keys[:, :, :capacity]
    x = torch.einsum("bhsd,hdr->bhsr", keys, key_proj.float()).reshape(batch, kv_heads, ns, sb, rank)
    valid = _token_valid(seq_lens, capacity).reshape(batch, 1, ns, sb, 1)
    lo, hi, codes = _quantise_groups(x, valid, SKETCH_LEVELS)
    codes = codes.to(torch.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(batch, kv_heads, nb, block_size, rank // 2)
    ranges = torch.stack([lo, hi], dim=3)  # [B, Hkv, NS, 2, R]
    counts = valid.sum(dim=3).float()  # [B, 1, NS, 1]
    block_keys = keys.reshape(batch, kv_heads, ns, sb, head_dim)
    total = torch.zeros(batch, kv_heads, ns, head_dim, dtype=torch.float32, device=k.device)
    for t in range(sb):  # token order, as the kernels sum; invalid slots (maybe not finite) add nothing
        total = torch.where(valid[:, :, :, t], total + block_keys[:, :, :, t], total)
    centroid = (total / counts.clamp(min=1.0)).to(torch.bfloat16)
    return packed.contiguous(), ranges.contiguous(), centroid.contiguous()


def unpack_sketch(codes: Tensor, ranges: Tensor) -> Tensor:
    """Dequantised coefficients ``[B, Hkv, NB, bs, R]`` float32: ``lo + code * step``, with the
    ranges of each block's sketch block (P = NB / ranges.shape[2] blocks share one)."""
    per = codes.shape[2] // ranges.shape[2] if ranges.shape[2] else 1  # an empty sketch: any P
    low = (codes & 0xF).to(torch.float32)
    high = (codes >> 4).to(torch.float32)
    code = torch.stack([low, high], dim=-1).flatten(-2)  # [B, Hkv, NB, bs, R]
    lo = ranges[:, :, :, 0].float().repeat_interleave(per, dim=2)
    step = (ranges[:, :, :, 1].float().repeat_interleave(per, dim=2) - lo) / SKETCH_LEVELS
    return lo[:, :, :, None, :] + code * step[:, :, :, None, :]


def sketch_head_scores(q: Tensor, codes: Tensor, ranges: Tensor, key_proj: Tensor, query_proj: Tensor,
                       seq_lens: Tensor, block_size: int, *, centroid: Tensor | None = None,
                       centroid_weight: float = 0.0, scale: float | None = None) -> Tensor:
    """qsketch scores ``[B, Hq, NB]`` (-inf for invalid blocks).

    Query head g of KV head h: ``u_g = query_proj_g^T q_g``; approximate logit of valid token t
    of block j in sketch block m = j / P: ``s * (u_g . deq_t + a * (q_g - key_proj_h u_g) . c_m)``
    with ``deq_t`` the dequantised coefficients, ``c_m`` the sketch's centroid and
    ``a = centroid_weight``; the score is the log-sum-exp of these over the block's valid tokens.
    P = NB / ranges.shape[2].
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, nb = codes.shape[1], codes.shape[2]
    per = nb // ranges.shape[2] if ranges.shape[2] else 1
    group = q_heads // kv_heads
    s = _default_scale(head_dim, scale)
    qf = q.float()
    u = torch.einsum("bgd,gdr->bgr", qf, query_proj.float())
    deq = _expand_to_query_heads(unpack_sketch(codes, ranges), group)  # [B, Hq, NB, bs, R]
    logits = torch.einsum("bgr,bgntr->bgnt", u, deq)
    if centroid_weight != 0.0:
        assert centroid is not None, "centroid_weight != 0 needs the sketch centroids"
        kp = _expand_to_query_heads(key_proj.float()[None], group)[0]  # [Hq, D, R]
        q_rest = qf - torch.einsum("gdr,bgr->bgd", kp, u)
        cent = _expand_to_query_heads(centroid.float().repeat_interleave(per, dim=2), group)
        base = torch.einsum("bgd,bgnd->bgn", q_rest, cent)
        logits = logits + centroid_weight * base[..., None]
    valid = _token_valid(seq_lens, nb * block_size).reshape(batch, 1, nb, block_size)
    logits = (s * logits).masked_fill(~valid, -math.inf)
    return torch.logsumexp(logits, dim=-1).contiguous()


# ----------------------------------------------------------------------------------------------
# Two-stage selection ("refine", docs/architecture.md "Key codes and refine scores")
# ----------------------------------------------------------------------------------------------

CODE_BITS = (2, 4)


class RefineRef(NamedTuple):
    """Two-stage selection settings for :func:`sparse_attention`: the first selection keeps
    ``candidate_blocks`` blocks (> 0) or a ``candidate_fraction`` of them; their key codes
    (``bits`` per channel, ranges per group of ``blocks_per_group`` blocks; built from k when
    ``codes`` is None) rank them; the call's budget keeps the final blocks. ``extra`` (indices
    ``[B, Hkv, L']`` int, counts ``[B, Hkv]``), e.g. the previous decode step's selection, joins
    the candidates (:func:`union_blocks`)."""

    bits: int = 2
    candidate_blocks: int = 0
    candidate_fraction: float = 0.3
    blocks_per_group: int = 1
    codes: Tensor | None = None
    ranges: Tensor | None = None
    extra: tuple[Tensor, Tensor] | None = None


def mask_from_indices(selected: Tensor, num_selected: Tensor, num_blocks: int) -> Tensor:
    """``[B, Hkv, NB]`` bool mask of the first ``num_selected`` entries of ``selected`` (entries
    outside ``[0, num_blocks)`` are ignored)."""
    sel = selected.to(torch.int64)
    positions = torch.arange(sel.shape[-1], device=sel.device)
    in_row = positions < num_selected.to(torch.int64)[..., None]
    usable = in_row & (sel >= 0) & (sel < num_blocks)
    target = torch.where(usable, sel, torch.full_like(sel, num_blocks))
    mask = torch.zeros(*sel.shape[:-1], num_blocks + 1, dtype=torch.bool, device=sel.device)
    mask.scatter_(-1, target, True)
    return mask[..., :num_blocks]


def indices_from_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Bool ``[B, Hkv, NB]`` -> (ascending indices padded with -1 int32, counts int32)."""
    nb = mask.shape[-1]
    idx = torch.arange(nb, device=mask.device).expand_as(mask)
    keyed = torch.where(mask, idx, torch.full_like(idx, nb))
    ordered = keyed.sort(dim=-1).values
    selected = torch.where(ordered < nb, ordered, torch.full_like(ordered, -1)).to(torch.int32)
    return selected, mask.sum(dim=-1).to(torch.int32)


def union_blocks(indices: Tensor, counts: Tensor, extra: Tensor, extra_counts: Tensor,
                 num_blocks: int) -> tuple[Tensor, Tensor]:
    """The union of two block lists per (b, kv head): the first ``counts`` entries of ``indices``
    and the first ``extra_counts`` entries of ``extra`` (entries outside ``[0, num_blocks)`` are
    ignored). Returns ascending int32 indices ``[B, Hkv, num_blocks]`` padded with -1 and their
    int32 counts ``[B, Hkv]``."""
    return indices_from_mask(mask_from_indices(indices, counts, num_blocks)
                             | mask_from_indices(extra, extra_counts, num_blocks))


def key_codes(k: Tensor, bits: int, block_size: int, seq_lens: Tensor | None = None,
              num_blocks: int | None = None, blocks_per_group: int = 1,
              channel_major: bool = False, channel_slots: Tensor | None = None,
              stored_channels: int | None = None) -> tuple[Tensor, Tensor]:
    """Every channel of every key as a ``bits``-bit code (the second stage's key store).

    A group is ``Pg = blocks_per_group`` consecutive blocks. Per (group, channel) over the valid
    tokens: ``lo = bf16(min k)``, ``hi = bf16(max k)`` (round to nearest even), ``step = (hi - lo) /
    (2^bits - 1)`` (float32), ``code = clamp(rint((k - lo) / step), 0, 2^bits - 1)`` where
    ``step > 0``, else 0. Invalid tokens get code 0, empty groups zero ranges.

    Returns:
        ``(codes [B, Hkv, NB, block_size, D * bits / 8] uint8`` (channel d at bit ``d * bits`` of
        the token's bytes, little-endian), ``ranges [B, Hkv, NB / Pg, 2, D] bfloat16``: lo, hi).
        With ``channel_major`` the same codes as ``[B, Hkv, NB / Pg, D, Pg * block_size * bits / 8]``:
        per group, channel d's run holds the group's token t at bit ``t * bits`` (the qcodes score's
        layout, :func:`channel_head_scores`). A channel pool (``channel_slots`` int ``[B, Hkv, D]``,
        channel-major only) stores ``S = stored_channels`` runs per group, channel d's at slot
        ``channel_slots[b, h, d]`` (outside ``[0, S)``: not stored); codes ``[B, Hkv, NB / Pg, S,
        run]``, zero at a slot no channel names; the ranges still cover every channel.
    """
    assert bits in CODE_BITS, f"bits must be one of {CODE_BITS}"
    batch, kv_heads, seq_len, head_dim = k.shape
    per = blocks_per_group
    levels = (1 << bits) - 1
    seq_lens = _default_seq_lens(batch, seq_len, seq_lens, k.device)
    nb = sketch_num_blocks(seq_len, block_size, per) if num_blocks is None else num_blocks
    assert nb % per == 0, "num_blocks must be a multiple of blocks_per_group"
    ng, gt = nb // per, block_size * per
    capacity = nb * block_size
    keys = k.float()
    keys = torch.nn.functional.pad(keys, (0, 0, 0, capacity - seq_len)) if seq_len < capacity \
        else keys[:, :, :capacity]
    x = keys.reshape(batch, kv_heads, ng, gt, head_dim)
    valid = _token_valid(seq_lens, capacity).reshape(batch, 1, ng, gt, 1)
    lo, hi, codes = _quantise_groups(x, valid, levels)
    codes = codes.to(torch.int32)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=k.device, dtype=torch.int32) * bits
    ranges = torch.stack([lo, hi], dim=3).contiguous()
    if channel_major:  # [B, Hkv, NG, D, gt]: consecutive tokens of a channel share a byte
        codes = codes.transpose(3, 4).reshape(batch, kv_heads, ng, head_dim, gt // per_byte, per_byte)
        runs = (codes << shifts).sum(dim=-1).to(torch.uint8)
        if channel_slots is None:
            return runs.contiguous(), ranges
        stored = int(stored_channels)
        slots = channel_slots.to(device=k.device, dtype=torch.int64)
        # Each stored channel's run to its slot; channels not stored go to a dropped extra slot S.
        target = torch.where((slots >= 0) & (slots < stored), slots, stored)
        pooled = torch.zeros(batch, kv_heads, ng, stored + 1, runs.shape[-1], dtype=torch.uint8, device=k.device)
        pooled.scatter_(3, target[:, :, None, :, None].expand(-1, -1, ng, -1, runs.shape[-1]), runs)
        return pooled[:, :, :, :stored].contiguous(), ranges
    codes = codes.reshape(batch, kv_heads, ng, gt, head_dim // per_byte, per_byte)
    packed = (codes << shifts).sum(dim=-1).to(torch.uint8)
    packed = packed.reshape(batch, kv_heads, nb, block_size, head_dim * bits // 8)
    return packed.contiguous(), ranges


def unpack_key_codes(codes: Tensor, ranges: Tensor, bits: int) -> Tensor:
    """Dequantised keys ``[B, Hkv, NB, bs, D]`` float32: ``lo + code * step`` with the ranges of
    each block's group (Pg = NB / ranges.shape[2] blocks share one)."""
    per = codes.shape[2] // ranges.shape[2] if ranges.shape[2] else 1
    levels = (1 << bits) - 1
    shifts = torch.arange(8 // bits, device=codes.device, dtype=torch.int32) * bits
    code = ((codes.to(torch.int32)[..., None] >> shifts) & levels).flatten(-2).float()  # [B, Hkv, NB, bs, D]
    lo = ranges[:, :, :, 0].float().repeat_interleave(per, dim=2)
    step = (ranges[:, :, :, 1].float().repeat_interleave(per, dim=2) - lo) / levels
    return lo[:, :, :, None, :] + code * step[:, :, :, None, :]


def refine_head_scores(q: Tensor, codes: Tensor, ranges: Tensor, bits: int, seq_lens: Tensor, block_size: int,
                       candidates: Tensor, num_candidates: Tensor, scale: float | None = None) -> Tensor:
    """Second-stage scores ``[B, Hq, L]`` float32, L = ``candidates.shape[-1]``: for the first
    ``num_candidates[b, h]`` entries j of ``candidates[b, h]`` that are valid blocks (``j <
    ceil(seq_len / bs)``, ``j < NB`` of the codes, ``j < L``), the log-sum-exp over block j's valid
    tokens of ``s * q_g . dequant(k_t)`` (:func:`unpack_key_codes`); -inf everywhere else."""
    batch, q_heads, head_dim = q.shape
    kv_heads, nb = codes.shape[1], codes.shape[2]
    group = q_heads // kv_heads
    s = _default_scale(head_dim, scale)
    deq = _expand_to_query_heads(unpack_key_codes(codes, ranges, bits), group)  # [B, Hq, NB, bs, D]
    logits = s * torch.einsum("bgd,bgntd->bgnt", q.float(), deq)
    valid = _token_valid(seq_lens, nb * block_size).reshape(batch, 1, nb, block_size)
    scores = torch.logsumexp(logits.masked_fill(~valid, -math.inf), dim=-1)
    length = candidates.shape[-1]
    n_blocks = ((seq_lens.to(torch.int64) + block_size - 1) // block_size).clamp(max=min(nb, length))
    is_candidate = torch.zeros(batch, kv_heads, length, dtype=torch.bool, device=q.device)
    for b in range(batch):
        for h in range(kv_heads):
            for j in candidates[b, h, :max(0, min(int(num_candidates[b, h]), length))].tolist():
                if 0 <= j < int(n_blocks[b]):
                    is_candidate[b, h, j] = True
    full = torch.full((batch, q_heads, length), -math.inf, dtype=torch.float32, device=q.device)
    width = min(nb, length)
    full[:, :, :width] = scores[:, :, :width].float()
    full = full.masked_fill(~_expand_to_query_heads(is_candidate, group), -math.inf)
    return full.contiguous()


# The qcodes score: every block ranked from the channel-major codes of the query's heaviest channels
# (docs/architecture.md "qcodes"; docs/selection.md "`score="qcodes"`").

class QcodesRef(NamedTuple):
    """qcodes settings for :func:`sparse_attention`: ``num_channels`` channels per (b, KV head) and
    step (:func:`code_channels`) of ``bits``-bit channel-major codes with ranges per group of
    ``blocks_per_group`` blocks (built from k when ``codes`` is None) score every block
    (:func:`channel_head_scores`)."""

    num_channels: int
    bits: int = 2
    blocks_per_group: int = 1
    codes: Tensor | None = None
    ranges: Tensor | None = None
    channel_slots: Tensor | None = None  # a channel pool (:func:`key_codes`), with codes given


def _valid_group_spreads(ranges: Tensor, seq_lens: Tensor, group_tokens: int) -> tuple[Tensor, Tensor]:
    """``(hi - lo)^2`` per group and channel in float64 ``[B, Hkv, NG, D]`` (bf16 ranges, exact in
    float64), 0 for the groups past each row's end, and the valid-group mask ``[B, 1, NG, 1]``."""
    width = ranges[:, :, :, 1].double() - ranges[:, :, :, 0].double()
    groups = ranges.shape[2]
    n_groups = ((seq_lens.to(torch.int64).clamp(min=0) + group_tokens - 1) // group_tokens).clamp(max=groups)
    valid = (torch.arange(groups, device=ranges.device)[None, :] < n_groups.to(ranges.device)[:, None])
    valid = valid[:, None, :, None]
    return torch.where(valid, width * width, 0.0), valid


def code_spreads(ranges: Tensor, seq_lens: Tensor, group_tokens: int) -> Tensor:
    """The running spreads of the qcodes channel choice, float64 ``[B, Hkv, NG, D]``: over a row's
    valid groups (``ceil(seq_len / group_tokens)``, at most NG) the running sum of ``(hi - lo)^2``
    (bf16 ranges widened to float64) in group order; 0 past the end. Group m's entry is the
    ``sum_groups (hi - lo)^2`` of :func:`code_channels` for a row of m + 1 groups."""
    squares, valid = _valid_group_spreads(ranges, seq_lens, group_tokens)
    return torch.where(valid, torch.cumsum(squares, dim=2), 0.0)


def code_channels(q: Tensor, ranges: Tensor, seq_lens: Tensor, group_tokens: int, num_channels: int,
                  channel_slots: Tensor | None = None, stored_channels: int | None = None) -> Tensor:
    """The channels the qcodes score reads, int32 ``[B, Hkv, m]`` ascending: per (b, KV head) the
    ``m = num_channels`` largest ``w_d = (sum_g q_gd^2) * sum_groups (hi_d - lo_d)^2`` (float64,
    over the row's valid groups of ``group_tokens = Pg * block_size`` tokens), a tie to the lower
    channel. ``w_d``: how far a coarse (mid-range) value of channel d would move the logits. With a
    channel pool (:func:`key_codes`' ``channel_slots``) only the stored channels compete; if fewer
    than m do, the list ends with -1 entries."""
    kv_heads = ranges.shape[1]
    batch, q_heads, head_dim = q.shape
    qd = q.float().double().reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    qq = (qd * qd).sum(dim=2)  # [B, Hkv, D]
    energy = _valid_group_spreads(ranges, seq_lens, group_tokens)[0].sum(dim=2)  # [B, Hkv, D]
    weight = qq * energy
    if channel_slots is None:
        # descending weight, a tie to the lower channel: a stable sort keeps index order among equals
        order = torch.sort(weight, dim=-1, descending=True, stable=True).indices[..., :num_channels]
        return order.sort(dim=-1).values.to(torch.int32).contiguous()
    slots = channel_slots.to(device=q.device, dtype=torch.int64)
    eligible = (slots >= 0) & (slots < int(stored_channels))
    out = torch.full((batch, kv_heads, num_channels), -1, dtype=torch.int32, device=q.device)
    for b in range(batch):
        for h in range(kv_heads):
            ids = torch.nonzero(eligible[b, h]).flatten()  # ascending: the stable sort keeps ties low
            order = ids[torch.sort(weight[b, h, ids], descending=True, stable=True).indices][:num_channels]
            out[b, h, :order.numel()] = order.sort().values.to(torch.int32)
    return out.contiguous()


def channel_head_scores(q: Tensor, codes: Tensor, ranges: Tensor, bits: int, seq_lens: Tensor, block_size: int,
                        channels: Tensor, scale: float | None = None, channel_slots: Tensor | None = None) -> Tensor:
    """qcodes scores ``[B, Hq, NB]`` float32 (-inf for blocks past each sequence's end): the
    log-sum-exp over block j's valid tokens of ``s * q_g . k'_t`` with ``k'_td = lo_d + code_td
    step_d`` for the channels listed in ``channels [B, Hkv, m]`` (entries outside ``[0, D)``
    ignored) and ``(lo_d + hi_d) / 2`` for the others, from the channel-major ``codes [B, Hkv, NG,
    D, gt * bits / 8]`` and ``ranges [B, Hkv, NG, 2, D]`` (``gt = Pg * block_size``). With a
    channel pool (``channel_slots``, :func:`key_codes`) codes has S runs per group and a listed
    channel that is not stored is ignored too."""
    batch, q_heads, head_dim = q.shape
    kv_heads, groups = codes.shape[1], codes.shape[2]
    if channel_slots is not None:  # back to one run per channel; the unstored ones are never read
        stored = codes.shape[3]
        slots = channel_slots.to(device=q.device, dtype=torch.int64)
        in_pool = (slots >= 0) & (slots < stored)
        full = codes[:, :, :, :1].new_zeros(batch, kv_heads, groups, head_dim, codes.shape[4])
        gathered = torch.gather(codes, 3, slots.clamp(0, stored - 1)[:, :, None, :, None]
                                .expand(-1, -1, groups, -1, codes.shape[4]))
        codes = torch.where(in_pool[:, :, None, :, None], gathered, full)
        ids = channels.to(torch.int64)
        listed_ok = (ids >= 0) & (ids < head_dim)
        stored_ok = torch.gather(in_pool, 2, ids.clamp(0, head_dim - 1))
        channels = torch.where(listed_ok & stored_ok, ids, torch.full_like(ids, -1))
    per_byte = 8 // bits
    levels = (1 << bits) - 1
    gt = codes.shape[4] * per_byte
    nb = groups * gt // block_size
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * bits
    code = ((codes.to(torch.int32)[..., None] >> shifts) & levels).flatten(-2).float()  # [B, Hkv, NG, D, gt]
    lo = ranges[:, :, :, 0].float()
    hi = ranges[:, :, :, 1].float()
    step = (hi - lo) / levels
    deq = lo[..., None] + code * step[..., None]
    mid = ((lo + hi) / 2)[..., None].expand_as(deq)
    ids = channels.to(torch.int64)
    usable = (ids >= 0) & (ids < head_dim)
    chosen = torch.zeros(batch, kv_heads, head_dim + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(usable, ids, torch.full_like(ids, head_dim)), True)
    keys = torch.where(chosen[:, :, None, :head_dim, None], deq, mid)  # [B, Hkv, NG, D, gt]
    keys = keys.transpose(3, 4).reshape(batch, kv_heads, nb, block_size, head_dim)
    group = q_heads // kv_heads
    s = _default_scale(head_dim, scale)
    logits = s * torch.einsum("bgd,bgntd->bgnt", q.float(), _expand_to_query_heads(keys, group))
    valid = _token_valid(seq_lens, nb * block_size).reshape(batch, 1, nb, block_size)
    return torch.logsumexp(logits.masked_fill(~valid, -math.inf), dim=-1).float().contiguous()


def group_sum_priority(group_scores: Tensor, n_blocks: int) -> list[float]:
    """S_j of ``group_agg="sum"`` for one group ``[G, NB]``: the sum over heads of each head's
    softmax share over the valid blocks ``j < n_blocks`` (double, rounded to float32), each share
    ``exp(s - m) * (1 / Z)``."""
    total_share = [0.0] * n_blocks
    for row in group_scores.float().tolist():
        row = row[:n_blocks]
        top = -math.inf
        for x in row:
            top = x if top < x else top  # skips NaN like the kernels
        weights = [math.exp(x - top) if math.isfinite(top) else math.nan for x in row]
        total = 0.0
        for w in weights:
            total += w
        if not (total > 0.0) or math.isinf(total):
            continue
        inv = 1.0 / total  # the reciprocal once, then multiplies (as the kernels; params.h)
        for j in range(n_blocks):
            total_share[j] += weights[j] * inv
    out = torch.tensor(total_share, dtype=torch.float64).to(torch.float32).tolist()
    return [-math.inf if math.isnan(x) else x for x in out]


def forced_blocks(length: int, block_size: int, sink_blocks: int, recent_blocks: int) -> list[int]:
    """Sink blocks, the last ``recent_blocks`` complete blocks and the partial tail, ascending."""
    n_blocks = num_blocks_for(length, block_size)
    n_full = length // block_size
    forced = set(range(min(sink_blocks, n_blocks)))
    forced.update(range(max(n_full - recent_blocks, 0), n_full))
    if length % block_size != 0:
        forced.add(n_full)
    return sorted(forced)


def _order_by_priority(candidates: list[int], priority: dict[int, float]) -> list[int]:
    """Candidates by descending priority, ties broken by the lower block index."""
    return sorted(candidates, key=lambda j: (-priority[j], j))


def _topk_count(n_blocks: int, num_forced: int, num_candidates: int, budget_blocks: int,
                budget_fraction: float) -> int:
    if budget_blocks > 0:
        total = budget_blocks
    else:
        # The -1e-9 keeps e.g. 0.07 * 100 = 7.000000000000001 at 7 blocks.
        total = max(1, math.ceil(budget_fraction * n_blocks - 1e-9))
    return min(max(total - num_forced, 0), num_candidates)


def _threshold_count(ordered: list[int], priority: dict[int, float], eps: float) -> int:
    """K for the threshold policy: keep what is left after dropping the lowest-priority blocks.

    ``exp(priority[j]) = n_j * exp(max_g(score_gj - M_g))`` bounds block j's softmax mass for
    every head of the group, so the dropped mass stays <= eps.
    """
    dropped = 0
    dropped_mass = 0.0
    # Walk from the lowest priority upward: the exact reverse of the selection order.
    for j in reversed(ordered):
        # math.exp raises OverflowError past ~709.78; such a block can never be dropped anyway.
        bound = math.exp(priority[j]) if priority[j] < 709.0 else math.inf
        if dropped_mass + bound > eps:
            break
        dropped_mass += bound
        dropped += 1
    return len(ordered) - dropped


def _adaptive_block_mass(scores: Tensor, counts: list[int], n_blocks: int) -> list[float]:
    """m_j, the group mean of each head's estimated mass share of block j (double)."""
    score_rows = scores.double().tolist()
    mass = [0.0] * n_blocks
    for row in score_rows:
        top = max(row[:n_blocks])
        weights = [counts[j] * math.exp(row[j] - top) for j in range(n_blocks)]
        total = 0.0
        for w in weights:
            total += w
        for j in range(n_blocks):
            mass[j] += weights[j] / total
    group = len(score_rows)
    return [m / group for m in mass]


def select_blocks(head_scores: Tensor, head_mlo: Tensor, seq_lens: Tensor, block_size: int,
                  kv_heads: int, *, policy: str = "topk", budget_blocks: int = 0,
                  budget_fraction: float = 0.125, eps: float = 1e-3, mass: float = 0.95,
                  min_blocks: int = 1, max_blocks: int = 0, sink_blocks: int = 1,
                  recent_blocks: int = 1, group_agg: str = "max") -> tuple[Tensor, Tensor]:
    """Select blocks per (batch, KV head) (docs/architecture.md, "Selection").

    Args:
        head_scores: ``[B, Hq, NB]`` per-query-head scores from :func:`head_scores` (or oracle).
        head_mlo: ``[B, Hq]`` M_g, the lower bound of each head's largest logit (threshold only).
        seq_lens: ``[B]`` valid tokens per sequence.
        kv_heads: Hkv; query heads ``[h*G, (h+1)*G)`` form the group of KV head h.
        policy: ``topk``, ``threshold`` (scores must be upper bounds) or ``adaptive``.
        group_agg: topk's group priority: ``max`` over the heads, or ``sum`` of each head's
            softmax share (:func:`group_sum_priority`).

    Returns:
        ``(selected [B, Hkv, NB] int32, ascending indices then -1; num_selected [B, Hkv] int32)``.
    """
    assert policy in POLICIES, policy
    assert group_agg in GROUP_AGGS, group_agg
    batch, q_heads, nb = head_scores.shape
    assert q_heads % kv_heads == 0
    group = q_heads // kv_heads
    scores_cpu = head_scores.detach().float().cpu()
    mlo_cpu = head_mlo.detach().float().cpu()
    lens = [int(x) for x in seq_lens.cpu()]

    selected = torch.full((batch, kv_heads, nb), -1, dtype=torch.int32)
    num_selected = torch.zeros((batch, kv_heads), dtype=torch.int32)
    for b in range(batch):
        length = lens[b]
        n_blocks = num_blocks_for(length, block_size)
        assert n_blocks <= nb
        if n_blocks == 0:
            continue
        counts = [min(block_size, length - j * block_size) for j in range(n_blocks)]
        forced = forced_blocks(length, block_size, sink_blocks, recent_blocks)
        forced_set = set(forced)
        candidates = [j for j in range(n_blocks) if j not in forced_set]
        for h in range(kv_heads):
            group_scores = scores_cpu[b, h * group:(h + 1) * group]  # [G, NB]
            group_mlo = mlo_cpu[b, h * group:(h + 1) * group]  # [G]
            if policy == "topk":
                if group_agg == "max":
                    block_score = group_scores.amax(dim=0).tolist()  # S_j, float32 values
                else:
                    block_score = group_sum_priority(group_scores, n_blocks)
                priority = {j: block_score[j] for j in candidates}
                ordered = _order_by_priority(candidates, priority)
                k_count = _topk_count(n_blocks, len(forced), len(candidates), budget_blocks,
                                      budget_fraction)
            elif policy == "threshold":
                rows = group_scores.double().tolist()
                mlos = group_mlo.double().tolist()
                priority = {j: math.log(counts[j]) + max(r[j] - m for r, m in zip(rows, mlos))
                            for j in candidates}
                ordered = _order_by_priority(candidates, priority)
                k_count = _threshold_count(ordered, priority, eps)
            else:
                block_mass = _adaptive_block_mass(group_scores, counts, n_blocks)
                priority = {j: block_mass[j] for j in candidates}
                ordered = _order_by_priority(candidates, priority)
                reached = 0.0
                for j in forced:
                    reached += block_mass[j]
                k_count = 0
                for j in ordered:
                    if reached >= mass:
                        break
                    reached += block_mass[j]
                    k_count += 1
                total = max(len(forced) + k_count, min_blocks)
                if max_blocks > 0:
                    total = min(total, max_blocks)
                total = min(max(total, len(forced)), n_blocks)
                k_count = total - len(forced)
            chosen = sorted(forced + ordered[:k_count])
            assert len(chosen) == len(set(chosen)) and all(0 <= j < n_blocks for j in chosen)
            selected[b, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            num_selected[b, h] = len(chosen)
    device = head_scores.device
    return selected.to(device), num_selected.to(device)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is (tests then get a more accurate oracle)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _group_logits(q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    """``[B, Hkv, G, S]`` logits ``s * q_g . k_t`` of every query head of each group."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert q_heads % kv_heads == 0
    group = q_heads // kv_heads
    s = _default_scale(head_dim, scale)
    dtype = _compute_dtype(q, k)
    qf = q.to(dtype).reshape(batch, kv_heads, group, head_dim)
    return s * torch.einsum("bkgd,bksd->bkgs", qf, k.to(dtype))


def _selected_token_mask(seq_lens: Tensor, num_tokens: int, block_size: int,
                         selected: Tensor | None, num_selected: Tensor | None,
                         kv_heads: int) -> Tensor:
    """``[B, Hkv, S]`` bool: token t is valid and lies in a selected block of (b, h)."""
    valid = _token_valid(seq_lens, num_tokens)[:, None, :].expand(-1, kv_heads, -1)
    if selected is None:
        return valid
    assert num_selected is not None
    batch = seq_lens.shape[0]
    nb_tokens = num_blocks_for(num_tokens, block_size)
    sel = selected.to(torch.int64)
    row_positions = torch.arange(sel.shape[-1], device=sel.device)[None, None, :]
    in_row = row_positions < num_selected.to(torch.int64)[..., None]
    n_blocks = ((seq_lens.to(torch.int64) + block_size - 1) // block_size)[:, None, None]
    usable = in_row & (sel >= 0) & (sel < n_blocks)
    # Ignored entries land in a spare last column that is dropped afterwards.
    target = torch.where(usable, sel, torch.full_like(sel, nb_tokens))
    block_mask = torch.zeros((batch, kv_heads, nb_tokens + 1), dtype=torch.bool, device=sel.device)
    block_mask.scatter_(2, target, True)
    token_in_block = block_mask[:, :, :nb_tokens].repeat_interleave(block_size, dim=2)
    token_in_block = token_in_block[:, :, :num_tokens]
    return valid & token_in_block.to(valid.device)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, token_mask: Tensor,
                      scale: float | None) -> tuple[Tensor, Tensor]:
    """Softmax attention of each query head over the tokens of ``token_mask [B, Hkv, S]``."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    logits = _group_logits(q, k, scale).masked_fill(~token_mask[:, :, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]; -inf for a head with no token
    empty = torch.isneginf(lse)
    weights = torch.exp(logits - torch.where(empty, 0.0, lse)[..., None])
    out = torch.einsum("bkgs,bksd->bkgd", weights, v.to(weights.dtype))
    out = out.masked_fill(empty[..., None], 0.0)
    return (out.reshape(batch, q_heads, v.shape[-1]).to(q.dtype),
            lse.reshape(batch, q_heads).to(torch.float32).contiguous())


def sparse_decode(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor, block_size: int,
                  selected: Tensor | None = None, num_selected: Tensor | None = None,
                  scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention over the selected blocks (docs/architecture.md, "Attention").

    Args:
        q: ``[B, Hq, D]``; k, v: ``[B, Hkv, S, D]``; any float dtype, computed in
            float32 (float64 when an input is float64).
        seq_lens: ``[B]`` valid tokens per sequence.
        selected: ``[B, Hkv, NB]`` block indices (only the first ``num_selected[b, h]`` are read;
            indices outside ``[0, n_blocks)`` are ignored); ``None`` attends to every token.

    Returns:
        ``(out [B, Hq, D] in q.dtype, lse [B, Hq] float32 natural log)``; zeros / -inf for a head
        with no token.
    """
    mask = _selected_token_mask(seq_lens, k.shape[2], block_size, selected, num_selected,
                                k.shape[1])
    return _masked_attention(q, k, v, mask, scale)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor | None = None,
                    scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every query head over all valid tokens: ``(out in q.dtype, lse float32)``."""
    seq_lens = _default_seq_lens(k.shape[0], k.shape[2], seq_lens, k.device)
    mask = _selected_token_mask(seq_lens, k.shape[2], 1, None, None, k.shape[1])
    return _masked_attention(q, k, v, mask, scale)


def _masked_logits(q: Tensor, k: Tensor, seq_lens: Tensor, scale: float | None) -> Tensor:
    """``[B, Hq, S]`` logits (float32, or float64 for float64 inputs), -inf past ``seq_lens``."""
    batch, q_heads, _ = q.shape
    logits = _group_logits(q, k, scale).reshape(batch, q_heads, k.shape[2])
    valid = _token_valid(seq_lens, k.shape[2])[:, None, :]
    return logits.masked_fill(~valid, -math.inf)


def oracle_head_scores(q: Tensor, k: Tensor, seq_lens: Tensor, block_size: int,
                       scale: float | None = None) -> Tensor:
    """``[B, Hq, NB]``: ``logsumexp`` of the logits of each block's tokens (-inf if invalid).

    The log of the block's true softmax-numerator mass: the ideal score for quality studies.
    """
    batch, q_heads, _ = q.shape
    seq_len = k.shape[2]
    nb = num_blocks_for(seq_len, block_size)
    logits = _masked_logits(q, k, seq_lens, scale)
    logits = torch.nn.functional.pad(logits, (0, nb * block_size - seq_len), value=-math.inf)
    block_logits = logits.reshape(batch, q_heads, nb, block_size)
    return torch.logsumexp(block_logits, dim=-1).to(torch.float32)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, *, stats: BlockStatsRef | None = None,
                     block_size: int = 64, score: str = "tight", policy: str = "topk",
                     budget_blocks: int = 0, budget_fraction: float = 0.125, eps: float = 1e-3,
                     mass: float = 0.95, min_blocks: int = 1, max_blocks: int = 0,
                     sink_blocks: int = 1, recent_blocks: int = 1,
                     seq_lens: Tensor | None = None,
                     scale: float | None = None, group_agg: str = "max",
                     sketch: tuple | None = None,
                     refine: RefineRef | None = None,
                     return_candidates: bool = False,
                     qcodes: QcodesRef | None = None,
                     ) -> tuple[Tensor, ...]:
    """The whole decode step: statistics, radar scores, selection, attention.

    ``score`` may also be ``oracle`` (true per-block log-mass; the threshold policy then uses the
    true largest logit of each head as M_g) or ``qsketch`` with ``sketch = (key_proj, query_proj,
    centroid_weight[, blocks_per_sketch])`` (the sketch is built from ``k``) or ``(codes, ranges,
    centroid, key_proj, query_proj, centroid_weight)``. With ``refine`` (a :class:`RefineRef`, top-k
    only) selection has two stages: the score keeps the refine's candidates, :func:`refine_head_scores`
    ranks them from their key codes and the budget keeps the final blocks (the same group_agg,
    sink and recent blocks); ``refine.extra`` joins the candidates. ``score="qcodes"`` needs
    ``qcodes`` (a :class:`QcodesRef`): :func:`code_channels` then :func:`channel_head_scores`.
    Returns ``(out, lse, selected, num_selected)``, and the candidates' counts after them with
    ``return_candidates`` (refine only).
    """
    seq_lens = _default_seq_lens(k.shape[0], k.shape[2], seq_lens, k.device)
    if score == "qcodes":
        assert qcodes is not None, "score='qcodes' needs qcodes="
        per = qcodes.blocks_per_group
        codes, ranges = qcodes.codes, qcodes.ranges
        if codes is None:
            codes, ranges = key_codes(k, qcodes.bits, block_size, seq_lens, blocks_per_group=per, channel_major=True)
        slots = qcodes.channel_slots if qcodes.codes is not None else None
        channels = code_channels(q, ranges, seq_lens, per * block_size, qcodes.num_channels, slots,
                                 None if slots is None else codes.shape[3])
        scores = channel_head_scores(q, codes, ranges, qcodes.bits, seq_lens, block_size, channels, scale, slots)
        mlo = torch.full(scores.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    elif score == SKETCH_SCORE:
        assert sketch is not None, "score='qsketch' needs sketch="
        if len(sketch) in (3, 4):
            key_proj, query_proj, weight = sketch[:3]
            per = sketch[3] if len(sketch) == 4 else 1
            codes, ranges, centroid = key_sketch(k, key_proj, block_size, seq_lens, blocks_per_sketch=per)
        else:
            codes, ranges, centroid, key_proj, query_proj, weight = sketch
        scores = sketch_head_scores(q, codes, ranges, key_proj, query_proj, seq_lens, block_size,
                                    centroid=centroid, centroid_weight=weight, scale=scale)
        mlo = torch.full(scores.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    elif score == "oracle":
        scores = oracle_head_scores(q, k, seq_lens, block_size, scale)
        logits = _masked_logits(q, k, seq_lens, scale)
        if logits.shape[-1] == 0:
            mlo = torch.full(logits.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
        else:
            mlo = logits.amax(dim=-1).to(torch.float32)
    else:
        if stats is None:
            stats = block_stats(k, block_size, seq_lens)
        scores, mlo = head_scores(q, stats, seq_lens, block_size, score, scale)
    if refine is not None:
        assert policy == "topk", "refine needs policy='topk'"
        cand, num_cand = select_blocks(
            scores, mlo, seq_lens, block_size, k.shape[1], budget_blocks=refine.candidate_blocks,
            budget_fraction=refine.candidate_fraction, sink_blocks=sink_blocks, recent_blocks=recent_blocks,
            group_agg=group_agg)
        if refine.extra is not None:
            cand, num_cand = union_blocks(cand, num_cand, refine.extra[0], refine.extra[1], cand.shape[-1])
        codes, ranges = refine.codes, refine.ranges
        if codes is None:
            per = refine.blocks_per_group
            codes, ranges = key_codes(k, refine.bits, block_size, seq_lens,
                                      num_blocks=-(-scores.shape[-1] // per) * per, blocks_per_group=per)
        scores = refine_head_scores(q, codes, ranges, refine.bits, seq_lens, block_size, cand, num_cand, scale)
        mlo = torch.full(scores.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    selected, num_selected = select_blocks(
        scores, mlo, seq_lens, block_size, k.shape[1], policy=policy,
        budget_blocks=budget_blocks, budget_fraction=budget_fraction, eps=eps, mass=mass,
        min_blocks=min_blocks, max_blocks=max_blocks, sink_blocks=sink_blocks,
        recent_blocks=recent_blocks, group_agg=group_agg)
    out, lse = sparse_decode(q, k, v, seq_lens, block_size, selected, num_selected, scale)
    if return_candidates:
        assert refine is not None, "return_candidates needs refine"
        return out, lse, selected, num_selected, num_cand
    return out, lse, selected, num_selected
