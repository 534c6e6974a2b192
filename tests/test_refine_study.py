"""The key quantisation and byte accounting behind the two-stage study (bench/refine_study.py,
docs/selection.md "Two-stage selection"): its numbers rest on these."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "refine_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("refine_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seq", [1, 127, 128, 300])
def test_quantized_keys_within_half_a_step_of_the_keys(study, bits, seq):
    torch.manual_seed(seq * 10 + bits)
    k = (torch.randn(2, 3, seq, 16) * torch.rand(16) * 4).to(torch.bfloat16)
    deq = study.quantize_keys(k, bits, group=128)
    assert deq.shape == k.shape and torch.isfinite(deq).all()
    levels = (1 << bits) - 1
    kf = k.float()
    for start in range(0, seq, 128):
        part = kf[:, :, start:start + 128]
        lo = part.amin(2, keepdim=True).to(torch.bfloat16).float()
        hi = part.amax(2, keepdim=True).to(torch.bfloat16).float()
        step = (hi - lo) / levels
        err = (deq[:, :, start:start + 128] - part).abs()
        # half a step, plus the bf16 rounding of the range ends (values outside [lo, hi] are clamped)
        slack = step / 2 + (part.abs().amax(2, keepdim=True) * 2 ** -8)
        assert (err <= slack + 1e-6).all()
        codes = torch.round((deq[:, :, start:start + 128] - lo) / torch.where(step > 0, step, 1.0))
        assert (codes >= 0).all() and (codes <= levels).all()
        # b bits: at most 2^b distinct values per (b, h, group, channel)
        flat = deq[:, :, start:start + 128].permute(0, 1, 3, 2).reshape(-1, part.shape[2])
        assert max(len(torch.unique(row)) for row in flat) <= levels + 1


def test_constant_channel_is_exact(study):
    k = torch.full((1, 1, 200, 4), 0.75)
    k[..., 1] = torch.arange(200.0)[None, None]  # one varying channel
    deq = study.quantize_keys(k, 4, group=128)
    assert torch.equal(deq[..., 0], k[..., 0]) and torch.equal(deq[..., 2:], k[..., 2:])
    assert not torch.equal(deq[..., 1], k[..., 1])


def test_candidate_byte_accounting(study):
    exact = study.refine_info(0.25, 0, 0.25)
    assert math.isclose(exact["candidate_key_bytes"], 0.125)  # K is half of K+V
    four = study.refine_info(0.25, 4, 0.25)
    assert math.isclose(four["candidate_key_bytes"], round(0.25 * (4 / 32 + 1 / 128), 5))
    two = study.refine_info(0.3, 2, 0.3)
    assert math.isclose(two["candidate_key_bytes"], round(0.3 * (2 / 32 + 1 / 128), 5))
