"""N-way alternating A/B of saved `_hr_kernels` builds on the int8 fused routed-expert op, one process, one thread
unless --threads (issue 19; benchmarks/prefill_cpu.md, h19h). int8_moe_ab.py compares the checkout with one base;
this takes any number of saved libraries, so the same run can hold an A/A control (a base and a byte copy of it).
Same case as int8_moe_ab.py: 48 FP4 experts [4096 <-> 2048], top-6, per-expert batches given by --batches. Per round:
the VNNI peak loop, then every build once (the order rotated by round), each the CPU-s of one call; "ratio" is the
median over rounds of (GOP per CPU-s) / (the same round's peak per CPU-s). Outputs are compared with the first
build's: differences are counted and reported (exit status 1), since most kernel changes are meant to be exact.

    cp homerun/kernels/_hr_kernels*.so /tmp/new.so                        # each build, after `build_ext --inplace`
    python benchmarks/int8_moe_abn.py /tmp/base.so /tmp/new.so /tmp/base_copy.so [--reps 7] [--batches 10,24,50,100]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="+", help="saved copies of the builds' _hr_kernels libraries")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="10,24,50,100", help="tokens per expert")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads of every build (the peak loop's too)")
    a = ap.parse_args()
    ce.set_threads(a.threads)
    libs = {}
    for i, path in enumerate(a.libs):
        lib = ctypes.CDLL(path)
        lib.hr_moe_forward.argtypes = [I32, I32, P, I64, I64, I64, P, I64, P, P, I64, ctypes.c_float, P]
        lib.hr_set_threads.argtypes = [I32]
        lib.hr_set_threads(a.threads)
        libs[f"{i}:{os.path.basename(path)}"] = lib
    names = list(libs)
    code = ce._path_code("avx512", "int8")
    gen = torch.Generator().manual_seed(0)

    def fp4(n, k):
        w, s = quant_fp4(torch.randn(n, k, generator=gen) * 0.05)
        return [w.contiguous(), s.contiguous()]

    mats = [fp4(INTER, DIM) + fp4(INTER, DIM) + fp4(DIM, INTER) for _ in range(N_EXPERTS)]
    table = torch.tensor([[t.data_ptr() for t in m] for m in mats], dtype=torch.int64)
    out = {"threads": a.threads, "load": os.getloadavg()[0], "differ": {}}
    for per in map(int, a.batches.split(",")):
        t = per * N_EXPERTS // TOP_K
        x = torch.randn(t, DIM, generator=gen)
        ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(t)])
        wts = torch.rand(t, TOP_K, generator=gen)
        ys = {k: torch.empty(t, DIM) for k in names}
        ops = 2.0 * 3 * DIM * INTER * t * TOP_K

        def call(k):
            c0 = time.process_time()
            rc = libs[k].hr_moe_forward(code, 0, table.data_ptr(), N_EXPERTS, DIM, INTER, x.data_ptr(), t,
                                        ids.data_ptr(), wts.data_ptr(), TOP_K, 10.0, ys[k].data_ptr())
            if rc != 0:
                raise RuntimeError(f"{k}: hr_moe_forward returned {rc}")
            return time.process_time() - c0

        for k in names:
            call(k)
        ref = ys[names[0]].clone()
        ratio = {k: [] for k in names}
        for r in range(a.reps):
            w0, c0 = time.perf_counter(), time.process_time()
            peak = cpu_gemm.unit_peak("int8", 300_000) or 0.0
            peak *= (time.perf_counter() - w0) / max(time.process_time() - c0, 1e-9)  # per CPU-second
            for k in names[r % len(names):] + names[:r % len(names)]:
                ratio[k].append(ops / call(k) / 1e9 / peak)
        out["differ"][per] = [k for k in names if not torch.equal(ys[k], ref)]
        out[per] = {k: round(statistics.median(v), 3) for k, v in ratio.items()}
        print(per, out[per], flush=True)
    print(json.dumps(out))
    return 1 if any(out["differ"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
