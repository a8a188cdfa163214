"""The fused routed-expert op (int8 activations) against one core's int8 peak, one thread (issue 19; see
benchmarks/prefill_cpu.md): 48 FP4 experts [4096 <-> 2048], top-6, at per-expert batches of 8-100 tokens, as
`homerun.kernels.prefill_bench` counts them (2 x 3 x D x I x tokens x top-k; the int8 down projection's residual pass
is not counted), in GOP per CPU-second, median of `--reps` forwards; the peak is `cpu_gemm.unit_peak("int8")` per
CPU-second, best of 5. A/B: run it from two checkouts alternately (each imports its own build).

    python benchmarks/int8_moe_bench.py [--path avx512|avx2] [--reps 5] [--batches 8,16,32,64,100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())  # the checkout it is run from, not an installed homerun

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.formats.experts import ExpertWeights  # noqa: E402
from homerun.formats.quant import quant_fp4  # noqa: E402
from homerun.kernels import cpu_experts as ce  # noqa: E402
from homerun.kernels import cpu_gemm  # noqa: E402

DIM, INTER, N_EXPERTS, TOP_K = 4096, 2048, 48, 6


def cpu_s_of(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="8,16,32,64,100")
    a = ap.parse_args()
    ce.set_threads(1)
    gen = torch.Generator().manual_seed(0)
    peak = 0.0
    for _ in range(5):
        w0, c0 = time.perf_counter(), time.process_time()
        g = cpu_gemm.unit_peak("int8") or 0.0
        peak = max(peak, g * (time.perf_counter() - w0) / max(time.process_time() - c0, 1e-9))

    def fp4(n: int, k: int):
        return quant_fp4(torch.randn(n, k, generator=gen) * 0.05)

    mats = {e: (fp4(INTER, DIM), fp4(INTER, DIM), fp4(DIM, INTER)) for e in range(N_EXPERTS)}

    def src(layer: int, e: int) -> ExpertWeights:
        (w1, s1), (w3, s3), (w2, s2) = mats[e]
        return ExpertWeights(w1=w1, w1_scale=s1, w3=w3, w3_scale=s3, w2=w2, w2_scale=s2, fmt="fp4")

    moe = ce.CpuMoE(src, swiglu_limit=10.0, path=a.path, act="int8")
    out = {"peak_gops_per_cpu_s": round(peak, 1), "path": a.path or ce.resolve_path(), "load": os.getloadavg()[0]}
    for per in map(int, a.batches.split(",")):
        t = per * N_EXPERTS // TOP_K
        x = torch.randn(t, DIM, generator=gen)
        ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(t)])
        wts = torch.rand(t, TOP_K, generator=gen)
        moe.forward(0, x, ids, wts)
        cpu = statistics.median(cpu_s_of(lambda: moe.forward(0, x, ids, wts)) for _ in range(a.reps))
        gops = 2.0 * 3 * DIM * INTER * t * TOP_K / cpu / 1e9
        out[str(per)] = {"gops_per_cpu_s": round(gops, 1), "ratio": round(gops / peak, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
