"""The planner on the shipped cards and profiles: placement, context, speed physics, and the `plan` command."""

import json
import math

import pytest

from homerun.plan.inventory import resolve_model
from homerun.plan.planner import (RAMP_TOKENS, PlanOptions, assumed_hit_rate, best_miss_split, distributed_launch, plan)
from profiles import GIB, list_profiles, load_profile


def _plan(model, profile, **opts):
    spec, inv = resolve_model(model)
    return spec, inv, plan(spec, inv, load_profile(profile), PlanOptions(**opts))


def run_cli(capsys, *args):
    from homerun.cli.app import app

    with pytest.raises(SystemExit) as exc:
        app(args=list(args), prog_name="homerun")
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_flash_on_rtx5090_fits_with_experts_in_host_ram():
    spec, inv, p = _plan("deepseek-ai/DeepSeek-V4-Flash", "rtx5090-192gb")
    assert p.fits and p.mode == "hybrid"
    host = [r for r in p.placement if r.device == "host"]
    assert sum(r.bytes for r in host) == inv.routed_expert_bytes  # the primary copy, all of it, at stored precision
    gpu_weights = [r for r in p.placement if r.device == "gpu0" and not r.what.startswith(("KV", "GPU expert cache"))]
    assert sum(r.bytes for r in gpu_weights) == inv.non_expert_bytes
    cache = [r for r in p.placement if r.what.startswith("GPU expert cache")]
    assert cache and cache[0].bytes % inv.bytes_per_expert == 0
    assert p.context["max_tokens"] == 1048576
    assert all(step["fits"] for step in p.context["ramp"])
    assert [s["tokens"] for s in p.context["ramp"]] == list(RAMP_TOKENS)
    assert p.context["think_max_available"]
    assert p.context["kv_bytes_per_token"] == 6880
    for d in p.devices:
        assert d.used_bytes <= d.capacity_bytes, d.name
    assert all(x["reason"] for x in p.decisions) and all(r.reason for r in p.placement)


def test_flash_fp8_kv_option():
    _, _, p = _plan("v4-flash", "rtx5090-192gb", kv_dtype="fp8")
    assert p.context["kv_bytes_per_token"] == 3850.25


def test_pro_on_rtx5090_does_not_fit_and_names_the_ram_shortfall(capsys):
    spec, inv, p = _plan("deepseek-ai/DeepSeek-V4-Pro", "rtx5090-192gb")
    assert not p.fits and p.mode == "none"
    need = f"needs {inv.routed_expert_bytes / GIB:.0f} GiB of host RAM for experts"
    assert p.remedy.startswith(need) and "the profile has 192 GiB" in p.remedy
    code, out, err = run_cli(capsys, "plan", "deepseek-ai/DeepSeek-V4-Pro", "--hw", "rtx5090-192gb", "--json")
    assert code == 3
    doc = json.loads(out)  # exactly one JSON document, even when it does not fit
    assert doc["fits"] is False and doc["remedy"] == p.remedy
    assert "host RAM" in err and err.startswith("Error:")
    assert doc["distributed"]["options"], "no shipped profile holds Pro: expect a distributed launch"


def test_distributed_launch_is_sized_from_the_model_bytes():
    spec, inv = resolve_model("v4-pro")
    d = distributed_launch(spec, inv)
    for opt in d["options"]:
        mem = 141e9 if "H200" in opt["gpu"] else 80e9
        assert opt["gpus"] * mem * 0.9 >= d["needed_bytes"] >= inv.total_bytes
        assert opt["gpus"] & (opt["gpus"] - 1) == 0  # power of two
        assert opt["tensor_parallel"] * opt["pipeline_parallel"] == opt["gpus"]
        assert f"--tensor-parallel-size {opt['tensor_parallel']}" in opt["vllm"]
        assert f"--ep-size {opt['expert_parallel']}" in opt["sglang"]


def test_flash_on_m3_ultra_fits_in_unified_memory():
    _, inv, p = _plan("deepseek-ai/DeepSeek-V4-Flash", "m3-ultra-512gb")
    assert p.fits and p.mode == "unified"
    assert {r.device for r in p.placement} == {"unified"}
    (dev,) = p.devices
    assert dev.margins["outside_gpu_limit"] == (512 - 384) * GIB  # the Mac wired limit is a margin
    assert p.predicted["expert_cache_hit_rate"] == 1.0


def test_flash_on_3xh100_is_all_in_vram():
    spec, inv, p = _plan("deepseek-ai/DeepSeek-V4-Flash", "3xh100")
    assert p.fits and p.mode == "all-vram"
    assert not [r for r in p.placement if r.device == "host" and r.bytes]
    host = next(d for d in p.devices if d.kind == "host")
    assert host.used_bytes == sum(host.margins.values())  # nothing but the OS reserve
    routed = [r for r in p.placement if r.what.startswith("routed experts, layers")]
    assert {r.device for r in routed} == {"gpu0", "gpu1", "gpu2"}
    assert sum(r.bytes for r in routed) == pytest.approx(inv.routed_expert_bytes, abs=3)
    assert "VRAM" in p.verdict and "no experts in host RAM" in p.verdict


def test_layers_are_split_across_gpus():
    spec, _, p = _plan("v4-flash", "2xh100")
    spans = [r.what.split(":")[0] for r in p.placement if r.what.startswith("layers ")]
    ranges = [tuple(map(int, s.removeprefix("layers ").split("-"))) for s in spans]
    assert ranges[0][0] == 0 and ranges[-1][1] == spec.num_layers - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("model,profile", [("v4-flash", "rtx5090-192gb"), ("v4-flash", "epyc-4090"),
                                           ("gpt-oss", "rtx4090-128gb"), ("v4-flash", "3xh100"),
                                           ("qwen3-30b", "m3-ultra-512gb")])
def test_decode_bound_is_recomputed_from_the_plans_own_bytes_and_bandwidths(model, profile):
    _, inv, p = _plan(model, profile)
    pred = p.predicted
    b = pred["bytes_per_token"]
    h, f = pred["expert_cache_hit_rate"], pred["miss_pcie_fraction"]
    miss = (1 - h) * b["experts"]
    links = {x["name"]: x for x in pred["links"]}
    local = links.get("vram") or links.get("unified")
    assert local["bytes_per_token"] == pytest.approx(b["resident"] + b["kv_read"] + h * b["experts"] + f * miss)
    if miss:
        assert links["dram"]["bytes_per_token"] == pytest.approx((1 - f) * miss)
        assert links["pcie"]["bytes_per_token"] == pytest.approx(f * miss)
    t = max(x["bytes_per_token"] / (x["gbps"] * 1e9) for x in pred["links"])
    assert pred["decode_tok_s_upper_bound"] == pytest.approx(1 / t)
    assert pred["decode_tok_s"] < pred["decode_tok_s_upper_bound"]
    assert b["experts"] == inv.bytes_per_expert * p.model["active_experts_per_token"]


def test_best_miss_split_is_optimal():
    fixed, m, v, pc, d = 0.004, 2.5e9, 1792, 56.3, 60.0

    def t(f):
        return max(fixed + f * m / (v * 1e9), f * m / (pc * 1e9), (1 - f) * m / (d * 1e9))

    best = best_miss_split(fixed, m, v, pc, d)
    assert all(t(best) <= t(i / 1000) + 1e-12 for i in range(1001))
    assert best_miss_split(fixed, m, v, 0.0, d) == 0.0  # no PCIe: CPU computes every miss


def test_hit_rate_assumption_and_override():
    assert assumed_hit_rate(0, 100) == 0.0 and assumed_hit_rate(100, 100) == 1.0
    assert assumed_hit_rate(10, 100) > 0.10  # skewed routing beats uniform
    _, _, p = _plan("v4-flash", "rtx5090-192gb", hit_rate=0.9)
    _, _, q = _plan("v4-flash", "rtx5090-192gb", hit_rate=0.1)
    assert p.predicted["expert_cache_hit_rate"] == 0.9
    assert p.predicted["decode_tok_s_upper_bound"] > q.predicted["decode_tok_s_upper_bound"]


def test_disk_tier_when_ram_is_short():
    _, _, p = _plan("v4-flash", "rtx4090-128gb")
    assert not p.fits and "host RAM" in p.remedy
    _, _, d = _plan("v4-flash", "rtx4090-128gb", allow_disk=True)
    assert d.fits and d.mode == "disk-mmap" and "slow" in d.verdict
    assert any(x["name"] == "disk" for x in d.predicted["links"])
    assert any(r.device == "disk" and r.bytes > 0 for r in d.placement)


def test_ramp_is_monotone_and_max_context_consistent():
    for model in ("v4-flash", "v3", "qwen3-235b"):
        spec, _, p = _plan(model, "epyc-4090")
        fits = [s["fits"] for s in p.context["ramp"]]
        assert fits == sorted(fits, reverse=True)
        for s in p.context["ramp"]:
            assert s["fits"] == (s["tokens"] <= p.context["max_tokens"])


def test_fp8_kv_extends_a_kv_limited_context():
    _, _, bf16 = _plan("v3", "epyc-4090")
    _, _, fp8 = _plan("v3", "epyc-4090", kv_dtype="fp8")
    assert fp8.context["max_tokens"] > bf16.context["max_tokens"]


def test_planner_is_pure():
    spec, inv = resolve_model("v4-flash")
    prof = load_profile("rtx5090-192gb")
    assert plan(spec, inv, prof).to_dict() == plan(spec, inv, prof).to_dict()


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_plans_flash_with_a_complete_record(profile):
    _, _, p = _plan("v4-flash", profile)
    doc = p.to_dict()
    for key in ("fits", "model", "context", "predicted", "placement", "devices", "cpu_kernel"):
        assert key in doc
    for key in ("total_bytes", "routed_expert_bytes", "bytes_per_expert", "non_expert_bytes"):
        assert isinstance(doc["model"][key], int)
    for key in ("decode_tok_s", "decode_tok_s_upper_bound", "prefill_tok_s"):
        assert key in doc["predicted"]
    assert (doc["remedy"] is None) == doc["fits"]


def test_plan_json_command_and_unknown_model(capsys):
    code, out, _ = run_cli(capsys, "plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", "rtx5090-192gb", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["fits"] and doc["context"]["think_max_available"]
    assert math.isfinite(doc["predicted"]["decode_tok_s"]) and doc["predicted"]["prefill_tok_s"] > 0
    code, out, err = run_cli(capsys, "plan", "no-such-model", "--hw", "rtx5090-192gb")
    assert code == 2 and "no-such-model" in err and out == ""


def test_plan_human_output_has_the_sections(capsys):
    code, out, _ = run_cli(capsys, "plan", "v4-flash", "--hw", "rtx5090-192gb")
    assert code == 0
    for text in ("FITS", "Memory", "Placement", "Context", "Speed", "decode", "prefill", "CPU expert kernel"):
        assert text in out, text
