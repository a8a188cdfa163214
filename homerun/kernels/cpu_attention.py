"""Prefill attention on the native CPU kernels (`hr_attend_prefill`, csrc/hr_attend.inc): the torch set's
`attend_rows` (homerun.kernels.torch_set) without its [T, H, N + k] score, mask and gathered-row temporaries. Per
query row the kernel lists the window rows and the compressed rows that query may see (CSA: the indexer's picks), runs
the softmax with the sink in the denominator, and sums the value rows; query rows and head groups split over the
native pool. fp32 products and sums: equal to the torch set up to summation order."""

from __future__ import annotations

import ctypes

import torch

from homerun.errors import KernelError

_fn: object | None = None  # None: not tried yet; False: unavailable


def _kernel():
    """The bound `hr_attend_prefill`, or None (library not built, an older build, or the torch path forced)."""
    global _fn
    if _fn is None:
        from homerun.kernels.cpu_experts import _native, resolve_path

        lib = _native()
        _fn = False
        if lib is not None and resolve_path() != "torch" and hasattr(lib, "hr_attend_prefill"):
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            f = lib.hr_attend_prefill
            f.argtypes = [ctypes.c_int, p, i64, i64, i64, p, i64, i64, i64, p, i64, p, i64, i64, i64, p,
                          ctypes.c_float, p]
            f.restype = ctypes.c_int
            _fn = f
    return _fn or None


def available() -> bool:
    return _kernel() is not None


def _f32c(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise KernelError(f"attend_rows: {name} is on {t.device}, the CPU kernel needs CPU tensors",
                          hint="use the torch kernel set for other devices")
    return t.to(torch.float32).contiguous()


def attend_rows(q: torch.Tensor, keys: torch.Tensor, key_pos0: int, window: int, comp: torch.Tensor | None,
                sel: torch.Tensor | None, q_pos0: int, rate: int, sink: torch.Tensor, scale: float,
                path: str | None = None) -> torch.Tensor:
    """The torch set's `attend_rows` on the native kernel: q [T, H, D], keys [N, D], comp [C, D] or None, sel [T, k]
    or None, sink [H] -> [T, H, D] fp32 (see homerun.kernels.torch_set.TorchKernels.attend_rows). path: a native
    code path of homerun.kernels.cpu_experts.PATHS (default: the best here; tests run each)."""
    fn = _kernel()
    if fn is None:
        raise KernelError("the native prefill attention kernel is not available", hint="rebuild with `pip install -e .`")
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2] or sink.numel() != q.shape[1]:
        raise KernelError(f"attend_rows: q {tuple(q.shape)}, keys {tuple(keys.shape)}, sink {tuple(sink.shape)} do "
                          "not match", hint="q [T, H, D], keys [N, D], sink [H]")
    code = 0
    if path is not None:
        from homerun.kernels.cpu_experts import _PATH_CODE, resolve_path

        code = _PATH_CODE.get(resolve_path(path), 0)
        if not code:
            raise KernelError(f"attend_rows: {path!r} is not a native path", hint="use avx512, avx2 or portable")
    t, h, d = q.shape
    qc, kc, sc = _f32c(q, "q"), _f32c(keys, "keys"), _f32c(sink, "sink")
    cc = _f32c(comp, "comp") if comp is not None and comp.shape[0] else None
    if cc is not None and cc.shape[1] != d:
        raise KernelError(f"attend_rows: compressed rows {tuple(cc.shape)} for queries of width {d}",
                          hint="comp is [C, D]")
    selc = None
    if sel is not None:
        if sel.dim() != 2 or sel.shape[0] != t:
            raise KernelError(f"attend_rows: sel {tuple(sel.shape)} for {t} queries", hint="sel is [T, k]")
        selc = sel.to(device="cpu", dtype=torch.int64).contiguous()
    out = torch.empty(t, h, d, dtype=torch.float32)
    rc = fn(code, qc.data_ptr(), t, h, d, kc.data_ptr() if kc.shape[0] else None, kc.shape[0], key_pos0, window,
            cc.data_ptr() if cc is not None else None, cc.shape[0] if cc is not None else 0,
            selc.data_ptr() if selc is not None and selc.shape[1] and cc is not None else None,
            selc.shape[1] if selc is not None and cc is not None else 0,
            q_pos0, rate, sc.data_ptr(), scale, out.data_ptr())
    if rc != 0:
        raise KernelError(f"native prefill attention failed with code {rc}",
                          hint="a selected compressed entry past the rows given (code -3), or rebuild the kernels")
    return out
