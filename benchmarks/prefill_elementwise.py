"""The CPU prefill set's elementwise kernels, one call each at one chunk's real V4-Flash shapes (T tokens, n = 4
streams of D = 4096, 64 heads x 512), CPU-ms per call (median), against a roofline: bytes moved over the measured
DRAM bandwidth, FLOPs over the fp32 peak, whichever is longer. Runs under the prefill heap policy
(homerun.kernels.cpu_heap), as a prefill does, so fresh outputs are not page-faulted.

    python benchmarks/prefill_elementwise.py [--tokens 512] [--reps 10] [--read-gbps 39.8] [--rw-gbps 37.5]
        [--fp32-gflops 258]

Defaults: one Zen 5 core of the dev VM (a 512 MiB AVX-512 read: 39.8 GB/s; read + write of a scaled copy, bytes of
both: 37.5 GB/s; `prefill_fit.py peaks` fp32: 258 GFLOP/s per CPU-second). Bytes: each operand once, the outputs
once (their write-allocate reads are in the read + write figure).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--read-gbps", type=float, default=39.8)
    ap.add_argument("--rw-gbps", type=float, default=37.5)
    ap.add_argument("--fp32-gflops", type=float, default=258.0)
    a = ap.parse_args()
    import homerun  # noqa: F401 - before torch (its OpenMP settings)
    import torch

    from homerun.kernels import cpu_heap, dispatch

    T, n, D, H, Dh = a.tokens, 4, 4096, 64, 512
    ks = dispatch.kernels_for("cpu", torch.float32, T)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(T, n, D, generator=g), torch.randn(T, D, generator=g)
    fn = torch.randn((2 + n) * n, n * D, generator=g) / 128
    base, scale = torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g)
    pre, post, comb = ks.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)
    q, w = torch.randn(T, H, Dh, generator=g), torch.rand(D, generator=g)
    ang = torch.rand(T, 32, generator=g) * 6
    c, s = ang.cos(), ang.sin()
    rd, rw, fp = a.read_gbps * 1e9, a.rw_gbps * 1e9, a.fp32_gflops * 1e9
    cases = {  # name: (call, bytes, flops, bandwidth)
        "hc_weights": (lambda: ks.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20), T * n * D * 4,
                       2 * ((2 + n) * n + 1) * n * D * T, rd),
        "hc_pre_norm": (lambda: ks.hc_pre_norm(pre, x, w, 1e-6), T * n * D * 4 + T * D * 4, T * D * (2 * n + 4), rw),
        "hc_post": (lambda: ks.hc_post(post, y, comb, x), T * n * D * 8 + T * D * 4, T * n * D * 10, rw),
        "norm_rope q": (lambda: ks.norm_rope(q, None, 1e-6, c, s), T * H * Dh * 8, T * H * (Dh * 3 + 64 * 3), rw),
        "inverse rope": (lambda: ks.norm_rope(q, None, 0.0, c, s, norm=False, inverse=True), T * H * Dh * 8,
                         T * H * 64 * 3, rw),
    }
    doc = {"tokens": T, "heap_policy": cpu_heap.applies(), "kernels": {}}
    with cpu_heap.prefill_heap():
        for name, (call, nbytes, flops, bw) in cases.items():
            call()
            times = []
            for _ in range(a.reps):
                c0 = time.process_time()
                call()
                times.append(time.process_time() - c0)
            med = sorted(times)[len(times) // 2]
            mem_s, flop_s = nbytes / bw, flops / fp
            doc["kernels"][name] = {"cpu_ms": med * 1e3, "bytes": nbytes, "flops": flops, "mem_ms": mem_s * 1e3,
                                    "flop_ms": flop_s * 1e3, "of_roofline": max(mem_s, flop_s) / med}
            print(f"{name:14} {med * 1e3:7.2f} CPU-ms   {nbytes / 2**20:5.0f} MiB -> {mem_s * 1e3:5.2f} ms   "
                  f"{flops / 1e6:5.0f} MFLOP -> {flop_s * 1e3:5.2f} ms   of roofline {max(mem_s, flop_s) / med:4.2f}")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
