"""A/B of the int8 fused routed-expert op (and the lone expert GEMM) against a saved build, in one process, one
thread unless --threads (issue 19; benchmarks/prefill_cpu.md, session 5). The checkout's build (A) and a saved copy
of another build's library (B) are loaded side by side through ctypes and called alternately on the same inputs;
every output of A is checked bit for bit against B's first (exit status 1 on any difference: the kernels' changes
are meant to be exact).
`--threads 2`: both builds on 2 kernel threads; GOP per CPU-second and the peak per CPU-second as with one.

    cp homerun/kernels/_hr_kernels*.so /tmp/base.so       # in the base checkout, after its build
    python benchmarks/int8_moe_ab.py --base /tmp/base.so [--reps 5] [--batches 8,16,24,32,48,64,100] [--gemm]

Fused op: 48 FP4 experts [4096 <-> 2048], top-6, per-expert batches of 8-100 tokens (as int8_moe_bench.py). GEMM
(--gemm): hr_fp4_gemm on [2048, 4096] x the batch. Per round: the VNNI peak loop (cpu_gemm.unit_peak("int8")), then
A and B (order alternating by round), each the CPU-s of one call; GOP per CPU-second and, as "ratio", the median of
each round's figure over the same round's peak, so host-wide slowdowns cancel.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())  # the checkout it is run from, not an installed homerun

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.formats.quant import quant_fp4  # noqa: E402
from homerun.kernels import cpu_experts as ce  # noqa: E402
from homerun.kernels import cpu_gemm  # noqa: E402

DIM, INTER, N_EXPERTS, TOP_K = 4096, 2048, 48, 6
P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def load(path: str, threads: int) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.hr_moe_forward.argtypes = [I32, I32, P, I64, I64, I64, P, I64, P, P, I64, ctypes.c_float, P]
    lib.hr_fp4_gemm.argtypes = [I32, P, P, I64, I64, P, I64, P]
    lib.hr_set_threads.argtypes = [I32]
    lib.hr_set_threads(threads)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a saved copy of the other build's _hr_kernels library")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="8,16,24,32,48,64,100")
    ap.add_argument("--gemm", action="store_true", help="the lone expert GEMM instead of the fused op")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads of both builds (the peak loop's too)")
    a = ap.parse_args()
    ce.set_threads(a.threads)
    libs = {"A": ce._native(), "B": load(a.base, a.threads)}
    code = ce._path_code("avx512", "int8")
    gen = torch.Generator().manual_seed(0)

    def fp4(n: int, k: int):
        w, s = quant_fp4(torch.randn(n, k, generator=gen) * 0.05)
        return w.contiguous(), s.contiguous()

    if a.gemm:
        w, s = fp4(2048, DIM)
    else:
        mats = [fp4(INTER, DIM) + fp4(INTER, DIM) + fp4(DIM, INTER) for _ in range(N_EXPERTS)]
        table = torch.tensor([[t.data_ptr() for t in m] for m in mats], dtype=torch.int64)
    out: dict = {"what": "gemm [2048, 4096]" if a.gemm else "fused op", "threads": a.threads,
                 "load": os.getloadavg()[0]}
    bad = 0
    for per in map(int, a.batches.split(",")):
        t = per if a.gemm else per * N_EXPERTS // TOP_K
        x = torch.randn(t, DIM, generator=gen)
        ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(t)])
        wts = torch.rand(t, TOP_K, generator=gen)
        ys = {k: torch.empty(t, 2048 if a.gemm else DIM) for k in libs}
        ops = 2.0 * 2048 * DIM * t if a.gemm else 2.0 * 3 * DIM * INTER * t * TOP_K

        def call(k: str) -> float:
            c0 = time.process_time()
            if a.gemm:
                rc = libs[k].hr_fp4_gemm(code, w.data_ptr(), s.data_ptr(), 2048, DIM, x.data_ptr(), t, ys[k].data_ptr())
            else:
                rc = libs[k].hr_moe_forward(code, 0, table.data_ptr(), N_EXPERTS, DIM, INTER, x.data_ptr(), t,
                                            ids.data_ptr(), wts.data_ptr(), TOP_K, 10.0, ys[k].data_ptr())
            dt = time.process_time() - c0
            assert rc == 0, rc
            return dt

        call("A"), call("B")
        ref = ys["B"].clone()
        fig = {k: [] for k in libs}
        ratio = {k: [] for k in libs}
        for r in range(a.reps):
            w0, c0 = time.perf_counter(), time.process_time()  # the peak per CPU-second (one thread)
            peak = cpu_gemm.unit_peak("int8", 300_000) or 0.0
            peak *= (time.perf_counter() - w0) / max(time.process_time() - c0, 1e-9)
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                g = ops / call(k) / 1e9
                fig[k].append(g)
                ratio[k].append(g / peak)
                if not torch.equal(ys[k], ref):
                    bad += 1
                    print(f"t={per}: {k} differs from B's first output "
                          f"(max |diff| {(ys[k] - ref).abs().max().item():.3g})", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in fig.items()}
        out[str(per)] = {k: {"gops_per_cpu_s": round(med[k], 1), "ratio": round(statistics.median(ratio[k]), 3)}
                         for k in libs}
        out[str(per)]["A/B"] = round(med["A"] / med["B"], 3)
    print(json.dumps(out))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
