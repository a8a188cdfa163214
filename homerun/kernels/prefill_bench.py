"""Prefill kernel figures for `homerun bench --kernels` (the `prefill` record): the measured peaks of the units a
prefill runs on, and what the prefill GEMMs achieve against them on V4-Flash shapes:

- `peak_gops`: int8 dot products (AVX512-VNNI, else the AVX2 vpmaddubsw/vpmaddwd tile), bf16 dots (AVX512-BF16) and
  fp32 FMA (AVX-512, else AVX2), over every kernel thread; `peak_gops_per_core` the same on one thread
  (`cpu_gemm.unit_peak`, best of `PEAK_REPS` short runs: a peak is a maximum, and a shared host only slows runs);
  `core_peak_gops_per_cpu_s`: one core's peaks per CPU-second (load-independent on a shared host);
  `torch_gemm_gflops`: torch's own fp32 and bf16 GEMMs at a large cache-friendly prefill shape (the BLAS reference);
- `dense`: an FP8 linear (wq_b [32768, 1024], wo_b [4096, 8192]) at `DENSE_ROWS` rows on both CPU units the dispatcher
  picks from: `native` (the decode-sized fp32 FP8 kernel, used up to `NATIVE_MAX_ROWS`) and `mkl` (exact FP8 -> fp32
  row blocks + torch's fp32 GEMM), or `bf16` (FP8 -> bf16 blocks + torch's bf16 GEMM) where the CPU has bf16 units;
  each in GFLOP/s and as a ratio to its unit's peak; `dispatch` names the unit a prefill of that many rows runs on;
- `experts`: the fused routed-expert op (`cpu_experts.CpuMoE`, the default activations) on 48 FP4 experts
  [4096 <-> 2048], top-6, at per-expert batches `EXPERT_BATCHES`, in GOP/s (2 x the model's multiply-adds: the int8
  mode's second down-projection pass over the residual is not counted) and as a ratio to the int8 peak;
  `expert_gemm`: one FP4 expert matrix [2048, 4096] alone at the same token counts (the GEMM tile, no routing).

Each timing is the median of `reps` runs; every GEMM figure also comes per CPU-second of the process
(`gops_per_cpu_s`) with `cpu_peak_ratio` against one core's peak per CPU-second: on a host shared with other jobs the
wall figures fall with the load, these do not. Not here: any pass/fail judgement.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from homerun.formats.experts import ExpertWeights
from homerun.kernels import cpu_experts as ce
from homerun.kernels import cpu_gemm

EXPERT_BATCHES = (8, 16, 32, 64, 100)
DENSE_ROWS = (8, 16, 32, 64, 100, 512)
PEAK_REPS = 5
DIM, INTER, N_EXPERTS, TOP_K = 4096, 2048, 48, 6


def _median_s(fn: Callable[[], object], reps: int) -> float:
    return _median_wall_cpu(fn, reps)[0]


def _median_wall_cpu(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU-seconds (every thread) of `reps` runs after one warm-up."""
    fn()
    ts, cs = [], []
    for _ in range(max(1, reps)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs)


def core_peaks_per_cpu_s(reps: int = PEAK_REPS) -> dict[str, float | None]:
    """One core's unit peaks in GOP per CPU-second: the one-thread peak scaled by wall / CPU time of its run, so a
    shared host's time slices taken by other processes do not lower it (the load-independent per-core figure)."""
    return _best_peaks(1, reps, per_cpu_s=True)


def _best_peaks(threads: int | None, reps: int, *, per_cpu_s: bool = False) -> dict[str, float | None]:
    """Each unit's best of `reps` peak runs (a peak is a maximum: a shared host only slows runs) on `threads` kernel
    threads (None: all); `per_cpu_s`: each run scaled by its wall / CPU time."""
    old = int(ce.backend_info()["threads"]) if threads else None
    if threads:
        ce.set_threads(threads)
    try:
        out: dict[str, float | None] = {}
        for kind in ("int8", "bf16", "fp32"):
            best = None
            for _ in range(max(1, reps)):
                w0, c0 = time.perf_counter(), time.process_time()
                g = cpu_gemm.unit_peak(kind)
                w, c = time.perf_counter() - w0, time.process_time() - c0
                if g is None:
                    break
                if per_cpu_s and c > 0:
                    g = g * w / c
                best = g if best is None else max(best, g)
            out[kind] = None if best is None else round(best, 1)
        return out
    finally:
        if old is not None:
            ce.set_threads(old)


def _cpu_fig(flops: float, cpu_s: float, peak: float | None) -> dict:
    g = flops / cpu_s / 1e9 if cpu_s > 0 else None
    return {"gops_per_cpu_s": None if g is None else round(g, 1),
            "cpu_peak_ratio": round(g / peak, 3) if g and peak else None}


def _fp8(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def _fp4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(-128, 128, (n, k // 2), generator=gen, dtype=torch.int8)
    s = torch.randint(118, 124, (n, k // 32), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return codes, s


def unit_peaks(threads: int | None = None, reps: int = PEAK_REPS) -> dict[str, float | None]:
    """Measured int8 / bf16 / fp32 unit peaks in GOP/s on `threads` kernel threads (None: all), best of `reps`."""
    return _best_peaks(threads, reps)


def _torch_gemm_gflops(dtype: torch.dtype, rows: int, k: int, n: int, reps: int) -> float:
    a, b = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    return 2.0 * rows * k * n / _median_s(lambda: torch.nn.functional.linear(a, b), reps) / 1e9


def dense_rows(w: torch.Tensor, s: torch.Tensor, rows_list, reps: int, peaks: dict, gen: torch.Generator,
               core_peaks: dict | None = None) -> dict:
    """One FP8 linear at each row count in `rows_list` on the CPU units the dispatcher chooses from (see the module
    docstring), GFLOP/s and the ratio to the unit's peak."""
    from homerun.kernels import cpu_prefill
    from homerun.kernels.dispatch import NATIVE_MAX_ROWS

    n, k = w.shape
    rb = cpu_gemm._row_block(n, k)
    fast = cpu_gemm.available() and cpu_gemm.bf16_units()
    out = {}
    for rows in rows_list:
        x = torch.randn(rows, k, generator=gen)
        flops = 2.0 * rows * n * k
        units = {"native": lambda: ce.fp8_linear(x, w, s)}
        if cpu_prefill.available():
            units["mkl"] = lambda: cpu_prefill.fp8_linear(w, s, x, rb)
        if fast:
            units["bf16"] = lambda: cpu_gemm.prefill_linear(w, s, x)
        rec: dict = {"dispatch": "native" if rows <= NATIVE_MAX_ROWS else ("bf16" if fast else "mkl")}
        for unit, fn in units.items():
            wall, cpu = _median_wall_cpu(fn, reps)
            g = flops / wall / 1e9
            kind = "bf16" if unit == "bf16" else "fp32"
            peak = peaks.get(kind)
            rec[unit] = {"gflops": round(g, 1), "peak_ratio": round(g / peak, 3) if peak else None,
                         **_cpu_fig(flops, cpu, (core_peaks or {}).get(kind))}
        out[str(rows)] = rec
    return out


def run_prefill_bench(reps: int = 3, say: Callable[[str], None] | None = None, n_experts: int = N_EXPERTS) -> dict:
    """The `prefill` record: unit peaks (GOP/s), dense and expert prefill GEMM figures (see the module docstring).
    n_experts < 16 (`bench --kernels --experts N`, a quick look): that many experts, top-min(6, N), one dense shape
    (wo_b's columns with an eighth of its rows) at 16 and 64 rows, batches of 8 and 64 tokens per expert."""
    say = say or (lambda msg: None)
    n_exp = max(2, min(int(n_experts), N_EXPERTS))
    top_k = min(TOP_K, n_exp)
    quick = n_exp < 16
    gen = torch.Generator().manual_seed(0)
    say("prefill: unit peaks")
    peaks = unit_peaks()
    core = core_peaks_per_cpu_s()
    rec: dict = {"peak_gops": peaks, "peak_gops_per_core": unit_peaks(threads=1), "core_peak_gops_per_cpu_s": core,
                 "threads": int(ce.backend_info()["threads"])}
    rows = 64 if quick else 512
    rec["torch_gemm_gflops"] = {
        "shape": [rows, 4096, 4096 if not quick else 512],
        "fp32": round(_torch_gemm_gflops(torch.float32, rows, 4096, 4096 if not quick else 512, reps), 1),
        "bf16": round(cpu_gemm.gemm_peak_gflops(rows, 4096, 4096 if not quick else 512, reps), 1),
    }
    shapes = {"wq_b": (32768, 1024), "wo_b": (4096, 8192)} if not quick else {"wo_b/8": (512, 8192)}
    dense = {}
    for name, (n, k) in shapes.items():
        say(f"prefill: dense FP8 {name} [{n}, {k}] at " + ", ".join(map(str, DENSE_ROWS if not quick else (16, 64))) + " rows")
        w, s = _fp8(n, k, gen)
        dense[name] = dense_rows(w, s, DENSE_ROWS if not quick else (16, 64), reps, peaks, gen, core)
    rec["dense"] = dense
    batches = EXPERT_BATCHES if not quick else (8, 64)
    say("prefill: fused experts at per-expert batches " + ", ".join(map(str, batches)))
    mats = {e: (_fp4(INTER, DIM, gen), _fp4(INTER, DIM, gen), _fp4(DIM, INTER, gen)) for e in range(n_exp)}

    def src(layer: int, e: int) -> ExpertWeights:
        (a, b), (c, d), (f, h) = mats[e]
        return ExpertWeights(w1=a, w1_scale=b, w3=c, w3_scale=d, w2=f, w2_scale=h, fmt="fp4")

    experts = {}
    if ce.resolve_path() != "torch":
        moe = ce.CpuMoE(src, swiglu_limit=10.0, act="auto")
        for per in batches:
            t = per * n_exp // top_k
            x = torch.randn(t, DIM, generator=gen)
            ids = torch.stack([torch.randperm(n_exp, generator=gen)[:top_k] for _ in range(t)])
            wts = torch.rand(t, top_k, generator=gen)
            sec, cpu = _median_wall_cpu(lambda: moe.forward(0, x, ids, wts), reps)
            gops = 2.0 * 3 * DIM * INTER * t * top_k / sec / 1e9
            experts[str(per)] = {"tokens": t, "experts": n_exp, "top_k": top_k, "gops": round(gops, 1), "act": moe.act,
                                 **_cpu_fig(2.0 * 3 * DIM * INTER * t * top_k, cpu, core.get(moe.act))}
            if peaks["int8"] and moe.act == "int8":
                experts[str(per)]["int8_peak_ratio"] = round(gops / peaks["int8"], 3)
    rec["experts"] = experts
    gemm = {}
    if ce.resolve_path() != "torch":  # one expert matrix alone: the tile without gather, SwiGLU and scatter
        say("prefill: one FP4 expert matrix [2048, 4096] at " + ", ".join(map(str, batches)) + " tokens")
        (codes, scale), act = mats[0][0], ce.default_act()
        for per in batches:
            x = torch.randn(per, DIM, generator=gen)
            sec, cpu = _median_wall_cpu(lambda: ce.fp4_linear(x, codes, scale, act=act), reps)
            g = 2.0 * INTER * DIM * per / sec / 1e9
            gemm[str(per)] = {"gops": round(g, 1), "act": act, **_cpu_fig(2.0 * INTER * DIM * per, cpu, core.get(act))}
            if peaks["int8"] and act == "int8":
                gemm[str(per)]["int8_peak_ratio"] = round(g / peaks["int8"], 3)
    rec["expert_gemm"] = gemm
    return rec
