"""In-process A/B of the dense prefill GEMM's FP8 -> bf16 conversion (issue 19): the old way (the scalar table,
forced with path="portable", into a fresh block per call) against `cpu_gemm.prefill_linear` (the AVX-512 lookup into
the reused scratch block), over V4-Flash's dense shapes at 512 rows, alternated 7 times, medians.

    python benchmarks/fp8_convert_ab.py 1     # kernel + torch threads (default 2)
"""

import statistics
import sys
import time

import homerun  # noqa: F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch
import torch.nn.functional as F

from homerun.kernels import cpu_gemm
from homerun.kernels.cpu_experts import _native as lib
th = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(th); lib().hr_set_threads(th)
torch.manual_seed(0)
shapes = [(32768, 1024), (4096, 8192), (2048, 4096), (4096, 2048), (1024, 4096), (8192, 1024)]
ws = [((torch.randn(n, k) * 0.1).to(torch.float8_e4m3fn), torch.full((n // 128, k // 128), 127, dtype=torch.uint8)) for n, k in shapes]
x = {k: torch.randn(512, k) for _, k in shapes}

def old(w, s, xx):
    n, k = w.shape
    rb = cpu_gemm._row_block(n, k)
    xb = xx.bfloat16()
    if rb >= n:
        return F.linear(xb, cpu_gemm.fp8_to_bf16(w, s, path="portable")).float()
    y = torch.empty(xx.shape[0], n)
    for r0 in range(0, n, rb):
        r1 = min(r0 + rb, n)
        y[:, r0:r1] = F.linear(xb, cpu_gemm.fp8_to_bf16(w, s, (r0, r1), path="portable"))
    return y

def new(w, s, xx):
    return cpu_gemm.prefill_linear(w, s, xx)

res = {"old": [], "new": []}
for r in range(7):
    for name, fn in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
        c0 = time.process_time(); t0 = time.perf_counter()
        for (w, s) in ws:
            fn(w, s, x[w.shape[1]])
        res[name].append((time.perf_counter() - t0, time.process_time() - c0))
flops = sum(2 * 512 * n * k for n, k in shapes)
for name, v in res.items():
    wall = statistics.median(a for a, _ in v); cpu = statistics.median(b for _, b in v)
    print(f"threads {th} {name}: wall {wall*1e3:.1f} ms ({flops/wall/1e9:.0f} GFLOP/s), CPU {cpu*1e3:.1f} ms ({flops/cpu/1e9:.0f} GFLOP per CPU-s)")
