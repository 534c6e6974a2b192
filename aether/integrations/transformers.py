"""Hugging Face transformers integration: `attn_implementation="aether"` plus `AetherCache`.

Usage::

    from aether.integrations.transformers import AetherCache, register
    register()  # adds "aether" to AttentionInterface and AttentionMaskInterface
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="aether")
    cache = AetherCache(model.config, score="tight", budget=0.25, block_size=64)  # docs/accuracy.md
    model.generate(ids, past_key_values=cache)   # transformers >= 5.24 also accepts cache=cache

Prefill (more than one query token) and the dense layers (default: the first two) run torch SDPA
exactly like `attn_implementation="sdpa"`; every decode step (one query token) of the other layers
runs AETHER over the layer's `AetherKVCache`, whose block statistics are built once after prefill
and refreshed incrementally per appended token.

`score="qsketch"`: at prefill every sparse layer keeps the post-RoPE queries of the last
`sketch_queries` (256) prompt positions; at the first decode step it calibrates its rank-8 sketch
projection and centroid weight from them and the prompt's keys (`aether.calibrate_sketch`; per
row of a left-padded batch, else on the first row), builds the key sketch, and then updates it
per token like the statistics. A decode without a prefill through this cache raises.

How the attention function finds the cache: transformers never hands the cache to an attention
function, so each `AetherLayer.update` tags the key tensor it returns with its layer
(`key._aether_layer`, a weak reference); the attention function checks that the tag's layer index equals
`module.layer_idx`. A model run with `attn_implementation="aether"` but another cache (e.g. the
`DynamicCache` that `generate` creates by default) runs dense SDPA, with a one-time warning.

Padding: left-padded batches work. The padding rows are read from the attention mask the model
builds (the registered mask function is transformers' own SDPA mask); each row's valid tokens form
the range `[start_b, length)` and AETHER runs per row over exactly those tokens, so padding gets
zero weight. A mask whose valid keys are not such a suffix (padding in the middle, custom masks)
makes that decode step run dense SDPA for the layer, which is exact.

Unsupported: sliding-window or other non-full-attention layers (rejected by `AetherCache` with a
clear error), training (dense SDPA). Works with transformers 5.17 (`past_key_values=`) and newer
releases that renamed the argument `cache=`.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Iterable

import torch

from aether.cache import AetherKVCache, SparseOptions
from aether.sketch import ALLOCATION_MULTIPLIERS, allocate_budgets
from aether.models import require_eval_extra

require_eval_extra()

from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

ATTN_IMPLEMENTATION = "aether"
DEFAULT_DENSE_LAYERS = (0, 1)


class AetherLayer(DynamicLayer):
    """One decoder layer's cache: an `AetherKVCache` behind transformers' `DynamicLayer` interface."""

    def __init__(self, layer_idx: int, options: SparseOptions, sparse: bool, parent: "AetherCache") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sparse = sparse
        self._parent = weakref.ref(parent)  # weak: no reference cycle keeping caches alive
        self.kv = AetherKVCache(options)

    def parent(self) -> "AetherCache":
        """The AetherCache this layer belongs to."""
        cache = self._parent()
        if cache is None:
            raise RuntimeError("the AetherCache of this layer was garbage-collected")
        return cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new keys/values; return the layer's full keys/values (tagged with this layer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.kv.append(key_states, value_states)
        keys._aether_layer = weakref.ref(self)
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.kv.length

    def reset(self) -> None:
        self.kv = AetherKVCache(self.kv.options)
        self.keys = self.values = None
        self.is_initialized = False

    def _sync_views(self) -> None:
        if self.kv.length:
            self.keys, self.values = self.kv.keys, self.kv.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # legacy meaning: the final absolute length
            tokens_to_remove = max(self.kv.length - tokens_to_remove, 0)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.kv.truncate(max(self.kv.length - abs(tokens_to_remove), 0))
        self._sync_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv.length:
            self.kv.reindex(beam_idx)
            self._sync_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kv.length:
            self.kv.reindex(torch.as_tensor(indices, dtype=torch.int64).reshape(-1))
            self._sync_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv.length:
            rows = torch.arange(self.kv.keys.shape[0]).repeat_interleave(repeats)
            self.kv.reindex(rows)
            self._sync_views()


class AetherCache(DynamicCache):
    """A transformers cache whose layers keep AETHER block statistics; decode runs block-sparse.

    Args:
        config: the model config (number of layers, attention layout checks).
        dense_layers: layer indices that always run dense attention (default: the first two;
            the first layers of LLMs attend broadly and are cheap to keep exact).
        score, policy, budget, block_size, eps, mass, sink_blocks, recent_blocks, group_agg:
            AETHER's selection options, as in `aether.sparse_attention` (`score="oracle"` picks
            blocks by their true attention mass with the reference implementation: a study tool;
            `group_agg=None` is the library default: "sum" for qsketch with topk, else "max").
        sketch_rank, sketch_queries: score="qsketch" only: the sketch's rank and how many of the
            last prefill queries calibrate it.
        blocks_per_sketch: score="qsketch" only: blocks that share one sketch block's ranges and
            centroid (1, 2, 4, 8; 2 with block_size=32 selects 32-token blocks for the metadata
            bytes of 64-token ones, docs/selection.md).
        budget_allocation: "uniform" (every sparse layer keeps `budget`) or "layer" (qsketch, float
            budget: at the first decode step every sparse layer gets its own keep fraction, mean
            at most `budget`, from recall curves measured on the prefill queries;
            `allocate_budgets`).
        refine_candidates, refine_bits: two-stage selection (`aether.refine`, topk only): the
            score keeps `refine_candidates` (a fraction) of the blocks, `refine_bits`-bit key codes
            (2 or 4) of every key rank them, `budget` keeps the final blocks; None: one stage.
        refine_reuse: with `refine_candidates`, each decode step's final blocks join the next
            step's candidates (docs/selection.md, "Reusing the last step's final blocks").
        code_channels, code_bits: score="qcodes": the fraction of head_dim whose `code_bits`-bit
            (2 or 4) channel-major key codes score every block, chosen per step and KV head
            (None: head_dim / (2 code_bits); the defaults, 4-bit codes of an eighth of the
            channels, are the measured best; docs/selection.md).
        code_pool: score="qcodes": store the key codes of only this fraction of head_dim per KV
            head (the channels of widest key range at the prefill; the per-step choice is made
            among them). None (default): every channel; 0.5 halves the codes' memory
            (docs/selection.md, "A fixed channel pool").
        codes_behind: score="qcodes": keep the key codes one token behind the cache; each step
            scores from them (the newest token's block is forced) and brings them up to date
            after its scores (`aether.sparse_attention(..., update_codes=True)`). Compiled
            extension only.

    Raises:
        ValueError: a config with sliding-window or other non-full-attention layers, a head_dim
            AETHER does not support, or an invalid option (named in the message).
    """

    def __init__(self, config, *, dense_layers: Iterable[int] | None = DEFAULT_DENSE_LAYERS, score: str = "tight",
                 policy: str = "topk", budget: int | float = 0.25, block_size: int = 64, eps: float = 1e-3,
                 mass: float = 0.95, sink_blocks: int = 1, recent_blocks: int = 1, group_agg: str | None = None,
                 sketch_rank: int = 8, sketch_queries: int = 256, budget_allocation: str = "uniform",
                 blocks_per_sketch: int = 1, refine_candidates: float | None = None, refine_bits: int = 2,
                 refine_reuse: bool = False, code_channels: float | None = None, code_bits: int = 4,
                 code_pool: float | None = None, codes_behind: bool = False) -> None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"config must describe a decoder with num_hidden_layers >= 1, got {num_layers!r}")
        _check_supported(text_config)
        dense = set(dense_layers or ())
        bad = sorted(i for i in dense if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"dense_layers must hold layer indices in [0, {num_layers}), got {bad}")
        self.options = SparseOptions(score=score, policy=policy, budget=budget, block_size=block_size, eps=eps,
                                     mass=mass, sink_blocks=sink_blocks, recent_blocks=recent_blocks,
                                     group_agg=group_agg, sketch_rank=sketch_rank, sketch_queries=sketch_queries,
                                     budget_allocation=budget_allocation, blocks_per_sketch=blocks_per_sketch,
                                     refine_candidates=refine_candidates, refine_bits=refine_bits,
                                     refine_reuse=refine_reuse, code_channels=code_channels, code_bits=code_bits,
                                     code_pool=code_pool, codes_behind=codes_behind)
        self.dense_layers = tuple(sorted(dense))
        self._mask_memo: tuple[object, list[int] | None, bool] | None = None
        layers = [AetherLayer(i, self.options, i not in dense, self) for i in range(num_layers)]
        Cache.__init__(self, layers=layers)

    def row_layout(self, attention_mask: torch.Tensor | None, length: int) -> tuple[list[int] | None, bool]:
        """`(row starts or None, usable)` from the decode mask; memoised per mask (one per step)."""
        memo = self._mask_memo
        if memo is not None and memo[0] is attention_mask:
            return memo[1], memo[2]
        starts, usable = _row_starts(attention_mask, length)
        self._mask_memo = (attention_mask, starts, usable)
        return starts, usable

    def allocate_budgets(self, starts: list[int] | None = None) -> list[float]:
        """Give every sparse layer its own top-k fraction (`budget_allocation="layer"`).

        Each sparse layer's recall curve (mass kept by qsketch top-k at `budget` times
        `aether.sketch.ALLOCATION_MULTIPLIERS`, on its prefill queries) feeds
        `aether.sketch.allocate_budgets`; the fractions are stored in `layer.kv.budget` (mean over
        the sparse layers at most `budget`) and returned. `starts`: the decode step's row starts,
        applied to every sparse layer first (so the later per-layer call does not recalibrate).
        """
        if self.options.budget_allocation != "layer":
            raise ValueError(f"allocate_budgets needs budget_allocation='layer', got "
                             f"{self.options.budget_allocation!r}")
        budget = float(self.options.budget)
        fractions = tuple(min(1.0, budget * m) for m in ALLOCATION_MULTIPLIERS)
        sparse = [layer for layer in self.layers if layer.sparse]
        curves = []
        for layer in sparse:
            layer.kv.set_row_starts(starts)
            curves.append(layer.kv.recall_curve(fractions))
        budgets = allocate_budgets(curves, budget, ALLOCATION_MULTIPLIERS)
        for layer, fraction in zip(sparse, budgets):
            layer.kv.budget = fraction
        return budgets

    def read_fractions(self, kv_element_bytes: int = 2) -> dict[str, float]:
        """KV bytes read by decode steps so far, relative to dense attention over the same steps.

        Returns `selected` (K/V of the selected blocks, sparse layers only), `metadata` (block
        statistics, or for qsketch the key sketch (+ centroid when its weight is not 0, + the
        query projection), read by the radar, sparse layers only), `sparse_layers` (their sum) and
        `all_layers` (dense layers count as reading everything). `kv_element_bytes`: 2 for a bf16
        cache (default: the deployment case), 4 for float32.
        """
        sparse = [layer for layer in self.layers if layer.sparse]
        total = sum(layer.kv.reads.tokens_total for layer in sparse)
        if total == 0:
            return {"selected": 0.0, "metadata": 0.0, "sparse_layers": 0.0, "all_layers": 1.0}
        selected = metadata = 0.0
        for layer in sparse:
            head_dim = layer.kv.keys.shape[-1]
            part = layer.kv.reads.fractions(head_dim, self.options.score, kv_element_bytes)
            weight = layer.kv.reads.tokens_total / total
            selected += weight * part["selected"]
            metadata += weight * part["metadata"]
        sparse_fraction = selected + metadata
        n = len(self.layers)
        return {"selected": selected, "metadata": metadata, "sparse_layers": sparse_fraction,
                "all_layers": (sparse_fraction * len(sparse) + (n - len(sparse))) / n}


def _check_supported(config) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"AETHER supports full-attention layers only; this config has layer_types "
                         f"{sorted(set(layer_types))}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(f"AETHER does not support sliding-window attention (config.sliding_window="
                         f"{config.sliding_window}); run this model with attn_implementation='sdpa'")
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if head_dim is not None and (head_dim % 8 != 0 or not 8 <= head_dim <= 256):
        raise ValueError(f"AETHER needs head_dim a multiple of 8 in [8, 256], this model has {head_dim}")


def _row_starts(attention_mask: torch.Tensor | None, length: int) -> tuple[list[int] | None, bool]:
    """Per-row first valid key of a decode mask `[batch, 1, 1, kv]`; usable=False if not a suffix."""
    if attention_mask is None:
        return None, True
    mask = attention_mask[:, 0, -1, :length]
    valid = mask if mask.dtype == torch.bool else mask == 0
    counts = valid.sum(dim=-1)
    starts = length - counts
    positions = torch.arange(length, device=valid.device)[None, :]
    suffix = positions >= starts[:, None]
    usable = bool(torch.equal(valid, suffix))
    return [int(s) for s in starts.tolist()], usable


_warned_foreign_cache = False


def aether_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs):
    """The function registered as `attn_implementation="aether"` (signature of transformers' SDPA one).

    query `[batch, q_heads, q_len, head_dim]`, key/value `[batch, kv_heads, kv_len, head_dim]`;
    returns `(attn_output [batch, q_len, q_heads, head_dim], None)`.
    """
    global _warned_foreign_cache
    layer_ref = getattr(key, "_aether_layer", None)
    layer = layer_ref() if layer_ref is not None else None
    if layer is None:
        if query.shape[2] == 1 and not _warned_foreign_cache:
            warnings.warn("attn_implementation='aether' without an AetherCache runs dense SDPA; pass "
                          "past_key_values=AetherCache(model.config, ...) to generate or forward", stacklevel=2)
            _warned_foreign_cache = True
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(f"AetherCache layer {layer.layer_idx} was handed to attention module layer_idx "
                           f"{module.layer_idx}: the model must call cache.update with its own layer_idx")
    sparse = (layer.sparse and query.shape[2] == 1 and not module.training
              and not getattr(module, "sliding_window", None))
    if (layer.sparse and query.shape[2] > 1 and not module.training
            and layer.kv.options.score == "qsketch"):
        layer.kv.record_queries(query)  # the prefill queries that calibrate the layer's sketch
    if sparse:
        starts, usable = layer.parent().row_layout(attention_mask, key.shape[2])
        sparse = usable
    if not sparse:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer.kv.set_row_starts(starts)
    if layer.kv.options.budget_allocation == "layer" and layer.kv.budget is None:
        layer.parent().allocate_budgets(starts)
    out = layer.kv.attend(query[:, :, 0, :], scale=scaling)
    return out[:, None, :, :], None


def register() -> None:
    """Register "aether" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, aether_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def cache_argument(model) -> str:
    """Name of the forward argument that takes the cache: "cache" (transformers >= 5.24) or
    "past_key_values" (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
