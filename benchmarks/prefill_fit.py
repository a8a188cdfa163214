"""The CPU prefill fit (homerun.plan.compute's per-part efficiencies) from measurements of one real-shaped V4-Flash
layer, and the plan against those measurements, on a CPU-seconds basis (a shared host's wall time is noise).

    python benchmarks/prefill_fit.py peaks --reps 8 > peaks.json     # one core's unit peaks per CPU-second
    python benchmarks/prefill_shares.py --checkpoint CKPT --prompt 1024 --repeat 2 --all-rows --json > s1k.json
    # and 8192, 32768; --all-rows: the one layer is the last, whose unused rows a session's prefill skips
    python benchmarks/prefill_fit.py fit --peaks peaks.json s1k.json s8k.json s32k.json

`fit` prints, per prompt: each part's efficiency (its FLOPs over its exclusive CPU-s x one core's peak per CPU-s:
experts on int8, dense linears on bf16 (fp32 without bf16 units), the attention core and the indexer on fp32), the
elementwise share (every other CPU-s over the linears'), and the plan's one-layer tok/s under each fit (with 2 x one
core's peaks) against the measured tokens / (CPU-s / 2); then the full model extrapolated through the plan; and the
fixed cost per prompt (`fixed_cost_per_prompt`: CPU-s = fixed + slope x tokens for the parts linear in tokens).
The checkpoint: `homerun.bench.synthetic.build_synthetic("deepseek-ai/DeepSeek-V4-Flash", n_layers=1)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

LINEARS = ("routed experts", "dense linears")
PARTS = {"routed experts": "routed_experts", "dense linears": "dense", "attention core": "attention",
         "indexer top-k": "indexer"}


def core_peaks(reps: int) -> dict:
    from homerun.kernels.prefill_bench import _best_peaks

    return _best_peaks(1, reps, per_cpu_s=True)


def one_layer():
    from homerun.bench.synthetic import synthetic_config
    from homerun.plan.inventory import inventory_from_config, resolve_model
    from homerun.plan.specs import parse_config

    card = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    spec = parse_config(synthetic_config(dict(card[0].config), 1), "flash-L1")
    return (spec, inventory_from_config(spec)), card


def plan_tok_s(model, flags, prompt: int, peaks: dict, all_rows: bool = True) -> float:
    return plan_prediction(model, flags, prompt, peaks, all_rows)["cpu_prefill_tok_s"]


def plan_prediction(model, flags, prompt: int, peaks: dict, all_rows: bool = True) -> dict:
    """The plan's CPU prefill for `model`; all_rows: its last layer runs every row (as the --all-rows measurements
    of one layer did); False: the prompt's last row only, as a session's prefill runs the full model."""
    from homerun.plan.planner import PlanOptions, plan
    from profiles import CpuSpec, HardwareProfile

    prof = HardwareProfile(name="host", description="this host", source="prefill_fit",
                           cpu=CpuSpec(name="host", cores=2, ram_gib=4096, mem_bw_gbps=50, flags=tuple(flags),
                                       clock_ghz=3.0))
    opts = PlanOptions(context_tokens=max(65536, prompt + 1), prefill_prompt_tokens=prompt, prefill_all_rows=all_rows,
                       cpu_peaks={**peaks, "source": "prefill_fit: 2 x one core's peaks per CPU-s"})
    return plan(*model, prof, opts).predicted


def fit(peaks_path: str, shares: list[str]) -> dict:
    from homerun.plan.compute import AVX2_FIT, AVX512_FIT, AVX512_FIT_FLAGS, depth_flops_per_token
    from homerun.plan.compute import linear_flops_per_token

    core = json.loads(open(peaks_path).read())
    two = {k: (2 * v if v else None) for k, v in core.items() if k in ("int8", "bf16", "fp32")}
    dense_unit = "bf16" if core.get("bf16") else "fp32"
    unit = {"routed_experts": "int8", "dense": dense_unit, "attention": "fp32", "indexer": "fp32"}
    model, card = one_layer()
    spec, inv = model
    lin = linear_flops_per_token(spec, inv)
    rows = []
    work = {part: 0.0 for part in PARTS.values()}  # pooled over the runs: unit-peak CPU-s of work, CPU-s spent
    spent = {part: 0.0 for part in PARTS.values()}
    rest = lin_total = 0.0
    for path in shares:
        text = open(path).read().strip()
        doc = json.loads(text if text.startswith("{") else text.splitlines()[-1])  # --json, or the printed table
        p, cpu_s = doc["prompt"], doc["prefill_cpu_s"]
        fam = {f: r["cpu_s"] for f, r in doc["families"].items()}
        flops = {**{k: lin[k] for k in ("routed_experts", "dense")},
                 **depth_flops_per_token(spec, spec.layer_types[0], p)}
        eff = {part: flops[part] * p / (fam.get(f, 0.0) * core[unit[part]] * 1e9) if fam.get(f) else None
               for f, part in PARTS.items()}
        lin_s = sum(fam.get(f, 0.0) for f in LINEARS)
        for f, part in PARTS.items():
            work[part] += flops[part] * p / (core[unit[part]] * 1e9)
            spent[part] += fam.get(f, 0.0)
        rest += cpu_s - sum(fam.get(f, 0.0) for f in PARTS)
        lin_total += lin_s
        eff["elementwise_fraction"] = (cpu_s - sum(fam.get(f, 0.0) for f in PARTS)) / lin_s
        measured = p / (cpu_s / 2)
        plans = {"avx2": plan_tok_s(model, ("avx2", "fma"), p, two),
                 "avx512": plan_tok_s(model, AVX512_FIT_FLAGS, p, two)}
        full = {"avx512": plan_tok_s(card, AVX512_FIT_FLAGS, p, two, all_rows=False) / plans["avx512"]}
        rows.append({"prompt": p, "cpu_s": round(cpu_s, 2), "measured_tok_s_per_2_cpu_s": round(measured, 1),
                     "efficiency": {k: (None if v is None else round(v, 3)) for k, v in eff.items()},
                     "cpu_s_by_part": {part: round(fam.get(f, 0.0), 2) for f, part in PARTS.items()},
                     "plan_tok_s": {k: round(v, 1) for k, v in plans.items()},
                     "plan_over_measured": {k: round(v / measured, 3) for k, v in plans.items()},
                     "full_model_tok_s_through_the_plan": round(measured * full["avx512"], 2)})
    # the fit: each part's work over its CPU-s pooled over every run (weighted by time, so long prompts count most)
    pooled = {part: round(work[part] / spent[part], 3) for part in PARTS.values() if spent[part]}
    pooled["elementwise_fraction"] = round(rest / lin_total, 3)
    # and each depth alike: the mean over prompts of each prompt's median (repeats of a prompt pooled first)
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r["efficiency"])
    per_depth = {}
    for k in [*PARTS.values(), "elementwise_fraction"]:
        meds = [statistics.median(e[k] for e in effs if e[k] is not None) for effs in by_prompt.values()]
        per_depth[k] = round(statistics.fmean(meds), 3)
    return {"core_peaks_per_cpu_s": core, "pooled_efficiency": pooled, "per_depth_mean_efficiency": per_depth,
            "fits": {"avx2": AVX2_FIT.__dict__, "avx512": AVX512_FIT.__dict__}, "rows": rows,
            "fixed_cost_per_prompt": fixed_term_fit(shares)}


def fixed_term_fit(shares: list[str]) -> dict:
    """The fixed cost per prompt: each linear-in-tokens part's CPU-s (experts, dense linears, and the elementwise rest:
    all but attention and indexer) fitted as fixed + slope x tokens, least squares on relative error (1K counts as much
    as 32K). `per_prompt_linear_tokens` is the fixed CPU-s over the linears' slope per token (the plan's unit), and
    `elementwise_fraction` the rest's slope over the linears'."""
    runs = []
    for path in shares:
        text = open(path).read().strip()
        doc = json.loads(text if text.startswith("{") else text.splitlines()[-1])
        fam = {f: r["cpu_s"] for f, r in doc["families"].items()}
        rest = doc["prefill_cpu_s"] - sum(fam.get(f, 0.0) for f in PARTS)
        runs.append((doc["prompt"], {"experts": fam.get("routed experts", 0.0), "dense": fam.get("dense linears", 0.0),
                                     "elementwise": rest}))
    out = {}
    for part in ("experts", "dense", "elementwise"):
        w = [1.0 / r[part] ** 2 for _, r in runs]
        xs, ys = [p for p, _ in runs], [r[part] for _, r in runs]
        sw, sx, sy = sum(w), sum(a * x for a, x in zip(w, xs)), sum(a * y for a, y in zip(w, ys))
        sxx, sxy = sum(a * x * x for a, x in zip(w, xs)), sum(a * x * y for a, x, y in zip(w, xs, ys))
        slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
        fixed = (sy - slope * sx) / sw
        out[part] = {"fixed_cpu_s": round(fixed, 3), "cpu_ms_per_token": round(slope * 1e3, 4),
                     "residual_cpu_s": [[p, round(y - fixed - slope * p, 3)] for p, y in zip(xs, ys)]}
    lin_ms = out["experts"]["cpu_ms_per_token"] + out["dense"]["cpu_ms_per_token"]
    fixed = sum(v["fixed_cpu_s"] for v in out.values())
    return {"by_part": out, "fixed_cpu_s": round(fixed, 3), "per_prompt_linear_tokens": round(fixed / lin_ms * 1e3, 1),
            "elementwise_fraction": round(out["elementwise"]["cpu_ms_per_token"] / lin_ms, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("peaks", help="one core's int8 / bf16 / fp32 peaks per CPU-second, best of --reps")
    pk.add_argument("--reps", type=int, default=8)
    ft = sub.add_parser("fit", help="efficiencies and plan vs measured from prefill_shares.py --json documents")
    ft.add_argument("--peaks", required=True, help="the JSON `peaks` printed")
    ft.add_argument("shares", nargs="+")
    a = ap.parse_args()
    import homerun  # noqa: F401 - before torch (its OpenMP settings)

    doc = core_peaks(a.reps) if a.cmd == "peaks" else fit(a.peaks, a.shares)
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
