"""The per-token cost model of issue 13's closing note, from a device check's measured parts (`device_check` JSON):
kernel time, copy time, CPU time and launch overhead per V4-Flash decode token, and the projected tok/s on a target
profile (default `rtx5090-192gb`), with every assumption named in the output.

  python -m homerun.bench.cost_model --doc device-check.json [--hw rtx5090-192gb]   # adds doc["cost_model"]

`project(doc, plan_dict, profile_dict)` is pure (tested on a labelled fake under tests/fixtures/); `main` plans the
model offline (homerun.plan) and writes the result into the same JSON. Library code: no printing.

The formula (seconds per token; B = bytes per token from the plan's estimate, GB/s = 1e9 B/s):
  kernel_s  = B_fixed / (gpu_bw x f_fp8) + (B_hits + B_streamed) / (gpu_bw x f_fp4)
  copy_s    = B_streamed / (h2d_gbps x f_stream)
  cpu_s     = B_cpu / (dram_gbps x f_cpu)
  launch_s  = launches_per_token x s_per_launch
  token_s   = B_fixed / (gpu_bw x f_fp8) + max(B_hits / (gpu_bw x f_fp4), copy_s, cpu_s)
              + B_streamed / (gpu_bw x f_fp4) + launch_s
where the misses (B_cpu + B_streamed, the plan's) are re-split between CPU and PCIe in proportion to their measured
rates (the split that ends both at once), gpu_bw = the target's spec bandwidth x the copy-to-spec ratio measured on
the device's GPU, and each f is a measured fraction (of the HBM copy, of the pinned H2D peak) or, where the device
run lacks it, the plan's default efficiency (then named so). The same parts on the device itself (its HBM copy,
its pinned peak) go to `per_token_s_on_device`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from homerun.plan.hardware import KNOWN_GPUS

# Spec HBM bandwidth (GB/s) of the GPUs the device check runs on (docs/hardware.md section 1), to turn the measured
# copy bandwidth into a copy-to-spec ratio; matched by substring of torch's device name, most specific first.
SPEC_HBM_GBPS = tuple((k, KNOWN_GPUS[k][0]) for k in ("H200", "H100 PCIe", "H100"))  # lent kinds, matched in order
DEFAULT_COPY_TO_SPEC = 0.9  # assumption where the GPU is unknown: H200 copies reach ~4.3 of 4.8 TB/s (KINDS.md)
KTRANSFORMERS_TOK_S = 20.0  # KTransformers' reported V4-Flash decode on a 5090 rig: "20+ tok/s" (issue 13)
MODEL = "deepseek-ai/DeepSeek-V4-Flash"
DEFAULT_S_PER_LAUNCH = 5e-6  # assumption where unmeasured: a PyTorch eager launch costs the host ~5 us
# Hybrid launches per token where the device run lacks them: the device check's own graphs_hybrid step counted on a
# CUDA stand-in (a count of the code's launches, which no device changes), as (launches per token, layers), from
#   TRITON_INTERPRET=1 python -m homerun.bench.device_check graphs_hybrid --tiny --out F
# on 2026-12-07 (branch h13b, benchmarks/hybrid_decode.md). tests/test_cost_model_standin.py recounts it.
STANDIN_HYBRID_LAUNCHES = (58, 3)
STANDIN_HYBRID_SOURCE = ("the stand-in count of the device check's graphs_hybrid step (device_check graphs_hybrid "
                         "--tiny, 2026-12-07)")


def _step(doc: dict, name: str) -> dict:
    rec = (doc.get("steps") or {}).get(name) or {}
    return rec if rec.get("ok", True) else {}


def _row(kernels: dict, name: str, **match: int) -> dict | None:
    for r in kernels.get("rows") or []:
        if r.get("kernel") == name and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def measured_parts(doc: dict) -> dict[str, Any]:
    """The measured inputs the model uses, each None when the device run lacks it."""
    env, kern, off = _step(doc, "env"), _step(doc, "kernels"), _step(doc, "offload")
    graphs, hybrid = _step(doc, "graphs"), _step(doc, "graphs_hybrid")
    hbm = kern.get("hbm_copy_gbps")
    fp8, moe = _row(kern, "fp8_linear", M=1), _row(kern, "fp4_moe_decode", T=1)
    h2d = off.get("h2d") or {}
    modes = graphs.get("modes") or {}
    eager, whole = modes.get("eager") or {}, modes.get("whole") or {}
    s_per_launch = kern["aten_launch_us"] * 1e-6 if kern.get("aten_launch_us") else None
    if eager.get("step_ms") and whole.get("step_ms") and eager.get("launches_per_token") and \
            whole.get("launches_per_token") is not None:
        dl = eager["launches_per_token"] - whole["launches_per_token"]
        if dl > 0 and eager["step_ms"] > whole["step_ms"]:  # the tiny model's GPU work is small: the step-time
            # difference is the launches' host cost, the model's Python between them included (preferred over the
            # bare ATen microbenchmark, which has none)
            s_per_launch = (eager["step_ms"] - whole["step_ms"]) / 1e3 / dl
    lpl = None
    if hybrid.get("launches_per_token") and hybrid.get("n_layers"):
        lpl = hybrid["launches_per_token"] / hybrid["n_layers"]
    return {"gpu": env.get("gpu"), "hbm_copy_gbps": hbm,
            "f_fp8": fp8["gbps"] / hbm if fp8 and hbm else None,
            "f_fp4": moe["gbps"] / hbm if moe and hbm else None,
            "pinned_peak_gbps": h2d.get("pinned_peak_gbps"),
            "f_stream": h2d.get("streaming_fraction_of_peak"),
            "s_per_launch": s_per_launch, "hybrid_launches_per_layer": lpl,
            "hybrid_waits_per_token": hybrid.get("event_waits_per_token")}


def copy_to_spec(gpu: str | None, hbm_copy_gbps: float | None) -> tuple[float, str]:
    if gpu and hbm_copy_gbps:
        for key, spec in SPEC_HBM_GBPS:
            if key in gpu:
                return hbm_copy_gbps / spec, f"measured: {hbm_copy_gbps:.0f} GB/s copy / {spec:.0f} spec ({key})"
    return DEFAULT_COPY_TO_SPEC, (f"assumed {DEFAULT_COPY_TO_SPEC} (GPU {gpu!r} not in the spec table or no copy "
                                  "measured)")


def _pick(value: float | None, default: float, what: str, assumptions: list[str], source: str = "the plan's default"
          ) -> float:
    if value is None or value <= 0:
        assumptions.append(f"{what}: not measured, {source} {default:g}")
        return default
    return value


def project(doc: dict, plan: dict, profile: dict) -> dict[str, Any]:
    """The cost model (module docstring) of `plan` (a Plan.to_dict() of MODEL on `profile`, a profile dict) from
    the measured parts in the device-check `doc`."""
    m = measured_parts(doc)
    p = plan["predicted"]
    eff = p["efficiency"]
    links = {ln["name"]: ln for ln in p["estimate_links"]}
    bpt = p["bytes_per_token"]
    gpu, cpu = profile["gpus"][0], profile["cpu"]
    n_layers = plan.get("model", {}).get("n_layers") or doc.get("n_layers_full") or 43
    assumptions: list[str] = []
    if doc.get("tiny") or doc.get("fake"):
        assumptions.append("NOT A DEVICE RUN: " + ("a CPU stand-in (CHECK_TINY); its timings mean nothing"
                                                   if doc.get("tiny") else "a fake fixture"))

    ratio, why = copy_to_spec(m["gpu"], m["hbm_copy_gbps"])
    assumptions.append(f"the target GPU reaches the same copy-to-spec ratio as the measured one ({why})")
    gpu_bw = gpu["mem_bw_gbps"] * ratio
    f_fp8 = _pick(m["f_fp8"], eff["vram"], "f_fp8 (FP8 GEMV fraction of the HBM copy)", assumptions)
    f_fp4 = _pick(m["f_fp4"], eff["vram"], "f_fp4 (FP4 MoE decode fraction of the HBM copy)", assumptions)
    assumptions.append("kernel fractions of the copy bandwidth carry from HBM to GDDR7 (both bandwidth-bound at M=1)")
    f_stream = _pick(m["f_stream"], eff["pcie"], "f_stream (streaming fraction of pinned H2D peak)", assumptions)
    assumptions.append(f"the target's pinned H2D peak is the profile's {gpu['h2d_gbps']} GB/s (nvbandwidth, cited)")
    f_cpu = eff["dram"]
    assumptions.append(f"CPU experts at the plan's {f_cpu:g} of the profile's {cpu['mem_bw_gbps']} GB/s DRAM: the "
                       "device's host is not the target's, so its CPU is not timed for this")
    s_launch = _pick(m["s_per_launch"], DEFAULT_S_PER_LAUNCH, "s_per_launch (host cost per kernel launch)",
                     assumptions, "assumed")
    assumptions.append("launch cost is the device host's (Python + driver per launch), and is serial with the GPU "
                       "work on hybrid decode (each MoE layer's miss mask waits on the host)")

    b_fixed = bpt["resident"] + bpt["kv_read"]
    b_misses = links["dram"]["bytes_per_token"] + links["pcie"]["bytes_per_token"]
    b_hits = max(0.0, links["vram"]["bytes_per_token"] - b_fixed - links["pcie"]["bytes_per_token"])
    rate_cpu, rate_pcie = cpu["mem_bw_gbps"] * f_cpu * 1e9, gpu["h2d_gbps"] * f_stream * 1e9
    b_streamed = b_misses * rate_pcie / (rate_cpu + rate_pcie)
    b_cpu = b_misses - b_streamed
    assumptions.append(f"hit rate {p['expert_cache_hit_rate']:.3f} and bytes per token are the plan's "
                       f"({p.get('hit_rate_source', 'plan')})")

    t_fixed = b_fixed / (gpu_bw * f_fp8 * 1e9)
    t_hits = b_hits / (gpu_bw * f_fp4 * 1e9)
    t_stream_compute = b_streamed / (gpu_bw * f_fp4 * 1e9)
    t_copy, t_cpu = b_streamed / rate_pcie, b_cpu / rate_cpu
    lpl = m["hybrid_launches_per_layer"]
    if lpl is None:
        per_token, layers = STANDIN_HYBRID_LAUNCHES
        lpl = per_token / layers
        assumptions.append(f"hybrid launches per layer not measured on the device: {lpl:.1f} = {per_token} / {layers}"
                           f", {STANDIN_HYBRID_SOURCE}; the tiny model's launches outside its layers are spread "
                           f"over {layers} layers, so at {n_layers} it overcounts")
    launches = lpl * n_layers + 1
    t_launch = launches * s_launch
    t_token = t_fixed + max(t_hits, t_copy, t_cpu) + t_stream_compute + t_launch
    tok_s = 1.0 / t_token
    device = None
    if m["hbm_copy_gbps"] and m["pinned_peak_gbps"]:  # the same token's GPU and link parts on the measured machine
        hb = m["hbm_copy_gbps"] * 1e9
        device = {"gpu": m["gpu"], "kernel": b_fixed / (hb * f_fp8) + (b_hits + b_streamed) / (hb * f_fp4),
                  "copy": b_streamed / (m["pinned_peak_gbps"] * f_stream * 1e9), "launch": t_launch,
                  "note": "the target's byte split; the device host's CPU is not timed (no cpu part)"}
    planned = p["decode_tok_s"]
    capped = _step(doc, "capped").get("ratios") or {}
    alt = None
    if capped.get("decode_to_plan"):  # the device's own capped hybrid against its plan, carried to the target
        alt = {"capped_decode_to_plan": capped["decode_to_plan"], "tok_s": planned * capped["decode_to_plan"],
               "assumption": "the target reaches the same fraction of its plan as the device's capped hybrid "
                             "(synthetic V4-Flash layers, VRAM cut to the 32 GB card's expert-cache share)"}
    return {
        "model": MODEL, "profile": profile["name"], "n_layers": n_layers, "measured": m,
        "inputs": {"gpu_bw_gbps": gpu_bw, "f_fp8": f_fp8, "f_fp4": f_fp4, "f_stream": f_stream, "f_cpu": f_cpu,
                   "s_per_launch": s_launch, "launches_per_token": launches,
                   "bytes_per_token": {"fixed": b_fixed, "hits": b_hits, "streamed": b_streamed, "cpu": b_cpu}},
        "per_token_s": {"kernel": t_fixed + t_hits + t_stream_compute, "copy": t_copy, "cpu": t_cpu,
                        "launch": t_launch, "total": t_token},
        "per_token_s_on_device": device,
        "projected_tok_s": tok_s, "projected_by_capped_ratio": alt,
        "upper_bound_tok_s": 1.0 / max(t_fixed + t_hits + t_stream_compute, t_copy, t_cpu, t_launch),
        "plan_tok_s": planned, "ratio_to_plan": tok_s / planned,
        "ktransformers_tok_s": KTRANSFORMERS_TOK_S, "ratio_to_ktransformers": tok_s / KTRANSFORMERS_TOK_S,
        "formula": __doc__.split("The formula")[1].split("\n\"\"\"")[0].strip() if __doc__ else None,
        "assumptions": assumptions,
    }


def plan_for(profile_name: str) -> tuple[dict, dict]:
    """(Plan.to_dict(), profile dict) of MODEL on the named profile, offline from the shipped card."""
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    prof = load_profile(profile_name)
    spec, inv = resolve_model(MODEL)
    d = plan(spec, inv, prof, PlanOptions()).to_dict()
    d.setdefault("model", {})["n_layers"] = getattr(spec, "num_layers", None)
    return d, prof.to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", required=True, type=Path, help="the device-check JSON (updated in place)")
    ap.add_argument("--hw", default="rtx5090-192gb", help="the target profile")
    a = ap.parse_args(argv)
    doc = json.loads(a.doc.read_text())
    try:
        plan, prof = plan_for(a.hw)
        doc["cost_model"] = project(doc, plan, prof)
        ok = True
    except Exception as exc:  # noqa: BLE001 - recorded: the measured steps above stay usable
        doc["cost_model"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        ok = False
    tmp = a.doc.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, a.doc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
