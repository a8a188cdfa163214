"""The fused routed-expert op on every compiled path x activation mode, this checkout's build against a saved build,
bit for bit (issue 19; benchmarks/prefill_cpu.md, h19m). int8_moe_ab.py times the int8 AVX-512 case on V4-Flash
shapes; this covers the rest on small ones: fp4 [288 <-> 160] (a partial 4-block group and 16-block chunk), fp8
[200 <-> 72] and fp4 [1024 <-> 512]; paths portable / avx2 / avx512 (those this CPU runs) x act fp32 / bf16 / int8;
t = 1, 3, 7, 64, 150 tokens, top-6 of 12 experts; 1 and 2 threads. Exit status 1 on any difference.

    cp homerun/kernels/_hr_kernels*.so /tmp/base.so       # in the base checkout, after its build
    python benchmarks/moe_paths_equal.py --base /tmp/base.so
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.getcwd())  # the checkout it is run from, not an installed homerun

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.errors import KernelError  # noqa: E402
from homerun.formats.quant import quant_fp4, quant_fp8  # noqa: E402
from homerun.kernels import cpu_experts as ce  # noqa: E402

P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SHAPES = [(0, 288, 160), (1, 200, 72), (0, 1024, 512)]  # (fmt: 0 fp4 / 1 fp8, D, I)
N_EXPERTS, TOP_K, LIMIT = 12, 6, 10.0


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.hr_moe_forward.argtypes = [I32, I32, P, I64, I64, I64, P, I64, P, P, I64, ctypes.c_float, P]
    lib.hr_set_threads.argtypes = [I32]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a saved copy of the other build's _hr_kernels library")
    a = ap.parse_args()
    libs = (ce._native(), load(a.base))
    gen = torch.Generator().manual_seed(0)
    n = bad = 0
    for fmt, d, i in SHAPES:
        q = quant_fp4 if fmt == 0 else quant_fp8
        mats = [q(torch.randn(i, d, generator=gen) * 0.08) + q(torch.randn(i, d, generator=gen) * 0.08)
                + q(torch.randn(d, i, generator=gen) * 0.08) for _ in range(N_EXPERTS)]
        table = torch.tensor([[t.data_ptr() for t in m] for m in mats], dtype=torch.int64)
        for path in (p for p in ce.available_paths() if p != "torch"):
            for act in ("fp32", "bf16", "int8"):
                try:
                    code = ce._path_code(path, act)
                except KernelError:  # bf16 on a path without AVX512-BF16
                    continue
                for t in (1, 3, 7, 64, 150):
                    for threads in (1, 2):
                        x = torch.randn(t, d, generator=gen) * 4  # the SwiGLU clamp engages
                        ids = torch.stack([torch.randperm(N_EXPERTS, generator=gen)[:TOP_K] for _ in range(t)])
                        wts = torch.rand(t, TOP_K, generator=gen)
                        ys, rcs = [], []
                        for lib in libs:
                            lib.hr_set_threads(threads)
                            ys.append(torch.empty(t, d))
                            rcs.append(lib.hr_moe_forward(code, fmt, table.data_ptr(), N_EXPERTS, d, i, x.data_ptr(),
                                                          t, ids.data_ptr(), wts.data_ptr(), TOP_K, LIMIT,
                                                          ys[-1].data_ptr()))
                        n += 1
                        if rcs[0] != rcs[1] or not torch.equal(ys[0], ys[1]):
                            bad += 1
                            print(f"differs: fmt {fmt} [{d} <-> {i}] {path} {act} t={t} threads={threads}",
                                  file=sys.stderr)
    print(f"{n} outputs, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
