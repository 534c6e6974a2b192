"""How fast can a GPU read scattered runs of the KV cache? (a ceiling for sparse_decode)

sparse_decode reads the selected blocks: runs of block_size * head_dim * 2 bytes (4 KiB for 16
tokens at head_dim 128, bf16) at random places of a cache far larger than L2. This times
`torch.index_select` of a random 13.5% of the runs of a 1 GiB buffer, for several run sizes, and a
contiguous copy of the same number of bytes, with CUDA events (warm-up, median of 20). Each kernel
reads and writes the bytes, so the ratio of the two is what the scattered read pattern costs.

    python3 bench/gather_bandwidth.py [--out FILE.json]
    python3 bench/gather_bandwidth.py --plot FILE.json   (writes FILE.png; no GPU needed)
"""
import argparse
import json

import torch


def time_ms(fn, iters=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.load(open(path))
    runs = [r["run_bytes"] for r in data["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(runs, [r["gather_gbps"] for r in data["rows"]], "o-", label="random runs (index_select)")
    ax.plot(runs, [r["copy_gbps"] for r in data["rows"]], "s--", label="contiguous copy, same bytes")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("run size (bytes); sparse_decode reads 4096 per 16-token block at head_dim 128")
    ax.set_ylabel("GB/s (read + write)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{data['gpu']}: {data['fraction']:.3g} of a 1 GiB buffer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.rsplit(".", 1)[0] + ".png", dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="plot a json written by --out and exit")
    ap.add_argument("--fraction", type=float, default=0.135)
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
        return
    total = 1 << 30
    src = torch.empty(total, dtype=torch.uint8, device="cuda").random_(0, 255)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for run in (256, 1024, 4096, 8192, 16384, 65536):
        table = src.view(-1, run)
        picks = torch.randperm(table.shape[0], device="cuda", generator=g)[: int(table.shape[0] * args.fraction)]
        picks, _ = picks.sort()  # ascending, as a selection lists its blocks
        out = torch.empty(picks.numel(), run, dtype=torch.uint8, device="cuda")
        nbytes = picks.numel() * run
        flat = src[:nbytes]
        dst = torch.empty_like(flat)
        t_gather = time_ms(lambda: torch.index_select(table, 0, picks, out=out))
        t_copy = time_ms(lambda: dst.copy_(flat))
        rows.append({"run_bytes": run, "bytes": nbytes, "gather_ms": t_gather, "copy_ms": t_copy,
                     "gather_gbps": 2 * nbytes / t_gather / 1e6, "copy_gbps": 2 * nbytes / t_copy / 1e6,
                     "gather_vs_copy": t_copy / t_gather})
        print(f"run {run:6d} B: gather {rows[-1]['gather_gbps']:7.0f} GB/s (read + write), contiguous copy "
              f"{rows[-1]['copy_gbps']:7.0f} GB/s, ratio {rows[-1]['gather_vs_copy']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                       "command": "python3 bench/gather_bandwidth.py", "fraction": args.fraction, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
