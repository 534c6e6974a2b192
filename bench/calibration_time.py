"""Time aether.calibrate_sketch per sparse layer of SmolLM2-135M after an 8k dense prefill of a
shipped text (CPU, one thread); writes bench/results/calibration_time_<text>_<ctx>.json.

Usage: python bench/calibration_time.py [text] [context]
"""

import json
import sys
import time

import torch

from aether import eval as ev
from aether import sketch as sk
from aether.models import load_smollm2

text = sys.argv[1] if len(sys.argv) > 1 else "vim_user_manual"
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
torch.set_num_threads(1)
tokenizer, model = load_smollm2("aether")
runner = ev.Runner(model, ev.EvalSettings(context=ctx, scores=("qsketch",), dense_layers=(0, 1)))
cache, _ = runner.prefill(ev.load_text_ids(tokenizer, text, ctx))
seconds = {}
for layer in cache.layers:
    if layer.sparse:
        queries, end = layer.kv.prefill_queries
        start = time.perf_counter()
        sk.calibrate_sketch(layer.kv.keys[0, :, :end], queries[0, :, -256:])
        seconds[layer.layer_idx] = time.perf_counter() - start
result = {"text": text, "context": ctx, "torch": torch.__version__, "threads": 1,
          "command": "python bench/calibration_time.py " + " ".join(sys.argv[1:]),
          "seconds_per_layer": seconds, "total_seconds": sum(seconds.values())}
path = f"bench/results/calibration_time_{text}_{ctx}.json"
with open(path, "w") as f:
    json.dump(result, f, indent=1)
values = sorted(seconds.values())
print(f"per layer: min {values[0]:.3f} median {values[len(values) // 2]:.3f} max {values[-1]:.3f} s, "
      f"total {result['total_seconds']:.1f} s -> {path}")
