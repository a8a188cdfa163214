"""A/B of the unit-peak loops of two builds of the native kernels (issue 19: the 8-chain loops read low on Zen 5).

    git archive <commit> homerun/kernels/csrc | tar -x -C /tmp/old
    gcc -O3 -std=gnu11 -fPIC -pthread -shared -DHR_SRC_HASH=\"old\" -I/tmp/old/homerun/kernels/csrc \
        /tmp/old/homerun/kernels/csrc/hr_kernels.c -o /tmp/old.so -lm      # and the same for the new sources
    flock /tmp/hr-bench.lock python benchmarks/unit_peak_ab.py /tmp/old.so /tmp/new.so --rounds 3

Prints, per round, thread count and build, each unit's best of 5 `hr_unit_peak` runs in GOP/s.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

KINDS = (("int8", 1), ("bf16", 2), ("fp32", 3))  # hr_kernels.h: HR_PEAK_INT8, HR_PEAK_BF16_KIND, HR_PEAK_FP32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+", help="paths of the _hr_kernels builds to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    libs = {}
    for path in a.libs:
        lib = ctypes.CDLL(path)
        lib.hr_unit_peak.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.hr_unit_peak.restype = ctypes.c_double
        libs[path] = lib
    for rnd in range(a.rounds):
        for threads in (1, 2):
            for path, lib in libs.items():
                lib.hr_set_threads(threads)
                gops = {k: round(max(lib.hr_unit_peak(c, 2_000_000) for _ in range(a.reps)) / 1e9, 1) for k, c in KINDS}
                sys.stdout.write(f"round {rnd} threads={threads} {path} {gops}\n")


if __name__ == "__main__":
    main()
