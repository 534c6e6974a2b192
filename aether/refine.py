"""Two-stage selection ("refine"): a first score keeps candidate blocks, their key codes rank them.

Measured on a real model (docs/selection.md, "Two-stage selection"), the qsketch score's weak point
is its *recall*: the blocks that matter sit between its top 16% and its top 30%, and ranking 30%
candidates by their exact keys gets within 0.008 KL of the oracle. The second stage here reads a
cheap second key store, :class:`KeyCodes`: every channel of every key as a 2- or 4-bit code with
a bf16 [lo, hi] per (group of ``blocks_per_group`` blocks, channel), ``head_dim * bits / 8`` bytes
per token (7% of the token's bf16 K+V at 2 bits, 13% at 4) plus the group's ranges, read only for
the candidate blocks. Selection and decoding then run as usual on the final blocks:

    codes = aether.key_codes(k, block_size=16, bits=2)
    out = aether.sparse_attention(q, k, v, score="qsketch", sketch=sketch, budget=0.098,
                                  refine=codes, refine_candidates=0.5)

The codes need no calibration; build them at prefill and call :meth:`KeyCodes.update` after
appends (the last group is rebuilt, like the sketch). On SmolLM2 at 8k (16-token blocks,
128-token sketch blocks) this selection at 16% of the bytes is the best measured (top-1 >= 92%
on three texts); on an H200 its step is still slower than the one-stage one (docs/selection.md,
docs/benchmarks.md), so it is opt-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aether import _ops
from aether.api import (_cache_dims, _channel_count, _check_block_size, _check_block_table, _check_head_dim,
                        _check_tensor, _grow_blocks, _normalize_seq_lens, _prepare_update, DEFAULT_BLOCK_SIZE)

CODE_BITS = (2, 4)
DEFAULT_CODE_BITS = 2
CODE_LAYOUTS = ("token", "channel")  # refine_scores reads "token", the qcodes score "channel"
GROUP_TOKENS = 128  # default group: 128 tokens share one [lo, hi] per channel


def default_blocks_per_group(block_size: int) -> int:
    """Blocks per 128-token group (1 at 128-token blocks)."""
    return max(1, GROUP_TOKENS // block_size)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS}, got {bits!r}")
    return bits


def _check_blocks_per_group(per: object, block_size: int) -> int:
    if isinstance(per, bool) or not isinstance(per, int) or per not in (1, 2, 4, 8) or per * block_size > 128:
        raise ValueError(f"blocks_per_group must be 1, 2, 4 or 8 with blocks_per_group * block_size <= 128 "
                         f"(block_size {block_size}), got {per!r}")
    return per


@dataclass
class KeyCodes:
    """The key codes of a KV cache for two-stage selection (see the module docstring).

    codes: uint8 ``[batch, kv_heads, num_blocks, block_size, head_dim * bits / 8]`` (channel d at
    bit ``d * bits`` of a token's bytes) with ``layout="token"`` (two-stage selection's
    ``refine=``), or ``[batch, kv_heads, num_blocks / Pg, head_dim, Pg * block_size * bits / 8]``
    (per group, one run of every channel's codes, token t at bit ``t * bits``) with
    ``layout="channel"`` (``score="qcodes"``, which reads a few channels' runs); ranges: bfloat16
    ``[batch, kv_heads, num_blocks / Pg, 2, head_dim]`` (lo, hi), Pg = ``blocks_per_group``. Build
    with :func:`key_codes`.

    pool: with ``key_codes(..., channel_pool=...)`` (channel layout only), int32 ``[batch,
    kv_heads, S]``, the S channels per KV head whose codes are stored, ascending; codes then has S
    runs per group (``[..., num_blocks / Pg, S, run]``, run i holding channel ``pool[b, h, i]``) and
    ``channel_slots`` int32 ``[batch, kv_heads, head_dim]`` maps a channel to its run (-1: not
    stored). The qcodes score then chooses its channels among the pool. None: every channel.

    spreads: ``layout="channel"`` only, float64 ``[batch, kv_heads, num_blocks / Pg, head_dim]``, the
    running ``sum (hi - lo)^2`` over the groups up to each one (``torch.ops.aether.code_spreads``),
    kept by :meth:`update`. The qcodes score reads the row of the last valid group to choose its
    channels inside ``channel_scores`` (no ``code_channels`` launch, no pass over every group's
    ranges). 8 bytes per channel and group: twice the ranges, 1/32 of the bf16 keys at 128-token
    groups. None (a KeyCodes built by hand): the choice is made by ``code_channels`` from the ranges.
    """

    codes: torch.Tensor
    ranges: torch.Tensor
    bits: int
    block_size: int
    seq_lens: torch.Tensor
    paged: bool = False
    blocks_per_group: int = 1
    layout: str = "token"
    pool: torch.Tensor | None = None
    channel_slots: torch.Tensor | None = None
    spreads: torch.Tensor | None = None
    # A rebuild enqueued on a side stream (update(stream=...)): its event, and the temporaries it
    # reads, kept alive until a stream waits for it (wait()).
    _pending: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return self.codes.shape[2] * (self.blocks_per_group if self.layout == "channel" else 1)

    @property
    def channel_major(self) -> bool:
        return self.layout == "channel"

    def qcodes_bytes(self, num_channels: int, num_blocks: int) -> float:
        """Bytes the qcodes score reads per KV head and step over `num_blocks` valid blocks: the
        runs of `num_channels` channels and the bf16 ranges of every group holding a valid block,
        plus the channel choice's row of running spreads (8 bytes per channel, :attr:`spreads`;
        counted for every implementation, so that the extension and the reference path report the
        same bytes; the choice without spreads reads the ranges, counted once above)."""
        groups = math.ceil(num_blocks / self.blocks_per_group)
        run_bytes = self.blocks_per_group * self.block_size * self.bits / 8
        return groups * (num_channels * run_bytes + 4 * self.head_dim) + 8 * self.head_dim

    @property
    def head_dim(self) -> int:
        return self.ranges.shape[-1]

    def bytes_read(self, candidates: "int | torch.Tensor", num_blocks: int) -> "float | torch.Tensor":
        """Bytes the second stage reads per KV head for `candidates` of `num_blocks` blocks: the
        candidates' codes, and the bf16 ranges of every group that can hold a candidate (at most
        one group per candidate, at most every group: an upper bound on the distinct groups).
        `candidates` may be a tensor of per-row counts (then elementwise, on its device)."""
        all_groups = math.ceil(num_blocks / self.blocks_per_group)
        groups = (candidates.clamp(max=all_groups) if isinstance(candidates, torch.Tensor)
                  else min(candidates, all_groups))
        return candidates * self.block_size * self.head_dim * self.bits / 8 + groups * 4 * self.head_dim

    def update(self, k: torch.Tensor, seq_lens: torch.Tensor | None = None, *,
               block_table: torch.Tensor | None = None, stream: "torch.cuda.Stream | None" = None,
               _lengths_checked: bool = False, _beside_decode: bool = False,
               _after: "torch.cuda.Event | None" = None) -> "KeyCodes":
        """Refresh the codes after tokens were appended to ``k`` (in place, CUDA-graph safe): only
        the groups from each sequence's previous last block on are rebuilt.

        ``stream``: a CUDA stream to rebuild on, after the work the current stream has queued so far.
        The first stage of a two-stage step does not read the codes, so the rebuild then runs beside
        it; :func:`aether.sparse_attention` makes its stream wait for the rebuild before the codes are
        read, and :meth:`wait` does the same for any other reader. ``None``: the current stream.
        """
        self.wait()  # an earlier side-stream rebuild may still read the buffers replaced below
        k, seq_lens, block_table, first_block, needed = _prepare_update(
            self, k, seq_lens, block_table, "the key codes", "build new codes with aether.key_codes", _check_codes_match,
            check_growth=not _lengths_checked)
        per = self.blocks_per_group
        self._reserve(needed)
        # the same launch brings the running spreads of the rebuilt groups up to date
        # _beside_decode: 64-thread CTAs that fit on an SM beside two sparse_decode CTAs (the same
        # codes; sparse_attention's update_codes on a side stream, which runs beside the decode)
        args = (k, seq_lens, first_block, self.block_size, block_table, self.codes, self.ranges, per, self.bits,
                self.channel_major, self.channel_slots, self.spreads, _beside_decode)

        def rebuild() -> None:
            torch.ops.aether.key_codes_update(*args)

        if stream is None:
            rebuild()
        else:
            if not isinstance(stream, torch.cuda.Stream):
                raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream).__name__}")
            if not k.is_cuda or stream.device != k.device:
                raise ValueError(f"stream must be a CUDA stream of the cache's device ({k.device}), got one of "
                                 f"{stream.device}")
            # _after: an event recorded earlier on the current stream (sparse_attention: after the
            # selection, with the decode already enqueued behind it), else all work queued so far
            if _after is not None:
                stream.wait_event(_after)
            else:
                stream.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(stream):
                rebuild()
                ready = torch.cuda.Event()
                ready.record(stream)
            # The caching allocator may hand these to the current stream once they are dropped: keep
            # them until a stream that reads the codes waits for the rebuild.
            self._pending = (ready, args)
        self.seq_lens.copy_(seq_lens)
        return self

    def _reserve(self, num_blocks: int) -> None:
        """Grows the buffers to cover `num_blocks` blocks (whole groups) without building anything:
        the new groups hold zeros until an update reaches them (sparse_attention with codes that
        trail a cache grown by a new group: their tokens lie in forced blocks, scored as absent)."""
        self.wait()
        per = self.blocks_per_group
        needed = -(-num_blocks // per) * per
        self.codes = _grow_blocks(self.codes, needed // per if self.channel_major else needed)
        self.ranges = _grow_blocks(self.ranges, needed // per)
        if self.spreads is not None:
            self.spreads = _grow_blocks(self.spreads, needed // per)

    def wait(self) -> "KeyCodes":
        """Makes the current stream wait for a rebuild enqueued by ``update(stream=...)`` (no-op if
        there is none or it was already waited for). :func:`aether.sparse_attention` calls it."""
        if self._pending is not None:
            torch.cuda.current_stream(self.codes.device).wait_event(self._pending[0])
            self._pending = None
        return self


def _check_codes_match(codes: KeyCodes, batch: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
    got = tuple(codes.codes.shape[:2])
    if got != (batch, kv_heads) or codes.head_dim != head_dim:
        raise ValueError(f"the key codes were built for another cache: [batch, kv_heads] = {list(got)}, head_dim "
                         f"{codes.head_dim}; this cache has [{batch}, {kv_heads}], {head_dim}")
    if codes.codes.device != device:
        raise ValueError(f"the key codes are on {codes.codes.device} but the cache is on {device}")


def key_codes(k: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, bits: int = DEFAULT_CODE_BITS,
              blocks_per_group: int | None = None, seq_lens: torch.Tensor | None = None,
              block_table: torch.Tensor | None = None, layout: str = "token",
              channel_pool: int | float | None = None) -> KeyCodes:
    """Build the key codes of a cache (the second stage of two-stage selection).

    Args:
        k: keys, contiguous ``[batch, kv_heads, seq, head_dim]`` or paged
            ``[num_pages, page_size, kv_heads, head_dim]`` with ``block_table``.
        block_size: tokens per block, 16/32/64/128 (that of the selection).
        bits: bits per channel, 2 (default; for two-stage selection measured better than 4 at
            equal bytes because more candidates fit) or 4 (the measured best for
            ``layout="channel"``, i.e. score="qcodes": 4-bit codes of an eighth of the channels).
        blocks_per_group: blocks sharing one [lo, hi] per channel (1, 2, 4, 8; at most 128
            tokens); default: 128 tokens.
        seq_lens: valid tokens per sequence (default: all).
        layout: "token" (default; each token's codes together, what two-stage selection's
            ``refine=`` reads) or "channel" (per group, each channel's codes together, what
            ``score="qcodes"`` reads: a few channels of every block). Same bytes either way.
        channel_pool: ``layout="channel"`` only. Store the codes of only part of the channels: an
            int count S or a float fraction of head_dim, chosen per (b, KV head) as the S channels
            with the largest spread ``sum_groups (hi - lo)^2`` of these keys (no query needed),
            a tie to the lower channel, and kept for later appends (:meth:`KeyCodes.update`). The
            qcodes score then chooses among them. Half the channels halves the store at about the
            quality of the free choice on SmolLM2 (docs/selection.md, "A fixed channel pool").
            None (default): every channel.
    """
    _ops.require_extension()
    if layout not in CODE_LAYOUTS:
        raise ValueError(f"layout must be one of {CODE_LAYOUTS}, got {layout!r}")
    k = _check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim] or [num_pages, page_size, kv_heads, head_dim]")
    block_size = _check_block_size(block_size)
    bits = _check_bits(bits)
    per = default_blocks_per_group(block_size) if blocks_per_group is None else blocks_per_group
    per = _check_blocks_per_group(per, block_size)
    block_table = _check_block_table(block_table, k)
    batch, kv_heads, capacity, head_dim = _cache_dims(k, block_table, block_size, "k")
    _check_head_dim(head_dim, k.device)
    seq_lens = _normalize_seq_lens(seq_lens, batch, capacity, k.device)
    num_blocks = math.ceil(capacity / (block_size * per)) * per
    if channel_pool is not None:
        if layout != "channel":
            raise ValueError(f"channel_pool needs layout='channel' (the qcodes score's codes), got layout={layout!r}")
        stored = _channel_count(channel_pool, head_dim, "channel_pool")
        pool, slots = choose_channel_pool(k, seq_lens, block_size, num_blocks, block_table, per, stored)
        codes, ranges = torch.ops.aether.key_codes(k, seq_lens, block_size, num_blocks, block_table, per, bits, True,
                                                   slots, stored)
        spreads = torch.ops.aether.code_spreads(ranges, seq_lens, block_size, per)
        return KeyCodes(codes, ranges, bits, block_size, seq_lens.clone(), block_table is not None,
                        blocks_per_group=per, layout=layout, pool=pool, channel_slots=slots, spreads=spreads)
    codes, ranges = torch.ops.aether.key_codes(k, seq_lens, block_size, num_blocks, block_table, per, bits,
                                               layout == "channel")
    spreads = torch.ops.aether.code_spreads(ranges, seq_lens, block_size, per) if layout == "channel" else None
    return KeyCodes(codes, ranges, bits, block_size, seq_lens.clone(), block_table is not None, blocks_per_group=per,
                    layout=layout, spreads=spreads)


def pool_slots(pool: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The slot map of a channel pool ``[B, Hkv, S]`` (distinct channel ids): int32 ``[B, Hkv,
    head_dim]`` with ``slots[b, h, pool[b, h, i]] = i`` and -1 for the channels not in the pool."""
    slots = torch.full((*pool.shape[:2], head_dim), -1, dtype=torch.int32, device=pool.device)
    order = torch.arange(pool.shape[-1], dtype=torch.int32, device=pool.device).expand_as(pool)
    return slots.scatter_(-1, pool.to(torch.int64), order.contiguous()).contiguous()


def choose_channel_pool(k: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int,
                        block_table: torch.Tensor | None, per: int, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel pool of :func:`key_codes`: per (b, KV head) the ``stored`` channels with the
    largest ``sum_groups (hi - lo)^2`` over the valid groups, ascending, and its slot map. The
    ranges come from a build that stores no runs (every slot -1, one zero run), and the choice is
    ``code_channels`` with a query of ones (so ``sum_g q_gd^2 = 1``): the same order, ties and
    double sums as the per-step choice."""
    batch, kv_heads, _, head_dim = _cache_dims(k, block_table, block_size, "k")
    none = torch.full((batch, kv_heads, head_dim), -1, dtype=torch.int32, device=k.device)
    _, ranges = torch.ops.aether.key_codes(k, seq_lens, block_size, num_blocks, block_table, per, 2, True, none, 1)
    ones = torch.ones(batch, kv_heads, head_dim, dtype=k.dtype, device=k.device)
    pool = torch.ops.aether.code_channels(ones, ranges, seq_lens, block_size, per, stored)
    return pool, pool_slots(pool, head_dim)
