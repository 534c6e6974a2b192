"""A contiguous KV cache for one attention layer that keeps AETHER's block statistics current.

`AetherKVCache` stores keys and values in `[batch, kv_heads, capacity, head_dim]` buffers that grow
by doubling (so an append costs O(new tokens), amortised), builds the block statistics once after
prefill, and then refreshes them incrementally: one appended token recomputes only the block it
lands in (O(block_size * head_dim) per head), never the whole cache. `attend` runs one AETHER
decode step over the cache and counts the bytes it read.

Left padding (batched generation) is supported through per-row valid ranges: row b holds valid
tokens in slots `[start_b, length)`. A batch without padding runs one AETHER call with one set of
statistics; a padded batch keeps one set of statistics per row, aligned to the row's first valid
token, and runs one call per row (slower, exact: padding never enters a block).

All attention goes through `sparse_decode_step`, which uses the compiled kernels
(`aether.sparse_attention`) when the extension is built and the pure-PyTorch reference otherwise;
the `oracle` score (true per-block attention mass, an upper limit for studies) exists only in the
reference.

The `qsketch` score (docs/selection.md) also needs the post-RoPE queries of the prefill: the
cache keeps the last `SparseOptions.sketch_queries` of them (`record_queries`, called by the
transformers integration at prefill), calibrates each statistics group's projection once from
them and the prefill keys (`aether.calibrate_sketch`, at the first decode step), builds the 4-bit
key sketch, and then updates it incrementally exactly like the block statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

import aether
from aether import reference
from aether.api import (CODE_BITS_PER_TOKEN_PER_DIM, BlockStats, GROUP_AGGS, SCORES, POLICIES, UPPER_BOUND_SCORES,
                        _channel_count, _grow_blocks, _resolve_code_channels)
from aether.refine import KeyCodes, default_blocks_per_group, pool_slots as refine_pool_slots
from aether.sketch import DEFAULT_RANK, KeySketch, SketchCalibration
from aether.sketch import recall_curve as sketch_recall_curve

EVAL_SCORES = SCORES + ("oracle",)
BLOCK_SIZES = (16, 32, 64, 128)
SKETCH_SCORE = "qsketch"
CODES_SCORE = "qcodes"
DEFAULT_SKETCH_QUERIES = 256
BUDGET_ALLOCATIONS = ("uniform", "layer")


# ------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SparseOptions:
    """How AETHER selects blocks at a decode step (see `aether.sparse_attention`).

    `score` may also be "oracle" (reference only: picks blocks by their true attention mass).
    `budget`: int = block count, float = fraction of the blocks (topk policy).
    `group_agg`: topk's aggregation of a GQA group's head scores, "max" or "sum" (None: the
    library default of `aether.sparse_attention`: "sum" for qsketch with topk, else "max");
    only with policy="topk".
    `sketch_rank`, `sketch_queries`: for score="qsketch", the sketch rank and how many of the last
    prefill queries calibrate it. `blocks_per_sketch`: for score="qsketch", how many blocks share
    one sketch block's ranges and centroid (1, 2, 4, 8; `aether.key_sketch`): 2 with 32-token
    blocks selects at 32 tokens for the metadata bytes of 64-token blocks.
    `budget_allocation`: "uniform" (every sparse layer keeps `budget`) or "layer" (qsketch with a
    float top-k budget only; `AetherCache` gives each sparse layer its own fraction, mean at most
    `budget`, from the recall curves measured at prefill: `aether.sketch.allocate_budgets`).
    `refine_candidates`, `refine_bits`: two-stage selection (`aether.refine`, top-k only): the
    score keeps this fraction of the blocks as candidates, `refine_bits`-bit key codes (2 or 4)
    rank them and `budget` keeps the final blocks; None (default) is one stage.
    `refine_reuse`: with `refine_candidates`, each decode step's final blocks join the next
    step's candidates (same layer; `sparse_attention(refine_extra=)`; docs/selection.md,
    "Reusing the last step's final blocks"). The read counter counts the union's codes.
    `code_channels`, `code_bits`: for score="qcodes", the fraction of head_dim whose channel-major
    `code_bits`-bit key codes (2 or 4) score every block (`aether.sparse_attention(codes=,
    code_channels=)`; None: head_dim / (2 code_bits) channels). The defaults, 4-bit codes of an
    eighth of the channels, are the measured best (docs/selection.md, "score=\"qcodes\"").
    `code_pool`: for score="qcodes", store the codes of only this fraction of head_dim per KV head
    (the channels of largest key spread at the first build, `aether.key_codes(channel_pool=)`;
    a rebuild after `reindex`, `truncate` or new row starts chooses again from the keys then),
    the per-step choice being made among them; None (default): every channel. 0.5 halves the
    codes at about the free choice's quality (docs/selection.md, "A fixed channel pool").
    """

    score: str = "tight"
    policy: str = "topk"
    budget: int | float = 0.125
    block_size: int = 64
    eps: float = 1e-3
    mass: float = 0.95
    sink_blocks: int = 1
    recent_blocks: int = 1
    group_agg: str | None = None
    sketch_rank: int = DEFAULT_RANK
    sketch_queries: int = DEFAULT_SKETCH_QUERIES
    budget_allocation: str = "uniform"
    blocks_per_sketch: int = 1
    refine_candidates: float | None = None
    refine_bits: int = 2
    refine_reuse: bool = False
    code_channels: float | None = None
    code_bits: int = 4
    code_pool: float | None = None
    codes_behind: bool = False

    def __post_init__(self) -> None:
        if self.score not in EVAL_SCORES:
            raise ValueError(f"score must be one of {EVAL_SCORES}, got {self.score!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.group_agg is not None and self.group_agg not in GROUP_AGGS:
            raise ValueError(f"group_agg must be one of {GROUP_AGGS} or None (the library default), "
                             f"got {self.group_agg!r}")
        if self.group_agg is not None and self.policy != "topk":
            raise ValueError(f"group_agg applies to policy='topk' only, got group_agg={self.group_agg!r} with "
                             f"policy={self.policy!r}")
        rank = self.sketch_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank % 2 or not 2 <= rank <= 16:
            raise ValueError(f"sketch_rank must be an even int in [2, 16], got {rank!r}")
        if isinstance(self.sketch_queries, bool) or not isinstance(self.sketch_queries, int) \
                or self.sketch_queries < 1:
            raise ValueError(f"sketch_queries must be an int >= 1, got {self.sketch_queries!r}")
        if self.budget_allocation not in BUDGET_ALLOCATIONS:
            raise ValueError(f"budget_allocation must be one of {BUDGET_ALLOCATIONS}, got {self.budget_allocation!r}")
        if self.budget_allocation == "layer" and (self.score != SKETCH_SCORE or self.policy != "topk"
                                                  or not isinstance(self.budget, float)):
            raise ValueError("budget_allocation='layer' needs score='qsketch', policy='topk' and a float budget "
                             f"(a fraction), got score={self.score!r}, policy={self.policy!r}, budget={self.budget!r}")
        if self.policy == "threshold" and self.score not in UPPER_BOUND_SCORES + ("oracle",):
            raise ValueError(f"policy='threshold' needs an upper-bound score {UPPER_BOUND_SCORES}, got "
                             f"score={self.score!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise TypeError(f"budget must be an int (blocks) or a float (fraction), got {type(self.budget).__name__}")
        if isinstance(self.budget, int) and self.budget < 1:
            raise ValueError(f"budget as a block count must be >= 1, got {self.budget}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget as a fraction must be in (0, 1], got {self.budget}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        per = self.blocks_per_sketch
        if isinstance(per, bool) or not isinstance(per, int) or per not in (1, 2, 4, 8) or per * self.block_size > 128:
            raise ValueError(f"blocks_per_sketch must be 1, 2, 4 or 8 with blocks_per_sketch * block_size <= 128 "
                             f"(block_size {self.block_size}), got {per!r}")
        if per != 1 and self.score != SKETCH_SCORE:
            raise ValueError(f"blocks_per_sketch is a qsketch option, got blocks_per_sketch={per} with "
                             f"score={self.score!r}")
        rc = self.refine_candidates
        if rc is not None:
            if isinstance(rc, bool) or not isinstance(rc, float) or not 0.0 < rc <= 1.0:
                raise ValueError(f"refine_candidates must be None or a float fraction in (0, 1], got {rc!r}")
            if self.policy != "topk" or self.score == "oracle":
                raise ValueError(f"refine_candidates (two-stage selection) needs policy='topk' and a real score, got "
                                 f"policy={self.policy!r}, score={self.score!r}")
            if isinstance(self.budget, float) and rc < self.budget:
                raise ValueError(f"refine_candidates ({rc}) must be >= budget ({self.budget})")
        if self.refine_bits not in (2, 4) or isinstance(self.refine_bits, bool):
            raise ValueError(f"refine_bits must be 2 or 4, got {self.refine_bits!r}")
        if self.score == CODES_SCORE and rc is not None:
            raise ValueError("refine_candidates (two-stage selection) does not combine with score='qcodes', which "
                             "already ranks every block from key codes")
        cc = self.code_channels
        if cc is not None and (isinstance(cc, bool) or not isinstance(cc, float) or not 0.0 < cc <= 1.0):
            raise ValueError(f"code_channels must be None or a float fraction of head_dim in (0, 1], got {cc!r}")
        if self.code_bits not in (2, 4) or isinstance(self.code_bits, bool):
            raise ValueError(f"code_bits must be 2 or 4, got {self.code_bits!r}")
        pool = self.code_pool
        if pool is not None:
            if isinstance(pool, bool) or not isinstance(pool, float) or not 0.0 < pool <= 1.0:
                raise ValueError(f"code_pool must be None or a float fraction of head_dim in (0, 1], got {pool!r}")
            if self.score != CODES_SCORE:
                raise ValueError(f"code_pool is a qcodes option, got score={self.score!r}")
            read = cc if cc is not None else CODE_BITS_PER_TOKEN_PER_DIM / self.code_bits  # the default's fraction
            if read > pool:
                raise ValueError(f"code_channels ({read}{' by default' if cc is None else ''}) must not exceed "
                                 f"code_pool ({pool}): the channels are chosen among the pool")
        if not isinstance(self.refine_reuse, bool):
            raise TypeError(f"refine_reuse must be a bool, got {type(self.refine_reuse).__name__}")
        if not isinstance(self.codes_behind, bool):
            raise TypeError(f"codes_behind must be a bool, got {type(self.codes_behind).__name__}")
        if self.codes_behind and self.score != CODES_SCORE:
            raise ValueError(f"codes_behind is a qcodes option, got score={self.score!r}")
        if self.refine_reuse and rc is None:
            raise ValueError("refine_reuse (the last step's final blocks join the candidates) needs "
                             "refine_candidates (two-stage selection)")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        for name in ("sink_blocks", "recent_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


# ---------------------------------------------------------------------- statistics backend


def _use_extension(k: torch.Tensor) -> bool:
    return aether.extension_available() and k.dtype in (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class RefBlockStats:
    """Block statistics kept with the pure-PyTorch reference (used when `aether._C` is not built).

    Same fields and `update` contract as `aether.BlockStats` (contiguous caches only).
    """

    centroid: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    radius: torch.Tensor
    spread: torch.Tensor
    block_size: int
    seq_lens: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.centroid.shape[2]

    def as_reference(self) -> reference.BlockStatsRef:
        return reference.BlockStatsRef(self.centroid, self.lo, self.hi, self.radius, self.spread)

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None) -> "RefBlockStats":
        """Recompute only the blocks from each row's previous last block on (in place)."""
        batch, _, capacity, _ = k.shape
        if seq_lens is None:
            seq_lens = torch.full((batch,), capacity, dtype=torch.int32, device=k.device)
        if bool((seq_lens < self.seq_lens).any()):
            raise ValueError("seq_lens must not shrink in update(); rebuild the statistics")
        bs = self.block_size
        needed = math.ceil(capacity / bs)
        if needed > self.num_blocks:
            extra = needed - self.num_blocks

            def pad(t: torch.Tensor) -> torch.Tensor:
                shape = list(t.shape)
                shape[2] = extra
                return torch.cat([t, t.new_zeros(shape)], dim=2)

            self.centroid, self.lo, self.hi, self.radius, self.spread = (
                pad(t) for t in (self.centroid, self.lo, self.hi, self.radius, self.spread))
        first = int(self.seq_lens.min()) // bs
        last = math.ceil(int(seq_lens.max()) / bs)
        if last > first:
            part_lens = (seq_lens.to(torch.int64) - first * bs).clamp(min=0).to(torch.int32)
            part = reference.block_stats(k[:, :, first * bs:], bs, part_lens, num_blocks=last - first)
            for name, value in zip(("centroid", "lo", "hi", "radius", "spread"), part):
                getattr(self, name)[:, :, first:last] = value
        self.seq_lens = seq_lens.to(torch.int32).clone()
        return self


def build_block_stats(k: torch.Tensor, block_size: int) -> BlockStats | RefBlockStats:
    """Statistics of every block of `k` `[batch, kv_heads, seq, head_dim]` (all slots valid)."""
    if _use_extension(k):
        return aether.block_stats(k, block_size)
    seq_lens = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    return RefBlockStats(*reference.block_stats(k, block_size, seq_lens), block_size=block_size, seq_lens=seq_lens)


@dataclass
class RefKeySketch(KeySketch):
    """A key sketch kept with the pure-PyTorch reference (used when `aether._C` is not built).

    Same fields, bytes and `update` contract as `aether.KeySketch` (contiguous caches only).
    """

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None) -> "RefKeySketch":
        """Rebuild only the sketch blocks from each row's previous last block on (in place)."""
        batch, _, capacity, _ = k.shape
        if seq_lens is None:
            seq_lens = torch.full((batch,), capacity, dtype=torch.int32, device=k.device)
        if bool((seq_lens < self.seq_lens).any()):
            raise ValueError("seq_lens must not shrink in update(); rebuild the sketch")
        sb = self.block_size * self.blocks_per_sketch  # tokens per sketch block
        per = self.blocks_per_sketch
        needed = math.ceil(capacity / sb)  # sketch blocks
        have = self.ranges.shape[2]
        if needed > have:
            self.codes = _grow_blocks(self.codes, needed * per)
            self.ranges, self.centroid = _grow_blocks(self.ranges, needed), _grow_blocks(self.centroid, needed)
        first = int(self.seq_lens.min()) // sb
        last = math.ceil(int(seq_lens.max()) / sb)
        if last > first:
            part_lens = (seq_lens.to(torch.int64) - first * sb).clamp(min=0).to(torch.int32)
            codes, ranges, centroid = reference.key_sketch(k[:, :, first * sb:], self.calibration.key_proj,
                                                           self.block_size, part_lens, num_blocks=(last - first) * per,
                                                           blocks_per_sketch=per)
            self.codes[:, :, first * per:last * per] = codes
            self.ranges[:, :, first:last] = ranges
            self.centroid[:, :, first:last] = centroid
        self.seq_lens = seq_lens.to(torch.int32).clone()
        return self


def build_key_sketch(k: torch.Tensor, calibration: SketchCalibration, block_size: int,
                     blocks_per_sketch: int = 1) -> KeySketch:
    """The qsketch key sketch of every block of `k` `[batch, kv_heads, seq, head_dim]` (all slots valid)."""
    if _use_extension(k):
        return aether.key_sketch(k, calibration, block_size, blocks_per_sketch=blocks_per_sketch)
    seq_lens = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    codes, ranges, centroid = reference.key_sketch(k, calibration.key_proj, block_size, seq_lens,
                                                   blocks_per_sketch=blocks_per_sketch)
    return RefKeySketch(codes, ranges, centroid, calibration, block_size, seq_lens,
                        blocks_per_sketch=blocks_per_sketch)


@dataclass
class RefKeyCodes(KeyCodes):
    """Key codes kept with the pure-PyTorch reference (used when `aether._C` is not built):
    `update` rebuilds every group (the reference is a correctness path, not a fast one)."""

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None) -> "RefKeyCodes":
        # every group rebuilt; a channel pool stays the one chosen at the first build
        fresh = build_key_codes(k, self.block_size, self.bits, self.layout, pool=self.pool)
        self.codes, self.ranges, self.seq_lens = fresh.codes, fresh.ranges, fresh.seq_lens
        return self


def build_key_codes(k: torch.Tensor, block_size: int, bits: int, layout: str = "token",
                    channel_pool: float | None = None, pool: torch.Tensor | None = None) -> KeyCodes:
    """The key codes of every block of `k` `[batch, kv_heads, seq, head_dim]` (all slots valid),
    128-token groups: token-major for two-stage selection, channel-major for score="qcodes"
    (`channel_pool`: `aether.key_codes(channel_pool=)`; `pool`: a pool already chosen, the
    reference path's `RefKeyCodes.update`)."""
    per = default_blocks_per_group(block_size)
    if _use_extension(k) and pool is None:  # a given pool: RefKeyCodes.update, which stays on this path
        return aether.key_codes(k, block_size, bits=bits, blocks_per_group=per, layout=layout,
                                channel_pool=channel_pool)
    seq_lens = torch.full((k.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    head_dim = k.shape[-1]
    if channel_pool is not None and pool is None:  # the library's choice: spread, ties low (refine.py)
        _, ranges = reference.key_codes(k, bits, block_size, seq_lens, blocks_per_group=per, channel_major=True)
        stored = _channel_count(channel_pool, head_dim, "channel_pool")
        ones = torch.ones(k.shape[0], k.shape[1], head_dim, dtype=k.dtype, device=k.device)
        pool = reference.code_channels(ones, ranges, seq_lens, per * block_size, stored)
    pool_slots = None if pool is None else refine_pool_slots(pool, head_dim)
    codes, ranges = reference.key_codes(k, bits, block_size, seq_lens, blocks_per_group=per,
                                        channel_major=layout == "channel", channel_slots=pool_slots,
                                        stored_channels=None if pool is None else pool.shape[-1])
    return RefKeyCodes(codes, ranges, bits, block_size, seq_lens, blocks_per_group=per, layout=layout, pool=pool,
                       channel_slots=pool_slots)


def calibrate_key_sketch(k: torch.Tensor, q: torch.Tensor, options: SparseOptions) -> SketchCalibration:
    """`aether.calibrate_sketch` for one sequence's prefill keys `[kv_heads, seq, head_dim]` and its
    last prefill queries `[q_heads, n, head_dim]` (n <= seq), with the options' rank and budget (a
    block-count budget is turned into the fraction it is of the prefill's blocks)."""
    budget = options.budget
    if isinstance(budget, int):
        budget = min(1.0, budget / math.ceil(k.shape[1] / options.block_size))
    return aether.calibrate_sketch(k, q, rank=options.sketch_rank, block_size=options.block_size,
                                   blocks_per_sketch=options.blocks_per_sketch, budget=float(budget))


# ---------------------------------------------------------------------- the one attention call


def resolved_group_agg(options: SparseOptions) -> str:
    """The group aggregation a step uses: the option, else `aether.sparse_attention`'s default (sum
    for qsketch with topk, whose scores are mass estimates; max for the bounds and the oracle)."""
    if options.group_agg is not None:
        return options.group_agg
    return "sum" if options.score in (SKETCH_SCORE, CODES_SCORE) and options.policy == "topk" else "max"


def refine_fraction(options: SparseOptions) -> float | None:
    """The candidate fraction of a two-stage step: `refine_candidates`, raised to the step's budget
    when that is larger (a per-layer allocation may give a layer more than the candidates)."""
    rc = options.refine_candidates
    if rc is None:
        return None
    return max(rc, float(options.budget)) if isinstance(options.budget, float) else rc


def sparse_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: SparseOptions,
                       stats: BlockStats | RefBlockStats | None = None,
                       scale: float | None = None,
                       sketch: KeySketch | None = None,
                       codes: KeyCodes | None = None,
                       refine_extra: tuple[torch.Tensor, torch.Tensor] | None = None,
                       return_candidates: bool = False) -> tuple[torch.Tensor, ...]:
    """One AETHER decode step over a whole cache view (every slot of `k`/`v` is a valid token).

    Every AETHER attention call of the cache and the integrations goes through here: the compiled
    kernels when available, else the reference (same semantics); the oracle score always uses
    the reference.

    Args:
        q: `[batch, q_heads, head_dim]`; k, v: `[batch, kv_heads, seq, head_dim]`.
        options: score, policy, budget and block size.
        stats: statistics of `k` for `options.block_size` (computed when None; unused by oracle
            and qsketch, whose sketch carries its centroid).
        scale: softmax scale (default 1/sqrt(head_dim)).
        sketch: the key sketch of `k` (`KeySketch`, or `RefKeySketch` without the extension),
            required by score="qsketch" and only read by it.
        codes: the key codes of `k` (`KeyCodes`, or `RefKeyCodes`), required by two-stage
            selection (`options.refine_candidates`, token-major) and score="qcodes"
            (channel-major), and only read by them.
        refine_extra: `(indices, counts)` of blocks that join the two-stage candidates (the
            previous step's selection with `options.refine_reuse`).
        return_candidates: also return the candidates' counts `[batch, kv_heads]` int32 (after
            refine_extra; two-stage only), for the read counter.

    Returns:
        `(out [batch, q_heads, head_dim] in q's dtype, selection [batch, kv_heads, num_blocks]
        int32 ascending block indices padded with -1)`, and the candidates' counts with
        `return_candidates`.
    """
    kwargs = dict(policy=options.policy, eps=options.eps, mass=options.mass, sink_blocks=options.sink_blocks,
                  recent_blocks=options.recent_blocks, scale=scale)
    budget_blocks, budget_fraction = ((options.budget, 0.0) if isinstance(options.budget, int)
                                      else (0, float(options.budget)))
    qsketch = options.score == SKETCH_SCORE
    if qsketch and not isinstance(sketch, KeySketch):
        raise ValueError("score='qsketch' needs the cache's key sketch (sketch=, built from a calibration of the "
                         f"prefill queries and keys), got {type(sketch).__name__}")
    if not qsketch and sketch is not None:
        raise ValueError(f"sketch is only read by score='qsketch', got score={options.score!r}")
    qcodes = options.score == CODES_SCORE
    if qsketch or qcodes:
        stats = None  # the sketch carries its centroid, qcodes reads the key codes: no statistics are read
    candidates = refine_fraction(options)
    if (candidates is None and not qcodes) != (codes is None):
        raise ValueError("key codes (codes=) are needed exactly when options.refine_candidates is set or score is "
                         f"'qcodes', got refine_candidates={options.refine_candidates!r}, score={options.score!r}, "
                         f"codes={type(codes).__name__}")
    if (refine_extra is not None or return_candidates) and codes is None:
        raise ValueError("refine_extra and return_candidates need two-stage selection (options.refine_candidates "
                         "and codes=)")
    if (options.score != "oracle" and _use_extension(k) and not isinstance(stats, RefBlockStats)
            and not isinstance(sketch, RefKeySketch) and not isinstance(codes, RefKeyCodes)):
        if qcodes:
            # codes_behind: the codes trail the cache by the newest token and catch up after the scores
            refine = dict(codes=codes, code_channels=options.code_channels, update_codes=options.codes_behind)
        else:
            refine = (dict(refine=codes, refine_candidates=candidates, refine_extra=refine_extra,
                           return_candidates=return_candidates) if codes is not None else {})
        out, selection, *cand = aether.sparse_attention(q, k, v, stats=stats, block_size=options.block_size,
                                                        score=options.score, budget=options.budget, sketch=sketch,
                                                        group_agg=options.group_agg, return_selection=True,
                                                        **refine, **kwargs)
        return (out, selection.indices, cand[0].counts) if return_candidates else (out, selection.indices)
    ref_stats = ref_sketch = None
    if options.score not in ("oracle", SKETCH_SCORE, CODES_SCORE):
        if stats is None:
            stats = build_block_stats(k, options.block_size)
        ref_stats = reference.BlockStatsRef(*(t for t in (stats.centroid, stats.lo, stats.hi, stats.radius,
                                                          stats.spread)))
    if qsketch:
        calib = sketch.calibration
        ref_sketch = (sketch.codes, sketch.ranges, sketch.centroid, calib.key_proj, calib.query_proj,
                      float(calib.centroid_weight))
    if options.codes_behind:
        raise ValueError("codes_behind needs the compiled extension (aether.sparse_attention's update_codes)")
    ref_refine = ref_qcodes = None
    if codes is not None and isinstance(codes, KeyCodes):
        codes.wait()  # a side-stream rebuild (KeyCodes.update(stream=...)) must land first
    if qcodes:
        channels = _resolve_code_channels(options.code_channels, q.shape[-1], codes.bits)
        ref_qcodes = reference.QcodesRef(channels, codes.bits, codes.blocks_per_group, codes.codes, codes.ranges,
                                         codes.channel_slots)
    elif codes is not None:
        ref_refine = reference.RefineRef(bits=codes.bits, candidate_fraction=candidates,
                                         blocks_per_group=codes.blocks_per_group, codes=codes.codes, ranges=codes.ranges,
                                         extra=refine_extra)
    out, _, selected, *rest = reference.sparse_attention(
        q, k, v, stats=ref_stats, block_size=options.block_size, score=options.score,
        budget_blocks=budget_blocks, budget_fraction=budget_fraction, group_agg=resolved_group_agg(options),
        sketch=ref_sketch, refine=ref_refine, return_candidates=return_candidates, qcodes=ref_qcodes, **kwargs)
    return (out, selected, rest[1].to(torch.int32)) if return_candidates else (out, selected)


# ------------------------------------------------------------------------------ read counts


def metadata_bytes_per_block(score: str, head_dim: int) -> int:
    """Bytes of float32 statistics the radar reads per block and KV head for `score`.

    ball: centroid + radius; box: lo + hi; tight: centroid + lo + hi + radius; mean: centroid;
    variance: centroid + radius + spread; oracle: 0 (an idealised selector; it really reads every key).
    qsketch depends on the layer's calibration: `KeySketch.bytes_per_block()`.
    """
    if score == SKETCH_SCORE:
        raise ValueError("qsketch's bytes per block depend on its rank and centroid weight: use "
                         "KeySketch.bytes_per_block()")
    floats = {"ball": head_dim + 1, "box": 2 * head_dim, "tight": 3 * head_dim + 1, "mean": head_dim,
              "variance": head_dim + 2, "oracle": 0}[score]
    return 4 * floats


@dataclass
class ReadCounter:
    """Tokens and blocks an AETHER layer read, accumulated on the device (no host sync per step).

    `tokens_read`: K/V tokens of the selected blocks summed over (batch, kv_heads, steps);
    `tokens_total`: what dense attention would have read; `blocks_total`: blocks scored;
    `sketch_bytes`: bytes the qsketch score read (sketch of every block + bf16 centroid of every
    sketch block when its weight is not 0 + the float32 query projection once per row and step),
    host-side. `refine_bytes`: bytes the second stage of two-stage selection read (the key codes
    of the candidate blocks and the ranges of the groups holding them, `KeyCodes.bytes_read`), or
    the qcodes score read (`KeyCodes.qcodes_bytes`).
    """

    tokens_read: torch.Tensor | int = 0
    tokens_total: int = 0
    blocks_total: int = 0
    steps: int = 0
    sketch_bytes: float = 0
    refine_bytes: torch.Tensor | float = 0

    def add(self, selection: torch.Tensor, length: int, block_size: int,
            sketch: KeySketch | None = None, codes: KeyCodes | None = None,
            refine_candidates: float | None = None, candidate_counts: torch.Tensor | None = None,
            code_channels: float | None = None) -> None:
        """Count one step over `length` tokens; `sketch`: the qsketch score's sketch, if it was read;
        `codes`, `refine_candidates`: the key codes a two-stage step read for that candidate fraction
        (the first stage's top-k count, ceil(fraction x blocks)), or for `candidate_counts`
        `[batch, kv_heads]` candidates per row when given (with refine_reuse the union is larger;
        counted on the device, no host sync). Channel-major `codes` were read by score="qcodes"
        for `code_channels` of the channels (None: the score's default; `KeyCodes.qcodes_bytes`)."""
        blocks = selection.to(torch.int64)
        token_counts = (length - blocks * block_size).clamp(min=0, max=block_size)
        read = torch.where(blocks >= 0, token_counts, torch.zeros_like(token_counts)).sum()
        self.tokens_read = self.tokens_read + read
        rows = selection.shape[0] * selection.shape[1]
        num_blocks = math.ceil(length / block_size)
        self.tokens_total += rows * length
        self.blocks_total += rows * num_blocks
        if sketch is not None:
            self.sketch_bytes += (rows * num_blocks * sketch.bytes_per_block()
                                  + selection.shape[0] * 4 * sketch.calibration.query_proj.numel())
        if codes is not None and codes.channel_major:
            channels = _resolve_code_channels(code_channels, codes.head_dim, codes.bits)
            self.refine_bytes += rows * codes.qcodes_bytes(channels, num_blocks)
        elif codes is not None and candidate_counts is not None:  # per row, on the device (float64)
            self.refine_bytes = self.refine_bytes + codes.bytes_read(candidate_counts.double(), num_blocks).sum()
        elif codes is not None:
            candidates = min(num_blocks, math.ceil(refine_candidates * num_blocks - 1e-9))
            self.refine_bytes += rows * codes.bytes_read(candidates, num_blocks)
        self.steps += 1

    def fractions(self, head_dim: int, score: str, kv_element_bytes: int = 2) -> dict[str, float]:
        """`{"selected": K/V bytes read / dense bytes, "metadata": statistics bytes / dense bytes}`.

        `kv_element_bytes` is the size of one cached K/V element (2 for a bf16/fp16 cache, the
        deployment case; 4 for float32), which sets how large the float32 metadata is relative to it.
        """
        if self.tokens_total == 0:
            return {"selected": 0.0, "metadata": 0.0}
        selected = float(self.tokens_read) / self.tokens_total
        dense_bytes = self.tokens_total * 2 * head_dim * kv_element_bytes
        if score in (SKETCH_SCORE, CODES_SCORE):  # qcodes: its code bytes are in refine_bytes
            metadata = self.sketch_bytes / dense_bytes
        else:
            metadata = self.blocks_total * metadata_bytes_per_block(score, head_dim) / dense_bytes
        return {"selected": selected, "metadata": metadata + float(self.refine_bytes) / dense_bytes}


# ------------------------------------------------------------------------------- the cache


class AetherKVCache:
    """Contiguous KV cache of one layer with incrementally updated AETHER block statistics.

    Args:
        options: the selection options used by `attend` (its block size sets the statistics').
        initial_capacity: token slots allocated at the first append (the buffer doubles when full).
    """

    def __init__(self, options: SparseOptions | None = None, initial_capacity: int = 256) -> None:
        self.options = options if options is not None else SparseOptions()
        if isinstance(initial_capacity, bool) or not isinstance(initial_capacity, int) or initial_capacity < 1:
            raise ValueError(f"initial_capacity must be an int >= 1, got {initial_capacity!r}")
        self.initial_capacity = initial_capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        self.row_starts: list[int] | None = None  # None: every row starts at slot 0
        self._stats: list[BlockStats | RefBlockStats] | None = None
        self._stats_length = 0  # the length the statistics describe (host-side: no device sync)
        # qsketch: the last prefill queries, the slot their last position attends up to (exclusive),
        # one calibration and one sketch per statistics group
        self._queries: torch.Tensor | None = None
        self._queries_end = 0
        self._calibrations: list[SketchCalibration] | None = None
        self._sketches: list[KeySketch] | None = None
        self._sketch_length = 0
        self._codes: list[KeyCodes] | None = None  # two-stage selection: one per statistics group
        self._codes_length = 0
        # refine_reuse: (the codes list it went with, the cache length, the selection per view) of the
        # last step; used only while the same codes list is current (a layout change, reindex or
        # truncate drops the codes) and exactly one token was appended since
        self._last_selection: tuple[list, int, list[torch.Tensor]] | None = None
        self.budget: float | None = None  # this layer's top-k fraction when allocated per layer, else None
        self._budget_options: SparseOptions | None = None  # `options` with `budget` (see _step_options)
        self.reads = ReadCounter()

    # ---- storage

    @property
    def keys(self) -> torch.Tensor:
        """`[batch, kv_heads, length, head_dim]` view of the cached keys."""
        if self._k is None:
            raise ValueError("the cache is empty: append keys and values first")
        return self._k[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        """`[batch, kv_heads, length, head_dim]` view of the cached values."""
        if self._v is None:
            raise ValueError("the cache is empty: append keys and values first")
        return self._v[:, :, :self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `k`, `v` `[batch, kv_heads, new, head_dim]` at slot `length`; return the full views.

        The statistics are not touched here: `stats()` refreshes them lazily, incrementally.
        """
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError(f"k and v must be torch.Tensors, got {type(k).__name__} and {type(v).__name__}")
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must have the same 4-D shape [batch, kv_heads, new, head_dim], got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        new = k.shape[2]
        if self._k is None:
            capacity = max(self.initial_capacity, new)
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            self._k = k.new_empty(shape)
            self._v = v.new_empty(shape)
        elif (k.shape[0], k.shape[1], k.shape[3]) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]) \
                or k.dtype != self._k.dtype or k.device != self._k.device:
            raise ValueError(f"k of shape {tuple(k.shape)} ({k.dtype}, {k.device}) does not match the cache "
                             f"[batch={self._k.shape[0]}, kv_heads={self._k.shape[1]}, *, "
                             f"head_dim={self._k.shape[3]}] ({self._k.dtype}, {self._k.device})")
        if self.length + new > self._k.shape[2]:
            capacity = max(2 * self._k.shape[2], self.length + new)
            self._k = self._grow(self._k, capacity)
            self._v = self._grow(self._v, capacity)
        self._k[:, :, self.length:self.length + new] = k
        self._v[:, :, self.length:self.length + new] = v
        self.length += new
        return self.keys, self.values

    def _grow(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = buffer.new_empty((buffer.shape[0], buffer.shape[1], capacity, buffer.shape[3]))
        grown[:, :, :self.length] = buffer[:, :, :self.length]
        return grown

    def record_queries(self, q: torch.Tensor) -> None:
        """Keep the post-RoPE prefill queries `q` `[batch, q_heads, n, head_dim]` of the last `n`
        cached positions (call right after appending their keys) for calibrating the qsketch score.

        Only the last `options.sketch_queries` positions are kept; a chunk that continues the
        previous one (its first query sits right after the kept ones) is appended to them.
        """
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"q must be a 4-D tensor [batch, q_heads, n, head_dim], got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if self._k is None:
            raise ValueError("record_queries: the cache is empty; append the prefill keys and values first")
        n = q.shape[2]
        if q.shape[0] != self._k.shape[0] or q.shape[3] != self._k.shape[3] or q.shape[1] % self._k.shape[1] \
                or not 1 <= n <= self.length:
            raise ValueError(f"q {tuple(q.shape)} must be [batch={self._k.shape[0]}, q_heads (a multiple of "
                             f"{self._k.shape[1]}), n (1..{self.length}), head_dim={self._k.shape[3]}]")
        keep = self.options.sketch_queries
        q = q[:, :, -keep:].detach()
        previous = self._queries
        if (previous is not None and self._queries_end == self.length - n and previous.shape[:2] == q.shape[:2]
                and previous.dtype == q.dtype and previous.device == q.device):
            q = torch.cat([previous, q], dim=2)[:, :, -keep:]
        self._queries = q.clone()
        self._queries_end = self.length

    @property
    def prefill_queries(self) -> tuple[torch.Tensor, int] | None:
        """`(queries [batch, q_heads, n, head_dim], end)` kept by `record_queries` (query i sits at
        slot `end - n + i`), or None."""
        return None if self._queries is None else (self._queries, self._queries_end)

    def set_prefill_queries(self, queries: tuple[torch.Tensor, int] | None) -> None:
        """Adopt `prefill_queries` of another cache holding the same prefix (e.g. a copy of it)."""
        if queries is None:
            self._queries, self._queries_end = None, 0
            return
        q, end = queries
        if not 1 <= q.shape[2] <= end <= self.length:
            raise ValueError(f"queries of {q.shape[2]} positions ending at slot {end} do not fit this cache of "
                             f"{self.length} tokens")
        self._queries, self._queries_end = q, int(end)
        self._calibrations = self._sketches = None
        self.budget = None  # the per-layer allocation follows the calibration

    def set_row_starts(self, starts: list[int] | None) -> None:
        """First valid slot of every row (left padding); None or all zeros: no padding.

        Changing the layout drops the statistics and sketches (they are rebuilt at the next
        `stats()` / `sketches()`; the sketches are recalibrated).
        """
        if starts is not None:
            starts = [int(s) for s in starts]
            if self._k is not None and len(starts) != self._k.shape[0]:
                raise ValueError(f"starts must hold one entry per row ({self._k.shape[0]}), got {len(starts)}")
            if any(s < 0 or s > self.length for s in starts):
                raise ValueError(f"starts must lie in [0, {self.length}], got {starts}")
            if not any(starts):
                starts = None
        if starts != self.row_starts:
            self.row_starts = starts
            self._stats = self._codes = None
            self._calibrations = self._sketches = None
            self.budget = None  # the per-layer allocation follows the calibration

    def reindex(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (beam search reordering, batch selection); statistics are rebuilt."""
        if self._k is not None:
            self._k = self._k.index_select(0, indices.to(self._k.device))
            self._v = self._v.index_select(0, indices.to(self._v.device))
        if self.row_starts is not None:
            self.row_starts = [self.row_starts[int(i)] for i in indices.tolist()]
        if self._queries is not None:
            self._queries = self._queries.index_select(0, indices.to(self._queries.device))
        self._stats = self._codes = None
        self._calibrations = self._sketches = None  # recalibrated: row 0 may be another sequence now
        # self.budget stays: the rows still continue the prompt it was allocated for (beam search
        # reorders every step; re-allocating each time would redo every layer's recall curve)

    def truncate(self, length: int) -> None:
        """Drop every token at or past slot `length`; statistics are rebuilt."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}], got {length}")
        self.length = length
        if self.row_starts is not None:
            self.row_starts = [min(s, length) for s in self.row_starts]
        self._stats = self._codes = None
        self._sketches = None
        if self._queries is not None and length < self._queries_end:
            # drop the queries past the end; what remains recalibrates the sketch
            keep = self._queries.shape[2] - (self._queries_end - length)
            self._queries = self._queries[:, :, :keep] if keep > 0 else None
            self._queries_end = length if keep > 0 else 0
            self._calibrations = None
            self.budget = None

    # ---- statistics

    def _row_views(self) -> list[tuple[slice, int]]:
        """(row slice, first valid slot) per statistics group: the whole batch, or one row each."""
        if self.row_starts is None:
            return [(slice(None), 0)]
        return [(slice(b, b + 1), s) for b, s in enumerate(self.row_starts)]

    def stats(self) -> list[BlockStats | RefBlockStats]:
        """The block statistics, one object per group of `_row_views()`, current with `length`.

        Built once (after prefill); later calls only refresh the blocks that received tokens.
        """
        return self._per_view("_stats", "_stats_length",
                              lambda i, k: build_block_stats(k, self.options.block_size))

    def calibrations(self) -> list[SketchCalibration]:
        """The qsketch calibration of every group of `_row_views()` (computed once, on first use).

        Group (rows, start) is calibrated on its first row: keys `[start, end)` and the last
        recorded prefill queries that lie in that range (`end` = where the recorded queries end).
        """
        if self._calibrations is None:
            if self._queries is None:
                raise ValueError("score='qsketch' calibrates its key sketch from the prefill's queries and keys, "
                                 "but this cache holds no prefill queries: run the prompt through the model with "
                                 "this cache first (a forward of more than one token; the integration records "
                                 "the queries), or call record_queries(q) after appending the prefill")
            self._calibrations = [calibrate_key_sketch(*self._prefill_of(rows, start), self.options)
                                  for rows, start in self._row_views()]
        return self._calibrations

    def _prefill_of(self, rows: slice, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(keys [kv_heads, n_keys, head_dim], queries [q_heads, n, head_dim])` of the prefill of
        group (rows, start)'s first row: keys `[start, end)` and the recorded queries in that range."""
        row = rows.start or 0
        valid = self._queries_end - start
        if valid < 1:
            raise ValueError(f"row {row} has no prefill token (its first valid slot {start} is past the "
                             f"recorded prefill's end {self._queries_end}): cannot calibrate qsketch")
        return (self._k[row, :, start:self._queries_end],
                self._queries[row, :, -min(valid, self._queries.shape[2]):])

    def recall_curve(self, fractions: tuple[float, ...]) -> list[float]:
        """Mass recalled by qsketch top-k at each keep fraction on the prefill queries
        (`aether.sketch.recall_curve`), measured on the first group of `_row_views()`."""
        calib = self.calibrations()[0]
        k, q = self._prefill_of(*self._row_views()[0])
        return sketch_recall_curve(k, q, calib, block_size=self.options.block_size, fractions=fractions,
                                   blocks_per_sketch=self.options.blocks_per_sketch)

    def sketches(self) -> list[KeySketch]:
        """The qsketch key sketches, one per group of `_row_views()`, current with `length`.

        Calibrated and built once (at the first decode step); later calls only refresh the blocks
        that received tokens (`KeySketch.update`, no host sync).
        """
        return self._per_view("_sketches", "_sketch_length",
                              lambda i, k: build_key_sketch(k, self.calibrations()[i], self.options.block_size,
                                                            self.options.blocks_per_sketch))

    def key_codes(self) -> list[KeyCodes]:
        """The key codes of two-stage selection (`options.refine_candidates`, token-major) or of
        score="qcodes" (channel-major), one per group of `_row_views()`, current with `length`:
        built once, then only the last group is rebuilt per step."""
        qcodes = self.options.score == CODES_SCORE
        bits = self.options.code_bits if qcodes else self.options.refine_bits
        layout = "channel" if qcodes else "token"
        pool = self.options.code_pool if qcodes else None
        if qcodes and self.options.codes_behind and self._codes is not None:
            return self._codes  # each step's sparse_attention brings them up to date (update_codes=True)
        return self._per_view("_codes", "_codes_length",
                              lambda i, k: build_key_codes(k, self.options.block_size, bits, layout, pool))

    def _per_view(self, attr: str, length_attr: str, build) -> list:
        """The per-view metadata kept in `self.<attr>` (statistics, sketches or key codes): built by
        `build(i, keys of view i)` for each group of `_row_views()` on first use, afterwards
        refreshed with `.update(keys of the view)` when the cache has grown (`self.<length_attr>`)."""
        keys = self.keys
        views = self._row_views()
        items = getattr(self, attr)
        if items is None:
            items = [build(i, keys[rows, :, start:]) for i, (rows, start) in enumerate(views)]
            setattr(self, attr, items)
        elif getattr(self, length_attr) != self.length:
            for item, (rows, start) in zip(items, views):
                item.update(keys[rows, :, start:])
        setattr(self, length_attr, self.length)
        return items

    # ---- attention

    def _step_options(self) -> SparseOptions:
        """The options of a decode step: `options` with this layer's allocated budget, if any
        (built once per allocation, not per step)."""
        if self.budget is None:
            return self.options
        memo = self._budget_options
        if memo is None or memo.budget != self.budget:
            memo = self._budget_options = replace(self.options, budget=self.budget)
        return memo

    def attend(self, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """AETHER attention of decode queries `q` `[batch, q_heads, head_dim]` over the cache.

        Returns `[batch, q_heads, head_dim]`; the tokens read are added to `self.reads`.
        """
        if q.dim() != 3 or q.shape[0] != self.keys.shape[0]:
            raise ValueError(f"q must be [batch={self.keys.shape[0]}, q_heads, head_dim], got {tuple(q.shape)}")
        views = self._row_views()
        none = [None] * len(views)
        sketches = self.sketches() if self.options.score == SKETCH_SCORE else none
        if self.options.score in ("oracle", SKETCH_SCORE, CODES_SCORE):  # neither reads block statistics
            stats = none
        else:
            stats = self.stats()
        qcodes = self.options.score == CODES_SCORE
        codes = self.key_codes() if self.options.refine_candidates is not None or qcodes else none
        keys, values = self.keys, self.values
        options = self._step_options()
        candidates = refine_fraction(options)
        reuse = options.refine_reuse
        last = self._last_selection if reuse else None
        usable = (last is not None and last[0] is self._codes and last[1] == self.length - 1
                  and len(last[2]) == len(views))
        outs, selections = [], []
        for i, (st, sk, kc, (rows, start)) in enumerate(zip(stats, sketches, codes, views)):
            k, v = keys[rows, :, start:], values[rows, :, start:]
            extra = None
            if usable:  # the last step's final blocks join this step's candidates
                previous = last[2][i]
                extra = (previous, (previous >= 0).sum(dim=-1, dtype=torch.int32))
            out, selection, *cand = sparse_decode_step(q[rows], k, v, options, st, scale, sketch=sk, codes=kc,
                                                       refine_extra=extra, return_candidates=reuse)
            self.reads.add(selection, k.shape[2], self.options.block_size, sketch=sk, codes=kc,
                           refine_candidates=candidates, candidate_counts=cand[0] if reuse else None,
                           code_channels=options.code_channels)
            outs.append(out)
            selections.append(selection)
        if reuse:
            self._last_selection = (self._codes, self.length, selections)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

