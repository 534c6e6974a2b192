"""The "qsketch" block score: a 4-bit token-level key sketch read for scoring only.

Per layer and KV head a rank-R projection of the keys is calibrated once at prefill
(:func:`calibrate_sketch`); every token's R coefficients are stored as 4-bit codes with a bf16
[lo, hi] range per (sketch block, coefficient) (:func:`key_sketch`, :class:`KeySketch`); at decode the
score of a block for query head g is the log-sum-exp over its tokens of the approximate logits

    s * (u_g . dequant(c_t) + a * (q_g - key_proj u_g) . centroid_m),   u_g = query_proj_g^T q_g,

an estimate of the block's attention mass (not a bound: the threshold policy rejects it). The
ranges and the bf16 centroid belong to a *sketch block* of ``blocks_per_sketch`` (P) consecutive
blocks: P = 2 selects 32-token blocks with the metadata bytes of 64-token ones. At R = 8 and
64-token sketch blocks the score reads 288 bytes per sketch block and KV head (codes + ranges;
1.8% of its bf16 K+V at head_dim 64, 0.9% at 128), plus the bf16 centroid (2 * head_dim bytes)
when the centroid weight ``a`` is not 0. docs/selection.md has the study behind the choices
(rank, bits, the query-aware projection, the centroid weight, P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from aether import _ops, reference, selection
from aether.api import (_cache_dims, _check_block_size, _check_block_table, _check_count, _check_head_dim,
                        _check_tensor, _grow_blocks, _normalize_seq_lens, _prepare_update, DEFAULT_BLOCK_SIZE)

DEFAULT_RANK = 8
CENTROID_WEIGHTS = (0.0, 0.5, 1.0)


class SketchCalibration(NamedTuple):
    """Projections of one layer's key sketch (float32) and its centroid weight.

    key_proj: ``[kv_heads, head_dim, rank]``: coefficients ``c_t = key_proj_h^T k_t``.
    query_proj: ``[q_heads, head_dim, rank]``: ``u_g = query_proj_g^T q_g``, ``u_g . c_t ~ q_g . k_t``.
    centroid_weight: ``a`` of the centroid term (0 reads no centroid).
    """

    key_proj: torch.Tensor
    query_proj: torch.Tensor
    centroid_weight: float

    @property
    def rank(self) -> int:
        return self.key_proj.shape[2]


def _check_rank(rank: object, head_dim: int) -> int:
    rank = _check_count(rank, "rank", 2)
    if rank not in (2, 4, 8, 16) or rank > head_dim:
        raise ValueError(f"rank must be 2, 4, 8 or 16 and <= head_dim ({head_dim}), got {rank}")
    return rank


def _check_blocks_per_sketch(per: object, block_size: int) -> int:
    per = _check_count(per, "blocks_per_sketch", 1)
    if per not in (1, 2, 4, 8) or per * block_size > 128:
        raise ValueError(f"blocks_per_sketch must be 1, 2, 4 or 8 with blocks_per_sketch * block_size <= 128 "
                         f"(block_size {block_size}), got {per}")
    return per


def _layer_sketch(k: torch.Tensor, calib: SketchCalibration, block_size: int, blocks_per_sketch: int = 1):
    """``(centroid, codes, ranges)`` of one sequence's prefill keys ``[kv_heads, seq, head_dim]``
    (reference implementations, batch 1), in the order :func:`_recalled_masses` takes them; the
    centroid per sketch block."""
    codes, ranges, centroid = reference.key_sketch(k[None], calib.key_proj, block_size,
                                                   blocks_per_sketch=blocks_per_sketch)
    return centroid, codes, ranges


def _recalled_masses(q: torch.Tensor, k: torch.Tensor, calib: SketchCalibration, block_size: int,
                     budgets: tuple[float, ...], weights: tuple[float, ...], centroid: torch.Tensor,
                     codes: torch.Tensor, ranges: torch.Tensor, chunk: int = 8) -> list[list[float]]:
    """``[weight][budget]``: the mean true attention mass that top-k at each budget fraction on
    qsketch scores (each centroid weight) keeps for queries at the last positions of ``k`` (each
    sees its prefix), sum aggregation, 1 sink + 1 recent block. Queries go in chunks of ``chunk``
    (memory O(chunk * q_heads * seq * rank)); a chunk's true block masses are computed once, its
    scores once per weight; only the top-k runs per budget."""
    kv_heads, seq_len, head_dim = k.shape
    q_heads, n = q.shape[0], q.shape[1]
    group = q_heads // kv_heads
    nb = codes.shape[2]  # a multiple of blocks_per_sketch
    per = nb // ranges.shape[2] if ranges.shape[2] else 1
    keys = k.float().repeat_interleave(group, 0)
    totals = [[0.0] * len(budgets) for _ in weights]
    # The query-independent parts of reference.sketch_head_scores, once: dequantised coefficients
    # and centroids per query head (the reference would expand and unpack them per query).
    deq = reference.unpack_sketch(codes, ranges)[0].repeat_interleave(group, 0)  # [Hq, NB, bs, R]
    cen = centroid[0].float().repeat_interleave(per, 1).repeat_interleave(group, 0)  # [Hq, NB, D]
    kp = calib.key_proj.float().repeat_interleave(group, 0)  # [Hq, D, R]
    scale = 1.0 / math.sqrt(head_dim)
    for start in range(0, n, chunk):
        qb = q[:, start:start + chunk].transpose(0, 1).float()  # [c, Hq, D]
        c = qb.shape[0]
        positions = torch.arange(seq_len - n + start, seq_len - n + start + c, device=k.device)
        lens = (positions + 1).to(torch.int32)
        logits = torch.einsum("ngd,gsd->ngs", qb, keys) / math.sqrt(head_dim)
        causal = torch.arange(seq_len, device=k.device)[None, :] <= positions[:, None]
        probs = torch.softmax(logits.masked_fill(~causal[:, None, :], -math.inf), dim=-1)
        probs = torch.nn.functional.pad(probs, (0, nb * block_size - seq_len))
        block_mass = probs.reshape(c, q_heads, nb, block_size).sum(-1)
        # reference.sketch_head_scores, operation for operation, on the shared tensors
        u = torch.einsum("bgd,gdr->bgr", qb, calib.query_proj.float())
        sketch_logits = torch.einsum("bgr,gntr->bgnt", u, deq)
        base = torch.einsum("bgd,gnd->bgn", qb - torch.einsum("gdr,bgr->bgd", kp, u), cen)
        valid = reference._token_valid(lens, nb * block_size).reshape(c, 1, nb, block_size)
        for i, weight in enumerate(weights):
            logits = sketch_logits + float(weight) * base[..., None] if weight != 0.0 else sketch_logits
            scores = torch.logsumexp((scale * logits).masked_fill(~valid, -math.inf), dim=-1)
            for j, budget in enumerate(budgets):
                mask = selection.select_topk(scores, lens, block_size, kv_heads, budget_fraction=budget,
                                             sink_blocks=1, recent_blocks=1, agg="sum", return_mask=True)
                totals[i][j] += float((block_mass * mask.repeat_interleave(group, 1)).sum())  # mask [c, Hkv, NB]
    return [[t / (n * q_heads) for t in row] for row in totals]


def _check_calibration_inputs(k: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's prefill keys ``[kv_heads, seq, head_dim]`` and last queries ``[q_heads, n, head_dim]``."""
    k = _check_tensor(k, "k", 3, "[kv_heads, seq, head_dim]")
    q = _check_tensor(q, "q", 3, "[q_heads, n, head_dim]")
    kv_heads, seq_len, head_dim = k.shape
    if q.shape[2] != head_dim or q.shape[0] % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} must be [q_heads (a multiple of {kv_heads}), n, {head_dim}]")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}")
    if not 1 <= q.shape[1] <= seq_len:
        raise ValueError(f"q must hold between 1 and seq ({seq_len}) queries, got {q.shape[1]}")
    return k, q


def calibrate_sketch(k: torch.Tensor, q: torch.Tensor, *, rank: int = DEFAULT_RANK,
                     block_size: int = DEFAULT_BLOCK_SIZE, blocks_per_sketch: int = 1, budget: float = 0.125,
                     centroid_weights: tuple[float, ...] | None = CENTROID_WEIGHTS,
                     max_queries: int = 64) -> SketchCalibration:
    """Calibrate one layer's key sketch from its prefill keys and queries (once per prompt).

    The projection is the query-aware rank-``rank`` factorisation ("qpca"): with ``Sk = E[k k^T]``
    over the keys and ``Sq = E[q q^T]`` over the group's queries, the top eigenvectors ``V`` of
    ``Sk^1/2 Sq Sk^1/2`` give ``key_proj = Sk^-1/2 V`` and ``query_proj = Sk^1/2 V``, which
    minimise the mean squared error of ``u . c`` against the logit ``q . k``.
    The centroid weight is the one of ``centroid_weights`` whose top-k selection at ``budget``
    recalls the most attention mass for the last ``max_queries`` queries (ties: the earlier,
    so list the cheapest, 0, first); ``None`` keeps 0 without measuring. ``block_size`` and
    ``blocks_per_sketch`` should be those of the sketch the calibration will serve.

    Args:
        k: ``[kv_heads, seq, head_dim]`` post-RoPE prefill keys of one sequence.
        q: ``[q_heads, n, head_dim]`` post-RoPE queries of the last ``n`` prefill positions
            (query i sits at position ``seq - n + i``).
    """
    k, q = _check_calibration_inputs(k, q)
    kv_heads, seq_len, head_dim = k.shape
    rank = _check_rank(rank, head_dim)
    block_size = _check_block_size(block_size)
    per = _check_blocks_per_sketch(blocks_per_sketch, block_size)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    _check_count(max_queries, "max_queries", 1)
    base = selection.calibrate_sketch(k.float().cpu(), q.float().cpu(), block_size, rank, mode="qpca",
                                      use_centroid=False)
    calib = SketchCalibration(base.key_proj.to(k.device).contiguous(), base.query_proj.to(k.device).contiguous(),
                              0.0)
    weights = tuple(centroid_weights or ())
    if len(weights) <= 1:
        return calib._replace(centroid_weight=float(weights[0]) if weights else 0.0)
    for w in weights:
        if not math.isfinite(w):
            raise ValueError(f"centroid_weights must be finite, got {weights}")
    q_tail = q[:, -max_queries:]
    recalled = [row[0] for row in _recalled_masses(q_tail, k, calib, block_size, (budget,), weights,
                                                   *_layer_sketch(k, calib, block_size, per))]
    best = max(range(len(weights)), key=lambda i: (recalled[i], -i))
    return calib._replace(centroid_weight=float(weights[best]))


ALLOCATION_MULTIPLIERS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def recall_curve(k: torch.Tensor, q: torch.Tensor, calib: SketchCalibration, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 fractions: tuple[float, ...], max_queries: int = 64, blocks_per_sketch: int = 1) -> list[float]:
    """Mean true attention mass that top-k on this layer's qsketch scores keeps, per keep fraction.

    Measured like the centroid-weight choice of :func:`calibrate_sketch`: the last
    ``max_queries`` prefill queries ``q`` ``[q_heads, n, head_dim]`` over the prefill keys ``k``
    ``[kv_heads, seq, head_dim]`` (each query sees its prefix; softmax scale 1/sqrt(head_dim)),
    sum aggregation, 1 sink + 1 recent block. Returns one mean recalled mass in [0, 1] per
    fraction (the masses and scores are computed once; only the top-k runs per fraction).
    """
    k, q = _check_calibration_inputs(k, q)
    block_size = _check_block_size(block_size)
    per = _check_blocks_per_sketch(blocks_per_sketch, block_size)
    _check_count(max_queries, "max_queries", 1)
    if calib.key_proj.shape[:2] != k.shape[::2] or calib.query_proj.shape[:2] != (q.shape[0], k.shape[2]):
        raise ValueError(f"calibration projections {tuple(calib.key_proj.shape)} / {tuple(calib.query_proj.shape)} "
                         f"do not match k {tuple(k.shape)} and q {tuple(q.shape)}")
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be non-empty and lie in (0, 1], got {fractions}")
    calib = SketchCalibration(calib.key_proj.to(k.device), calib.query_proj.to(k.device), calib.centroid_weight)
    return _recalled_masses(q[:, -max_queries:], k, calib, block_size, fractions, (calib.centroid_weight,),
                            *_layer_sketch(k, calib, block_size, per))[0]


def allocate_budgets(curves: list[list[float]], budget: float,
                     multipliers: tuple[float, ...] = ALLOCATION_MULTIPLIERS) -> list[float]:
    """Per-layer keep fractions with mean at most ``budget`` that recall the most mass in total.

    ``curves[l][i]`` is layer l's recalled mass at keep fraction ``budget * multipliers[i]``
    (:func:`recall_curve`; multipliers ascending and containing 1). Greedy on the marginal gain
    per unit of budget: every layer starts at the smallest multiplier and the step with the best
    gain per unit is taken while the mean stays within ``budget`` (exact for concave curves when
    every step costs the same, a knapsack approximation otherwise, e.g. on the default grid whose
    steps are 0.25 then 0.5; recalled mass is concave in practice).
    Fractions are capped at 1.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    mults = tuple(float(m) for m in multipliers)
    if list(mults) != sorted(set(mults)) or 1.0 not in mults or mults[0] <= 0.0:
        raise ValueError(f"multipliers must be positive, strictly ascending and contain 1, got {multipliers}")
    for i, curve in enumerate(curves):
        if len(curve) != len(mults):
            raise ValueError(f"curves[{i}] has {len(curve)} points, expected one per multiplier ({len(mults)})")
        if not all(math.isfinite(x) for x in curve):
            raise ValueError(f"curves[{i}] holds a non-finite value: {list(curve)}")
    if not curves:
        return []
    at = [0] * len(curves)
    room = len(curves) * 1.0 - len(curves) * mults[0]  # in units of budget
    while True:
        best = None
        for layer, i in enumerate(at):
            if i + 1 == len(mults):
                continue
            cost = mults[i + 1] - mults[i]
            if cost > room + 1e-9:
                continue
            gain = (curves[layer][i + 1] - curves[layer][i]) / cost
            if best is None or gain > best[0]:  # ties: the lower layer
                best = (gain, layer, cost)
        if best is None:
            break
        at[best[1]] += 1
        room -= best[2]
    return [min(1.0, budget * mults[i]) for i in at]


@dataclass
class KeySketch:
    """The key sketch of a KV cache, reusable across decode steps (see the module docstring).

    codes: uint8 ``[batch, kv_heads, num_blocks, block_size, rank // 2]`` (two 4-bit codes per
    byte); ranges: bfloat16 ``[batch, kv_heads, num_blocks / P, 2, rank]`` (lo, hi); centroid:
    bfloat16 ``[batch, kv_heads, num_blocks / P, head_dim]``, with P = ``blocks_per_sketch``
    blocks sharing one sketch block's ranges and centroid. Build with :func:`key_sketch`; after
    appending tokens to the cache call :meth:`update`.
    """

    codes: torch.Tensor
    ranges: torch.Tensor
    centroid: torch.Tensor
    calibration: SketchCalibration
    block_size: int
    seq_lens: torch.Tensor
    paged: bool = False
    blocks_per_sketch: int = 1  # P: blocks per sketch block (a field: an empty sketch has no shape to show it)

    @property
    def num_blocks(self) -> int:
        return self.codes.shape[2]

    def bytes_per_block(self, with_centroid: bool | None = None, head_dim: int | None = None) -> float:
        """Bytes the score reads per block and KV head: codes, plus the block's share of its sketch
        block's ranges and bf16 centroid (the centroid only when the centroid weight is not 0)."""
        rank = self.calibration.rank
        use_centroid = self.calibration.centroid_weight != 0.0 if with_centroid is None else with_centroid
        extra = 2 * (head_dim or self.calibration.key_proj.shape[1]) if use_centroid else 0
        return self.block_size * rank // 2 + (2 * rank * 2 + extra) / self.blocks_per_sketch

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None, *,
               block_table: torch.Tensor | None = None) -> "KeySketch":
        """Refresh the sketch after tokens were appended to ``k`` (in place, CUDA-graph safe):
        only the sketch blocks from each sequence's previous last block on are rebuilt."""
        k, seq_lens, block_table, first_block, needed = _prepare_update(
            self, k, seq_lens, block_table, "the sketch", "build a new sketch with aether.key_sketch",
            _check_sketch_match)
        per = self.blocks_per_sketch
        needed = -(-needed // per) * per
        self.codes = _grow_blocks(self.codes, needed)
        self.ranges, self.centroid = _grow_blocks(self.ranges, needed // per), _grow_blocks(self.centroid, needed // per)
        torch.ops.aether.key_sketch_update(k, seq_lens, first_block, self.calibration.key_proj, self.block_size,
                                           block_table, self.codes, self.ranges, self.centroid, per)
        self.seq_lens.copy_(seq_lens)
        return self


def _check_sketch_match(sketch: KeySketch, batch: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
    got = tuple(sketch.codes.shape[:2])
    if got != (batch, kv_heads) or sketch.calibration.key_proj.shape[1] != head_dim:
        raise ValueError(f"the sketch was built for another cache: [batch, kv_heads] = {list(got)}, head_dim "
                         f"{sketch.calibration.key_proj.shape[1]}; this cache has [{batch}, {kv_heads}], {head_dim}")
    if sketch.codes.device != device:
        raise ValueError(f"the sketch is on {sketch.codes.device} but the cache is on {device}")


def _check_calibration(calib: object, kv_heads: int, head_dim: int, device: torch.device) -> SketchCalibration:
    if not isinstance(calib, SketchCalibration):
        raise TypeError(f"calibration must be an aether.SketchCalibration, got {type(calib).__name__}")
    kp, qp = calib.key_proj, calib.query_proj
    if kp.dtype != torch.float32 or qp.dtype != torch.float32:
        raise TypeError(f"calibration projections must be float32, got {kp.dtype} and {qp.dtype}")
    if kp.dim() != 3 or kp.shape[:2] != (kv_heads, head_dim):
        raise ValueError(f"calibration.key_proj must be [kv_heads={kv_heads}, head_dim={head_dim}, rank], "
                         f"got {tuple(kp.shape)}")
    _check_rank(kp.shape[2], head_dim)
    if qp.dim() != 3 or qp.shape[0] % kv_heads or qp.shape[1:] != kp.shape[1:]:
        raise ValueError(f"calibration.query_proj must be [q_heads, {head_dim}, {kp.shape[2]}], got {tuple(qp.shape)}")
    if not math.isfinite(calib.centroid_weight):
        raise ValueError(f"calibration.centroid_weight must be finite, got {calib.centroid_weight}")
    if kp.device != device or qp.device != device:
        raise ValueError(f"calibration tensors are on {kp.device} / {qp.device} but the cache is on {device}")
    return calib._replace(key_proj=kp.contiguous(), query_proj=qp.contiguous())


def key_sketch(k: torch.Tensor, calibration: SketchCalibration, block_size: int = DEFAULT_BLOCK_SIZE, *,
               blocks_per_sketch: int = 1, seq_lens: torch.Tensor | None = None,
               block_table: torch.Tensor | None = None) -> KeySketch:
    """Build the 4-bit key sketch of a cache with a calibrated projection.

    Args:
        k: keys, contiguous ``[batch, kv_heads, seq, head_dim]`` or paged
            ``[num_pages, page_size, kv_heads, head_dim]`` with ``block_table``.
        calibration: from :func:`calibrate_sketch` (on k's device).
        block_size: tokens per block, 16/32/64/128: the granularity of selection and decoding.
        blocks_per_sketch: P, blocks that share one set of ranges and one centroid (1, 2, 4 or 8,
            P * block_size <= 128): P = 2 at 32-token blocks selects at 32 tokens for the metadata
            bytes of 64-token blocks (docs/selection.md).
        seq_lens: valid tokens per sequence (default: all).
    """
    _ops.require_extension()
    k = _check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    block_size = _check_block_size(block_size)
    per = _check_blocks_per_sketch(blocks_per_sketch, block_size)
    block_table = _check_block_table(block_table, k)
    batch, kv_heads, capacity, head_dim = _cache_dims(k, block_table, block_size, "k")
    _check_head_dim(head_dim, k.device)
    calibration = _check_calibration(calibration, kv_heads, head_dim, k.device)
    seq_lens = _normalize_seq_lens(seq_lens, batch, capacity, k.device)
    num_blocks = math.ceil(capacity / (block_size * per)) * per
    codes, ranges, centroid = torch.ops.aether.key_sketch(k, seq_lens, calibration.key_proj, block_size, num_blocks,
                                                          block_table, per)
    return KeySketch(codes, ranges, centroid, calibration, block_size, seq_lens.clone(), block_table is not None,
                     blocks_per_sketch=per)
