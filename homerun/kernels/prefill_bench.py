"""Prefill kernel figures for `homerun bench --kernels` (the `prefill` record): the measured peaks of the units a
prefill runs on (int8 VNNI dots, bf16 dots, fp32 FMA; `cpu_gemm.unit_peak`), and what the prefill kernels achieve
against them on V4-Flash shapes:

- `dense_gflops`: the FP8 dense prefill linear (`cpu_gemm.prefill_linear`: native FP8 -> bf16 blocks + torch's bf16
  GEMM) at 512 rows (`rows`) on wq_b's [32768, 1024] and wo_b's [4096, 8192], and the plain fp32 path it replaces;
- `experts`: the fused routed-expert op (`cpu_experts.CpuMoE`, int8 activations) on 48 FP4 experts [4096 <-> 2048],
  top-6, at per-expert batches of 10, 32, 64 and 100 tokens, in GOP/s (2 x multiply-adds) and as a ratio to the int8
  peak.

Each figure is the median of `reps` runs. Not here: any pass/fail judgement.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from homerun.formats.experts import ExpertWeights
from homerun.kernels import cpu_experts as ce
from homerun.kernels import cpu_gemm

EXPERT_BATCHES = (10, 32, 64, 100)
DIM, INTER, N_EXPERTS, TOP_K = 4096, 2048, 48, 6


def _median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _fp8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def _fp4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8)
    s = torch.randint(118, 124, (n, k // 32), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return codes, s


def run_prefill_bench(reps: int = 3, say: Callable[[str], None] | None = None, n_experts: int = N_EXPERTS) -> dict:
    """The `prefill` record: unit peaks (GOP/s), dense and expert prefill GEMM figures (see the module docstring).
    n_experts < 16 (`bench --kernels --experts N`, a quick look): that many experts, top-min(6, N), and the dense
    GEMMs at 64 rows on wo_b's columns with an eighth of its rows, batches of 10 and 100 tokens per expert."""
    say = say or (lambda msg: None)
    n_exp = max(2, min(int(n_experts), N_EXPERTS))
    top_k = min(TOP_K, n_exp)
    quick = n_exp < 16
    rows = 64 if quick else 512
    gen = torch.Generator().manual_seed(0)
    say("prefill: unit peaks")
    peaks = {k: cpu_gemm.unit_peak(k) for k in ("int8", "bf16", "fp32")}
    rec: dict = {"peak_gops": {k: None if v is None else round(v, 1) for k, v in peaks.items()}}
    rec["bf16_gemm_gflops"] = round(cpu_gemm.gemm_peak_gflops(rows, 4096, 4096 if not quick else 512, reps), 1)
    rec["rows"] = rows
    say(f"prefill: dense FP8 linears at {rows} rows")
    dense = {}
    from homerun.formats.quant import dequant_fp8

    shapes = {"wq_b": (32768, 1024), "wo_b": (4096, 8192)} if not quick else {"wo_b/8": (512, 8192)}
    for name, (n, k) in shapes.items():
        w, s = _fp8(n, k, gen)
        x = torch.randn(rows, k, generator=gen)
        flops = 2.0 * rows * n * k
        t_bf = _median_s(lambda: cpu_gemm.prefill_linear(w, s, x), reps)
        t_32 = _median_s(lambda: torch.nn.functional.linear(x, dequant_fp8(w, s, torch.float32)), reps)
        dense[name] = {"bf16_gflops": round(flops / t_bf / 1e9, 1), "fp32_gflops": round(flops / t_32 / 1e9, 1)}
        if peaks["bf16"]:
            dense[name]["bf16_peak_ratio"] = round(flops / t_bf / 1e9 / peaks["bf16"], 3)
    rec["dense_gflops"] = dense
    say("prefill: fused experts at per-expert batches " + ", ".join(map(str, EXPERT_BATCHES)))
    mats = {e: (_fp4(INTER, DIM, gen), _fp4(INTER, DIM, gen), _fp4(DIM, INTER, gen)) for e in range(n_exp)}

    def src(layer: int, e: int) -> ExpertWeights:
        (a, b), (c, d), (f, h) = mats[e]
        return ExpertWeights(w1=a, w1_scale=b, w3=c, w3_scale=d, w2=f, w2_scale=h, fmt="fp4")

    experts = {}
    if ce.resolve_path() != "torch":
        moe = ce.CpuMoE(src, swiglu_limit=10.0, act="auto")
        for per in EXPERT_BATCHES if not quick else EXPERT_BATCHES[::3]:
            t = per * n_exp // top_k
            x = torch.randn(t, DIM, generator=gen)
            ids = torch.stack([torch.randperm(n_exp, generator=gen)[:top_k] for _ in range(t)])
            wts = torch.rand(t, top_k, generator=gen)
            sec = _median_s(lambda: moe.forward(0, x, ids, wts), reps)
            gops = 2.0 * 3 * DIM * INTER * t * top_k / sec / 1e9
            experts[str(per)] = {"tokens": t, "experts": n_exp, "top_k": top_k, "gops": round(gops, 1), "act": moe.act}
            if peaks["int8"] and moe.act == "int8":
                experts[str(per)]["int8_peak_ratio"] = round(gops / peaks["int8"], 3)
    rec["experts"] = experts
    return rec
