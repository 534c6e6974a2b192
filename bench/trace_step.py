"""Kernel timeline of one CUDA-graph replay of a decode step (torch.profiler / CUPTI): which kernels
overlap. For the qcodes step with the append beside the decode (score "qcodes+behind") against
the serial one. Usage (GPU): python3 bench/trace_step.py [batch ctx block_size budget [scores]]
e.g. python3 bench/trace_step.py 8 32768 16 0.135 qcodes,qcodes+behind
Prints, per score, each kernel of the last replay: start and end (us from the first kernel's
start) and duration."""
import math
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_decode as bd  # noqa: E402

batch, ctx, bs = (int(x) for x in (sys.argv[1:4] if len(sys.argv) > 3 else (8, 32768, 16)))
budget = float(sys.argv[4]) if len(sys.argv) > 4 else 0.135
scores = sys.argv[5].split(",") if len(sys.argv) > 5 else ["qcodes", "qcodes+behind"]
c = bd.Case(batch, ctx, bs)
c.group_agg = "sum"
c.enable_qcodes(0.125, 4)
nb = math.ceil(budget * ctx / bs)
for score in scores:
    # the benchmark's graphs: copy i's step (step() advances c.i first)
    graphs = bd.capture_graphs(lambda i: (setattr(c, "i", i - 1), c.step(nb, score)), c.copies)
    for g in graphs * 3:
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name
                     and "Memcpy" not in e.name and "Memset" not in e.name), key=lambda e: e.time_range.start)
    n = len(events) // len(graphs)  # kernels per replay
    last = events[-n:] if n else []
    if not last:
        print(f"{score}: no kernels traced")
        continue
    t0 = last[0].time_range.start
    print(f"\n{score}: {n} kernels per replay; the last replay (us)")
    for e in last:
        name = e.name.split("(")[0].replace("void ", "").replace("aether::cuda::", "")[:40]
        print(f"  {name:40} start {e.time_range.start - t0:7.1f} end {e.time_range.end - t0:7.1f} "
              f"dur {e.time_range.end - e.time_range.start:6.1f}")
    print(f"  span {max(e.time_range.end for e in last) - t0:.1f} us")
