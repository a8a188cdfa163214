"""Issue 19: what would int8 x int8 dense prefill linears gain over the bf16 path? Measured on the machinery that
exists, no new kernel: at `--rows` tokens, per shape [N x K], alternated per round in one process, CPU-seconds
(medians of the rounds), ratios against the same process's unit peaks (`cpu_gemm.unit_peak`, best of 5):

  bf16_path      `cpu_gemm.prefill_linear` on an FP8 weight: FP8 -> bf16 per row block + oneDNN bf16 GEMM (today)
  bf16_gemm      torch's bf16 GEMM on weights converted once (the GEMM alone)
  fp8_to_bf16    the per-call conversion alone (whole matrix into a reused buffer)
  int8_gemm      `cpu_experts.fp4_linear(act="int8")` on an FP4 weight of the same shape: the expert path's VNNI
                 GEMM (activations quantized per 32-column block each call, weight rows decoded to int8 per call,
                 per-(row, 32-column) power-of-two scales). An FP4 weight is exactly an int8 weight with per-32 block
                 scales, so this is the single-plane int8 GEMM a dense path would reuse, its per-call weight decode
                 included (a LUT per byte pair; an FP8 -> int8 re-quantization needs a block max first, so costs more).

    python benchmarks/int8_dense_speed.py [--rows 512] [--shapes 4096x4096,32768x1024,4096x1024] [--reps 5]
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

from homerun.formats.quant import quant_fp4  # noqa: E402
from homerun.kernels import cpu_experts as ce  # noqa: E402
from homerun.kernels import cpu_gemm  # noqa: E402


def cpu_s(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def peaks(kind: str) -> float:
    """One process's best of 5 unit peak per CPU-second (GOP)."""
    best = 0.0
    for _ in range(5):
        w0, c0 = time.perf_counter(), time.process_time()
        g = cpu_gemm.unit_peak(kind) or 0.0
        w, c = time.perf_counter() - w0, time.process_time() - c0
        best = max(best, g * w / max(c, 1e-9))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--shapes", default="4096x4096,32768x1024,4096x1024")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ce.set_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    rec: dict = {"load": os.getloadavg()[0], "threads": a.threads, "rows": a.rows,
                 "peak_gops_per_cpu_s": {k: round(peaks(k), 1) for k in ("int8", "bf16")}}
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
        s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        codes, s4 = quant_fp4(torch.randn(n, k, generator=gen) * 0.05)
        x = torch.randn(a.rows, k, generator=gen)
        wb = cpu_gemm.fp8_to_bf16(w, s)
        xb = x.to(torch.bfloat16)
        conv_out = torch.empty(n, k, dtype=torch.bfloat16)
        fns = {"bf16_path": lambda: cpu_gemm.prefill_linear(w, s, x),
               "bf16_gemm": lambda: F.linear(xb, wb),
               "fp8_to_bf16": lambda: cpu_gemm.fp8_to_bf16(w, s, out=conv_out),
               "int8_gemm": lambda: ce.fp4_linear(x, codes, s4, act="int8")}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm: scratch pages, oneDNN primitives
        for _ in range(a.reps):
            for name, fn in fns.items():
                times[name].append(cpu_s(fn))
        gop = 2.0 * a.rows * n * k / 1e9
        r: dict = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            r[name] = {"cpu_ms": round(med * 1e3, 2)}
            if name != "fp8_to_bf16":
                unit = "int8" if name == "int8_gemm" else "bf16"
                r[name]["gops_per_cpu_s"] = round(gop / med, 1)
                r[name]["peak_ratio"] = round(gop / med / rec["peak_gops_per_cpu_s"][unit], 3)
        r["int8_over_bf16_path_time"] = round(r["int8_gemm"]["cpu_ms"] / r["bf16_path"]["cpu_ms"], 3)
        rec[shape] = r
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
