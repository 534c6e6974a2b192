"""bench/plot_frontier.py: the issue-protocol points it collects from the committed results and
the table it writes (bytes of the study runs include the candidates' key bytes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("plot_frontier", ROOT / "bench" / "plot_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frontier_points_and_table(tmp_path):
    module = _load()
    points = module.collect()
    families = {p["family"] for p in points}
    assert {"oracle", "qsketch, one stage", "two-stage (CPU study)", "two-stage (library)"} <= families
    # a study run: the eval's bytes plus the candidates' key bytes recorded by refine_study.py
    path = ROOT / "bench" / "results" / "refine_q2_c30_k112_vim.json"
    data = json.loads(path.read_text())
    config = next(c for c in data["configs"] if c["name"] != "dense")
    want = config["ppl"]["vim_user_manual"]["kv_read"]["sparse_layers"] + data["refine"]["candidate_key_bytes"]
    got = [p for p in points if p["file"] == path.name]
    assert len(got) == 1 and abs(got[0]["bytes"] - want) < 1e-12 and "C 0.3, 2-bit keys" in got[0]["label"]
    # the channel-pool study runs are labelled apart from the unrestricted per-step choice
    pooled = [p for p in points if p["file"] == "refine_ch12q4_c10_k135_pool25_python.json"]
    assert len(pooled) == 1 and "among a fixed 25% by key spread" in pooled[0]["label"]
    # only the issue protocol (8k context, 1024 decoded): no 128-position run slips in
    assert all(json.loads((ROOT / "bench" / "results" / p["file"]).read_text())["settings"]["decode"] == 1024
               for p in points)
    table = module.markdown(points)
    assert table.count("\n") == 2 + len({(p["family"], p["label"]) for p in points})
    assert "| two-stage (library) | qsketch bs16 P8 refine0.5q2 topk 0.095 sum | 15.8% |" in table
    module.plot(points, tmp_path / "f")
    assert (tmp_path / "f.png").stat().st_size > 1000
