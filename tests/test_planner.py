"""The planner on the shipped cards and profiles: placement, context, speed physics, and the `plan` command."""

import json
import math

import pytest

from homerun.plan.inventory import resolve_model
from homerun.plan.planner import (RAMP_TOKENS, PlanOptions, best_miss_split, distributed_launch, plan)
from homerun.plan.priors import hit_rate_prior
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
    gpu_weights = [r for r in p.placement if r.device == "gpu0" and not r.what.startswith(("KV", "decode graphs", "GPU expert cache", "prefill staging", "expert slot table"))]
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
    assert dev.margins["host_reserve"] == 16 * GIB  # the CPU runs it: RAM less the host reserve (not the wired limit)
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
    local = links.get("vram") or links.get("dram")  # a unified plan runs on the CPU: its one link is the DRAM
    tp = pred["tensor_parallel"]  # each of tp GPUs reads its 1/tp share at once
    assert local["bytes_per_token"] == pytest.approx((b["resident"] + b["kv_read"] + h * b["experts"]) / tp + f * miss)
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


def test_hit_rate_prior_and_override():
    mixtral, _ = resolve_model("mistralai/Mixtral-8x7B-v0.1")
    qwen, _ = resolve_model("Qwen/Qwen3-30B-A3B")
    flash, _ = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    assert hit_rate_prior(qwen, 0)[0] == 0.0
    assert hit_rate_prior(qwen, qwen.routed_experts_total)[0] == pytest.approx(1.0)
    # the routing model's own calibration: 512 experts, top-10, per-layer LRU-64 ~67 %, LRU-128 ~81 % (#27861)
    from dataclasses import replace
    fine = replace(qwen, n_routed_experts=512, experts_per_tok=10)
    assert hit_rate_prior(fine, 64 * fine.moe_layers)[0] == pytest.approx(0.67, abs=0.02)
    assert hit_rate_prior(fine, 128 * fine.moe_layers)[0] == pytest.approx(0.81, abs=0.02)
    # a coarse MoE gains less from the same cache fraction than a fine-grained one; both beat uniform routing
    h_mix = hit_rate_prior(mixtral, round(0.15 * mixtral.routed_experts_total))[0]
    h_qwen = hit_rate_prior(qwen, round(0.15 * qwen.routed_experts_total))[0]
    assert 0.15 < h_mix < 0.39 < h_qwen  # 0.39 was the old (fraction)^0.5 for Mixtral
    # hash-routed layers (V4's first num_hash_layers) hit at the cache fraction only
    h, src = hit_rate_prior(flash, flash.routed_experts_total // 10)
    unhashed = hit_rate_prior(replace(flash, config={**flash.config, "num_hash_layers": 0}), flash.routed_experts_total // 10)[0]
    assert h < unhashed and "hash-routed" in src
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
    """Same inputs, same Plan, with no file, process, network or hardware access, and the inputs left as they were."""
    import builtins
    import copy
    import io
    import pathlib
    import socket
    import subprocess

    spec, inv = resolve_model("v4-flash")
    prof = load_profile("rtx5090-192gb")
    before = copy.deepcopy((spec, inv, prof))
    # Independently built inputs (resolved and loaded a second time) must give the same plan ...
    spec2, inv2 = resolve_model("v4-flash")
    expected = plan(spec2, inv2, load_profile("rtx5090-192gb"), PlanOptions()).to_dict()

    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise OSError(f"the planner did I/O or asked the hardware: {args!r}")

    ways_out = [(builtins, "open"), (io, "open"), (pathlib.Path, "open"), (pathlib.Path, "read_text"),
                (pathlib.Path, "read_bytes"), (pathlib.Path, "iterdir"), (subprocess, "run"), (subprocess, "Popen"),
                (socket, "socket")]
    for module in ("psutil", "torch"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        if module == "psutil":
            ways_out += [(mod, n) for n in ("virtual_memory", "cpu_count", "cpu_freq", "disk_usage")]
        else:
            ways_out += [(mod.cuda, n) for n in ("is_available", "device_count", "mem_get_info",
                                                 "get_device_properties")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in ways_out]
    try:  # patched by hand and restored before any assertion: pytest itself opens files to report a failure
        for obj, name, _ in saved:
            setattr(obj, name, forbidden)
        # ... and so must the same objects again, with every way out made to fail (the planner takes none) ...
        got = [plan(spec, inv, prof).to_dict(), plan(spec, inv, prof, PlanOptions()).to_dict()]
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)
    assert calls == []
    assert got == [expected, expected]
    # ... leaving its inputs as they were.
    assert (spec, inv, prof) == before


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


# ---- estimates against hand-computed values (issue 20): independent arithmetic from the card's bytes and the
# profile's figures, not the planner's helpers; the default efficiencies are restated here on purpose.
VRAM_EFF, DRAM_EFF, PCIE_EFF, COMPUTE_EFF, PER_LAYER_S = 0.75, 0.65, 0.85, 0.4, 1e-4


def test_hand_computed_unified_decode_gpt_oss_on_m3_ultra():
    """The runtime runs a unified plan on the CPU (tests/test_plan_unified_executor.py): the CPU's bandwidth and the
    DRAM efficiency."""
    spec, inv, p = _plan("openai/gpt-oss-120b", "m3-ultra-512gb")
    prof = load_profile("m3-ultra-512gb")
    assert p.mode == "unified"
    # KV read at depth 4096: 36 layers alternate full / 128-token sliding window; 8 KV heads x 64 dims x K,V x BF16
    kv = 18 * 4096 * (8 * 64 * 2 * 2) + 18 * 128 * (8 * 64 * 2 * 2)
    weights = inv.non_expert_bytes - inv.bytes_by_class["embed"] + 36 * 4 * inv.bytes_per_expert
    t = (weights + kv) / (prof.cpu.mem_bw_gbps * 1e9 * DRAM_EFF) + 36 * PER_LAYER_S
    assert p.predicted["decode_tok_s"] == pytest.approx(1 / t, rel=0.01)
    assert p.predicted["decode_tok_s_upper_bound"] == pytest.approx(prof.cpu.mem_bw_gbps * 1e9 / (weights + kv),
                                                                   rel=0.01)


def test_hand_computed_tensor_parallel_decode_and_prefill_qwen3_30b_on_2xh100():
    spec, inv, p = _plan("Qwen/Qwen3-30B-A3B", "2xh100")
    g = load_profile("2xh100").gpu_list[0]
    assert p.mode == "all-vram" and p.predicted["tensor_parallel"] == 2
    # KV read at depth 4096: 48 full-attention layers, 4 KV heads x 128 dims x K,V x BF16
    kv = 48 * 4096 * (4 * 128 * 2 * 2)
    per_gpu = (inv.non_expert_bytes - inv.bytes_by_class["embed"] + 48 * 8 * inv.bytes_per_expert + kv) / 2
    # two all-reduces per layer of the BF16 hidden state (2048 x 2 B): 15 us latency + a ring's half over PCIe
    comm = 2 * 48 * (15e-6 + 2 * 1 / 2 * 2048 * 2 / (g.h2d_gbps * 1e9))
    t = per_gpu / (g.mem_bw_gbps * 1e9 * VRAM_EFF) + 48 * PER_LAYER_S + comm
    assert p.predicted["decode_tok_s"] == pytest.approx(1 / t, rel=0.01)
    # prefill, one 2048-token chunk: 2 x active params x tokens FLOPs over both GPUs, against reading all weights
    chunk = 2048
    compute = 2 * inv.active_params_per_token * chunk / (2 * g.tflops_bf16 * 1e12 * COMPUTE_EFF)
    reads = (inv.non_expert_bytes + inv.routed_expert_bytes) / (2 * g.mem_bw_gbps * 1e9 * VRAM_EFF)
    assert compute > reads  # compute-bound: halving the FLOPs would show
    assert p.predicted["prefill_tok_s"] == pytest.approx(chunk / max(compute, reads), rel=0.01)


def test_hand_computed_hybrid_decode_v4_flash_on_rtx5090():
    spec, inv, p = _plan("deepseek-ai/DeepSeek-V4-Flash", "rtx5090-192gb", hit_rate=0.5)
    prof = load_profile("rtx5090-192gb")
    g = prof.gpus[0]
    assert p.mode == "hybrid"
    experts = 43 * 6 * inv.bytes_per_expert  # 43 MoE layers x top-6
    kv = p.predicted["bytes_per_token"]["kv_read"]  # V4 compressed KV: ~23 MB, 0.2 % of the bytes; taken as planned
    fixed = inv.non_expert_bytes - inv.bytes_by_class["embed"] + kv
    v, pc, d = g.mem_bw_gbps * 1e9 * VRAM_EFF, g.h2d_gbps * 1e9 * PCIE_EFF, prof.cpu.mem_bw_gbps * 1e9 * DRAM_EFF
    hits, miss = 0.5 * experts, 0.5 * experts
    # expert phase: hits on the GPU while the misses split between the CPU and PCIe, best split by brute force
    phase = min(max((hits + f * miss) / v, f * miss / pc, (1 - f) * miss / d) for f in (i / 10000 for i in range(10001)))
    # handoff per MoE layer: 2 kernel round trips (20 us) + 2 small copies (6 us) + pool wake (10 us) + 2 x 4096 x 2 B
    handoff = 2 * 20e-6 + 2 * 6e-6 + 10e-6 + 2 * 4096 * 2 / (g.h2d_gbps * 1e9)
    t = fixed / v + phase + 43 * PER_LAYER_S + 43 * handoff
    assert p.predicted["decode_tok_s"] == pytest.approx(1 / t, rel=0.01)


def test_vram_only_experts_when_ram_is_short_and_page_cache_tier():
    from homerun.plan.priors import page_cache_resident_fraction
    spec, inv, p = _plan("openai/gpt-oss-120b", "rtx3090-64gb", allow_disk=True)
    whats = {d["what"]: d for d in p.decisions}
    assert "VRAM experts" in whats  # 61 GB of experts + copies do not fit 64 GB: the GPU's experts have no host copy
    cache = sum(r.bytes for r in p.placement if r.what.startswith("GPU expert cache"))
    host = sum(r.bytes for r in p.placement if r.device in ("host", "disk") and r.what.startswith("routed experts"))
    assert host == pytest.approx(inv.routed_expert_bytes - cache, abs=inv.bytes_per_expert)
    assert p.predicted["hit_rate_source"].startswith("static VRAM-only")
    assert page_cache_resident_fraction(30, 60) == 0.5 and page_cache_resident_fraction(60, 30) == 1.0


def test_cpu_experts_false_streams_every_miss_over_pcie():
    _, _, p = _plan("v4-flash", "rtx5090-192gb", cpu_experts=False)
    _, _, q = _plan("v4-flash", "rtx5090-192gb")
    assert p.predicted["miss_pcie_fraction"] == 1.0 and p.predicted["estimate_miss_pcie_fraction"] == 1.0
    assert p.predicted["decode_tok_s"] < q.predicted["decode_tok_s"]
