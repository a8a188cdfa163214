"""1 vs 2 threads for the bf16 dense prefill path (`cpu_gemm.prefill_linear`) and its two halves measured alone: torch's
bf16 GEMM on weights converted once, and the native FP8 -> bf16 conversion into the per-thread scratch block. Per
call, CPU-ms (process time, every thread) and wall-ms, medians of `--reps` rounds; each round runs every (threads,
part) once, threads alternated, so a neighbour's load falls on both thread counts alike. The load average is printed
per round. torch's intra-op pool (libgomp in the pip wheels) spins idle workers after a parallel region unless
OMP_WAIT_POLICY=passive is set before torch loads, which `import homerun` does (setdefault) when it comes first, as
here. `OMP_WAIT_POLICY= python ...` (set, empty) keeps libgomp's default spin, for the A/B in separate processes.
benchmarks/prefill_cpu.md, issue 19.

    python benchmarks/dense_threads_ab.py [--reps 7] [--shapes 4096x4096,4096x1024,32768x1024] [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

import homerun  # noqa: E402,F401  first: its OMP_WAIT_POLICY=PASSIVE applies only before torch loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from homerun.kernels import cpu_experts as ce  # noqa: E402
from homerun.kernels import cpu_gemm  # noqa: E402


def once(fn, calls: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call over `calls` back-to-back calls."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - w0) * 1e3 / calls, (time.process_time() - c0) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="back-to-back calls per timing (as in a layer's linears)")
    ap.add_argument("--shapes", default="4096x4096,4096x1024,32768x1024")
    ap.add_argument("--rows", type=int, default=512)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    cases = []
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
        s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        x = torch.randn(a.rows, k, generator=gen)
        xb, wb = x.to(torch.bfloat16), cpu_gemm.fp8_to_bf16(w, s)
        rb = cpu_gemm._row_block(n, k)
        blk = cpu_gemm._scratch_block(min(rb, n), k)
        parts = {
            "gemm": lambda xb=xb, wb=wb: F.linear(xb, wb),
            "convert": lambda w=w, s=s, n=n, rb=rb, blk=blk: [cpu_gemm.fp8_to_bf16(w, s, (r0, min(r0 + rb, n)),
                                                                          out=blk[: min(r0 + rb, n) - r0])
                                                     for r0 in range(0, n, rb)],
            "path": lambda w=w, s=s, x=x: cpu_gemm.prefill_linear(w, s, x),
        }
        cases.append((shape, parts))
    res: dict = {}
    loads = []
    for _ in range(a.reps):
        loads.append(os.getloadavg()[0])
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ce.set_threads(threads)
            for shape, parts in cases:
                for name, fn in parts.items():
                    fn()  # warm: scratch pages, the pools' threads
                    res.setdefault((threads, shape, name), []).append(once(fn, a.calls))
    out = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
           "rows": a.rows, "load": [round(v, 2) for v in loads], "per_call_ms": {}}
    for (threads, shape, name), v in res.items():
        out["per_call_ms"][f"{shape} {name} t{threads}"] = {
            "wall": round(statistics.median(w for w, _ in v), 2), "cpu": round(statistics.median(c for _, c in v), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
