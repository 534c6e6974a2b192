"""Plot a bench_decode.py json: speedup over torch SDPA per shape and budget, next to the
speedup the bytes alone would allow (dense bytes / bytes read)."""

from __future__ import annotations

import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, out: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    labels = [f"{r['batch']}x{r['ctx'] // 1024}k" for r in rows]
    series = [(b.get("score", "tight"), b["fraction"]) for b in rows[0]["budgets"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (2 * len(series))
    for i, (score, frac) in enumerate(series):
        pick = [next(b for b in r["budgets"] if (b.get("score", "tight"), b["fraction"]) == (score, frac))
                for r in rows]
        got = [b.get("graph_speedup_vs_sdpa", b["speedup_vs_sdpa"]) for b in pick]
        ideal = [b["ideal_speedup"] for b in pick]
        name = "keep all" if frac >= 1.0 else f"{score} {frac:g}"
        xs = [x + (2 * i) * width for x in range(len(rows))]
        ax.bar(xs, got, width, label=f"measured (CUDA graph), {name}")
        ax.bar([x + width for x in xs], ideal, width, alpha=0.35, label=f"bytes bound, {name}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels)
    ax.set_ylabel("speedup over torch SDPA (decode step)")
    sizes = sorted({row.get("block_size", 64) for row in data["rows"]})
    blocks = "/".join(str(size) for size in sizes)
    # older jsons name blocks_per_sketch only in their command
    found = re.search(r"--blocks-per-sketch (\d+)", data.get("command", ""))
    per_sketch = data.get("blocks_per_sketch", int(found.group(1)) if found else 1)
    per = f", qsketch: {per_sketch} blocks per sketch block" if per_sketch != 1 else ""
    ax.set_title(f"AETHER decode step vs SDPA, {data['gpu']}, 32q/8kv d128 bf16, {blocks}-token blocks{per}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
