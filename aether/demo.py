"""The synthetic demo: one decode step over a long KV cache, dense vs AETHER.

The cache imitates what makes real attention sparse: keys drift slowly along the sequence, a few
channels carry large outliers, and a handful of "needle" tokens anywhere in the context align with
the query. The demo reports, per score and budget, the attention mass the selected blocks hold
(computed from the true softmax), the output error against dense attention, the fraction of KV
bytes read, and the time of one call.
"""

from __future__ import annotations

import math
import time

import torch

import aether
from aether import reference


def synthetic_cache(batch: int, q_heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                    device: str, seed: int = 0, needles: int = 8):
    """Decode queries and a KV cache with drift, outlier channels and planted needle tokens."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    # Topics: each 512-token segment shares a direction; the query leans on three of them.
    segments = seq // 512 + 1
    topics = torch.randn(batch, kv_heads, segments, head_dim, generator=g)
    topics = topics / topics.norm(dim=-1, keepdim=True) * 0.8 * math.sqrt(head_dim)
    k += topics.repeat_interleave(512, dim=2)[:, :, :seq]
    k[..., :4] *= 3.0
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    q = torch.randn(batch, q_heads, head_dim, generator=g) * 0.5
    group = q_heads // kv_heads
    for b in range(batch):
        for h in range(kv_heads):
            chosen = torch.randperm(segments, generator=g)[:3]
            lean = topics[b, h, chosen].sum(0) / math.sqrt(head_dim)
            q[b, h * group:(h + 1) * group] += 6.0 * lean / math.sqrt(3.0)
            pos = torch.randint(0, seq, (needles,), generator=g)
            direction = q[b, h * group:(h + 1) * group].mean(0)
            k[b, h, pos] += 1.5 * direction / direction.norm() * math.sqrt(head_dim)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(q), cast(k), cast(v)


def _recalled_mass(q, k, seq_lens, selection, block_size) -> float:
    """Mean over query heads of the true softmax mass held by the selected blocks."""
    logits = reference._masked_logits(q.float().cpu(), k.float().cpu(), seq_lens.cpu(), None)
    probs = torch.softmax(logits, dim=-1)  # [B, Hq, S]
    mask = reference._selected_token_mask(seq_lens.cpu(), k.shape[2], block_size, selection.indices.cpu(),
                                          selection.counts.cpu(), k.shape[1])  # [B, Hkv, S]
    group = q.shape[1] // k.shape[1]
    mask = mask.repeat_interleave(group, dim=1)
    return float((probs * mask).sum(-1).mean())


def _time_call(fn, device: str, repeats: int = 5) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def run_synthetic_demo(device: str | None = None, seq: int = 16384, batch: int = 2, block_size: int = 64,
                       seed: int = 0) -> list[dict]:
    """Print a dense-vs-sparse table for one decode step; returns its rows."""
    device = device or ("cuda" if torch.cuda.is_available() and aether.built_with_cuda() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q_heads, kv_heads, head_dim = 32, 8, 128
    q, k, v = synthetic_cache(batch, q_heads, kv_heads, seq, head_dim, dtype, device, seed)
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    stats = aether.block_stats(k, block_size, seq_lens=seq_lens)
    dense_out = aether.sparse_attention(q, k, v, stats=stats, seq_lens=seq_lens, budget=1.0)
    dense_ms = _time_call(lambda: aether.sparse_attention(q, k, v, stats=stats, seq_lens=seq_lens, budget=1.0),
                          device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"AETHER demo on {name}: batch {batch}, {seq} tokens, {q_heads} q / {kv_heads} kv heads, head_dim "
          f"{head_dim}, {str(dtype).split('.')[-1]}, {block_size}-token blocks")
    header = f"{'selection':<26}{'KV read':>9}{'mass kept':>11}{'out err':>10}{'ms/step':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'dense (budget 1.0)':<26}{1.0:>9.1%}{1.0:>11.4f}{0.0:>10.4f}{dense_ms:>10.2f}")
    rows = []
    num_blocks = math.ceil(seq / block_size)
    meta_fraction = (3 * head_dim + 2) * 4 / (2 * block_size * head_dim * q.element_size())
    configs = [("tight", "topk", 0.125), ("box", "topk", 0.125), ("ball", "topk", 0.125), ("mean", "topk", 0.125),
               ("tight", "topk", 0.25), ("tight", "threshold", None), ("tight", "adaptive", None)]
    for score, policy, budget in configs:
        kw = dict(stats=stats, seq_lens=seq_lens, score=score, policy=policy)
        if budget is not None:
            kw["budget"] = budget
        if policy == "threshold":
            kw["eps"] = 1e-2
        out, selection = aether.sparse_attention(q, k, v, return_selection=True, **kw)
        ms = _time_call(lambda: aether.sparse_attention(q, k, v, **kw), device)
        read = float(selection.counts.float().mean()) / num_blocks + meta_fraction
        err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
        mass = _recalled_mass(q, k, seq_lens, selection, block_size)
        label = f"{score} {policy}" + (f" {budget:g}" if budget is not None else "")
        print(f"{label:<26}{read:>9.1%}{mass:>11.4f}{err:>10.4f}{ms:>10.2f}")
        rows.append(dict(score=score, policy=policy, budget=budget, kv_read=read, mass=mass, out_err=err, ms=ms))
    print("KV read counts the selected K/V blocks plus every block's float32 statistics.")
    return rows
