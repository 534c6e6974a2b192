"""Block-selection methods beyond the radar bounds of ``aether.reference`` (issue 5).

Pure-PyTorch reference implementations, written for clarity and tested against brute-force
definitions in ``tests/test_selection.py``. Every scoring method returns per-query-head block
scores ``[B, Hq, NB]`` (float32, ``-inf`` for invalid blocks) that ``reference.select_blocks``
accepts, and has a ``*_bytes`` function giving the exact metadata bytes it reads per block and
KV head (docs/selection.md counts every one of them).

Shapes as in ``aether.reference``: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads,
``G = Hq // Hkv`` (query head g reads KV head g // G), ``S`` token slots, ``D`` head_dim,
``NB = ceil(S / block_size)`` blocks.

Methods:

* ``subblock_*``: statistics of ``sub_size``-token sub-blocks inside each ``block_size``-token
  read block (finer statistics for ranking than for reading); the block score combines the
  sub-block scores by ``max`` or by a log-sum-exp estimate of mass.
* ``*_sketch``: a token-level key sketch read for scoring only: ``rank`` coefficients per token,
  ``W^T r_t`` of the residual ``r_t = k_t - c_b`` around the bf16 block centroid (residual
  sketch) or ``W^T k_t`` of the raw key (raw sketch), quantised to ``bits`` bits with a
  per-block, per-coefficient [lo, hi] range in bf16. The approximate logit of token t for query
  head g is ``s * (q_g . c_b + u_g . dequant(W^T r_t))`` (residual) or
  ``s * (u_g . dequant(W^T k_t) + a * q_g . (I - P) c_b)`` (raw, ``a`` the centroid weight, picked
  per layer at prefill by :func:`calibrate_centroid_weight`), ``u_g = U_g^T q_g``, and the block
  score is the log-sum-exp of these over the block's tokens (an estimate of the block's log
  softmax numerator, not a bound). ``W`` and ``U`` come from :func:`calibrate_sketch`, once per
  layer at prefill: ``pca`` (top principal directions), ``qpca`` (the rank-r factorisation that
  minimises the mean squared logit error for the prefill queries), ``channels`` (a per-KV-head
  subset of channels with the largest E[q_i^2] E[r_i^2]) or ``full`` (every channel).
  docs/selection.md recommends the raw ``qpca`` sketch with a calibrated centroid weight.
* selection: a vectorised top-k identical to ``reference.select_blocks(policy="topk")``
  (group score = max over the group), with a ``sum`` aggregation over the group (sum of each
  head's estimated mass share) as an option, a two-stage refinement (a cheap score picks
  candidates, the sketch is read only for them), a budget pooled across the KV heads of a layer,
  and a mass-target policy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from aether import reference as ref

BF16_BYTES = 2
SKETCH_MODES = ("pca", "qpca", "channels", "full")
GROUP_AGGS = ("max", "sum")


def round_bf16(x: Tensor) -> Tensor:
    """Round to the nearest bf16 and return float32 (the value a bf16 store would hold)."""
    return x.to(torch.bfloat16).to(torch.float32)


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _block_counts(seq_lens: Tensor, block_size: int, num_blocks: int) -> Tensor:
    """``[B, NB]`` int64 tokens per block (0 for invalid blocks)."""
    starts = torch.arange(num_blocks, device=seq_lens.device, dtype=torch.int64) * block_size
    return (seq_lens.to(torch.int64)[:, None] - starts[None, :]).clamp(min=0, max=block_size)


def _blocked(x: Tensor, block_size: int, num_blocks: int) -> Tensor:
    """``[B, H, S, X] -> [B, H, NB, block_size, X]``, zero-padded at the end."""
    batch, heads, seq_len, width = x.shape
    capacity = num_blocks * block_size
    if seq_len < capacity:
        x = torch.nn.functional.pad(x, (0, 0, 0, capacity - seq_len))
    else:
        x = x[:, :, :capacity]
    return x.reshape(batch, heads, num_blocks, block_size, width)


# ----------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------

def stat_bytes(score: str, head_dim: int, elem_bytes: int = BF16_BYTES) -> int:
    """Bytes of block statistics a radar score reads per block and KV head (docs/theory.md §5).

    ``oracle`` is 0 (it is not implementable; it reads the keys themselves).
    """
    vectors = {"mean": 1, "ball": 1, "variance": 1, "box": 2, "tight": 3, "oracle": 0}
    scalars = {"mean": 0, "ball": 1, "variance": 2, "box": 0, "tight": 1, "oracle": 0}
    if score not in vectors:
        raise ValueError(f"score={score!r}; allowed: {sorted(vectors)}")
    return (vectors[score] * head_dim + scalars[score]) * elem_bytes


def kv_block_bytes(block_size: int, head_dim: int, elem_bytes: int = BF16_BYTES) -> int:
    """Bytes of K plus V of one full block and KV head."""
    return 2 * block_size * head_dim * elem_bytes


def subblock_bytes(score: str, head_dim: int, block_size: int, sub_size: int,
                   elem_bytes: int = BF16_BYTES) -> int:
    """Metadata bytes per read block for :func:`subblock_scores`."""
    return (block_size // sub_size) * stat_bytes(score, head_dim, elem_bytes)


def sketch_bytes(head_dim: int, block_size: int, rank: int, bits: int,
                 use_centroid: bool = True) -> int:
    """Metadata bytes per block and KV head of a key sketch: bf16 centroid (optional), packed
    ``bits``-bit codes of ``rank`` coefficients per token, and a bf16 [lo, hi] per coefficient
    (none when ``bits == 16``: the coefficients are then stored as bf16 directly)."""
    codes = math.ceil(block_size * rank * bits / 8)
    ranges = 0 if bits >= 16 else 2 * rank * BF16_BYTES  # 16: bf16 values, 32: float32 values
    return codes + ranges + (head_dim * BF16_BYTES if use_centroid else 0)


def sketch_step_bytes(calib: "SketchCalib", group: int) -> int:
    """Bytes read once per decode step and KV head: the group's bf16 query projections
    (``G * D * rank``), none for ``channels``/``full`` (a channel gather needs only indices)."""
    if calib.mode in ("channels", "full"):
        return 0
    return group * calib.query_proj.shape[1] * calib.query_proj.shape[2] * BF16_BYTES


# ----------------------------------------------------------------------------------------------
# Sub-block statistics
# ----------------------------------------------------------------------------------------------

def subblock_stats(k: Tensor, block_size: int, sub_size: int,
                   seq_lens: Tensor | None = None) -> ref.BlockStatsRef:
    """Statistics of ``sub_size``-token sub-blocks, ``[B, Hkv, NB * (block_size // sub_size)]``
    (plus ``D`` for vectors), so sub-blocks ``[j * n, (j + 1) * n)`` lie in read block j (n = block_size // sub_size)."""
    if sub_size <= 0 or block_size % sub_size:
        raise ValueError(f"sub_size={sub_size} must divide block_size={block_size}")
    nb = ref.num_blocks_for(k.shape[2], block_size)
    return ref.block_stats(k, sub_size, seq_lens, num_blocks=nb * (block_size // sub_size))


def subblock_scores(q: Tensor, sub_stats: ref.BlockStatsRef, seq_lens: Tensor, block_size: int,
                    sub_size: int, score: str = "mean", agg: str = "lse",
                    scale: float | None = None) -> Tensor:
    """Block scores from sub-block scores, ``[B, Hq, NB]``.

    ``agg="max"``: the largest sub-block score (an upper bound of the block max when ``score`` is
    one). ``agg="lse"``: ``log sum_i n_i exp(score_i)`` over the valid sub-blocks, each sub-block
    counted as ``n_i`` tokens at its score (an estimate of the block's log-mass).
    """
    if agg not in ("max", "lse"):
        raise ValueError(f"agg={agg!r}; allowed: 'max', 'lse'")
    n_sub = block_size // sub_size
    scores, _ = ref.head_scores(q, sub_stats, seq_lens, sub_size, score, scale)
    batch, q_heads, n_total = scores.shape
    nb = n_total // n_sub
    scores = scores.reshape(batch, q_heads, nb, n_sub)
    if agg == "max":
        return scores.amax(dim=-1).contiguous()
    counts = _block_counts(seq_lens, sub_size, n_total).reshape(batch, 1, nb, n_sub)
    log_counts = torch.log(counts.clamp(min=1).to(torch.float32))
    return torch.logsumexp(scores + log_counts, dim=-1).contiguous()


# ----------------------------------------------------------------------------------------------
# Token-level key sketches
# ----------------------------------------------------------------------------------------------

class SketchCalib(NamedTuple):
    """Projections of a key sketch, float32.

    key_proj: ``[Hkv, D, r]``, coefficients ``c_t = key_proj^T r_t`` of the residual ``r_t``.
    query_proj: ``[Hq, D, r]``, ``u_g = query_proj_g^T q_g``; ``u_g . c_t`` approximates
        ``q_g . r_t``.
    mode: how they were made (see :func:`calibrate_sketch`).
    """

    key_proj: Tensor
    query_proj: Tensor
    mode: str


class KeySketch(NamedTuple):
    """Stored sketch of one cache, float32 (a kernel would store codes; values are identical).

    centroid: ``[B, Hkv, NB, D]`` bf16-rounded block centroids.
    coeff: ``[B, Hkv, NB, bs, r]`` dequantised coefficients (0 for invalid tokens) of the
        residuals ``k_t - centroid`` (``residual=True``) or of the raw keys ``k_t``.
    residual: which of the two.
    """

    centroid: Tensor
    coeff: Tensor
    residual: bool = True


def block_residuals(k: Tensor, block_size: int, seq_lens: Tensor | None = None,
                    use_centroid: bool = True) -> tuple[Tensor, Tensor]:
    """``(centroid [B, Hkv, NB, D] bf16-rounded, residual [B, Hkv, NB, bs, D])``; the residual is
    taken around the *stored* (rounded) centroid and is 0 for invalid tokens."""
    batch, kv_heads, seq_len, head_dim = k.shape
    seq_lens = ref._default_seq_lens(batch, seq_len, seq_lens, k.device)
    nb = ref.num_blocks_for(seq_len, block_size)
    keys = _blocked(k.float(), block_size, nb)
    valid = ref._token_valid(seq_lens, nb * block_size).reshape(batch, 1, nb, block_size, 1)
    if use_centroid:
        counts = _block_counts(seq_lens, block_size, nb).clamp(min=1).to(torch.float32)
        centroid = (keys * valid).sum(dim=3) / counts[:, None, :, None]
        centroid = round_bf16(centroid)
    else:
        centroid = keys.new_zeros(batch, kv_heads, nb, head_dim)
    residual = (keys - centroid[:, :, :, None, :]) * valid
    return centroid, residual


def _sym_power(mat: Tensor, power: float, eps: float) -> Tensor:
    """``mat^power`` of a symmetric PSD matrix with eigenvalues floored at ``eps * max``."""
    evals, evecs = torch.linalg.eigh(mat.double())
    evals = evals.clamp(min=float(evals.max()) * eps)
    return (evecs * evals.pow(power)) @ evecs.T


def calibrate_sketch(k: Tensor, q: Tensor, block_size: int, rank: int, mode: str = "qpca",
                     use_centroid: bool = True, eps: float = 1e-6) -> SketchCalib:
    """Projections for a key sketch of ``rank`` coefficients, from prefill keys and queries.

    Args:
        k: ``[Hkv, S, D]`` prefill keys (post-RoPE), one sequence.
        q: ``[Hq, N, D]`` prefill queries (post-RoPE), e.g. a sample of positions.
        block_size: the residuals are taken around each block's centroid, as stored.
        mode:
            ``pca``: W = U = the top-``rank`` eigenvectors of E[r r^T] (per KV head).
            ``qpca``: with ``Sr = E[r r^T]`` and ``Sq = E[q q^T]`` averaged over the group,
                ``V`` = the top-``rank`` eigenvectors of ``Sr^1/2 Sq Sr^1/2``, ``W = Sr^-1/2 V``,
                ``U = Sr^1/2 V``: the rank-r bilinear form minimising E[(q.r - u.c)^2].
            ``channels``: the ``rank`` channels with the largest ``E[q_i^2] E[r_i^2]``.
            ``full``: every channel (``rank`` must equal D).
    """
    if mode not in SKETCH_MODES:
        raise ValueError(f"mode={mode!r}; allowed: {SKETCH_MODES}")
    kv_heads, seq_len, head_dim = k.shape
    q_heads = q.shape[0]
    if q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} not a multiple of kv heads {kv_heads}")
    if not 1 <= rank <= head_dim:
        raise ValueError(f"rank={rank}; allowed: 1..{head_dim}")
    if mode == "full" and rank != head_dim:
        raise ValueError(f"mode='full' needs rank == head_dim ({head_dim}), got {rank}")
    group = q_heads // kv_heads
    _, residual = block_residuals(k[None], block_size, use_centroid=use_centroid)
    nb = residual.shape[2]
    counts = _block_counts(torch.tensor([seq_len]), block_size, nb)[0]
    token_valid = (torch.arange(block_size)[None, :] < counts[:, None]).reshape(-1)
    residual = residual[0].reshape(kv_heads, -1, head_dim)[:, token_valid].double()
    qd = q.double()
    key_proj, query_proj = [], []
    for h in range(kv_heads):
        r_h = residual[h]
        s_r = r_h.T @ r_h / r_h.shape[0]
        q_grp = qd[h * group:(h + 1) * group].reshape(-1, head_dim)
        s_q = q_grp.T @ q_grp / q_grp.shape[0]
        if mode == "pca":
            _, evecs = torch.linalg.eigh(s_r)
            w = evecs[:, -rank:].flip(-1)
            u = w
        elif mode == "qpca":
            half = _sym_power(s_r, 0.5, eps)
            inv_half = _sym_power(s_r, -0.5, eps)
            _, evecs = torch.linalg.eigh(half @ s_q @ half)
            v = evecs[:, -rank:].flip(-1)
            w, u = inv_half @ v, half @ v
        elif mode == "channels":
            importance = torch.diagonal(s_q) * torch.diagonal(s_r)
            chans = torch.argsort(importance, descending=True, stable=True)[:rank]
            chans = torch.sort(chans).values
            w = torch.eye(head_dim, dtype=torch.float64)[:, chans]
            u = w
        else:
            w = torch.eye(head_dim, dtype=torch.float64)
            u = w
        key_proj.append(w.float())
        query_proj.extend([u.float()] * group)
    return SketchCalib(torch.stack(key_proj), torch.stack(query_proj), mode)


def quantize_blockwise(x: Tensor, bits: int, valid: Tensor) -> Tensor:
    """Asymmetric uniform quantisation of ``x [..., bs, r]`` with a per-(block, coefficient)
    range [lo, hi] over the valid tokens (``valid [..., bs, 1]``), stored in bf16; returns the
    dequantised values (0 for invalid tokens). ``bits == 16``: bf16 rounding only; ``bits == 32``:
    exact float32 (for tests)."""
    if bits == 32:
        return x * valid
    if bits == 16:
        return round_bf16(x) * valid
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}; allowed: 1..8, 16 or 32")
    levels = (1 << bits) - 1
    lo = round_bf16(x.masked_fill(~valid, math.inf).amin(dim=-2, keepdim=True))
    hi = round_bf16(x.masked_fill(~valid, -math.inf).amax(dim=-2, keepdim=True))
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    step = (hi - lo) / levels
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - lo) / safe_step).clamp(0, levels)
    deq = lo + codes * step
    return deq * valid


def build_sketch(k: Tensor, calib: SketchCalib, block_size: int, bits: int,
                 seq_lens: Tensor | None = None, use_centroid: bool = True) -> KeySketch:
    """The stored key sketch of a cache ``k [B, Hkv, S, D]`` (see the module docstring).

    ``use_centroid=True``: coefficients of the residuals around the bf16 block centroid;
    ``False``: coefficients of the raw keys (the centroid is still returned, for
    :func:`sketch_token_logits`'s ``centroid_weight``; it costs bytes only where used).
    """
    batch, kv_heads, seq_len, _ = k.shape
    seq_lens = ref._default_seq_lens(batch, seq_len, seq_lens, k.device)
    centroid, residual = block_residuals(k, block_size, seq_lens, True)
    nb = centroid.shape[2]
    valid = ref._token_valid(seq_lens, nb * block_size).reshape(batch, 1, nb, block_size, 1)
    source = residual if use_centroid else _blocked(k.float(), block_size, nb) * valid
    coeff = torch.einsum("bhntd,hdr->bhntr", source, calib.key_proj.to(source.device))
    return KeySketch(centroid, quantize_blockwise(coeff, bits, valid), use_centroid)


def sketch_token_logits(q: Tensor, sketch: KeySketch, calib: SketchCalib,
                        scale: float | None = None,
                        centroid_weight: float | None = None) -> Tensor:
    """Approximate logits ``[B, Hq, NB, bs]`` of every token slot (garbage for invalid slots).

    With ``P = U W^T`` (the rank-r map of the calibration) and ``a = centroid_weight``:
    residual sketch: ``s * (a q.c_b + u.coeff_t)`` (default a = 1: ``q.c_b + q.P(k_t - c_b)``);
    raw sketch: ``s * (u.coeff_t + a (q.c_b - u.W^T c_b))`` (default a = 0: ``q.P k_t``;
    a = 1 adds the centroid's logit outside the sketch's subspace, ``q.(I - P) c_b``).
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = sketch.centroid.shape[1]
    group = q_heads // kv_heads
    s = _scale(head_dim, scale)
    a = (1.0 if sketch.residual else 0.0) if centroid_weight is None else float(centroid_weight)
    qf = q.float()
    coeff = sketch.coeff.repeat_interleave(group, dim=1)  # [B, Hq, NB, bs, r]
    u = torch.einsum("bgd,gdr->bgr", qf, calib.query_proj.to(qf.device))
    logits = torch.einsum("bgr,bgntr->bgnt", u, coeff)
    if a != 0.0:
        centroid = sketch.centroid.repeat_interleave(group, dim=1)  # [B, Hq, NB, D]
        base = torch.einsum("bgd,bgnd->bgn", qf, centroid)
        if not sketch.residual:
            key_proj = calib.key_proj.repeat_interleave(group, dim=0).to(qf.device)
            base = base - torch.einsum("bgr,bgnd,gdr->bgn", u, centroid, key_proj)
        logits = logits + a * base[..., None]
    return s * logits


def sketch_scores(q: Tensor, sketch: KeySketch, calib: SketchCalib, seq_lens: Tensor,
                  block_size: int, agg: str = "lse", scale: float | None = None,
                  centroid_weight: float | None = None) -> Tensor:
    """Block scores ``[B, Hq, NB]``: log-sum-exp (``agg="lse"``) or max of the approximate logits
    (:func:`sketch_token_logits`) of each block's valid tokens; ``-inf`` for invalid blocks."""
    if agg not in ("max", "lse"):
        raise ValueError(f"agg={agg!r}; allowed: 'max', 'lse'")
    logits = sketch_token_logits(q, sketch, calib, scale, centroid_weight)
    batch, _, nb, bs = logits.shape
    valid = ref._token_valid(seq_lens, nb * bs).reshape(batch, 1, nb, bs)
    logits = logits.masked_fill(~valid, -math.inf)
    return (torch.logsumexp(logits, -1) if agg == "lse" else logits.amax(-1)).contiguous()


def calibrate_centroid_weight(q: Tensor, positions: Tensor, k: Tensor, sketch: KeySketch,
                              calib: SketchCalib, block_size: int, *,
                              weights: tuple[float, ...] = (0.0, 0.5, 1.0),
                              budget_fraction: float = 0.125, sink_blocks: int = 1,
                              recent_blocks: int = 1, agg: str = "max",
                              scale: float | None = None) -> tuple[float, list[float]]:
    """Pick the ``centroid_weight`` whose top-k selection recalls the most true attention mass
    for prefill queries (one layer, one sequence; done once at prefill).

    Args:
        q: ``[N, Hq, D]`` calibration queries at ``positions [N]`` (each sees keys [0, p]).
        k: ``[Hkv, S, D]`` the keys; ``sketch`` built from them (batch 1).

    Returns:
        ``(best weight, mass recalled for each weight)``; ties go to the earlier weight, so list
        the cheapest (0: no centroid read) first.
    """
    n, q_heads, head_dim = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    s = _scale(head_dim, scale)
    seq_len = k.shape[1]
    lens = (positions.to(torch.int64) + 1).to(torch.int32)
    nb = ref.num_blocks_for(seq_len, block_size)
    logits = s * torch.einsum("nkgd,ksd->nkgs", q.float().reshape(n, kv_heads, group, head_dim),
                              k.float()).reshape(n, q_heads, seq_len)
    causal = torch.arange(seq_len)[None, :] <= positions[:, None]
    weights_t = torch.softmax(logits.masked_fill(~causal[:, None, :], -math.inf), dim=-1)
    weights_t = torch.nn.functional.pad(weights_t, (0, nb * block_size - seq_len))
    block_mass = weights_t.reshape(n, q_heads, nb, block_size).sum(-1)
    full = torch.full((n,), seq_len, dtype=torch.int32)
    recalled = []
    for a in weights:
        scores = sketch_scores(q, sketch, calib, full, block_size, "lse", scale, a)
        mask = select_topk(scores, lens, block_size, kv_heads, budget_fraction=budget_fraction,
                           sink_blocks=sink_blocks, recent_blocks=recent_blocks, agg=agg,
                           return_mask=True)
        recalled.append(float((block_mass * mask.repeat_interleave(group, 1)).sum(-1).mean()))
    best = max(range(len(weights)), key=lambda i: (recalled[i], -i))
    return weights[best], recalled


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------

def group_priority(head_scores: Tensor, kv_heads: int, agg: str = "max") -> Tensor:
    """``[B, Hkv, NB]`` block priority of each KV head's group.

    ``max``: the max over the group (the reference ``topk`` priority). ``sum``: the sum over the
    group of each head's estimated mass share ``softmax_j(score_gj)`` over its valid blocks
    (scores read as block log-masses); it ranks a block by the total mass it holds for the group.
    """
    if agg not in GROUP_AGGS:
        raise ValueError(f"agg={agg!r}; allowed: {GROUP_AGGS}")
    batch, q_heads, nb = head_scores.shape
    group = q_heads // kv_heads
    grouped = head_scores.float().reshape(batch, kv_heads, group, nb)
    if agg == "max":
        return grouped.amax(dim=2)
    top = grouped.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(grouped - top)
    share = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    return share.sum(dim=2)


def forced_mask(seq_lens: Tensor, block_size: int, num_blocks: int, sink_blocks: int,
                recent_blocks: int) -> tuple[Tensor, Tensor]:
    """``(forced [B, NB], valid [B, NB])`` bool masks: sink, last complete and tail blocks."""
    lens = seq_lens.to(torch.int64)[:, None]
    idx = torch.arange(num_blocks, device=seq_lens.device, dtype=torch.int64)[None, :]
    n_blocks = (lens + block_size - 1) // block_size
    n_full = lens // block_size
    valid = idx < n_blocks
    forced = (idx < sink_blocks) | ((idx >= n_full - recent_blocks) & (idx < n_full))
    forced = forced | ((idx == n_full) & (lens % block_size != 0))
    return forced & valid, valid


# The block-list <-> mask conversions live with the reference (which union_blocks also uses).
_indices_from_mask = ref.indices_from_mask
mask_from_indices = ref.mask_from_indices


def _topk_total(seq_lens: Tensor, block_size: int, budget_blocks: int,
                budget_fraction: float | Tensor) -> Tensor:
    """``[B]`` (or broadcast) block budget T, as ``reference._topk_count`` computes it."""
    n_blocks = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    if budget_blocks > 0:
        return torch.full_like(n_blocks, budget_blocks)
    frac = torch.as_tensor(budget_fraction, dtype=torch.float64, device=seq_lens.device)
    return torch.ceil(frac * n_blocks.double() - 1e-9).to(torch.int64).clamp(min=1)


def select_topk(head_scores: Tensor, seq_lens: Tensor, block_size: int, kv_heads: int, *,
                budget_fraction: float | Tensor = 0.125, budget_blocks: int = 0,
                sink_blocks: int = 1, recent_blocks: int = 1, agg: str = "max",
                return_mask: bool = False):
    """Vectorised top-k selection; with ``agg="max"`` identical to
    ``reference.select_blocks(policy="topk")`` (forced blocks count toward the budget, ties to the
    lower index). ``budget_fraction`` may be a ``[B]`` or ``[B, Hkv]`` tensor (per-row budgets).

    Returns ``(selected [B, Hkv, NB] int32, num_selected [B, Hkv] int32)``, or the bool mask
    ``[B, Hkv, NB]`` when ``return_mask``.
    """
    batch, _, nb = head_scores.shape
    forced, valid = forced_mask(seq_lens, block_size, nb, sink_blocks, recent_blocks)
    forced, valid = forced[:, None, :], valid[:, None, :]
    priority = group_priority(head_scores.masked_fill(~valid, -math.inf), kv_heads, agg)
    frac = torch.as_tensor(budget_fraction, dtype=torch.float64)
    if frac.dim() == 1:
        frac = frac[:, None]
    n_blocks = ((seq_lens.to(torch.int64) + block_size - 1) // block_size)[:, None]
    if budget_blocks > 0:
        total = torch.full_like(n_blocks, budget_blocks).expand(batch, kv_heads)
    else:
        total = torch.ceil(frac * n_blocks.double() - 1e-9).to(torch.int64).clamp(min=1)
        total = total.expand(batch, kv_heads)
    n_forced = forced.sum(-1)
    n_cand = (valid & ~forced).sum(-1)
    k_count = (total - n_forced).clamp(min=0)
    k_count = torch.minimum(k_count, n_cand.expand_as(k_count))
    cand_priority = priority.masked_fill(~(valid & ~forced), -math.inf)
    # Stable descending sort: equal priorities keep ascending block order (lower index first).
    order = torch.sort(cand_priority, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nb, device=order.device).expand_as(order))
    chosen = (rank < k_count[..., None]) & valid & ~forced
    mask = chosen | forced.expand_as(chosen)
    if return_mask:
        return mask
    return _indices_from_mask(mask)


def select_pooled(head_scores: Tensor, seq_lens: Tensor, block_size: int, kv_heads: int, *,
                  budget_fraction: float = 0.125, sink_blocks: int = 1, recent_blocks: int = 1,
                  agg: str = "sum") -> Tensor:
    """Top-k with one budget for all KV heads of a sequence: ``Hkv * T`` blocks in all (T as in
    :func:`select_topk`), forced blocks first, the rest given to the (head, block) pairs of highest
    priority (``agg="sum"``: the group's estimated mass, comparable across heads). A peaked head
    gives its blocks to a flat one. Returns the bool mask ``[B, Hkv, NB]``."""
    batch, _, nb = head_scores.shape
    forced, valid = forced_mask(seq_lens, block_size, nb, sink_blocks, recent_blocks)
    priority = group_priority(head_scores.masked_fill(~valid[:, None, :], -math.inf), kv_heads,
                              agg)
    forced = forced[:, None, :].expand(batch, kv_heads, nb)
    valid = valid[:, None, :].expand(batch, kv_heads, nb)
    total = _topk_total(seq_lens, block_size, 0, budget_fraction) * kv_heads
    cand = valid & ~forced
    k_count = (total - forced.sum(dim=(1, 2))).clamp(min=0)
    flat = priority.masked_fill(~cand, -math.inf).reshape(batch, kv_heads * nb)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(kv_heads * nb, device=order.device).expand_as(order))
    chosen = (rank < k_count[:, None]).reshape(batch, kv_heads, nb) & cand
    return chosen | forced


def select_mass_target(head_scores: Tensor, seq_lens: Tensor, block_size: int, kv_heads: int, *,
                       mass: float = 0.95, min_fraction: float = 0.0, max_fraction: float = 1.0,
                       sink_blocks: int = 1, recent_blocks: int = 1) -> Tensor:
    """Smallest set whose *estimated* mass (mean over the group of each head's softmax share of
    the scores, read as block log-masses) reaches ``mass``, forced blocks first, the total clamped
    to ``[ceil(min_fraction * n), ceil(max_fraction * n)]`` blocks. Returns the bool mask."""
    batch, q_heads, nb = head_scores.shape
    forced, valid = forced_mask(seq_lens, block_size, nb, sink_blocks, recent_blocks)
    forced, valid = forced[:, None, :], valid[:, None, :]
    share = group_priority(head_scores.masked_fill(~valid, -math.inf), kv_heads, "sum")
    share = share / (q_heads // kv_heads)
    cand = valid & ~forced
    forced_mass = (share * forced).sum(-1, keepdim=True)
    cand_share = share.masked_fill(~cand, -1.0)
    sorted_share, order = torch.sort(cand_share, dim=-1, descending=True, stable=True)
    positive = sorted_share.clamp(min=0)
    before = forced_mass + torch.cumsum(positive, dim=-1) - positive
    k_count = ((before < mass) & (sorted_share >= 0)).sum(-1)
    n_blocks = ((seq_lens.to(torch.int64) + block_size - 1) // block_size)[:, None]
    n_forced = forced.sum(-1)
    lo = torch.ceil(min_fraction * n_blocks.double() - 1e-9).to(torch.int64)
    hi = torch.ceil(max_fraction * n_blocks.double() - 1e-9).to(torch.int64)
    total = torch.minimum(torch.maximum(n_forced + k_count, lo), hi)
    total = torch.minimum(torch.maximum(total, n_forced), n_blocks)
    k_count = (total - n_forced).clamp(min=0)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nb, device=order.device).expand_as(order))
    return ((rank < k_count[..., None]) & cand) | forced


def refine_candidates(coarse_scores: Tensor, fine_scores: Tensor, seq_lens: Tensor,
                      block_size: int, kv_heads: int, *, candidate_fraction: float,
                      sink_blocks: int = 1, recent_blocks: int = 1,
                      agg: str = "max") -> tuple[Tensor, Tensor]:
    """Two-stage radar: the coarse score keeps a top-k of ``candidate_fraction`` of the blocks
    (forced blocks included); the fine score (a sketch, read only for those blocks) replaces it
    there and every other block gets ``-inf``.

    Returns ``(head_scores [B, Hq, NB], candidates [B, Hkv, NB] bool)``; forced blocks stay
    candidates so a following :func:`select_topk` with the same sink/recent keeps them.
    """
    cand = select_topk(coarse_scores, seq_lens, block_size, kv_heads,
                       budget_fraction=candidate_fraction, sink_blocks=sink_blocks,
                       recent_blocks=recent_blocks, agg=agg, return_mask=True)
    group = coarse_scores.shape[1] // kv_heads
    cand_heads = cand.repeat_interleave(group, dim=1)
    return fine_scores.masked_fill(~cand_heads, -math.inf), cand
