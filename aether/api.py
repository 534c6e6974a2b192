"""Public API: `sparse_attention`, `block_stats` and the `BlockStats` object.

Everything a user passes is validated here, with errors that name the argument, its value and
what is allowed; the operators in csrc/torch/ops.cpp check again (never trusting the caller) so
the kernels cannot read or write out of bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from aether import _ops
from aether.reference import forced_blocks

STAT_SCORES = ("ball", "box", "tight", "mean", "variance")  # computed from BlockStats alone
SCORES = STAT_SCORES + ("qsketch", "qcodes")  # qsketch reads a KeySketch, qcodes channel-major KeyCodes
# qcodes without code_channels: head_dim / (2 bits) channels, D / 16 bytes of codes per token (a quarter
# of the channels at 2 bits, an eighth at 4; docs/selection.md, "score=\"qcodes\"")
CODE_BITS_PER_TOKEN_PER_DIM = 0.5
GROUP_AGGS = ("max", "sum")
UPPER_BOUND_SCORES = ("ball", "box", "tight")
POLICIES = ("topk", "threshold", "adaptive")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128, 256)
DEFAULT_BLOCK_SIZE = 64


class Selection(NamedTuple):
    """Selected blocks per (batch, kv_head): ascending indices padded with -1, and their count."""

    indices: torch.Tensor  # [batch, kv_heads, num_blocks] int32
    counts: torch.Tensor  # [batch, kv_heads] int32


# ------------------------------------------------------------------------------------ checks


def _check_refine_extra(extra: object, batch: int, kv_heads: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """refine_extra: a Selection or (indices, counts), int32 [batch, kv_heads, L] and [batch, kv_heads]."""
    if not isinstance(extra, tuple) or len(extra) != 2:
        raise TypeError(f"refine_extra must be an aether.Selection or a tuple (indices, counts), got "
                        f"{type(extra).__name__}")
    indices, counts = extra
    for name, x, shape in (("indices", indices, f"[{batch}, {kv_heads}, L]"), ("counts", counts,
                                                                               f"[{batch}, {kv_heads}]")):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            raise TypeError(f"refine_extra {name} must be an int32 tensor {shape}, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.device != device:
            raise ValueError(f"refine_extra {name} must be on q's device ({device}), got {x.device}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, kv_heads):
        raise ValueError(f"refine_extra indices must be [{batch}, {kv_heads}, L], got {tuple(indices.shape)}")
    if tuple(counts.shape) != (batch, kv_heads):
        raise ValueError(f"refine_extra counts must be [{batch}, {kv_heads}], got {tuple(counts.shape)}")
    return indices.contiguous(), counts.contiguous()


def _check_tensor(x: object, name: str, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last (head_dim) dimension (stride 1), got strides "
                         f"{tuple(x.stride())}; call .contiguous()")
    return x


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be a power of two in [16, 128] (16, 32, 64, 128), got {block_size}")
    return block_size


def _check_head_dim(head_dim: int, device: torch.device) -> None:
    if device.type == "cuda":
        if head_dim not in CUDA_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {CUDA_HEAD_DIMS} on CUDA, got {head_dim}")
    elif head_dim % 8 != 0 or not 8 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, 256] on CPU, got {head_dim}")


def _check_count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks that need the data on the host: always on CPU; on CUDA they cost a sync, so
    they are skipped while a CUDA graph is being captured, and under torch.compile, where they
    would break the graph (the kernels clamp lengths instead)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    """Min and max of an integer tensor with a single device-to-host copy."""
    lo, hi = torch.aminmax(t)
    return tuple(int(x) for x in torch.stack([lo, hi]).tolist())


def _cache_dims(k: torch.Tensor, block_table: torch.Tensor | None, block_size: int, name: str):
    """(batch, kv_heads, capacity, head_dim) of a contiguous or paged cache."""
    if block_table is None:
        return k.shape[0], k.shape[1], k.shape[2], k.shape[3]
    if k.shape[1] != block_size:
        raise ValueError(f"paged {name} has page_size {k.shape[1]} (dim 1 of [num_pages, page_size, kv_heads, "
                         f"head_dim]) but block_size is {block_size}; they must be equal")
    return block_table.shape[0], k.shape[2], block_table.shape[1] * k.shape[1], k.shape[3]


def _check_block_table(block_table: object, k: torch.Tensor) -> torch.Tensor | None:
    if block_table is None:
        return None
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be 2-D [batch, max_pages], got shape {tuple(block_table.shape)}")
    if block_table.device != k.device:
        raise ValueError(f"block_table is on {block_table.device} but k is on {k.device}")
    block_table = block_table.contiguous()
    if block_table.numel() and _host_checks_allowed(block_table):
        lo, hi = _min_max(block_table)
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"block_table holds page ids in [{lo}, {hi}] but k has {k.shape[0]} pages "
                             f"(allowed: 0..{k.shape[0] - 1})")
    return block_table


def _normalize_seq_lens(seq_lens: object, batch: int, capacity: int, device: torch.device) -> torch.Tensor:
    """int32 lengths on `device`, checked to lie in [0, capacity]."""
    if seq_lens is None:
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"seq_lens must be a torch.Tensor or None, got {type(seq_lens).__name__}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must have shape [{batch}] (one length per sequence), got {tuple(seq_lens.shape)}")
    if seq_lens.device != device:
        raise ValueError(f"seq_lens is on {seq_lens.device} but the cache is on {device}")
    if batch and _host_checks_allowed(seq_lens):
        lo, hi = _min_max(seq_lens)
        if lo < 0 or hi > capacity:
            raise ValueError(f"seq_lens values must be in [0, {capacity}] (the cache's token capacity), "
                             f"got values in [{lo}, {hi}]")
    return seq_lens.to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------- stats


@dataclass
class BlockStats:
    """Per-block key statistics of a KV cache (float32), reusable across decode steps.

    Shapes: centroid/lo/hi `[batch, kv_heads, num_blocks, head_dim]`, radius/spread
    `[batch, kv_heads, num_blocks]`. `seq_lens` are the lengths the statistics describe.
    Build with `aether.block_stats`; after appending tokens to the cache call `update`.
    """

    centroid: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    radius: torch.Tensor
    spread: torch.Tensor
    block_size: int
    seq_lens: torch.Tensor
    paged: bool = False

    @property
    def num_blocks(self) -> int:
        return self.centroid.shape[2]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.centroid, self.lo, self.hi, self.radius, self.spread)

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None, *,
               block_table: torch.Tensor | None = None) -> "BlockStats":
        """Refresh the statistics after tokens were appended to the cache `k` (in place).

        Only the blocks from each sequence's previous last block onward are recomputed: one
        decode step costs O(block_size * head_dim) per head, whatever the sequence length, and
        the result equals a full rebuild. Lengths may only grow. The capacity grows when `k` grew.
        """
        k, seq_lens, block_table, first_block, needed = _prepare_update(
            self, k, seq_lens, block_table, "the statistics", "build new statistics with aether.block_stats",
            _check_stats_match)
        self.centroid, self.lo, self.hi, self.radius, self.spread = (_grow_blocks(t, needed) for t in self.tensors)
        torch.ops.aether.block_stats_update(k, seq_lens, first_block, self.block_size, block_table, *self.tensors)
        # In place, so that a CUDA graph that captured this call reads and advances the same tensor.
        self.seq_lens.copy_(seq_lens)
        return self


def _grow_blocks(t: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``t`` with dim 2 (blocks) zero-padded to ``num_blocks`` (unchanged when it holds enough)."""
    if t.shape[2] >= num_blocks:
        return t
    shape = list(t.shape)
    shape[2] = num_blocks - t.shape[2]
    return torch.cat([t, t.new_zeros(shape)], dim=2)


def _prepare_update(state, k, seq_lens, block_table, what: str, rebuild: str, check_match, check_growth=True):
    """The checks shared by `BlockStats.update` and `KeySketch.update`: the cache, its layout and
    lengths against the state (`block_size`, `paged`, `seq_lens`), lengths that only grow.
    Returns ``(k, seq_lens, block_table, first_block, num_blocks)``: the blocks to rebuild start
    at each sequence's previous last block; ``num_blocks`` is the capacity the cache now needs."""
    _ops.require_extension()
    k = _check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    if (block_table is not None) != state.paged:
        raise ValueError(f"block_table must be given exactly when {what} were built for a paged cache "
                         f"(these were built {'paged' if state.paged else 'contiguous'})")
    block_table = _check_block_table(block_table, k)
    batch, kv_heads, capacity, head_dim = _cache_dims(k, block_table, state.block_size, "k")
    check_match(state, batch, kv_heads, head_dim, k.device)
    seq_lens = _normalize_seq_lens(seq_lens, batch, capacity, k.device)
    # (check_growth=False: the caller has checked it, e.g. sparse_attention before its scores, where
    # a sync here would stall the GPU between the scores and the select)
    if check_growth and _host_checks_allowed(seq_lens) and bool((seq_lens < state.seq_lens).any()):
        raise ValueError(f"seq_lens must not shrink in update(); {rebuild}")
    first_block = torch.div(state.seq_lens, state.block_size, rounding_mode="floor").to(torch.int32)
    return k, seq_lens, block_table, first_block, math.ceil(capacity / state.block_size)


def _check_current(state, what: str, verb: str, block_size: int, block_table, capacity: int,
                   seq_lens: torch.Tensor, forced: tuple[int, int] | None = None) -> None:
    """That a per-cache state (`BlockStats`, `KeySketch`, `KeyCodes`) describes this call's cache:
    block size, layout, coverage and lengths (the last needs a host sync on CUDA; skipped where not
    allowed). With `forced` = (sink_blocks, recent_blocks) the state's lengths may trail seq_lens
    as long as every token they miss lies in a block the call keeps anyway."""
    if state.block_size != block_size:
        raise ValueError(f"{what} {verb} built with block_size {state.block_size} but block_size is {block_size}")
    if state.paged != (block_table is not None):
        raise ValueError(f"{what} {verb} built for a " + ("paged" if state.paged else "contiguous") +
                         " cache but this call uses a " + ("paged" if block_table is not None else "contiguous")
                         + " one")
    if state.num_blocks * block_size < capacity:
        raise ValueError(f"{what} {verb} built for {state.num_blocks * block_size} token slots but the cache holds "
                         f"{capacity}; call .update(k, seq_lens) after appending")
    if not _host_checks_allowed(seq_lens) or torch.equal(state.seq_lens, seq_lens):
        return
    if forced is None:
        raise ValueError(f"{what} {verb} computed for other sequence lengths; call .update(k, seq_lens) after "
                         "appending tokens")
    sink_blocks, recent_blocks = forced
    for b, (have, n) in enumerate(zip(state.seq_lens.tolist(), seq_lens.tolist())):
        if have > n:
            raise ValueError(f"{what} {verb} computed for {have} tokens of sequence {b} but it holds {n}; build "
                             "them again for this cache")
        # the blocks holding tokens have..n-1 that the select does not keep whatever the scores
        kept = set(forced_blocks(n, block_size, sink_blocks, recent_blocks))
        missed = [j for j in range(have // block_size, -(-n // block_size)) if j not in kept]
        if missed:
            raise ValueError(f"{what} {verb} computed for {have} of sequence {b}'s {n} tokens, and block {missed[0]} "
                             "(not kept by sink_blocks / recent_blocks / the partial tail) holds tokens they miss; "
                             "call .update(k, seq_lens) after appending tokens, or pass update_codes=True each "
                             "step")


def _check_stats_match(stats: BlockStats, batch: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
    got = tuple(stats.centroid.shape)
    if got[0] != batch or got[1] != kv_heads or got[3] != head_dim:
        raise ValueError(f"stats were built for another cache: centroid shape {got} does not match "
                         f"[batch={batch}, kv_heads={kv_heads}, *, head_dim={head_dim}]")
    if stats.centroid.device != device:
        raise ValueError(f"stats are on {stats.centroid.device} but the cache is on {device}")


def block_stats(k: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, seq_lens: torch.Tensor | None = None,
                block_table: torch.Tensor | None = None) -> BlockStats:
    """Compute the per-block statistics (centroid, channel min/max, radius, spread) of the keys.

    Args:
        k: keys, contiguous layout `[batch, kv_heads, seq, head_dim]` (any strides but the last),
            or paged `[num_pages, page_size, kv_heads, head_dim]` with `block_table`.
        block_size: tokens per block: 16, 32, 64 or 128 (the page size of a paged cache).
        seq_lens: valid tokens per sequence, int32/int64 `[batch]` on k's device (default: all).
        block_table: int32 `[batch, max_pages]` page ids for a paged cache.

    Returns:
        A `BlockStats` reusable by `sparse_attention(..., stats=...)`; call `.update` after appends.
    """
    _ops.require_extension()
    k = _check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    block_size = _check_block_size(block_size)
    block_table = _check_block_table(block_table, k)
    batch, kv_heads, capacity, head_dim = _cache_dims(k, block_table, block_size, "k")
    _check_head_dim(head_dim, k.device)
    seq_lens = _normalize_seq_lens(seq_lens, batch, capacity, k.device)
    num_blocks = math.ceil(capacity / block_size)
    tensors = torch.ops.aether.block_stats(k, seq_lens, block_size, num_blocks, block_table)
    return BlockStats(*tensors, block_size=block_size, seq_lens=seq_lens.clone(), paged=block_table is not None)


# ------------------------------------------------------------------------- sparse attention


def _check_policy_args(score, policy, budget, eps, mass, min_blocks, max_blocks, sink_blocks, recent_blocks):
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "threshold" and score not in UPPER_BOUND_SCORES:
        raise ValueError(f"policy='threshold' needs an upper-bound score {UPPER_BOUND_SCORES} to certify the "
                         f"dropped mass, got score={score!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (a block count) or a float (a fraction of the blocks), "
                        f"got {type(budget).__name__}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget as a block count must be >= 1, got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a fraction must be in (0, 1], got {budget}")
    for value, name in ((eps, "eps"), (mass, "mass")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    _check_count(min_blocks, "min_blocks", 1)
    if max_blocks is not None:
        _check_count(max_blocks, "max_blocks", 1)
        if max_blocks < min_blocks:
            raise ValueError(f"max_blocks ({max_blocks}) must be >= min_blocks ({min_blocks})")
    _check_count(sink_blocks, "sink_blocks", 0)
    _check_count(recent_blocks, "recent_blocks", 0)


def _max_selected_hint(policy: str, budget, max_blocks, num_blocks: int, forced: int) -> int:
    """Host-side upper bound of the blocks any row selects (sizes the split-KV grid, no sync)."""
    if policy == "topk":
        total = budget if isinstance(budget, int) else math.ceil(budget * num_blocks - 1e-9)
        return min(num_blocks, max(total, forced, 1))
    if policy == "adaptive" and max_blocks is not None:
        return min(num_blocks, max(max_blocks, forced))
    return num_blocks


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stats: BlockStats | None = None,
    block_size: int | None = None,
    score: str = "tight",
    policy: str = "topk",
    budget: int | float = 0.25,
    eps: float = 1e-3,
    mass: float = 0.95,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    sink_blocks: int = 1,
    recent_blocks: int = 1,
    seq_lens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    return_selection: bool = False,
    sketch=None,
    group_agg: str | None = None,
    refine=None,
    refine_candidates: int | float = 0.5,
    refine_extra=None,
    return_candidates: bool = False,
    codes=None,
    code_channels: int | float | None = None,
    update_codes: bool = False,
    codes_stream=None,
):
    """Query-aware block-sparse decode attention.

    Scores every KV block for the decode queries with a cheap bound on its largest logit, keeps
    blocks by `policy`, and computes exact softmax attention over the kept blocks only.

    Args:
        q: decode queries `[batch, q_heads, head_dim]`; q_heads a multiple of kv_heads (GQA).
        k, v: the cache, `[batch, kv_heads, seq, head_dim]`, or paged
            `[num_pages, page_size, kv_heads, head_dim]` with `block_table`. Same dtype as q
            (float32, float16, bfloat16) and device.
        stats: precomputed `BlockStats` (from `aether.block_stats`); computed when None. Not read by
            score="qsketch" (must be None there: the sketch carries its centroid).
        block_size: tokens per block, 16/32/64/128 (default: stats.block_size, else 64).
        score: block score: "tight" (min of ball and box), "ball", "box", "mean", "variance", or
            "qsketch" (log-sum-exp of approximate token logits from a 4-bit key sketch: pass
            `sketch`; not a bound), or "qcodes" (the log-sum-exp of every block's token logits
            from 2- or 4-bit key codes of the query's `code_channels` heaviest channels, the
            others at their group's mid-range: pass channel-major `codes`; the most accurate
            ranking measured, docs/selection.md; not a bound, no calibration).
        policy: "topk" (keep `budget` blocks), "threshold" (certified: dropped mass <= eps),
            "adaptive" (smallest set with estimated mass >= `mass`, within [min_blocks, max_blocks]).
        budget: topk budget, an int block count (>= 1) or a float fraction of the blocks in
            (0, 1]; the forced sink/recent/tail blocks count toward it. A budget above the number
            of blocks reads everything (dense). The default 1/4 is where the measured perplexity
            cost on a real model stays within a few percent (docs/accuracy.md); 1/8 cost ~15%.
        eps: threshold policy's bound on the dropped attention mass, in (0, 1).
        mass: adaptive policy's estimated-mass target p, in (0, 1].
        min_blocks, max_blocks: adaptive policy's clamps on the number of blocks.
        sink_blocks: first blocks always kept. recent_blocks: last complete blocks always kept.
            The partial tail block is always kept.
        seq_lens: valid tokens per sequence, int32/int64 `[batch]` on the cache's device.
        block_table: int32 `[batch, max_pages]` page ids of a paged cache.
        scale: softmax scale (> 0), default 1/sqrt(head_dim).
        return_lse: also return the natural-log log-sum-exp `[batch, q_heads]` (float32).
        return_selection: also return the `Selection` (indices, counts).
        sketch: the `aether.KeySketch` of this cache (`aether.key_sketch`), for score="qsketch".
        group_agg: how topk combines the query heads of a GQA group: "sum" (each head's
            estimated mass share summed over the group; the default for qsketch and qcodes) or "max" (the
            largest head score; the default for the bound scores). Only topk takes it; threshold
            and adaptive have their own group rules.
        refine: the `aether.KeyCodes` of this cache (`aether.key_codes`) for two-stage selection
            (policy="topk" only): `score` keeps `refine_candidates` blocks, their key codes rank
            them (`torch.ops.aether.refine_scores`), and `budget` keeps the final blocks (the same
            group_agg, sink and recent blocks in both stages). docs/selection.md, "Two-stage".
        refine_candidates: the first stage's top-k budget, an int block count or a float fraction
            in (0, 1] (default 0.5, the measured best with 2-bit codes); at least `budget` when
            both are fractions.
        refine_extra: blocks that join the first stage's candidates (with `refine`), e.g. the
            previous decode step's `Selection`: a `Selection` or `(indices, counts)`, int32
            `[batch, kv_heads, L]` and `[batch, kv_heads]` on q's device; entries past a row's
            count or outside the cache's blocks are ignored. Their codes are read like any
            candidate's. docs/selection.md, "Reusing the last step's final blocks".
        return_candidates: also return the first stage's candidates (a `Selection`, after
            `refine_extra`; with `refine` only), last in the returned tuple.
        codes: for score="qcodes", the `aether.KeyCodes` of this cache built with
            `layout="channel"` (`aether.key_codes(k, block_size, layout="channel")`).
        code_channels: for score="qcodes", the channels read per KV head and step: an int count
            in [1, head_dim] or a float fraction of head_dim in (0, 1] (rounded, at least 1);
            chosen per step by `torch.ops.aether.code_channels`. None (default): head_dim / (2
            bits), i.e. 1/4 of the channels with 2-bit codes, 1/8 with 4-bit ones (the measured
            best: 4-bit codes of 1/8 of the channels, docs/selection.md).
            The codes may trail `seq_lens` (built before the newest tokens were appended) when every
            token they miss lies in a block this call keeps anyway (sink, recent window, partial
            tail): the scores then come from the codes' own lengths. Otherwise a `ValueError`.
        update_codes: with score="qcodes": after the scores have read `codes`, bring them up to
            this call's `seq_lens` (`codes.update(k, seq_lens)`), so that a decode loop appends the
            newest token's code for the next step without a launch before this step's scores.
        codes_stream: with `update_codes` on CUDA: a `torch.cuda.Stream` to run that update on,
            after the selection and beside the decode, in CTAs narrow enough to share the decode's
            SMs; the current stream waits for it before this call returns (so a captured step
            joins). It pays inside a CUDA graph; eagerly the fork's host work can cost more than it
            hides (docs/api.md). None: on the current stream, after the decode.

    Returns:
        `out` `[batch, q_heads, head_dim]` in q's dtype, or a tuple `(out, lse)`,
        `(out, selection)` or `(out, lse, selection)` as requested, then the candidates with
        `return_candidates`. A sequence of length 0 gives a zero output and lse = -inf.
    """
    _ops.require_extension()
    q = _check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    k = _check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    v = _check_tensor(v, "v", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.device.type == "cuda" and not _ops.built_with_cuda():
        raise RuntimeError("q is on CUDA but aether._C was built without CUDA kernels; rebuild with nvcc and a "
                           "CUDA build of torch")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("q, k and v must be float16 or bfloat16 on CUDA, got float32 (float32 runs on CPU)")
    if stats is not None and not isinstance(stats, BlockStats):
        raise TypeError(f"stats must be an aether.BlockStats or None, got {type(stats).__name__}")
    if block_size is None:
        source = (stats if stats is not None else sketch if score == "qsketch" else codes if score == "qcodes"
                  else None)
        block_size = getattr(source, "block_size", DEFAULT_BLOCK_SIZE)
    block_size = _check_block_size(block_size)
    block_table = _check_block_table(block_table, k)
    batch, kv_heads, capacity, head_dim = _cache_dims(k, block_table, block_size, "k")
    if q.shape[0] != batch:
        raise ValueError(f"q has batch {q.shape[0]} but the cache has batch {batch}")
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but k has head_dim {head_dim}")
    if kv_heads == 0 or q.shape[1] % kv_heads != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({kv_heads})")
    _check_head_dim(head_dim, q.device)
    _check_policy_args(score, policy, budget, eps, mass, min_blocks, max_blocks, sink_blocks, recent_blocks)
    if group_agg is None:
        # sum for qsketch, whose scores are mass estimates; max for the bounds (on SmolLM2, sum with
        # tight lowered 8k passkey retrieval from 9/10 to 7/10 at keep 1/8, docs/selection.md).
        group_agg = "sum" if score in ("qsketch", "qcodes") and policy == "topk" else "max"
    elif group_agg not in GROUP_AGGS:
        raise ValueError(f"group_agg must be one of {GROUP_AGGS} or None, got {group_agg!r}")
    elif policy != "topk":
        raise ValueError(f"group_agg applies to policy='topk' only (threshold and adaptive have their own group "
                         f"rules), got group_agg={group_agg!r} with policy={policy!r}")
    from aether.sketch import KeySketch, _check_sketch_match  # aether.sketch imports this module
    from aether.refine import KeyCodes, _check_codes_match
    if refine is not None:
        if not isinstance(refine, KeyCodes):
            raise TypeError(f"refine must be an aether.KeyCodes (build it with aether.key_codes) or None, got "
                            f"{type(refine).__name__}")
        if policy != "topk":
            raise ValueError(f"refine (two-stage selection) needs policy='topk', got policy={policy!r}")
        rc = refine_candidates
        if isinstance(rc, bool) or not isinstance(rc, (int, float)):
            raise TypeError(f"refine_candidates must be an int (blocks) or a float (a fraction), got {type(rc).__name__}")
        if isinstance(rc, int) and rc < 1:
            raise ValueError(f"refine_candidates as a block count must be >= 1, got {rc}")
        if isinstance(rc, float) and not 0.0 < rc <= 1.0:
            raise ValueError(f"refine_candidates as a fraction must be in (0, 1], got {rc}")
        if isinstance(rc, float) and isinstance(budget, float) and rc < budget:
            raise ValueError(f"refine_candidates ({rc}) must be >= budget ({budget}): the final blocks are chosen "
                             "among the candidates")
    if score == "qcodes":
        if not isinstance(codes, KeyCodes) or codes.layout != "channel":
            raise TypeError("score='qcodes' needs codes=aether.KeyCodes with layout='channel' (build it with "
                            f"aether.key_codes(k, block_size, bits=4, layout='channel')), got "
                            f"{type(codes).__name__}{' with layout ' + repr(codes.layout) if isinstance(codes, KeyCodes) else ''}")
        if refine is not None:
            raise ValueError("refine (two-stage selection) and score='qcodes' do not combine: qcodes already ranks "
                             "every block from key codes")
        num_code_channels = _resolve_code_channels(code_channels, head_dim, codes.bits)
        if codes.pool is not None and num_code_channels > codes.pool.shape[-1]:
            raise ValueError(f"code_channels ({num_code_channels}) must not exceed the codes' channel pool "
                             f"({codes.pool.shape[-1]} channels; aether.key_codes(..., channel_pool=))")
    elif codes is not None:
        raise ValueError(f"codes is only read by score='qcodes', got score={score!r}")
    if not isinstance(update_codes, bool):
        raise TypeError(f"update_codes must be a bool, got {type(update_codes).__name__}")
    if update_codes and score != "qcodes":
        raise ValueError(f"update_codes brings the qcodes score's codes up to date, got score={score!r}")
    if codes_stream is not None and not update_codes:
        raise ValueError("codes_stream is where update_codes=True runs the update; pass update_codes=True")
    if codes_stream is not None:
        if not isinstance(codes_stream, torch.cuda.Stream):
            raise TypeError(f"codes_stream must be a torch.cuda.Stream or None, got {type(codes_stream).__name__}")
        if q.device.type != "cuda" or codes_stream.device != q.device:
            raise ValueError(f"codes_stream must be a CUDA stream of the cache's device ({q.device}), got one of "
                             f"{codes_stream.device}")
    if refine is not None and refine.layout != "token":
        raise ValueError("refine (two-stage selection) reads token-major key codes: build them with "
                         f"aether.key_codes(k, block_size) (layout='token'), got layout={refine.layout!r}")
    if score == "qsketch":
        if not isinstance(sketch, KeySketch):
            raise TypeError("score='qsketch' needs sketch=aether.KeySketch (build it with aether.key_sketch), got "
                            f"{type(sketch).__name__}")
    elif sketch is not None:
        raise ValueError(f"sketch is only read by score='qsketch', got score={score!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    seq_lens = _normalize_seq_lens(seq_lens, batch, capacity, q.device)
    num_blocks = math.ceil(capacity / block_size)

    if score == "qsketch":
        _check_sketch_match(sketch, batch, kv_heads, head_dim, q.device)
        _check_current(sketch, "the sketch", "was", block_size, block_table, capacity, seq_lens)
        if sketch.calibration.query_proj.shape[0] != q.shape[1]:
            raise ValueError(f"the sketch's query_proj has {sketch.calibration.query_proj.shape[0]} query heads but q "
                             f"has {q.shape[1]}")
        num_blocks = sketch.num_blocks
    if score == "qcodes":
        if stats is not None:
            raise ValueError("stats are not read by score='qcodes' (it reads the key codes); pass stats=None")
        _check_codes_match(codes, batch, kv_heads, head_dim, q.device)
        if (update_codes and codes.block_size == block_size and codes.num_blocks * block_size < capacity
                and codes.channel_major):
            # a growing cache that entered a new group since the codes' last update: room for it
            # (its tokens are checked below to lie in forced blocks, which the scores skip)
            codes._reserve(math.ceil(capacity / block_size))
        _check_current(codes, "the key codes", "were", block_size, block_table, capacity, seq_lens,
                       forced=(sink_blocks, recent_blocks))
        codes.wait()  # a side-stream rebuild (KeyCodes.update(stream=...)) must land first
        num_blocks = codes.num_blocks
        code_lens = codes.seq_lens  # = seq_lens, or behind it inside the forced blocks
        if codes.spreads is not None:  # channel_scores chooses the channels from the running spreads
            head_scores = torch.ops.aether.channel_scores(q, codes.codes, codes.ranges, code_lens, None, block_size,
                                                          float(scale), codes.blocks_per_group, codes.bits,
                                                          codes.channel_slots, codes.spreads, num_code_channels)
        else:
            stored = 0 if codes.pool is None else codes.pool.shape[-1]  # a channel pool: choose among it
            channels = torch.ops.aether.code_channels(q, codes.ranges, code_lens, block_size, codes.blocks_per_group,
                                                      num_code_channels, codes.channel_slots, stored)
            head_scores = torch.ops.aether.channel_scores(q, codes.codes, codes.ranges, code_lens, channels,
                                                          block_size, float(scale), codes.blocks_per_group,
                                                          codes.bits, codes.channel_slots)
        try:
            budget_blocks, budget_fraction = (budget, 0.0) if isinstance(budget, int) else (0, float(budget))
            selected, counts = torch.ops.aether.select_blocks(
                q, head_scores, seq_lens, kv_heads, block_size, policy, budget_blocks, budget_fraction, float(mass),
                min_blocks, max_blocks or 0, sink_blocks, recent_blocks, group_agg)
            selected_ready = None
            if update_codes and codes_stream is not None:
                selected_ready = torch.cuda.Event()
                selected_ready.record(torch.cuda.current_stream(q.device))  # q's device, not the current one
            result = _decode_and_pack(q, k, v, seq_lens, block_size, scale, selected, counts, block_table, policy,
                                      budget, max_blocks, num_blocks, sink_blocks, recent_blocks, return_lse,
                                      return_selection)
            if update_codes:  # the scores have been read: the codes may change from here on
                # (_check_current ruled out shrinking lengths: no second host sync between the launches).
                # On codes_stream the update waits for the selection only and runs beside the decode
                # (enqueued first, so that its CTAs take their SMs first), in CTAs narrow enough to
                # share an SM with two of the decode's. Forked right after the scores, beside the
                # selection, it held the selection back: 109 against 101 us at 8 x 32k on an H200.
                codes.update(k, seq_lens, block_table=block_table, stream=codes_stream, _lengths_checked=True,
                             _beside_decode=codes_stream is not None, _after=selected_ready)
            return result
        finally:
            if update_codes:
                codes.wait()  # the update on codes_stream joins the current stream before returning
    sketch_args = (None, None, None, None, 0.0, None, 1)
    if score == "qsketch":
        # The sketch carries its own centroid; qsketch reads no block statistics.
        if stats is not None:
            raise ValueError("stats are not read by score='qsketch' (the KeySketch carries its centroid); pass "
                             "stats=None")
        stat_tensors = (q.new_empty((0,), dtype=torch.float32),) * 5  # placeholders, never read
        calib = sketch.calibration
        sketch_args = (sketch.codes, sketch.ranges, calib.key_proj, calib.query_proj, float(calib.centroid_weight),
                       sketch.centroid, sketch.blocks_per_sketch)
    else:
        if stats is None:
            stats = block_stats(k, block_size, seq_lens=seq_lens, block_table=block_table)
        else:
            _check_current(stats, "stats", "were", block_size, block_table, capacity, seq_lens)
            _check_stats_match(stats, batch, kv_heads, head_dim, q.device)
        stat_tensors = stats.tensors
        num_blocks = stats.num_blocks
    budget_blocks, budget_fraction = (budget, 0.0) if isinstance(budget, int) else (0, float(budget))
    head_scores = None
    if return_candidates and refine is None:
        raise ValueError("return_candidates needs refine= (the candidates are two-stage selection's first stage)")
    if refine_extra is not None:
        if refine is None:
            raise ValueError("refine_extra (blocks that join the two-stage candidates) needs refine= key codes")
        extra_indices, extra_counts = _check_refine_extra(refine_extra, batch, kv_heads, q.device)
    if refine is not None:
        _check_codes_match(refine, batch, kv_heads, head_dim, q.device)
        _check_current(refine, "the key codes", "were", block_size, block_table, capacity, seq_lens)
        rc_blocks, rc_fraction = ((refine_candidates, 0.0) if isinstance(refine_candidates, int)
                                  else (0, float(refine_candidates)))
        candidates, num_candidates, _, _ = torch.ops.aether.radar_select(
            q, *stat_tensors, seq_lens, block_size, float(scale), score, policy, rc_blocks, rc_fraction,
            float(eps), float(mass), min_blocks, max_blocks or 0, sink_blocks, recent_blocks, False, None, None,
            group_agg, *sketch_args)
        if refine_extra is not None:  # e.g. the last step's final blocks join the candidates
            candidates, num_candidates = torch.ops.aether.union_blocks(candidates, num_candidates, extra_indices,
                                                                       extra_counts, candidates.shape[-1])
        refine.wait()  # a rebuild on a side stream (KeyCodes.update(stream=...)) ran beside the first stage
        head_scores = torch.ops.aether.refine_scores(q, refine.codes, refine.ranges, seq_lens, candidates,
                                                     num_candidates, block_size, float(scale),
                                                     refine.blocks_per_group, refine.bits)
    selected, counts, _, _ = torch.ops.aether.radar_select(
        q, *stat_tensors, seq_lens, block_size, float(scale), score, policy, budget_blocks, budget_fraction,
        float(eps), float(mass), min_blocks, max_blocks or 0, sink_blocks, recent_blocks, False, head_scores, None,
        group_agg, *sketch_args)
    extra = (Selection(candidates, num_candidates),) if return_candidates else ()
    return _decode_and_pack(q, k, v, seq_lens, block_size, scale, selected, counts, block_table, policy, budget,
                            max_blocks, num_blocks, sink_blocks, recent_blocks, return_lse, return_selection, extra)


def _resolve_code_channels(code_channels: object, head_dim: int, bits: int) -> int:
    """qcodes' channel count: an int in [1, head_dim], a float fraction in (0, 1] of head_dim, or
    None: head_dim / (2 bits) (the same code bytes per token at 2 and 4 bits)."""
    if code_channels is None:
        code_channels = CODE_BITS_PER_TOKEN_PER_DIM / bits
    return _channel_count(code_channels, head_dim, "code_channels")


def _channel_count(value: object, head_dim: int, name: str) -> int:
    """A number of channels given as an int in [1, head_dim] or a float fraction in (0, 1] of
    head_dim (rounded, at least 1); errors name `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (channels) or a float (a fraction of head_dim), got "
                        f"{type(value).__name__}")
    if isinstance(value, int):
        if not 1 <= value <= head_dim:
            raise ValueError(f"{name} as a count must be in [1, head_dim = {head_dim}], got {value}")
        return value
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} as a fraction must be in (0, 1], got {value}")
    return max(1, min(head_dim, round(value * head_dim)))


def _decode_and_pack(q, k, v, seq_lens, block_size, scale, selected, counts, block_table, policy, budget, max_blocks,
                     num_blocks, sink_blocks, recent_blocks, return_lse, return_selection, extra=()):
    """Attention over the selected blocks, and the outputs sparse_attention was asked for."""
    hint = _max_selected_hint(policy, budget, max_blocks, num_blocks, sink_blocks + recent_blocks + 1)
    out, lse = torch.ops.aether.sparse_decode(q, k, v, seq_lens, block_size, float(scale), selected, counts,
                                              block_table, hint)
    result = [out]
    if return_lse:
        result.append(lse)
    if return_selection:
        result.append(Selection(selected, counts))
    result.extend(extra)
    return out if len(result) == 1 else tuple(result)
