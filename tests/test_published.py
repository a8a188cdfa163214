"""The published-measurement table (benchmarks/published.json, issue 17) and the planner checked against it."""

from __future__ import annotations

import functools

import pytest

from homerun.plan.inventory import resolve_model
from homerun.plan.validate import (
    HYBRID_MODES,
    MODES,
    applicable,
    compare_row,
    load_table,
    row_problems,
    row_profile,
)

ROWS = load_table()
APPLICABLE = applicable(ROWS)
BY_ID = {r["id"]: r for r in APPLICABLE}

# Hybrid rows the planner gets wrong by more than 3x, each with the measured reason (strict xfail: a model change
# that brings one within 3x must flip it, and nothing is tuned to pass). Empty since rows are planned under their
# runtime's own expert placement: llmgarage (llama.cpp --n-cpu-moe 26) went from 3.54x (the planner's placement,
# 57 % of experts in VRAM) to 1.58x (the source's, 28 %).
BEYOND_3X_UNEXPLAINED: dict[str, str] = {}


@functools.cache
def _compare(row_id: str):
    return compare_row(BY_ID[row_id])


def test_table_has_enough_rows():
    assert len(ROWS) >= 15
    assert len(APPLICABLE) >= 10
    assert len({r["id"] for r in ROWS}) == len(ROWS), "row ids must be unique"


def test_admission_rule_a_row_without_stated_precision_is_never_applicable():
    from homerun.plan.validate import admissible
    row = dict(next(r for r in ROWS if r["id"] == "kt-doc-gptoss120b-llamaserver-5090-9900x"))
    assert admissible(row) and applicable([row]) == [row] and row_problems(row) == []
    for unstated in (None, "", "   "):
        bad = {**row, "precision_stated": unstated}
        assert not admissible(bad)
        assert applicable([bad]) == []  # not even with exclude=false
        assert any("precision_stated" in p for p in row_problems(bad))
    missing = {k: v for k, v in row.items() if k != "precision_stated"}
    assert applicable([missing]) == [] and "missing 'precision_stated'" in row_problems(missing)
    from homerun.plan.validate import excluded
    left = excluded([row, {**row, "id": "unstated", "precision_stated": None}])
    assert [e["id"] for e in left] == ["unstated"] and "precision_stated" in left[0]["reason"]


def test_every_row_records_precision_stated_and_unstated_rows_are_excluded_with_evidence():
    for r in ROWS:
        assert "precision_stated" in r, r["id"]
        if not r["precision_stated"]:
            assert r["exclude"] and "precision not stated" in r["exclude_reason"], r["id"]
    hwc = next(r for r in ROWS if r["id"] == "hwc-gptoss120b-3090-epyc7343-64gb")
    assert hwc["precision_stated"] is None and hwc not in APPLICABLE
    assert "refutes page-cache thrash" in hwc["notes"] and "10-17 tok/s" in hwc["notes"]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r["id"])
def test_row_schema(row):
    assert row_problems(row) == []
    assert row["mode"] in MODES
    if row["exclude"]:
        assert row["exclude_reason"]


@pytest.mark.parametrize("row", APPLICABLE, ids=lambda r: r["id"])
def test_applicable_row_profile_and_model(row):
    assert row["source_url"].startswith("https://")
    assert row["decode_tok_s"] > 0
    prof = row_profile(row)  # raises ProfileError on a bad key or value
    assert prof.cpu.mem_bw_gbps > 0
    spec, inv = resolve_model(row["homerun_model"])
    assert inv.routed_expert_bytes > 0 and spec.active_experts_per_token > 0


@pytest.mark.parametrize("row_id", list(BY_ID))
def test_upper_bound_covers_measured(row_id):
    c = _compare(row_id)
    assert c.fits, c.verdict
    assert c.upper_bound is not None and c.upper_bound >= c.measured_high, (
        f"{row_id}: bound {c.upper_bound} < measured {c.measured_high}")


def test_hybrid_estimates_within_2x_on_80_percent():
    hybrid = [i for i, r in BY_ID.items() if r["mode"] in HYBRID_MODES]
    assert len(hybrid) >= 5
    ratios = {i: _compare(i).ratio for i in hybrid}
    inside = [i for i, r in ratios.items() if r is not None and 0.5 <= r <= 2.0]
    assert len(inside) >= 0.8 * len(hybrid), ratios


@pytest.mark.parametrize("row_id", [
    pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=BEYOND_3X_UNEXPLAINED[i]))
    if i in BEYOND_3X_UNEXPLAINED else i
    for i, r in BY_ID.items() if r["mode"] in HYBRID_MODES])
def test_hybrid_estimate_within_3x(row_id):
    r = _compare(row_id).ratio
    assert r is not None and 1 / 3 <= r <= 3.0, f"{row_id}: estimate/measured {r}"


def test_row_options_reach_the_planner():
    from homerun.plan.validate import row_inventory, row_options
    assert row_options(BY_ID["moe-infinity-mixtral-fp16-a5000"]).cpu_experts is False
    row = BY_ID["spark-arena-gptoss120b-vllm"]
    _, inv = resolve_model(row["homerun_model"])
    req = row_inventory(row, inv)
    assert req.bytes_by_class["attn"] == int(inv.params_by_class["attn"] * 4.25 / 8)
    assert req.non_expert_bytes < inv.non_expert_bytes and req.routed_expert_bytes == inv.routed_expert_bytes


def test_every_row_records_the_runtime_s_expert_placement_as_stated():
    from homerun.plan.validate import placement_problems
    stated = {r["id"]: r for r in ROWS if r["expert_placement"] != "unstated"}
    for r in ROWS:
        assert placement_problems(r) == [], r["id"]
    # the rows whose sources state a placement, each quoting the words that state it
    assert {i: r["expert_placement"] for i, r in stated.items()} == {
        "kt-doc-gptoss120b-llamaserver-5090-9900x": {"kind": "cpu_moe_layers", "layers": 22},
        "hwc-gptoss120b-3090-epyc7343-64gb": {"kind": "cpu_moe_layers", "layers": 27},
        "llmgarage-gptoss120b-2x3090-5800x-64gb": {"kind": "cpu_moe_layers", "layers": 26},
        "reddit-gptoss120b-14900k-8gbgpu-cpumoe": {"kind": "cpu_moe_layers", "layers": 36},
        "reddit-gptoss120b-epyc9b14-cpu-only": {"kind": "all_cpu"},
        "kt-doc-v4flash-8x5090-tp8": {"kind": "gpu_experts_per_layer", "experts": 144},
        "kt-doc-v4flash0731-1x5090-20plus": {"kind": "gpu_experts_per_layer", "experts": 10}}
    for i, r in stated.items():
        n = r["expert_placement"].get("layers", r["expert_placement"].get("experts"))
        assert n is None or str(n) in r["expert_placement_stated"], i
    assert "--n-cpu-moe 26" in stated["llmgarage-gptoss120b-2x3090-5800x-64gb"]["expert_placement_stated"]
    assert "--kt-num-gpu-experts 10" in stated["kt-doc-v4flash0731-1x5090-20plus"]["expert_placement_stated"]


@pytest.mark.parametrize("bad, problem", [
    ({"expert_placement": {"kind": "n_gpu_layers", "layers": 3}}, "must be"),
    ({"expert_placement": {"kind": "cpu_moe_layers", "layers": -2}}, "non-negative integer 'layers'"),
    ({"expert_placement": {"kind": "gpu_experts_per_layer"}}, "non-negative integer 'experts'"),
    ({"expert_placement_stated": None}, "needs expert_placement_stated"),
    ({"expert_placement": "unstated"}, "quotes a text"),
])
def test_placement_field_problems_are_reported(bad, problem):
    row = {**BY_ID["llmgarage-gptoss120b-2x3090-5800x-64gb"], **bad}
    assert any(problem in p for p in row_problems(row)), row_problems(row)


def test_rows_are_planned_under_their_stated_placement_and_the_table_shows_it():
    import importlib.util
    import pathlib

    from homerun.plan.validate import row_options
    row = BY_ID["llmgarage-gptoss120b-2x3090-5800x-64gb"]
    assert row_options(row).expert_placement.cpu_moe_layers == 26
    assert row_options(BY_ID["freetoken444-v4flash-5090-epyc-rome"]).expert_placement is None
    c = _compare(row["id"])
    assert c.placement == "cpu-moe 26L"
    # by hand (row notes): 10 of 36 layers' experts in VRAM; 26 x 4 x 13,236,480 B per token on the CPU at
    # 40 x 0.65 GB/s = 52.9 ms, plus fixed GPU reads, per-layer overhead and handoff: ~63.4 ms -> 15.8 tok/s
    assert c.hit_rate == pytest.approx(10 / 36)
    assert c.estimate == pytest.approx(15.8, abs=0.1) and 1.5 < c.ratio < 1.6
    assert c.upper_bound == pytest.approx(40e9 / (26 * 4 * 13_236_480)) and c.bound_ok
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "validate_plans.py"
    spec = importlib.util.spec_from_file_location("validate_plans", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = mod.format_table([c, _compare("freetoken444-v4flash-5090-epyc-rome")])
    head, _, llm, ft = table.splitlines()
    assert "placement" in head.split() and "cpu-moe 26L" in llm and " planner " in ft
