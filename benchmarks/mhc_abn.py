"""N-way alternating A/B of saved `_hr_kernels` builds on the prefill mHC and norm+RoPE kernels (issue 19;
benchmarks/prefill_cpu.md, h19k), one process, at one chunk's real V4-Flash shapes (T tokens, n = 4 streams of
D = 4096, fn 24 x 16384, q [T, 64, 512] with 64 rope channels). Per round every build runs every kernel once (the
build order rotated by round); the figure is the median CPU-ms per call over rounds, with its fraction of the
kernel's roofline (bytes over the measured DRAM GB/s, FLOPs over the fp32 peak, whichever is longer; the limits of
prefill_elementwise.py). Outputs are compared with the first build's (differences reported, exit status 1): the
kernels are meant to keep their bits.

    cp homerun/kernels/_hr_kernels*.so /tmp/new.so                        # each build, after `build_ext --inplace`
    python benchmarks/mhc_abn.py /tmp/base.so /tmp/new.so /tmp/base_copy.so [--tokens 512] [--reps 7]

A build without `hr_hc_pre_norm_pool` (main before h19k) is timed on its two calls, hc_pre then the norm.
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

from homerun.kernels import cpu_heap  # noqa: E402

P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _bind(path: str):
    lib = ctypes.CDLL(path)
    lib.hr_hc_weights_pool.argtypes = [I32, P, I64, I64, I64, P, I64, P, P, F32, F32, I64, P, P, P]
    lib.hr_hc_pre_pool.argtypes = [P, P, P, I64, I64, I64]
    lib.hr_hc_post_pool.argtypes = [P, P, P, P, P, I64, I64, I64]
    lib.hr_norm_rope_pool.argtypes = [I32, P, P, I64, I64, I64, P, F32, I32, P, P, I64, I32]
    if hasattr(lib, "hr_hc_pre_norm_pool"):
        lib.hr_hc_pre_norm_pool.argtypes = [P, P, P, F32, P, I64, I64, I64]
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+", help="saved copies of the builds' _hr_kernels libraries")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--read-gbps", type=float, default=39.8)
    ap.add_argument("--rw-gbps", type=float, default=37.5)
    ap.add_argument("--fp32-gflops", type=float, default=258.0)
    a = ap.parse_args()
    libs = {f"{i}:{os.path.basename(p)}": _bind(p) for i, p in enumerate(a.libs)}
    names = list(libs)
    T, n, D, H, Dh, R = a.tokens, 4, 4096, 64, 512, 64
    m, k = (2 + n) * n, n * D
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(T, n, D, generator=g), torch.randn(T, D, generator=g)
    fn = torch.randn(m, k, generator=g) / 128
    base, scale = torch.randn(m, generator=g), torch.rand(3, generator=g)
    w = torch.rand(D, generator=g) + 0.5
    qsrc = torch.randn(T, H, Dh, generator=g)
    ang = torch.rand(T, R // 2, generator=g) * 6
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    pre, post, comb = torch.rand(T, n, generator=g), torch.rand(T, n, generator=g), torch.rand(T, n, n, generator=g)
    rd, rw, fp = a.read_gbps * 1e9, a.rw_gbps * 1e9, a.fp32_gflops * 1e9

    def hcw(lib):
        p, po, c = torch.empty(T, n), torch.empty(T, n), torch.empty(T, n, n)
        rc = lib.hr_hc_weights_pool(0, x.data_ptr(), T, n, D, fn.data_ptr(), m, scale.data_ptr(), base.data_ptr(),
                                    1e-6, 1e-6, 20, p.data_ptr(), po.data_ptr(), c.data_ptr())
        assert rc == 0
        return torch.cat([p.flatten(), po.flatten(), c.flatten()])

    def pre_norm(lib):
        out = torch.empty(T, D)
        if hasattr(lib, "hr_hc_pre_norm_pool"):
            assert lib.hr_hc_pre_norm_pool(pre.data_ptr(), x.data_ptr(), w.data_ptr(), 1e-6, out.data_ptr(), T, n,
                                           D) == 0
            return out
        h = torch.empty(T, D)
        assert lib.hr_hc_pre_pool(pre.data_ptr(), x.data_ptr(), h.data_ptr(), T, n, D) == 0
        assert lib.hr_norm_rope_pool(0, h.data_ptr(), out.data_ptr(), T, 1, D, w.data_ptr(), 1e-6, 1, None, None, 0,
                                     0) == 0
        return out

    def hc_post(lib):
        out = torch.empty(T, n, D)
        assert lib.hr_hc_post_pool(post.data_ptr(), y.data_ptr(), comb.data_ptr(), x.data_ptr(), out.data_ptr(), T,
                                   n, D) == 0
        return out

    def q_norm_rope(lib):  # the per-head norm + RoPE of q, out of place as the model calls it
        out = torch.empty_like(qsrc)
        assert lib.hr_norm_rope_pool(0, qsrc.data_ptr(), out.data_ptr(), T, H, Dh, None, 1e-6, 1, cos.data_ptr(),
                                     sin.data_ptr(), R, 0) == 0
        return out

    def inv_rope(lib):  # the attention output's inverse RoPE in place (rope_out); a fresh copy each call
        out = qsrc.clone()
        c0 = time.process_time()
        assert lib.hr_norm_rope_pool(0, out.data_ptr(), out.data_ptr(), T, H, Dh, None, 0.0, 0, cos.data_ptr(),
                                     sin.data_ptr(), R, 1) == 0
        return out, time.process_time() - c0

    cases = {  # name: (call, bytes, flops, bandwidth)
        "hc_weights": (hcw, T * k * 4, 2 * (m + 1) * k * T, rd),
        "hc_pre_norm": (pre_norm, T * k * 4 + T * D * 4, T * D * (2 * n + 4), rw),
        "hc_post": (hc_post, T * n * D * 8 + T * D * 4, T * n * D * 10, rw),
        "q norm_rope": (q_norm_rope, T * H * Dh * 8, T * H * (Dh * 3 + R * 3), rw),
        "inverse rope (in place)": (inv_rope, T * H * R * 8, T * H * R * 3, rw),
    }
    times = {c: {nm: [] for nm in names} for c in cases}
    outs: dict = {}
    with cpu_heap.prefill_heap():
        for rnd in range(a.reps + 1):  # round 0 warms up
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for case, (call, _, _, _) in cases.items():
                for nm in order:
                    c0 = time.process_time()
                    r = call(libs[nm])
                    dt = time.process_time() - c0
                    if isinstance(r, tuple):
                        r, dt = r
                    if rnd:
                        times[case][nm].append(dt)
                    else:
                        outs.setdefault(case, {})[nm] = r
    doc, differ = {"tokens": T, "reps": a.reps, "kernels": {}}, 0
    for case, (_, nbytes, flops, bw) in cases.items():
        limit_s = max(nbytes / bw, flops / fp)
        ref = outs[case][names[0]]
        row = {}
        for nm in names:
            med = statistics.median(times[case][nm])
            same = torch.equal(outs[case][nm], ref)
            differ += not same
            row[nm] = {"cpu_ms": med * 1e3, "of_roofline": limit_s / med, "bit_equal_first": same,
                       "max_abs_diff": float((outs[case][nm] - ref).abs().max())}
        doc["kernels"][case] = {"roofline_ms": limit_s * 1e3, "builds": row}
        cells = "  ".join(f"{nm} {v['cpu_ms']:6.2f} ({v['of_roofline']:.2f}){'' if v['bit_equal_first'] else ' DIFF'}"
                          for nm, v in row.items())
        print(f"{case:24} roofline {limit_s * 1e3:5.2f} ms   {cells}")
    print(json.dumps(doc))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
