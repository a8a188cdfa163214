"""Issue 19: the exact (fp32) prefill GEMM, torch's F.linear (MKL's sgemm, which runs its AVX2 code on AMD CPUs)
against `cpu_gemm.f32_linear` (oneDNN's fp32 GEMM, AVX-512 where the CPU has it), at V4-Flash's shapes: the narrow
linears the fast set keeps exact (router, the indexer's weights_proj and compressor) and the exact mode's dense ones.
CPU-milliseconds per call (medians of `--reps`, the two alternated in one process, under the model's prefill heap
policy), GFLOP per CPU-second, and each one's max error against the float64 product over max |y|.

    python benchmarks/f32_gemm_speed.py --rows 512 [--reps 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# name -> (N, K): V4-Flash (256 routed experts; this repo's L3 synthetic checkpoint has 48)
SHAPES = {"router": (256, 4096), "idx_weights_proj": (64, 4096), "idx_comp_wkv": (256, 4096),
          "comp_wkv": (1024, 4096), "wq_a": (1024, 4096), "wo_b": (4096, 8192), "wq_b": (32768, 1024)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import homerun  # noqa: F401 - before torch (its OpenMP settings)
    import torch
    import torch.nn.functional as F

    from homerun.kernels import cpu_gemm
    from homerun.kernels.cpu_heap import prefill_heap

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, 4096, generator=g)
    doc: dict = {"rows": a.rows, "threads": torch.get_num_threads(), "shapes": {}}
    with torch.inference_mode(), prefill_heap():
        for name, (n, k) in SHAPES.items():
            xs = x[:, :k] if k <= 4096 else torch.randn(a.rows, k, generator=g)
            xs = xs.contiguous()
            w = torch.randn(n, k, generator=g) * k**-0.5
            ref = (xs.double() @ w.double().T)
            times: dict = {"blas": [], "onednn": []}
            fns = {"blas": lambda: F.linear(xs, w), "onednn": lambda: cpu_gemm.f32_linear(xs, w)}
            err = {s: ((f().double() - ref).abs().max() / ref.abs().max()).item() for s, f in fns.items()}
            for _ in range(a.reps):
                for side, f in fns.items():
                    c0 = time.process_time()
                    f()
                    times[side].append(time.process_time() - c0)
            flop = 2.0 * a.rows * n * k
            row = {}
            for side, ts in times.items():
                med = statistics.median(ts)
                row[side] = {"cpu_ms": 1e3 * med, "gflop_per_cpu_s": flop / med / 1e9, "max_err_rel": err[side]}
            row["speedup"] = row["blas"]["cpu_ms"] / row["onednn"]["cpu_ms"]
            doc["shapes"][name] = row
            if not a.json:
                print(f"{name:17} [{n} x {k}]  blas {row['blas']['cpu_ms']:7.2f} ms "
                      f"({row['blas']['gflop_per_cpu_s']:5.0f} GFLOP/CPU-s)  onednn {row['onednn']['cpu_ms']:7.2f} ms "
                      f"({row['onednn']['gflop_per_cpu_s']:5.0f})  x{row['speedup']:.2f}  err {err['blas']:.1e} / "
                      f"{err['onednn']:.1e}")
    print(json.dumps(doc, indent=None if not a.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
