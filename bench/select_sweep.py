"""Times torch.ops.aether.select_blocks alone (topk, keep 0.135, 32 query / 8 KV heads, random scores)
for the shapes given, as a CUDA graph of 20 launches (median of 30 replays, per launch): for
comparing the selection kernels. AETHER_SELECT_CLUSTER picks the kernel (0: one CTA per row;
1, 2, 4, 8: that many CTAs per row; unset: the launcher's choice); it is read once per process.
Usage: python3 bench/select_sweep.py [--block-size 16] [--agg sum] 8x32768 1x32768 ..."""

import argparse
import json
import math
import os
import statistics
import sys

import torch

import aether  # noqa: F401  (loads the operators)


def time_select(batch: int, ctx: int, bs: int, agg: str) -> float:
    nb = math.ceil(ctx / bs)
    scores = torch.randn(batch, 32, nb, device="cuda") * 3
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.zeros(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    keep = math.ceil(0.135 * nb)

    def step():
        return torch.ops.aether.select_blocks(q, scores, lens, 8, bs, "topk", keep, 0.0, 0.95, 1, 0, 1, 1, agg)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            step()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shapes", nargs="+")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--agg", default="sum", choices=["sum", "max"])
    parser.add_argument("--out", help="append the results to this json file (a list of runs)")
    args = parser.parse_args()
    mode = os.environ.get("AETHER_SELECT_CLUSTER") or "auto"
    results = {}
    for shape in args.shapes:
        batch, ctx = (int(x) for x in shape.split("x"))
        us = time_select(batch, ctx, args.block_size, args.agg)
        results[shape] = round(us, 2)
        print(f"select {args.agg} {shape} bs{args.block_size} cluster={mode}: {us:.1f} us")
    if args.out:
        runs = []
        if os.path.exists(args.out):
            with open(args.out) as f:
                runs = json.load(f)
        runs.append({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "command": f"AETHER_SELECT_CLUSTER={os.environ.get('AETHER_SELECT_CLUSTER', '')} python3 "
                                + " ".join(sys.argv),
                     "cluster": mode, "agg": args.agg, "block_size": args.block_size, "us_per_select": results})
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
