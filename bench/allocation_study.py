"""Offline study behind docs/selection.md "Per-layer budgets": per sparse layer of SmolLM2 (8k
prefill of a shipped text), the mass qsketch top-k recalls on the last 64 prefill queries at
budget x multipliers, and what the greedy per-layer allocation recalls at the same mean.

Usage: python bench/allocation_study.py vim_user_manual 8192   (writes bench/results/allocation_curves_<text>_<ctx>.json)
"""
import json
import sys
import time

import torch

from aether import eval as ev, sketch as sk
from aether.models import load_smollm2

torch.set_num_threads(1)
text = sys.argv[1]; ctx = int(sys.argv[2]); nq = 64
tok, model = load_smollm2("aether")
settings = ev.EvalSettings(context=ctx, scores=("qsketch",), dense_layers=(0, 1))
runner = ev.Runner(model, settings)
ids = ev.load_text_ids(tok, text, ctx)
t0 = time.time()
cache, _ = runner.prefill(ids)
print("prefill", time.time() - t0, flush=True)
base = 0.125
mults = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
curves = {}
for layer in cache.layers:
    if not layer.sparse:
        continue
    kv = layer.kv
    q_all, end = kv.prefill_queries
    k = kv.keys[0, :, :end]
    q = q_all[0, :, -256:]
    calib = sk.calibrate_sketch(k, q, budget=base, max_queries=nq)
    rec = sk.recall_curve(k, q, calib, block_size=64, fractions=tuple(min(1.0, base * m) for m in mults),
                          max_queries=nq)
    curves[layer.layer_idx] = rec
    print(layer.layer_idx, calib.centroid_weight, [round(r, 3) for r in rec], flush=True)
out = {"text": text, "ctx": ctx, "budget": base, "mults": mults, "curves": curves}
names = list(curves)
budgets = sk.allocate_budgets([curves[n] for n in names], base, tuple(mults))
picked = {n: min(range(len(mults)), key=lambda i: abs(base * mults[i] - b)) for n, b in zip(names, budgets)}
uni = sum(curves[n][mults.index(1.0)] for n in names) / len(names)
alloc = sum(curves[n][picked[n]] for n in names) / len(names)
print("uniform recall", round(uni, 4), "missed", round(1 - uni, 4))
print("greedy  recall", round(alloc, 4), "missed", round(1 - alloc, 4), "mean fraction", sum(budgets) / len(budgets))
out.update(uniform_recall=uni, greedy_recall=alloc, greedy_multipliers={n: mults[picked[n]] for n in names})
json.dump(out, open(f"bench/results/allocation_curves_{text}_{ctx}.json", "w"), indent=1)
