"""Issue 19: where the bf16 dense prefill path's time goes, per V4-Flash dense matrix (one layer's every FP8 and bf16
linear that the fast set runs as a bf16 GEMM), at `--rows` tokens and `--threads` threads: CPU-seconds (medians of
`--reps` rounds, the parts alternated in one process) of

  path      what the model calls: `cpu_gemm.prefill_linear` (FP8 or bf16 weight) or `prefill_grouped` (wo_a, 8 groups)
  x_bf16    the activations rounded to bf16 (`x.to(torch.bfloat16)`)
  convert   FP8 -> bf16 of the whole matrix into a reused buffer (the path does it in row blocks of <= 32 MiB)
  gemm      torch's bf16 GEMM alone (oneDNN) on the converted weight, bf16 out (per group for wo_a)
  out_f32   the bf16 output widened to fp32 (`.float()`)
  rest      path - (x_bf16 + convert + gemm + out_f32): Python, the row-block stores, allocations

under the model's prefill heap policy (`cpu_heap.prefill_heap`), and GOP per CPU-second against the same process's
bf16 unit peak (`cpu_gemm.unit_peak`, best of 5, per CPU-s).
`--blocks 256,1024` also times the GEMM alone over N-blocks of that many weight rows (one call each, the weights
already converted), and `fused_N`: each block converted into a small (cache-resident) scratch and multiplied at once.
`--f32` also times the exact mode's FP8 -> fp32 conversion of each FP8 matrix (`cpu_prefill.fp8_to_f32`) on the
128 x 128 block table (`f32_table`, the portable/AVX2 path) and on the AVX-512 rows (`f32_rows`), with ns per weight.

    python benchmarks/dense_prefill_speed.py --rows 512 --threads 1 [--reps 3] [--only wq_b,wo_a] [--blocks 1024]
        [--f32]
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
from homerun.kernels import cpu_gemm, cpu_heap, cpu_prefill  # noqa: E402

# V4-Flash's dense matrices per layer: name -> (N, K, FP8?, groups). The indexer's compressor (256 outputs), its
# weights_proj (64) and the router (256) stay fp32 in the fast set (dispatch.EXACT_MAX_OUT), so are not here.
SHAPES = {
    "wq_a": (1024, 4096, True, 1), "wkv": (512, 4096, True, 1), "wq_b": (32768, 1024, True, 1),
    "wo_a": (8192, 4096, True, 8), "wo_b": (4096, 8192, True, 1),
    "sh_w1": (2048, 4096, True, 1), "sh_w3": (2048, 4096, True, 1), "sh_w2": (4096, 2048, True, 1),
    "idx_wq_b": (8192, 1024, True, 1), "comp_wkv": (1024, 4096, False, 1), "comp_wgate": (1024, 4096, False, 1),
}


def cpu_s(fn) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def bf16_peak() -> float:
    """One process's best of 5 bf16 unit peak per CPU-second (GOP)."""
    best = 0.0
    for _ in range(5):
        w0, c0 = time.perf_counter(), time.process_time()
        g = cpu_gemm.unit_peak("bf16") or 0.0
        w, c = time.perf_counter() - w0, time.process_time() - c0
        best = max(best, g * w / max(c, 1e-9))
    return best


def fused(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, rb: int) -> torch.Tensor:
    """Candidate: convert rb weight rows into a small (cache-resident) scratch, multiply them at once."""
    n, k = w.shape
    xb = x.to(torch.bfloat16)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    buf = torch.empty(rb, k, dtype=torch.bfloat16)
    for r0 in range(0, n, rb):
        r1 = min(r0 + rb, n)
        y[:, r0:r1] = F.linear(xb, cpu_gemm.fp8_to_bf16(w, s, (r0, r1), out=buf[: r1 - r0]))
    return y


def parts(name: str, rows: int, blocks: list[int], gen: torch.Generator, f32: bool = False) -> dict:
    n, k, fp8, groups = SHAPES[name]
    if fp8:
        w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.float8_e4m3fn)
        s = torch.randint(118, 127, (n // 128, k // 128), generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        wb = cpu_gemm.fp8_to_bf16(w, s)
    else:
        w, s = (torch.randn(n, k, generator=gen) * 0.02).bfloat16(), None
        wb = w
    per = n // groups
    x = torch.randn(rows, groups, k, generator=gen) if groups > 1 else torch.randn(rows, k, generator=gen)
    xb = x.to(torch.bfloat16)
    conv = torch.empty(n, k, dtype=torch.bfloat16)
    yb = F.linear(xb, wb) if groups == 1 else torch.stack([F.linear(xb[:, g], wb[g * per:(g + 1) * per])
                                                           for g in range(groups)], 1)
    fns = {
        "path": (lambda: cpu_gemm.prefill_linear(w, s, x)) if groups == 1
        else (lambda: cpu_gemm.prefill_grouped(w, s, x, groups)),
        "x_bf16": lambda: x.to(torch.bfloat16),
        "gemm": (lambda: F.linear(xb, wb)) if groups == 1
        else (lambda: [F.linear(xb[:, g], wb[g * per:(g + 1) * per]) for g in range(groups)]),
        "out_f32": lambda: yb.float(),
    }
    if fp8:
        fns["convert"] = lambda: cpu_gemm.fp8_to_bf16(w, s, out=conv)
        if f32:
            fns["f32_table"] = lambda: cpu_prefill.fp8_to_f32(w, s, (0, n), path="avx2")
            fns["f32_rows"] = lambda: cpu_prefill.fp8_to_f32(w, s, (0, n), path="avx512")
    for nb in blocks:
        if groups == 1 and nb < n:
            fns[f"gemm_blocks_{nb}"] = lambda nb=nb: [F.linear(xb, wb[r:r + nb]) for r in range(0, n, nb)]
        if fp8 and groups == 1 and nb < n:
            fns[f"fused_{nb}"] = lambda nb=nb: fused(w, s, x, nb)
    return {"fns": fns, "gop": 2.0 * rows * n * k / 1e9, "weights": n * k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names of SHAPES (default: all)")
    ap.add_argument("--blocks", default="", help="comma-separated N-block sizes for the blocked GEMM calls")
    ap.add_argument("--f32", action="store_true", help="also time the exact mode's FP8 -> fp32 conversion")
    a = ap.parse_args()
    names = [s for s in a.only.split(",") if s] or list(SHAPES)
    bad = [s for s in names if s not in SHAPES]
    if bad:
        print(f"error: --only: unknown matrix {bad[0]!r}; hint: one of {', '.join(SHAPES)}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(a.threads)
    ce.set_threads(a.threads)
    peak = bf16_peak()
    rec: dict = {"load": os.getloadavg()[0], "threads": a.threads, "rows": a.rows,
                 "bf16_peak_gops_per_cpu_s": round(peak, 1), "shapes": {}}
    with cpu_heap.prefill_heap():  # the model's prefill heap policy: big blocks reused, not page-faulted per call
        run(a, names, peak, rec)
    print(json.dumps(rec))


def run(a: argparse.Namespace, names: list[str], peak: float, rec: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    tot: dict[str, float] = {}
    for name in names:
        p = parts(name, a.rows, [int(b) for b in a.blocks.split(",") if b], gen, a.f32)
        for fn in p["fns"].values():
            fn()  # warm: scratch pages, oneDNN primitives
        times: dict[str, list[float]] = {nm: [] for nm in p["fns"]}
        for _ in range(a.reps):
            for nm, fn in p["fns"].items():
                times[nm].append(cpu_s(fn))
        med = {nm: statistics.median(ts) for nm, ts in times.items()}
        med["rest"] = med["path"] - sum(med.get(nm, 0.0) for nm in ("x_bf16", "convert", "gemm", "out_f32"))
        r = {nm: round(v * 1e3, 2) for nm, v in med.items()}
        r["path_peak_ratio"] = round(p["gop"] / med["path"] / peak, 3)
        r["gemm_peak_ratio"] = round(p["gop"] / med["gemm"] / peak, 3)
        for nm in ("convert", "f32_table", "f32_rows"):
            if nm in med:
                r[f"{nm}_ns_per_weight"] = round(med[nm] * 1e9 / p["weights"], 3)
        rec["shapes"][name] = r
        for nm, v in med.items():
            tot[nm] = tot.get(nm, 0.0) + v
        tot["gop"] = tot.get("gop", 0.0) + p["gop"]
    rec["total_cpu_ms"] = {nm: round(v * 1e3, 1) for nm, v in tot.items() if nm != "gop"}
    rec["total_path_peak_ratio"] = round(tot["gop"] / tot["path"] / peak, 3)
    rec["total_gemm_peak_ratio"] = round(tot["gop"] / tot["gemm"] / peak, 3)


if __name__ == "__main__":
    main()
