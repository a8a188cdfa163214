"""The device check's post-processing (homerun.bench.cost_model) and its capped-VRAM planning
(homerun.bench.capped_check), on a labelled FAKE device-check JSON (tests/fixtures/device-check-FAKE.json): no
device result is recorded here, only the arithmetic that turns one into the closing note's cost model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from homerun.bench import cost_model as cm
from homerun.bench.capped_check import CARD, TARGET, cache_share, capped_plan

FAKE = Path(__file__).parent / "fixtures" / "device-check-FAKE.json"


@pytest.fixture(scope="module")
def target():
    return cm.plan_for(TARGET)


def test_fixture_is_labelled_fake():
    doc = json.loads(FAKE.read_text())
    assert doc["fake"] is True and "NOT a device measurement" in doc["_label"]


def test_measured_parts_read_the_fixture():
    m = cm.measured_parts(json.loads(FAKE.read_text()))
    assert m["f_fp8"] == pytest.approx(2580 / 4300) and m["f_fp4"] == pytest.approx(2870 / 4300)
    assert m["f_stream"] == 0.9 and m["pinned_peak_gbps"] == 52.0
    # (1.2 - 0.25) ms over (97 - 9) launches: the tiny model's eager/whole-step difference is host launch cost
    assert m["s_per_launch"] == pytest.approx(0.95e-3 / 88)
    assert m["hybrid_launches_per_layer"] == pytest.approx(80 / 3)


def test_projection_adds_up_and_names_its_assumptions(target):
    plan, prof = target
    r = cm.project(json.loads(FAKE.read_text()), plan, prof)
    t = r["per_token_s"]
    inp = r["inputs"]
    b = inp["bytes_per_token"]
    bw = inp["gpu_bw_gbps"] * 1e9
    assert inp["gpu_bw_gbps"] == pytest.approx(1792 * 4300 / 4800)
    assert t["copy"] == pytest.approx(b["streamed"] / (56.3e9 * 0.9))
    assert t["cpu"] == pytest.approx(b["cpu"] / (60e9 * plan["predicted"]["efficiency"]["dram"]))
    assert t["copy"] == pytest.approx(t["cpu"])  # the misses re-split so both links end together
    assert t["launch"] == pytest.approx(inp["launches_per_token"] * inp["s_per_launch"])
    assert inp["launches_per_token"] == pytest.approx(80 / 3 * 43 + 1)
    total = (b["fixed"] / (bw * inp["f_fp8"]) + max(b["hits"] / (bw * inp["f_fp4"]), t["copy"], t["cpu"])
             + b["streamed"] / (bw * inp["f_fp4"]) + t["launch"])
    assert t["total"] == pytest.approx(total) and r["projected_tok_s"] == pytest.approx(1 / total)
    assert r["upper_bound_tok_s"] >= r["projected_tok_s"]
    # 30.10: the rtx5090-192gb plan with the cache's admissions bounded by its PCIe 5.0 link (hit 0.485, not 0.500)
    assert r["plan_tok_s"] == pytest.approx(30.10, abs=0.05) and r["ktransformers_tok_s"] == 20.0
    assert not any("not measured" in a for a in r["assumptions"])
    assert any("CPU experts" in a for a in r["assumptions"]) and "kernel_s" in r["formula"]


def test_missing_parts_fall_back_and_say_so(target):
    plan, prof = target
    r = cm.project({"steps": {"kernels": {"ok": False, "error": "timed out"}}}, plan, prof)
    missing = [a for a in r["assumptions"] if "not measured" in a]
    assert len(missing) >= 4 and r["projected_tok_s"] > 0


def test_unmeasured_hybrid_launches_default_to_the_standin_count(target):
    """Without the device's graphs_hybrid step, launches per layer are the stand-in's count of that same step
    (STANDIN_HYBRID_LAUNCHES, recounted by tests/test_cost_model_standin.py), named as such."""
    plan, prof = target
    doc = json.loads(FAKE.read_text())
    del doc["steps"]["graphs_hybrid"]
    r = cm.project(doc, plan, prof)
    per_token, layers = cm.STANDIN_HYBRID_LAUNCHES
    assert r["inputs"]["launches_per_token"] == pytest.approx(per_token / layers * 43 + 1)
    assert r["measured"]["hybrid_launches_per_layer"] is None
    assert any("not measured on the device" in a and "stand-in" in a for a in r["assumptions"])


def test_main_writes_the_cost_model_into_the_json(tmp_path):
    doc = tmp_path / "device-check.json"
    shutil.copy(FAKE, doc)
    assert cm.main(["--doc", str(doc)]) == 0
    out = json.loads(doc.read_text())
    assert out["fake"] is True and out["cost_model"]["profile"] == TARGET and "steps" in out


def test_capped_plan_recovers_the_32gb_card():
    """Cutting a 141 GB card down to the rtx5090 plan's expert-cache share lands on 32 GiB."""
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    prof = load_profile(TARGET)
    spec, inv = resolve_model(CARD)
    share = cache_share(plan(spec, inv, prof, PlanOptions()).to_dict())
    assert share == pytest.approx(847 / 11008)
    big = dataclasses.replace(prof, gpus=(dataclasses.replace(prof.gpu_list[0], vram_gib=141.0),))
    p, gib = capped_plan(lambda pr: plan(spec, inv, pr, PlanOptions()), big, share)
    assert p.mode == "hybrid" and gib == pytest.approx(32.0, abs=0.05)
    assert cache_share(p.to_dict()) >= share


def test_launch_cost_falls_back_to_the_aten_microbenchmark():
    doc = json.loads(FAKE.read_text())
    doc["steps"]["kernels"]["aten_launch_us"] = 4.0
    assert cm.measured_parts(doc)["s_per_launch"] == pytest.approx(0.95e-3 / 88)  # the decode-derived one first
    del doc["steps"]["graphs"]
    assert cm.measured_parts(doc)["s_per_launch"] == pytest.approx(4e-6)


def test_fake_and_tiny_runs_say_so(target):
    plan, prof = target
    r = cm.project({"tiny": True, "steps": {}}, plan, prof)
    assert r["assumptions"][0].startswith("NOT A DEVICE RUN")


def test_the_device_column_uses_the_measured_machine(target):
    plan, prof = target
    r = cm.project(json.loads(FAKE.read_text()), plan, prof)
    d, b, inp = r["per_token_s_on_device"], r["inputs"]["bytes_per_token"], r["inputs"]
    assert d["copy"] == pytest.approx(b["streamed"] / (52e9 * 0.9))
    assert d["kernel"] == pytest.approx(b["fixed"] / (4300e9 * inp["f_fp8"])
                                        + (b["hits"] + b["streamed"]) / (4300e9 * inp["f_fp4"]))
    assert d["kernel"] < r["per_token_s"]["kernel"]  # HBM is faster than the 5090's GDDR7
