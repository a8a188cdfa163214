"""One-pool plans (unified memory: Macs, DGX Spark, Strix Halo) run on the host CPU: homerun.engine.placement's
placement_from_plan puts every layer on the host device and there is no MPS/Metal or ROCm backend. So the plan names
the CPU kernels as the executor in its decisions, and predicts decode from the CPU's DRAM bandwidth x the DRAM
efficiency and prefill from the CPU prefill fit, not from the profile's GPU. Hand-computed here from the profiles'
figures; a profile whose CPU and GPU bandwidths differ tells the two apart."""

from __future__ import annotations

from dataclasses import replace

import pytest

from homerun.engine.placement import placement_from_plan
from homerun.plan.inventory import resolve_model
from homerun.plan.planner import plan
from profiles import load_profile
from test_plan_cpu_prefill import AVX2, _hand_tok_s

DRAM_EFF, PER_LAYER_S = 0.65, 1e-4  # homerun.plan.records.Efficiency's defaults, restated on purpose


def _executor(p) -> dict:
    (d,) = [d for d in p.decisions if d["what"] == "executor"]
    return d


def test_spark_decode_follows_the_cpu_bandwidth_not_the_gpus():
    """gpt-oss-120b on a DGX Spark whose CPU is given 150 GB/s, its GPU keeping 273: decode at the CPU's."""
    spec, inv = resolve_model("openai/gpt-oss-120b")
    base = load_profile("dgx-spark")
    prof = replace(base, cpu=replace(base.cpu, mem_bw_gbps=150.0))
    p = plan(spec, inv, prof)
    assert p.fits and p.mode == "unified" and prof.gpus[0].mem_bw_gbps == 273
    ex = _executor(p)
    assert ex["choice"] == "the CPU kernels"
    assert "GB10 Blackwell GPU" in ex["reason"] and "runs nothing" in ex["reason"] and "150 GB/s" in ex["reason"]
    # what the runtime makes of the plan: every layer on the host
    pl = placement_from_plan(p)
    assert {d.kind for d in pl.devices} == {"host"} and {lp.device for lp in pl.layers} == {"cpu"}
    # KV read at depth 4096: 36 layers alternate full / 128-token sliding window; 8 KV heads x 64 dims x K,V x BF16
    kv = 18 * 4096 * (8 * 64 * 2 * 2) + 18 * 128 * (8 * 64 * 2 * 2)
    weights = inv.non_expert_bytes - inv.bytes_by_class["embed"] + 36 * 4 * inv.bytes_per_expert
    pred = p.predicted
    assert pred["decode_tok_s"] == pytest.approx(1 / ((weights + kv) / (150e9 * DRAM_EFF) + 36 * PER_LAYER_S),
                                                 rel=0.01)
    assert pred["decode_tok_s_upper_bound"] == pytest.approx(150e9 / (weights + kv), rel=0.01)
    assert [(x["name"], x["gbps"]) for x in pred["links"]] == [("dram", 150.0)]
    assert pred["prefill_tok_s"] == pred["cpu_prefill_tok_s"] and pred["prefill_reason"].startswith("the CPU runs")


def test_flash_on_m3_ultra_decodes_and_prefills_at_the_cpu_figures():
    """V4-Flash on the M3 Ultra: decode at 819 GB/s x the DRAM efficiency (not the GPU's VRAM efficiency), prefill
    by hand from the profile's CPU: 32 cores x 4.05 GHz x 28 FLOPs = 3,628.8 GFLOP/s fp32, int8 (NEON) x2, no bf16
    units, the AVX2 fit (tests/test_plan_cpu_prefill.py's arithmetic)."""
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    prof = load_profile("m3-ultra-512gb")
    p = plan(spec, inv, prof)
    assert p.mode == "unified" and _executor(p)["choice"] == "the CPU kernels"
    pred = p.predicted
    b = pred["bytes_per_token"]
    read = b["resident"] + b["experts"] + b["kv_read"]
    assert b["experts"] == 43 * 6 * inv.bytes_per_expert  # top-6 in each of 43 MoE layers
    assert pred["decode_tok_s"] == pytest.approx(1 / (read / (819e9 * DRAM_EFF) + 43 * PER_LAYER_S), rel=1e-9)
    fp32 = 32 * 4.05 * 28
    assert pred["cpu_peak_gops"] == pytest.approx({"int8": 2 * fp32, "fp32": fp32, "bf16": None})
    dense = 2 * (inv.active_params_per_token - 43 * 6 * 3 * 4096 * 2048 - 4096 * 129280)
    assert pred["prefill_tok_s"] == pytest.approx(_hand_tok_s(dense, 2 * fp32, fp32, fp32, fit=AVX2), rel=1e-9)


def test_strix_halo_prefill_is_the_cpus_though_its_gpu_has_a_compute_figure():
    spec, inv = resolve_model("openai/gpt-oss-120b")
    base = load_profile("strix-halo-128gb")
    prof = replace(base, cpu=replace(base.cpu, clock_ghz=5.1))  # the profile gives no clock: no CPU peak without one
    assert prof.gpus[0].tflops_bf16
    p = plan(spec, inv, prof)
    assert p.fits and _executor(p)["choice"] == "the CPU kernels"
    assert p.predicted["prefill_tok_s"] == p.predicted["cpu_prefill_tok_s"] is not None


def test_cpu_only_plans_name_the_cpu_kernels_too():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    p = plan(spec, inv, load_profile("epyc-genoa-768gb"))
    assert p.mode == "cpu-only" and _executor(p)["choice"] == "the CPU kernels"
    assert "runs nothing" not in _executor(p)["reason"]
