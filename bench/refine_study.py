"""Two-stage selection study (issue 5): the sketch picks candidates, a finer look at their keys
picks the blocks that are read. Emulated on the CPU with the pure-PyTorch reference; nothing
here is in the kernels.

Each qsketch decode step of `aether.eval` is replaced by:
  1. the qsketch scores of every block (the cache's real key sketch, `reference.sketch_head_scores`),
     top-k with the sum aggregation at the candidate fraction `--candidates` C;
  2. for the candidate blocks only, the block log-mass from the keys themselves: exact bf16 keys
     (`--key-bits 0`), or keys quantised per (128-token group, channel) to `--key-bits` bits with
     bf16 min / max ranges (a second, full-dimension key sketch read only for candidates);
  3. top-k of those at the eval's budget K (sum aggregation), then exact attention over them;
     with `--attend-with-codes` the attention itself uses the quantised keys (bf16 values): a
     lossy K read, counted at the codes' bytes.
  With `--debias` step 3 ranks by the codes' log-mass minus half the variance of their logit error
  (uniform +-step / 2 per channel: s^2 sum_c q_c^2 step_c^2 / 12), the lift that noise gives a
  log-sum-exp.
  With `--final-mass P` step 3 is the adaptive rule instead: per KV head and step, the fewest
  candidates whose refined mass (normalised over the candidates, averaged over the group) reaches
  P, at most `--final-max` of the blocks (variable bytes; the eval counts the blocks read).
  With `--final-agg rank` step 3's top-k unites each query head's own ranking (every head's best
  block first, then every head's second, ...) instead of summing the heads' softmax shares.
  With `--key-channels F` step 2 reads the codes of only F x D channels per candidate token,
  chosen per step and KV head for the query (the largest sum_g q_gd^2 x mean range_d^2), the
  others at their group's mid-range; with `--candidates 1.0` every block is ranked this way and
  the sketch ranks nothing (bench/plot_frontier.py then leaves its bytes out). With
  `--channel-refresh N` the channels are chosen every N decode steps per layer and reused in
  between (what a kernel that skips the channel choice on most steps would do). With
  `--channel-pool P` the choice is made only among P x D channels per (layer, KV head), fixed at
  a sequence's first decode step by their key spread (a cache that stores codes for those
  channels only, P of the code memory).
  With `--reuse` the previous decode step's final blocks (same layer) join step 2's candidates:
  attention is correlated from one token to the next, so the blocks read last step are likely
  candidates again, at no first-stage bytes (their codes are read and counted like any other
  candidate's).
  4. optionally (`--tail`) the unread candidates enter the softmax by an estimate: their block
     log-masses from the codes (`cand`), minus half the variance of the codes' logit error
     (`cand-corrected`), or exact (`cand-exact`, a diagnostic), each with the mean value of its
     `--tail-tokens` span (value means cost D bf16 per span, not counted in the printed bytes).

Bytes read per step, as a fraction of dense bf16 K+V (head_dim D; the table the eval prints
counts only the sketch and the K/V of the final blocks, so add the candidates' share by hand):
  sketch (printed as metadata) + K (printed as selected)
  + candidates x 1/2            with exact keys (their K read twice: refinement and attention),
  + candidates x (bits / 32 + 1 / 128) with b-bit keys (D b / 8 bytes per token plus the
    group's 4 D bf16 range bytes over 128 tokens, against 4 D bytes of K+V); bits / 32 x F with
    `--key-channels F`;
  with `--attend-with-codes` the final blocks' K is read as codes, not bf16: subtract
  K x (1/2 - bits / 32 - 1 / 128) from the printed total.
The script prints the measured candidate fraction at exit.

Usage (the committed runs; 8k context, the last 1024 positions decoded, ~6 min per text and
configuration on 2 CPU cores):
  PYTHONPATH=. python bench/refine_study.py --candidates 0.25 --key-bits 4 -- \\
      --context 8192 --decode 1024 --texts python_language_reference --tasks ppl \\
      --scores qsketch:sum --budgets 0.1 --block-sizes 16 --blocks-per-sketch 8 --threads 1 \\
      --output bench/results/refine_q4_c25_python.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import aether.cache as cache_mod
from aether import reference
from aether.selection import mask_from_indices, quantize_blockwise

RANGE_GROUP = 128  # tokens sharing one (lo, hi) per channel of the quantised keys


def quantize_keys(k: torch.Tensor, bits: int, group: int = RANGE_GROUP) -> torch.Tensor:
    """Dequantised keys: per (b, h, group of `group` tokens, channel) bf16 min / max, 2^bits - 1 steps
    (`aether.selection.quantize_blockwise` over groups of `group` tokens)."""
    batch, heads, seq, dim = k.shape
    pad = (-seq) % group
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).reshape(batch, heads, -1, group, dim)
    valid = (torch.arange(seq + pad) < seq).reshape(1, 1, -1, group, 1)
    deq = quantize_blockwise(kf, bits, valid)
    return deq.reshape(batch, heads, seq + pad, dim)[:, :, :seq]


def group_ranges(k: torch.Tensor, group: int = RANGE_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, group of `group` tokens, channel) the bf16-rounded min and max of the valid keys,
    as the codes store them: ``lo, hi [B, Hkv, groups, D]`` float32 (0 for an empty group)."""
    batch, heads, seq, dim = k.shape
    pad = (-seq) % group
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).reshape(batch, heads, -1, group, dim)
    valid = (torch.arange(seq + pad) < seq).reshape(1, 1, -1, group, 1)
    lo = kf.masked_fill(~valid, math.inf).amin(3)
    hi = kf.masked_fill(~valid, -math.inf).amax(3)
    lo = torch.where(torch.isfinite(lo), lo, 0.0).to(torch.bfloat16).float()
    hi = torch.where(torch.isfinite(hi), hi, 0.0).to(torch.bfloat16).float()
    return lo, hi


def channel_choice(q: torch.Tensor, k: torch.Tensor, fraction: float, group: int = RANGE_GROUP,
                   ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
                   pool: torch.Tensor | None = None) -> torch.Tensor:
    """`--key-channels`' choice: per (b, KV head) the ``m = round(fraction * D)`` channels with the
    largest ``sum_g q_gd^2 * mean_groups (hi_d - lo_d)^2``, as a bool mask ``[B, Hkv, D]``
    (`ranges`: ``group_ranges(k, group)`` when the caller has them; `pool`: a ``[B, Hkv, D]`` mask
    of the channels that may be chosen, `--channel-pool`)."""
    batch, heads, _, dim = k.shape
    m = max(1, min(dim, round(fraction * dim)))
    lo, hi = group_ranges(k, group) if ranges is None else ranges
    gq = q.shape[1] // heads
    qq = q.float().reshape(batch, heads, gq, dim).pow(2).sum(2)  # [B, Hkv, D]
    weight = qq * (hi - lo).pow(2).mean(2)
    if pool is not None:
        weight = weight.masked_fill(~pool, -math.inf)
    chosen = torch.zeros(batch, heads, dim, dtype=torch.bool)
    chosen.scatter_(-1, weight.topk(m, dim=-1).indices, True)
    return chosen


def channel_pool(k: torch.Tensor, fraction: float, group: int = RANGE_GROUP) -> torch.Tensor:
    """`--channel-pool`: per (b, KV head) the ``round(fraction * D)`` channels with the largest
    ``mean_groups (hi_d - lo_d)^2`` of the keys so far (query-independent: what a cache would decide
    at prefill, storing codes for those channels only), as a bool mask ``[B, Hkv, D]``."""
    batch, heads, _, dim = k.shape
    size = max(1, min(dim, round(fraction * dim)))
    lo, hi = group_ranges(k, group)
    pool = torch.zeros(batch, heads, dim, dtype=torch.bool)
    pool.scatter_(-1, (hi - lo).pow(2).mean(2).topk(size, dim=-1).indices, True)
    return pool


def channel_subset_keys(q: torch.Tensor, k: torch.Tensor, dequant: torch.Tensor, fraction: float,
                        group: int = RANGE_GROUP, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """`--key-channels`: the codes of only ``m = round(fraction * D)`` channels per (b, KV head) are
    read, chosen per decode step for the query: the m largest ``sum_g q_gd^2 * mean_groups (hi_d -
    lo_d)^2`` (where a channel's coarse value would move the group's logits most). The other
    channels take their group's mid-range ``(lo + hi) / 2`` (from the ranges, read anyway). Returns
    the keys as the refinement sees them ``[B, Hkv, S, D]``. `chosen` (a `channel_choice` mask,
    e.g. an earlier step's: `--channel-refresh`) replaces the choice for this query."""
    seq = k.shape[2]
    lo, hi = group_ranges(k, group)
    if chosen is None:
        chosen = channel_choice(q, k, fraction, group, (lo, hi))
    mid = ((lo + hi) / 2).repeat_interleave(group, dim=2)[:, :, :seq]  # [B, Hkv, S, D]
    return torch.where(chosen[:, :, None, :], dequant.float(), mid).to(dequant.dtype)


def value_means(v: torch.Tensor, seq: int, block_size: int, tokens: int) -> torch.Tensor:
    """``[B, Hkv, NB, D]`` float32: the mean of the valid values of each `tokens`-token span,
    repeated for each of its `block_size`-token blocks."""
    batch, heads, _, dim = v.shape
    pad = (-seq) % tokens
    vf = torch.nn.functional.pad(v[:, :, :seq].float(), (0, 0, 0, pad)).reshape(batch, heads, -1, tokens, dim)
    count = (torch.arange(seq + pad) < seq).reshape(-1, tokens).sum(-1).clamp_min(1)
    means = vf.sum(3) / count[None, None, :, None]
    nb = reference.num_blocks_for(seq, block_size)
    return means.repeat_interleave(tokens // block_size, dim=2)[:, :, :nb]


def code_noise_variance(q: torch.Tensor, k: torch.Tensor, bits: int, block_size: int, scale: float | None,
                        nb: int) -> torch.Tensor:
    """``[B, Hq, NB]``: variance of the logit error of b-bit codes (uniform in +-step / 2 per
    channel): scale^2 sum_c q_c^2 step_c^2 / 12 with the step of the block's 128-token group."""
    batch, heads, seq, dim = k.shape
    pad = (-seq) % RANGE_GROUP
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).reshape(batch, heads, -1, RANGE_GROUP, dim)
    valid = (torch.arange(seq + pad) < seq).reshape(1, 1, -1, RANGE_GROUP, 1)
    hi = kf.masked_fill(~valid, -math.inf).amax(3)
    lo = kf.masked_fill(~valid, math.inf).amin(3)
    step = ((hi - lo) / (2 ** bits - 1)).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # [B, Hkv, groups, D]
    group = q.shape[1] // heads
    s = scale if scale is not None else dim ** -0.5
    qf = q.float().reshape(batch, heads, group, dim)
    var = torch.einsum("bhgd,bhnd->bhgn", qf * qf, step * step) * (s * s / 12.0)
    var = var.repeat_interleave(RANGE_GROUP // block_size, dim=-1)[..., :nb]
    return var.reshape(batch, heads * group, -1)


def add_tail(out: torch.Tensor, lse: torch.Tensor, est: torch.Tensor, vmeans: torch.Tensor) -> torch.Tensor:
    """Merges the attention over the read blocks (out, lse) with an estimate of the unread blocks:
    log-masses `est` [B, Hq, NB] (-inf: not estimated) and per-block value means [B, Hq, NB, D]."""
    tail_lse = torch.logsumexp(est, dim=-1)
    weights = torch.softmax(est, dim=-1).nan_to_num(0.0)
    tail_out = torch.einsum("bhn,bhnd->bhd", weights, vmeans)
    top = torch.maximum(lse, tail_lse)
    a = torch.exp(lse - top).nan_to_num(0.0)
    c = torch.exp(tail_lse - top).nan_to_num(0.0)
    return (a[..., None] * out.float() + c[..., None] * tail_out) / (a + c).clamp_min(1e-30)[..., None]


def rank_priority(scores: torch.Tensor) -> torch.Tensor:
    """Per-query-head selection within a KV head's budget: each head ranks the blocks by its own
    score (0 = best), and a block's priority is minus its best rank over the heads, so top-k with
    the max aggregation takes every head's first blocks, then every head's second, ... (a union of
    the heads' own top lists). Within a rank, the larger softmax share goes first. Blocks a head
    scores -inf (not candidates) never gain priority from that head."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    share = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all -inf row has no share
    priority = -ranks.float() + 0.5 * share
    return priority.masked_fill(scores == -math.inf, -math.inf)


def make_step(candidates: float, key_bits: int, attend_with_codes: bool, counts: dict, tail: str = "none",
              tail_tokens: int = RANGE_GROUP, debias: bool = False, final_mass: float = 0.0,
              final_max: float = 0.25, final_agg: str = "sum", reuse: bool = False, key_channels: float = 1.0,
              channel_refresh: int = 1, channel_pool_fraction: float = 1.0):
    original = cache_mod.sparse_decode_step
    # --channel-pool: per layer (keyed as --reuse below), the sequence length when the pool was
    # fixed and the pool; kept while later steps continue that sequence.
    pools: dict[int, tuple[int, torch.Tensor]] = {}
    # --channel-refresh: per layer (keyed as --reuse below), the sequence length at the last
    # channel choice and the choice; reused while this step continues the same sequence fewer
    # than channel_refresh tokens after it.
    choices: dict[int, tuple[int, torch.Tensor]] = {}
    # --reuse: per layer (keyed by the storage of its calibration's key_proj, one per layer; the
    # sketch may carry a copy of the calibration object), the last step's sequence length and final
    # selection; used only when this step is the next token of the same sequence.
    previous: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def step(q, k, v, options, stats=None, scale=None, sketch=None, codes=None, refine_extra=None,
             return_candidates=False):
        # The library's own two-stage arguments (AetherKVCache passes them; None / False here, as
        # the study's configurations have no refine_candidates): the study does its own reuse.
        if options.score != "qsketch" or refine_extra is not None or return_candidates:
            return original(q, k, v, options, stats, scale, sketch, codes=codes, refine_extra=refine_extra,
                            return_candidates=return_candidates)
        bs = options.block_size
        batch, kv_heads, seq, _ = k.shape
        seq_lens = torch.full((batch,), seq, dtype=torch.int32)
        cal = sketch.calibration
        nb = reference.num_blocks_for(seq, bs)
        scores = reference.sketch_head_scores(q, sketch.codes, sketch.ranges, cal.key_proj, cal.query_proj, seq_lens,
                                              bs, centroid=sketch.centroid,
                                              centroid_weight=float(cal.centroid_weight), scale=scale)[:, :, :nb]
        mlo = torch.full(scores.shape[:2], -math.inf)
        forced = dict(sink_blocks=options.sink_blocks, recent_blocks=options.recent_blocks)
        cand, num_cand = reference.select_blocks(scores, mlo, seq_lens, bs, kv_heads, budget_fraction=candidates,
                                                 group_agg="sum", **forced)
        keys = quantize_keys(k, key_bits).to(k.dtype) if key_bits else k
        # --key-channels: only the query's most telling channels of the codes (the rest at mid-range)
        layer = cal.key_proj.data_ptr()  # one calibration per layer (--reuse, --channel-refresh)
        ranked = keys
        pool = None
        if channel_pool_fraction < 1.0:
            fixed = pools.get(layer)
            if fixed is None or not 0 < seq - fixed[0] or fixed[1].shape[:2] != k.shape[:2]:
                fixed = (seq, channel_pool(k, channel_pool_fraction))  # a new sequence: fixed at its first step
            pools[layer] = (seq, fixed[1])  # continued by the next step
            pool = fixed[1]
        if key_channels < 1.0 and channel_refresh == 1:
            chosen = channel_choice(q, k, key_channels, pool=pool) if pool is not None else None
            ranked = channel_subset_keys(q, k, keys, key_channels, chosen=chosen)
        elif key_channels < 1.0:
            made = choices.get(layer)
            if made is None or not 0 < seq - made[0] < channel_refresh or made[1].shape[:2] != k.shape[:2]:
                made = (seq, channel_choice(q, k, key_channels, pool=pool))
                choices[layer] = made
            ranked = channel_subset_keys(q, k, keys, key_channels, chosen=made[1])
        refined = reference.oracle_head_scores(q, ranked, seq_lens, bs, scale)
        is_cand = mask_from_indices(cand, num_cand, nb)
        last = previous.get(layer) if reuse else None
        if last is not None and last[0] == seq - 1 and last[1].shape[:2] == cand.shape[:2]:
            is_cand = is_cand | mask_from_indices(last[1], last[2], nb)  # last step's indices are < nb
        group = q.shape[1] // kv_heads
        if debias and key_bits:  # rank by the log-mass minus half the variance of the codes' logit error
            refined = refined - 0.5 * code_noise_variance(q, k, key_bits, bs, scale, nb)
        refined = refined.masked_fill(~is_cand.repeat_interleave(group, dim=1), -math.inf)
        if final_mass > 0.0:  # per KV head and step: the fewest candidates whose refined mass reaches P
            selected, num_selected = reference.select_blocks(refined, mlo, seq_lens, bs, kv_heads, policy="adaptive",
                                                             mass=final_mass, min_blocks=1,
                                                             max_blocks=max(1, math.ceil(final_max * nb)), **forced)
        elif final_agg == "rank":  # per query head rankings, united by each block's best rank
            selected, num_selected = reference.select_blocks(rank_priority(refined), mlo, seq_lens, bs, kv_heads,
                                                             budget_fraction=float(options.budget), group_agg="max",
                                                             **forced)
        else:
            selected, num_selected = reference.select_blocks(refined, mlo, seq_lens, bs, kv_heads,
                                                             budget_fraction=float(options.budget), group_agg="sum",
                                                             **forced)
        out, lse = reference.sparse_decode(q, keys if attend_with_codes else k, v, seq_lens, bs, selected,
                                           num_selected, scale)
        if tail != "none":
            # The unread candidates (and with "all" every other unread block, by its sketch score)
            # enter the softmax by their estimated log-mass with their span's mean value.
            read = mask_from_indices(selected, num_selected, nb).repeat_interleave(group, dim=1)
            cand_q = is_cand.repeat_interleave(group, dim=1)
            if tail == "cand-exact":  # diagnostic: the true log-mass of the unread candidates
                est = reference.oracle_head_scores(q, k, seq_lens, bs, scale).masked_fill(~cand_q, -math.inf)
            elif tail == "cand-corrected":  # minus half the variance of the codes' logit error
                est = refined - 0.5 * code_noise_variance(q, k, key_bits, bs, scale, nb)
            elif tail == "cand":
                est = refined
            else:
                est = torch.where(cand_q, refined, scores)
            est = est.masked_fill(read, -math.inf)
            vmeans = value_means(v, seq, bs, tail_tokens).repeat_interleave(group, dim=1)
            out = add_tail(out, lse, est, vmeans)
        if reuse:
            previous[layer] = (seq, selected.clone(), num_selected.clone())
        block_tokens = (seq - torch.arange(nb) * bs).clamp(0, bs)  # every candidate's codes are read
        counts["candidate_tokens"] += int((is_cand.long() * block_tokens).sum())
        counts["tokens"] += batch * kv_heads * seq
        return out.to(q.dtype), selected

    return step


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=float, required=True, help="candidate fraction C of the blocks")
    parser.add_argument("--key-bits", type=int, default=0, help="0: exact keys; 1-8: quantised keys")
    parser.add_argument("--attend-with-codes", action="store_true",
                        help="the attention over the final blocks also uses the quantised keys")
    parser.add_argument("--tail", choices=("none", "cand", "cand-corrected", "cand-exact", "all"), default="none",
                        help="estimate the unread candidates (cand) or all unread blocks (all) into the softmax")
    parser.add_argument("--tail-tokens", type=int, default=RANGE_GROUP,
                        help="tokens per value mean of the tail estimate (a multiple of the block size)")
    parser.add_argument("--debias", action="store_true",
                        help="rank the candidates by the codes' log-mass minus half its noise variance")
    parser.add_argument("--final-mass", type=float, default=0.0,
                        help="P > 0: the final blocks are, per KV head and step, the fewest candidates whose "
                             "refined mass (normalised over the candidates, averaged over the group) reaches P "
                             "(the adaptive rule), instead of top-k at the eval's budget")
    parser.add_argument("--final-agg", choices=("sum", "rank"), default="sum",
                        help="how the final top-k combines a KV head's query heads: the sum of their softmax "
                             "shares (the library's), or the union of each head's own ranking (rank_priority)")
    parser.add_argument("--reuse", action="store_true",
                        help="the previous decode step's final blocks (same layer) join the candidates")
    parser.add_argument("--key-channels", type=float, default=1.0,
                        help="fraction of the channels whose codes are read per candidate token, chosen per step "
                             "and KV head for the query (the others at their group's mid-range); needs --key-bits")
    parser.add_argument("--channel-refresh", type=int, default=1,
                        help="with --key-channels: choose the channels every N decode steps per layer (the "
                             "steps between reuse the last choice); 1 = every step")
    parser.add_argument("--channel-pool", type=float, default=1.0,
                        help="with --key-channels: the per-step choice only among this fraction of the channels, "
                             "fixed per (layer, KV head) at a sequence's first decode step by their key spread (a "
                             "cache storing codes for those channels only: that fraction of the code memory)")
    parser.add_argument("--final-max", type=float, default=0.25,
                        help="with --final-mass: at most this fraction of the blocks per KV head and step")
    args = parser.parse_args(argv[:split])
    if not 0.0 < args.candidates <= 1.0:
        parser.error(f"--candidates must be in (0, 1], got {args.candidates}")
    if args.key_bits and not 1 <= args.key_bits <= 8:
        parser.error(f"--key-bits must be 0 or in [1, 8], got {args.key_bits}")
    if not 0.0 < args.key_channels <= 1.0 or (args.key_channels < 1.0 and not args.key_bits):
        parser.error(f"--key-channels must be in (0, 1] and below 1 needs --key-bits, got {args.key_channels}")
    if args.channel_refresh < 1 or (args.channel_refresh > 1 and args.key_channels >= 1.0):
        parser.error(f"--channel-refresh must be >= 1 and above 1 needs --key-channels < 1, got {args.channel_refresh}")
    if not 0.0 < args.channel_pool <= 1.0 or (args.channel_pool < 1.0 and args.key_channels >= 1.0) \
            or args.channel_pool < args.key_channels:
        parser.error(f"--channel-pool must be in [--key-channels, 1] and below 1 needs --key-channels < 1, got "
                     f"{args.channel_pool}")
    if args.attend_with_codes and not args.key_bits:
        parser.error("--attend-with-codes needs --key-bits")
    if not 0.0 <= args.final_mass <= 1.0 or not 0.0 < args.final_max <= 1.0:
        parser.error(f"--final-mass must be in [0, 1] and --final-max in (0, 1], got {args.final_mass}, "
                     f"{args.final_max}")
    counts = {"candidate_tokens": 0, "tokens": 0}
    cache_mod.sparse_decode_step = make_step(args.candidates, args.key_bits, args.attend_with_codes, counts,
                                               args.tail, args.tail_tokens, args.debias, args.final_mass,
                                               args.final_max, args.final_agg, args.reuse, args.key_channels,
                                               args.channel_refresh, args.channel_pool)

    from aether.eval import build_parser, main as eval_main
    eval_argv = argv[split + 1:]
    rc = eval_main(eval_argv)
    fraction = counts["candidate_tokens"] / max(counts["tokens"], 1)
    info = refine_info(args.candidates, args.key_bits, fraction, args.key_channels)
    if args.channel_refresh > 1:
        info["channel_refresh"] = args.channel_refresh
    if args.channel_pool < 1.0:
        info["channel_pool"] = args.channel_pool
    if args.debias:
        info["debias"] = True
    if args.final_mass:
        info["final_mass"], info["final_max"] = args.final_mass, args.final_max
    if args.final_agg != "sum":
        info["final_agg"] = args.final_agg
    if args.reuse:
        info["reuse"] = True
    if args.tail != "none":
        info["tail"] = args.tail
        info["tail_tokens"] = args.tail_tokens
    if args.attend_with_codes:
        saved = 0.5 - args.key_bits / 32 - 1 / RANGE_GROUP
        info["attend_with_codes"] = True
        info["note"] += (f"; the final blocks' K is read as codes: subtract selected x {saved:.4f} (K bf16 minus "
                         f"codes, per dense K+V byte)")
    print(f"refine: {info}", flush=True)
    output = build_parser().parse_args(eval_argv).output
    if output:
        annotate(Path(output), info, "python bench/refine_study.py " + " ".join(argv))
    return rc


def refine_info(candidates: float, key_bits: int, fraction: float, key_channels: float = 1.0) -> dict:
    """The study's settings and the candidates' key bytes as a fraction of dense K+V (with
    `key_channels` < 1 the codes of that fraction of the channels, and every group's ranges)."""
    per_token = 0.5 if key_bits == 0 else key_bits / 32 * key_channels + 1 / RANGE_GROUP
    info = {"candidates": candidates, "key_bits": key_bits, "candidate_token_fraction": round(fraction, 5),
            "candidate_key_bytes": round(fraction * per_token, 5),
            "note": "add candidate_key_bytes to every configuration's bytes (the eval counts sketch + final K/V)"}
    if key_channels < 1.0:
        info["key_channels"] = key_channels
    return info


def annotate(path: Path, info: dict, command: str) -> None:
    """Adds the refinement settings and the study's command to an eval json."""
    result = json.loads(path.read_text())
    result["refine"] = info
    result["refine_command"] = command
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
