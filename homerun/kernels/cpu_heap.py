"""The C heap's policy for CPU prefill (glibc only).

A 512-token prefill chunk allocates and frees tens of fresh tensors of 8-64 MiB per layer ([T, 4, D] streams,
[T, H, Dh] queries and outputs). glibc serves every block above its mmap threshold (128 KiB, raised on a free up to
32 MiB) with a fresh mmap, so each such tensor is first-touched page by page: the kernel faults and zeroes 4 KiB at
a time, and the munmap at its free shoots down both threads' TLBs. On the 2-vCPU Zen 5 dev VM that was ~0.7 of a
3-layer 512-token prefill's 3.5 CPU-s, most of the time in the elementwise families (norm+RoPE, mHC).

So a CPU prefill step raises the thresholds once (blocks up to PREFILL_MMAP_THRESHOLD_BYTES come from the heap and
are reused), and after each prefill step gives the free heap back (`malloc_trim(0)`), so memory between prompts is
what it was. Decode steps keep the raised thresholds (their blocks are small). A user's own malloc settings in the
environment (MALLOC_*_ / GLIBC_TUNABLES) are left alone; so are other C libraries.
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# Above the largest per-chunk temporary: [512, 64, 512] fp32 queries are 64 MiB; larger blocks (long-context caches)
# keep their own mappings.
PREFILL_MMAP_THRESHOLD_BYTES = 256 << 20
# Free memory at the heap's top kept during a step instead of shrinking the heap at each free (a step's working set
# is a few hundred MiB); malloc_trim returns it all after the step.
PREFILL_TRIM_THRESHOLD_BYTES = 1 << 30

_state: dict = {}  # "libc": the bound glibc or None; "raised": thresholds set


def _glibc():
    """libc with mallopt and malloc_trim on glibc where the user set no malloc tunables, else None (once)."""
    if "libc" not in _state:
        lib = None
        user_set = any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not user_set:
            try:
                lib = ctypes.CDLL(None)
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.mallopt.restype = ctypes.c_int
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
            except (OSError, AttributeError):
                lib = None
        _state["libc"] = lib
    return _state["libc"]


def applies() -> bool:
    """Whether this process's heap policy is homerun's to set (glibc, no user malloc settings)."""
    return _glibc() is not None


@contextmanager
def prefill_heap() -> Iterator[None]:
    """One CPU prefill step: blocks up to PREFILL_MMAP_THRESHOLD_BYTES from the reused heap; the free heap returned
    to the system afterwards (also when the step fails)."""
    lib = _glibc()
    if lib is None:
        yield
        return
    if not _state.get("raised"):
        lib.mallopt(M_MMAP_THRESHOLD, PREFILL_MMAP_THRESHOLD_BYTES)
        lib.mallopt(M_TRIM_THRESHOLD, PREFILL_TRIM_THRESHOLD_BYTES)
        _state["raised"] = True
    try:
        yield
    finally:
        lib.malloc_trim(0)
