"""Quality vs bytes read under the issue-5 protocol (SmolLM2-135M, 8k context, the last 1024
tokens decoded): every committed eval json of that protocol, one point per (configuration,
text), and a markdown table of them. Bytes = K/V of the selected blocks + every metadata byte read (sparse layers); for the
two-stage *study* jsons (bench/refine_study.py) the candidates' key bytes recorded in the json
are added (and, for its attend-with-codes runs, the K bytes the codes replaced are taken off; for
its --tail runs, one bf16 value mean per span of every candidate; for its runs with every block a
candidate, C = 1, the sketch's metadata is taken off: nothing reads it), as that script's docstring says. Writes a png, a json of the points and a markdown table.

Usage: python bench/plot_frontier.py [--out bench/results/selection_frontier_1024]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXTS = {"vim_user_manual": "vim", "python_language_reference": "python", "gnu_gpl3_lgpl3": "GPL"}


def family(name: str, study: bool) -> str:
    """The method family a configuration belongs to (one marker each)."""
    if name.startswith("oracle"):
        return "oracle"
    if study:
        return "two-stage (CPU study)"
    if name.startswith("qcodes"):
        return "qcodes (library)"
    if "refine" in name:
        return "two-stage (library)"
    if name.startswith("tight"):
        return "tight"
    return "qsketch, one stage"


def collect() -> list[dict]:
    points = []
    for path in sorted(glob.glob(str(RESULTS / "*.json"))):
        data = json.loads(Path(path).read_text())
        settings = data.get("settings", {}) if isinstance(data, dict) else {}
        if settings.get("decode") != 1024 or settings.get("context") != 8192:
            continue
        refine = data.get("refine")
        extra = refine["candidate_key_bytes"] if refine else 0.0
        if refine and refine.get("tail"):  # value means of the candidates' spans, D bf16 per span
            extra += refine["candidate_token_fraction"] / (2 * refine["tail_tokens"])
        # --attend-with-codes: the final blocks' K was read as codes, not bf16 (refine_study.py)
        saved = 0.5 - refine["key_bits"] / 32 - 1 / 128 if refine and refine.get("attend_with_codes") else 0.0
        for config in data.get("configs", []):
            if config["name"] == "dense" or "ppl" not in config:
                continue
            for text, item in config["ppl"].items():
                kv = item.get("kv_read", config.get("kv_read"))
                if text not in TEXTS or kv is None:
                    continue
                label = config["name"]
                # C = 1: every block is a candidate, the sketch ranks nothing and need not be read
                unused = kv["metadata"] if refine and refine["candidates"] >= 1.0 else 0.0
                if refine:
                    keys = f"{refine['key_bits']}-bit keys" if refine["key_bits"] else "exact keys"
                    if refine.get("key_channels"):  # codes of the query's heaviest channels only
                        every = refine.get("channel_refresh", 1)
                        when = "per step" if every == 1 else f"every {every} steps"
                        pool = refine.get("channel_pool")
                        among = f", among a fixed {100 * pool:g}% by key spread" if pool else ""
                        keys += f" of {100 * refine['key_channels']:g}% of the channels ({when}, for the query{among})"
                    codes = ", attention with the codes" if refine.get("attend_with_codes") else ""
                    if refine.get("debias"):
                        codes += ", debiased"
                    if refine.get("final_mass"):
                        codes += f", adaptive final blocks at mass {refine['final_mass']:g}"
                    if refine.get("final_agg"):
                        codes += f", final top-k by the {refine['final_agg']} union of the heads' rankings"
                    if refine.get("reuse"):
                        codes += ", the last step's final blocks join the candidates"
                    if refine.get("tail"):
                        codes += f", tail {refine['tail']} / {refine['tail_tokens']}-token value means"
                    label += f" [study: C {refine['candidates']:g}, {keys}{codes}]"
                points.append(dict(file=Path(path).name, config=config["name"], label=label, text=TEXTS[text],
                                   family=family(config["name"], refine is not None),
                                   bytes=kv["sparse_layers"] + extra - saved * kv["selected"] - unused,
                                   ppl_change=item["ppl_change"],
                                   top1=item["top1_agreement"], kl=item.get("kl")))
    return points


def plot(points: list[dict], out: Path) -> None:
    markers = {"oracle": "*", "tight": "s", "qsketch, one stage": "o", "two-stage (CPU study)": "^",
               "two-stage (library)": "D", "qcodes (library)": "P"}
    library = ("two-stage (library)", "qcodes (library)")
    colors = {"vim": "tab:blue", "python": "tab:orange", "GPL": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "top1", "top-1 agreement with dense"),
                           (axes[1], "ppl_change", "perplexity change vs dense")):
        for p in points:
            ax.scatter(100 * p["bytes"], 100 * p[key], marker=markers[p["family"]], color=colors[p["text"]],
                       s=70 if p["family"] in library else 40, alpha=0.8,
                       edgecolors="black" if p["family"] in library else "none")
        ax.axvline(16, color="gray", ls="--", lw=1)
        ax.axhline(92 if key == "top1" else 1, color="gray", ls=":", lw=1)
        ax.set_xlabel("KV bytes read per step, % of dense (selected + metadata, sparse layers)")
        ax.set_ylabel(label + " (%)")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-2, 15)
    handles = [plt.Line2D([], [], marker=m, ls="", color="gray", label=f) for f, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in colors.items()]
    axes[0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M, 8k context, last 1024 tokens decoded; goal: <= 16% of the bytes (dashed), "
                 "top-1 >= 92% and perplexity <= +1% (dotted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def markdown(points: list[dict]) -> str:
    """One row per (family, configuration): bytes and ppl / top-1 / KL per text."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for p in points:
        rows.setdefault((p["family"], p["label"]), {})[p["text"]] = p
    lines = ["| family | configuration | KV read | vim: ppl / top-1 / KL | python | GPL |", "|---|---|---|---|---|---|"]
    for (fam, label), by_text in sorted(rows.items(), key=lambda kv: (kv[0][0], min(p["bytes"] for p in kv[1].values()))):
        lo = min(p["bytes"] for p in by_text.values())
        hi = max(p["bytes"] for p in by_text.values())
        span = f"{100 * lo:.1f}%" if hi - lo < 0.0005 else f"{100 * lo:.1f}-{100 * hi:.1f}%"
        cells = []
        for text in TEXTS.values():
            p = by_text.get(text)
            kl = f" / {p['kl']:.3f}" if p and p.get("kl") is not None else ""
            cells.append(f"{100 * p['ppl_change']:+.2f}% / {100 * p['top1']:.1f}%{kl}" if p else "")
        lines.append(f"| {fam} | {label} | {span} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "selection_frontier_1024")
    args = parser.parse_args()
    points = collect()
    plot(points, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(points))
    for p in sorted(points, key=lambda p: (p["family"], p["text"], p["bytes"])):
        print(f"{p['family']:24} {p['text']:7} {100 * p['bytes']:5.1f}%  ppl {100 * p['ppl_change']:+6.2f}%  "
              f"top-1 {100 * p['top1']:5.1f}%  {p['config']}")
    print(f"wrote {args.out.with_suffix('.png')}, .json and .md ({len(points)} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
