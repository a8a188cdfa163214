"""The bf16 dense prefill GEMM (FP8 weights through `cpu_gemm.prefill_linear`: exact FP8 -> bf16 row blocks + torch's
bf16 GEMM, oneDNN on AVX512-BF16) against the measured bf16 peak (`cpu_gemm.unit_peak("bf16")`, best of 5), on 1 and
2 threads (torch's and the kernels'), at prefill shapes; GFLOP/s wall and per CPU-second, medians of `--reps`, and
torch's bf16 GEMM on bf16 weights converted once (the conversion's share). benchmarks/prefill_cpu.md, issue 19.

    python benchmarks/bf16_dense_bench.py [--reps 5] [--shapes 4096x4096,32768x1024] [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from homerun.kernels import cpu_experts as ce  # noqa: E402
from homerun.kernels import cpu_gemm  # noqa: E402


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    ws, cs = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        ws.append(time.perf_counter() - w0)
        cs.append(time.process_time() - c0)
    return statistics.median(ws), statistics.median(cs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="4096x4096,32768x1024")
    ap.add_argument("--rows", type=int, default=512)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    out: dict = {"load": os.getloadavg()[0], "bf16_units": cpu_gemm.bf16_units()}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ce.set_threads(threads)
        best_wall = best_cpu = 0.0
        for _ in range(5):
            w0, c0 = time.perf_counter(), time.process_time()
            g = cpu_gemm.unit_peak("bf16") or 0.0
            w, c = time.perf_counter() - w0, time.process_time() - c0
            best_wall, best_cpu = max(best_wall, g), max(best_cpu, g * w / max(c, 1e-9))
        rec: dict = {"peak_gflops": round(best_wall, 1), "peak_gflops_per_cpu_s": round(best_cpu, 1)}  # one core's
        for shape in a.shapes.split(","):
            n, k = map(int, shape.split("x"))
            w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
            s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
            x = torch.randn(a.rows, k, generator=gen)
            flops = 2.0 * a.rows * n * k
            wb = cpu_gemm.fp8_to_bf16(w, s)
            xb = x.to(torch.bfloat16)
            for name, fn in (("prefill_linear", lambda: cpu_gemm.prefill_linear(w, s, x)),
                             ("torch_bf16_gemm", lambda: F.linear(xb, wb))):
                wall, cpu = timed(fn, a.reps)
                g, gc = flops / wall / 1e9, flops / cpu / 1e9
                rec[f"{shape} {name}"] = {"gflops": round(g, 1), "ratio": round(g / best_wall, 3),
                                          "gflops_per_cpu_s": round(gc, 1), "cpu_ratio": round(gc / rec["peak_gflops_per_cpu_s"], 3)}
        out[f"threads={threads}"] = rec
    print(json.dumps(out))


if __name__ == "__main__":
    main()
