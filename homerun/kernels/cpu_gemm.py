"""Prefill-sized dense GEMMs on the CPU: FP8 (e4m3 + ue8m0 128x128) and bf16 weights times activations rounded to
bf16, on the bf16 units (AVX512-BF16 / AMX-BF16 through oneDNN, which torch's bf16 matmul calls), with fp32
accumulation inside the GEMM; and the measured peaks of the units a prefill uses (`unit_peak`).

Why bf16 and not int8 for these matrices: an e4m3 weight times a power-of-two scale is exactly a bf16 number, so the
bf16 GEMM keeps the weights exact and rounds only the activations (and the output) to bf16 (relative error ~3e-3 per
linear, bound 1e-2); int8 would also round the weights (e4m3 has a 4-bit significand over a 2^8 range per block).
The FP8 -> bf16 conversion runs natively (`hr_fp8_to_bf16`, on every thread: on AVX-512 bit arithmetic over whole
rows read front to back, 0.08-0.11 ns per weight on one Zen 5 core; elsewhere a 256-entry table per 128x128 block)
in row blocks of at most `BLOCK_ELEMS` elements into one reused per-thread scratch block, so no resident bf16 copy
exists, the transient stays bounded, and no call pays fresh page faults (a new 32 MiB block cost about as much as
the conversion itself). At 512 rows the conversion is 2-4% of the path (benchmarks/dense_prefill_speed.py).

`prefill_linear(w, scale, x)`: y = x W^T in fp32 out; `prefill_grouped(w, scale, x, groups)`: the block-diagonal
projection (V4's wo_a). Without the native library the conversion falls back to torch (same bytes, slower).
`f32_linear(x, w)`: the exact (fp32) prefill GEMM on oneDNN's fp32 kernels, which use AVX-512 where the CPU has it;
torch's F.linear calls MKL's sgemm, which runs its AVX2 code on AMD CPUs (Zen 5: 97 vs ~220 GFLOP per CPU-s at
[512 x 4096] x [4096 x 1024]).
Not here: which kernel a forward uses (homerun.kernels.dispatch), decode-sized rows (homerun.kernels.cpu_dense).
"""

from __future__ import annotations

import ctypes
import threading

import torch
import torch.nn.functional as F

from homerun.errors import KernelError
from homerun.formats.quant import FP8_BLOCK, dequant_fp8

# bf16 weight blocks are kept under this many elements (32 MiB).
BLOCK_ELEMS = 1 << 24
PEAK_KINDS = {"int8": 1, "bf16": 2, "fp32": 3}

_bound: ctypes.CDLL | bool | None = None


def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's entry points bound, or None (not built, or an older build)."""
    global _bound
    if _bound is None:
        from homerun.kernels.cpu_experts import _native

        lib = _native()
        _bound = False
        if lib is not None and hasattr(lib, "hr_fp8_to_bf16"):
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.hr_fp8_to_bf16.argtypes = [ctypes.c_int, p, p, i64, i64, i64, i64, p]
            lib.hr_fp8_to_bf16.restype = ctypes.c_int
            lib.hr_unit_peak.argtypes = [ctypes.c_int, i64]
            lib.hr_unit_peak.restype = ctypes.c_double
            _bound = lib
    return _bound or None


def available() -> bool:
    return _lib() is not None


def fp8_to_bf16(w: torch.Tensor, scale: torch.Tensor, rows: tuple[int, int] | None = None, *,
                out: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """Rows [r0, r1) of an FP8 weight [N, K] with ue8m0 128x128 scales -> bf16 [r1 - r0, K], exactly the fp32
    dequantization rounded to bf16 (which is exact for e4m3 x 2^e). out: a contiguous bf16 [r1 - r0, K] to write
    (a reused scratch); path: the native code path ("auto", "portable", "avx2", "avx512"; tests pin each)."""
    n, k = w.shape
    r0, r1 = rows if rows is not None else (0, n)
    lib = _lib()
    if lib is None or w.device.type != "cpu":
        s0, s1 = r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)
        full = dequant_fp8(w[s0 * FP8_BLOCK : min(s1 * FP8_BLOCK, n)], scale[s0:s1], torch.bfloat16)
        return full[r0 - s0 * FP8_BLOCK : r1 - s0 * FP8_BLOCK]
    wb = w.contiguous().view(torch.uint8)
    sb = scale.contiguous().view(torch.uint8)
    if out is None:
        out = torch.empty(r1 - r0, k, dtype=torch.bfloat16)
    elif out.shape != (r1 - r0, k) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise KernelError(f"fp8_to_bf16: out is {out.dtype} {tuple(out.shape)}, need contiguous bf16 {(r1 - r0, k)}",
                          hint="pass a contiguous bf16 block of the rows asked for")
    rc = lib.hr_fp8_to_bf16(_PATHS[path], wb.data_ptr(), sb.data_ptr(), n, k, r0, r1, out.data_ptr())
    if rc != 0:
        raise KernelError(f"native FP8 -> bf16 conversion failed with code {rc} on path {path}",
                          hint="check the weight's shape, or use path auto")
    return out


_PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}
_scratch = threading.local()


def _scratch_block(rows: int, k: int) -> torch.Tensor:
    """This thread's reused bf16 block for `rows` x k converted weights (grown to the largest asked for, at most
    BLOCK_ELEMS elements by the row-block rule): the pages stay mapped between calls."""
    buf = getattr(_scratch, "buf", None)
    need = rows * k
    if buf is None or buf.numel() < need:
        buf = _scratch.buf = torch.empty(need, dtype=torch.bfloat16)
    return buf[:need].view(rows, k)


def _row_block(n: int, k: int) -> int:
    return max(FP8_BLOCK, (BLOCK_ELEMS // max(k, 1)) // FP8_BLOCK * FP8_BLOCK)


def prefill_linear(w: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] fp32, activations rounded to bf16, bf16 GEMM with fp32 accumulation. W: FP8
    [N, K] with `scale`, or bf16 [N, K] (scale None)."""
    xb = x.to(torch.bfloat16)
    if scale is None:
        if w.dtype != torch.bfloat16:
            raise KernelError(f"prefill_linear takes FP8 or bf16 weights, got {w.dtype}", hint="keep fp32 in fp32")
        return F.linear(xb, w).float()
    n, _ = w.shape
    rb = _row_block(*w.shape)
    if rb >= n:
        return F.linear(xb, _bf16_rows(w, scale, 0, n)).float()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rb):
        r1 = min(r0 + rb, n)
        y[..., r0:r1] = F.linear(xb, _bf16_rows(w, scale, r0, r1))
    return y


def _bf16_rows(w: torch.Tensor, scale: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of an FP8 weight in bf16, in this thread's scratch block when the native library converts them
    (valid until the next conversion on this thread)."""
    native = w.device.type == "cpu" and _lib() is not None
    return fp8_to_bf16(w, scale, (r0, r1), out=_scratch_block(r1 - r0, w.shape[1]) if native else None)


def prefill_grouped(w: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-diagonal projection x [T, G, in] -> [T, G, out/G] (group g: rows g*out/G ...), as prefill_linear."""
    n, k = w.shape
    per = n // groups
    y = torch.empty(x.shape[0], groups, per, dtype=torch.float32, device=x.device)
    xb = x.to(torch.bfloat16)
    for g in range(groups):
        wg = w[g * per : (g + 1) * per] if scale is None else _bf16_rows(w, scale, g * per, (g + 1) * per)
        y[:, g] = F.linear(xb[:, g], wg)
    return y


def _onednn_f32() -> bool:
    """Whether torch has oneDNN's fp32 linear (`mkldnn::_linear_pointwise`) and oneDNN is enabled (checked per
    call: `torch.backends.mkldnn.flags(enabled=False)` turns it off)."""
    global _ONEDNN_OP
    if _ONEDNN_OP is None:
        try:
            _ONEDNN_OP = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        except (AttributeError, RuntimeError):
            _ONEDNN_OP = False
    return _ONEDNN_OP and bool(torch.backends.mkldnn.enabled)


_ONEDNN_OP: bool | None = None


def f32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 @ w [N, K] fp32 ^T -> [..., N] fp32: fp32 products and fp32 sums, F.linear up to summation
    order, on oneDNN's fp32 GEMM for CPU tensors where torch has it (see the module doc), else F.linear."""
    if (x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or not _onednn_f32()):
        return F.linear(x, w)
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def bf16_units() -> bool:
    """Whether this CPU has bf16 dot-product units (AVX512-BF16 or AMX) that torch's bf16 GEMM runs on. Without them
    (AVX2-only CPUs) that GEMM is emulated: measured 9 GFLOP per CPU-second against fp32's 64 at [512 x 4096] x
    [4096 x 4096] on an AVX2 EPYC, so the exact fp32 GEMM is the faster unit there."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is None for p in probes):  # an older torch: ask the native unit probe
        return unit_peak("bf16", 1000) is not None
    return any(bool(p()) for p in probes if p is not None)


def unit_peak(kind: str, iters: int = 2_000_000) -> float | None:
    """The measured peak of one unit over every kernel thread, in GOP/s (a multiply-add counts 2): "int8"
    (AVX512-VNNI), "bf16" (AVX512-BF16), "fp32" (AVX-512 FMA); None where this CPU or build lacks it."""
    lib = _lib()
    if lib is None or kind not in PEAK_KINDS:
        return None
    ops = float(lib.hr_unit_peak(PEAK_KINDS[kind], int(iters)))
    return ops / 1e9 if ops > 0 else None


def gemm_peak_gflops(rows: int = 512, k: int = 4096, n: int = 4096, reps: int = 3) -> float:
    """Achieved GFLOP/s of torch's bf16 GEMM at a prefill shape (the unit prefill_linear runs on), median of reps."""
    import time

    a = torch.randn(rows, k).bfloat16()
    b = torch.randn(n, k).bfloat16()
    F.linear(a, b)
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        F.linear(a, b)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 2.0 * rows * k * n / ts[len(ts) // 2] / 1e9
