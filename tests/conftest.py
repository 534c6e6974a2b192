"""Shared fixtures: devices to test, input generators, poisoning and tolerances."""

from __future__ import annotations

import pytest
import torch

import aether

HAS_CUDA = torch.cuda.is_available() and aether.extension_available() and aether.built_with_cuda()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (or build without CUDA)"))]


@pytest.fixture
def poison_empty():
    """Make every torch.empty inside the ops NaN (floats) or the max value (ints) so that an
    output element the kernel forgets to write is caught."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def make_case(batch: int, q_heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
              device: str, seed: int, lens: list[int] | None = None):
    """Random decode inputs with mixed lengths; keys get a few outlier channels and a drift along
    the sequence so that blocks differ (as in real caches) and selection is not a coin toss."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    k += torch.randn(batch, kv_heads, 1, head_dim, generator=g) * torch.linspace(0, 2, seq).view(1, 1, seq, 1)
    k[..., :2] *= 4.0
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    if lens is None:
        lens = [seq if b == 0 else int(torch.randint(0, seq + 1, (1,), generator=g)) for b in range(batch)]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(q), cast(k), cast(v), seq_lens.to(device)


def lowp_attention_error_bound(q, k, v, seq_lens, selected, counts, block_size, scale, ref_out):
    """Error of the same attention done by PyTorch in the input precision (math in that dtype),
    against the float64 result; the kernels must stay within 2x of it (flash-attention's rule)."""
    if q.dtype == torch.float32:
        return torch.zeros(())
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        for h in range(k.shape[1]):
            if selected is None:
                idx = torch.arange(n, device=q.device)
            else:
                n_blocks = -(-n // block_size)
                blocks = [int(j) for j in selected[b, h, : int(counts[b, h])] if 0 <= int(j) < n_blocks]
                idx = torch.cat([torch.arange(j * block_size, min(n, (j + 1) * block_size)) for j in blocks]
                                ) if blocks else torch.zeros(0, dtype=torch.long)
                idx = idx.to(q.device)
            qs = q[b, h * group:(h + 1) * group]
            if idx.numel() == 0:
                out[b, h * group:(h + 1) * group] = 0
                continue
            logits = (qs @ k[b, h, idx].T) * scale
            out[b, h * group:(h + 1) * group] = torch.softmax(logits, dim=-1) @ v[b, h, idx]
    return (out.double() - ref_out.double()).abs().max()
