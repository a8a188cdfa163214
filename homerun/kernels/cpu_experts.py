"""CPU compute for FP4/FP8 weights: native SIMD kernels (homerun/kernels/csrc, loaded through ctypes) with a pure-torch
fallback that gives the same results where no compiler was available at install.

What it provides:
- `backend_info()`: which path runs here ("avx512" | "avx2" | "portable" | "torch"), whether the library was built,
  why, and the thread count. The planner shows it for `homerun plan --hw auto`.
- `fp4_linear` / `fp8_linear`: y = x @ dequant(W)^T for CPU-resident weights (decode GEMV and small-batch GEMM).
- `CpuMoE`: the fused routed-expert op for CPU-resident experts (offload.cpu_backend.CpuExpertBackend serves it as
  an ExpertBackend). One native call per layer computes gate/up, clamped SwiGLU, down and the weighted sum for every
  token and expert, on all cores.

Activations: `act="fp32"` (the default, every path) keeps them fp32, so results match fp32 dequantize-then-matmul up
to summation order (relative error well under 1e-5). `act="bf16"` (AVX-512 with AVX512-BF16 only) rounds the
activations of FP4 batches (>= 2 tokens on one weight) to bf16 and multiplies with vdpbf16ps, about 1.5x the batch
throughput at relative error ~1e-3 (bound 1e-2); single tokens and FP8 weights stay fp32 in that mode too.
`act="int8"` (every path, the torch fallback emulating it) quantizes the activations of FP4 weights per 32-column
block (symmetric, d = amax/127, round half to even; `quantize_act_int8`) and runs exact integer dots (vpdpbusd on
AVX512-VNNI, vpmaddubsw on AVX2), for GEMV, GEMM and both halves of the fused op (the hidden activation is
re-quantized as an int8 value plus an int8 residual, two rows through the same decoded weights, because one rounding
of the heavy-tailed SwiGLU product doubled the error); relative error ~5e-3 for a linear, ~8e-3 for the fused op
(bound 1e-2). FP8 weights keep fp32 activations. `default_act()` is the mode the runtime should use: "int8" where
a SIMD int8 kernel exists, else "fp32"; act="auto" means that mode.

Not here: placement (which experts live on the CPU) and the runtime wiring; both live with the runtime.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from homerun.errors import CheckpointError, KernelError
from homerun.formats.quant import FP4_BLOCK, FP8_BLOCK, dequant_fp4, dequant_fp8
from homerun.formats.experts import ExpertSource, ExpertWeights
from homerun.kernels.reference import reference_moe

PATHS = ("avx512", "avx2", "portable", "torch")  # best first
_PATH_CODE = {"portable": 1, "avx2": 2, "avx512": 3}
_FMT_CODE = {"fp4": 0, "fp8": 1}
ACTS = ("fp32", "bf16", "int8")
_ACT_FLAG = {"fp32": 0, "bf16": 0x100, "int8": 0x200}
_INT8_IMPL = {1: "portable", 2: "avx2", 3: "avx512-vnni"}  # hr_int8_impl codes
_ABI_VERSION = 5
_ERRORS = {
    -1: "the requested kernel path is not supported by this CPU",
    -2: "bad shape (FP4 input width must be a multiple of 32)",
    -3: "an expert id is outside the loaded table",
    -4: "out of memory in the native kernel",
}
_BUILD_HINT = "Rebuild the kernels with `pip install -e .` (or `python setup.py build_ext --inplace`); a C compiler is needed."

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_reason: str | None = None  # set once the load was attempted


def _library_file() -> Path | None:
    here = Path(__file__).resolve().parent
    for pattern in ("_hr_kernels*.so", "_hr_kernels*.pyd", "_hr_kernels*.dylib", "_hr_kernels*.dll"):
        found = sorted(here.glob(pattern))
        if found:
            return found[0]
    return None


def _stale_reason(lib: ctypes.CDLL, path: Path) -> str | None:
    """Why `lib` does not match the C sources beside it (homerun.kernels.csrc_hash), or None: built from other
    sources (a failed rebuild keeps the old file), or by a build that recorded no hash. No sources: None."""
    from homerun.kernels.csrc_hash import source_hash

    want = source_hash()
    if want is None:
        return None
    fn = getattr(lib, "hr_src_hash", None)
    if fn is None:
        got = ""
    else:
        fn.restype = ctypes.c_char_p
        got = (fn() or b"").decode()
    if got == want:
        return None
    built = f"sources {got}" if got else "sources it did not record"
    return (f"{path.name} was built from {built}, not the csrc/ beside it ({want}); rebuild it with "
            "`python setup.py build_ext --inplace` (or reinstall)")


def _native() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason is kept for backend_info)."""
    global _lib, _lib_reason
    with _lock:
        if _lib_reason is not None:
            return _lib
        path = _library_file()
        if path is None:
            _lib_reason = "native kernel library not built (no C compiler at install, or the build failed)"
            return None
        try:
            lib = ctypes.CDLL(str(path))
            if lib.hr_abi_version() != _ABI_VERSION:
                _lib_reason = f"{path.name} has ABI {lib.hr_abi_version()}, expected {_ABI_VERSION}; rebuild it"
                return None
            stale = _stale_reason(lib, path)
            if stale:
                _lib_reason = stale
                warnings.warn(f"homerun: {stale}; using the pure-torch fallback", RuntimeWarning, stacklevel=2)
                return None
        except (OSError, AttributeError) as exc:
            _lib_reason = f"cannot load {path.name}: {exc}"
            return None
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for name in ("hr_fp4_gemm", "hr_fp8_gemm"):
            fn = getattr(lib, name)
            fn.argtypes = [i32, p, p, i64, i64, p, i64, p]
            fn.restype = i32
        lib.hr_moe_forward.argtypes = [i32, i32, p, i64, i64, i64, p, i64, p, p, i64, ctypes.c_float, p]
        lib.hr_moe_forward.restype = i32
        lib.hr_read_sum.argtypes = [i32, p, i64]
        lib.hr_read_sum.restype = ctypes.c_uint64
        lib.hr_set_threads.argtypes = [i32]
        lib.hr_set_spin_us.argtypes = [i32]
        for name in ("hr_best_path", "hr_get_threads", "hr_path_supported", "hr_set_threads", "hr_set_spin_us"):
            getattr(lib, name).restype = i32
        lib.hr_path_supported.argtypes = [i32]
        lib.hr_int8_impl.argtypes = [i32]
        lib.hr_int8_impl.restype = i32
        _lib = lib
        _lib_reason = f"built from source ({path.name})"
        return _lib


def available_paths() -> list[str]:
    """Paths usable on this machine, best first; "torch" is always last."""
    lib = _native()
    native = [p for p in PATHS[:-1] if lib is not None and lib.hr_path_supported(_PATH_CODE[p])]
    return native + ["torch"]


def resolve_path(path: str | None = None) -> str:
    """None or "auto" -> the best available path; an explicit path must be available here."""
    avail = available_paths()
    if path is None or path == "auto":
        return avail[0]
    if path not in PATHS:
        raise KernelError(f"unknown CPU kernel path {path!r}", hint=f"use one of: auto, {', '.join(PATHS)}")
    if path not in avail:
        reason = _lib_reason if _native() is None else "this CPU lacks the instructions it needs"
        raise KernelError(f"CPU kernel path {path!r} is not available: {reason}", hint=f"available: {', '.join(avail)}")
    return path


def available_acts(path: str | None = None) -> list[str]:
    """Activation modes usable on `path` (default: the best path); the torch fallback emulates int8."""
    p = resolve_path(path)
    lib = _native()
    if p == "torch" or lib is None:
        return ["fp32", "int8"]
    return [a for a in ACTS if a == "fp32" or lib.hr_path_supported(_PATH_CODE[p] | _ACT_FLAG[a])]


def int8_kernel(path: str | None = None) -> str:
    """Which kernel runs int8 activations on `path`: "avx512-vnni" | "avx2" | "portable" | "torch" (emulation)."""
    p = resolve_path(path)
    lib = _native()
    if p == "torch" or lib is None:
        return "torch"
    return _INT8_IMPL.get(int(lib.hr_int8_impl(_PATH_CODE[p])), "portable")


def default_act(path: str | None = None) -> str:
    """The activation mode the runtime should use on `path`: "int8" where a SIMD int8 kernel (AVX512-VNNI or AVX2)
    runs it (several times the fp32 decode speed at ~5e-3 relative error), else "fp32" (exact)."""
    return "int8" if int8_kernel(path) in ("avx512-vnni", "avx2") else "fp32"


def _resolve_act(path: str, act: str | None) -> str:
    """None/"auto" -> default_act(path); otherwise act must be usable on path."""
    if act == "fp32":  # every path; the hot path of fp8_linear stays free of feature queries
        return act
    if act is None or act == "auto":
        return default_act(path)
    if act not in ACTS:
        raise KernelError(f"unknown activation mode {act!r}", hint=f"use one of: auto, {', '.join(ACTS)}")
    if act not in available_acts(path):
        raise KernelError(f"activation mode {act!r} is not available on the {path} path",
                          hint="bf16 activations need a CPU with AVX512-BF16; use act='int8' or 'fp32'")
    return act


def _path_code(path: str, act: str) -> int:
    return _PATH_CODE[path] | _ACT_FLAG[_resolve_act(path, act)]


def set_threads(n: int | None) -> int:
    """Threads for the native kernels (None or <= 0: every CPU this process may use). Returns the count."""
    lib = _native()
    if lib is None:
        return torch.get_num_threads()
    return int(lib.hr_set_threads(int(n or 0)))


def set_spin_us(us: int) -> int | None:
    """How long (microseconds) idle kernel threads spin for the next call before sleeping; returns the previous
    setting, or None without the native library. Long spins suit decode steps whose torch ops run on one thread."""
    lib = _native()
    return None if lib is None else int(lib.hr_set_spin_us(int(us)))


def backend_info() -> dict:
    """{"path", "built", "reason", "threads", "acts", "default_act", "int8_kernel"}: what CPU expert compute runs
    here and why; "acts" are the activation modes usable on "path", "default_act" the one to use."""
    lib = _native()
    path = resolve_path(None)
    acts = {"acts": available_acts(path), "default_act": default_act(path), "int8_kernel": int8_kernel(path)}
    if lib is None:
        return {"path": "torch", "built": False, "reason": f"{_lib_reason}; using the pure-torch fallback",
                "threads": torch.get_num_threads(), **acts}
    if path == "torch":
        reason = "native library loaded but no kernel path is usable on this CPU; using the pure-torch fallback"
    else:
        reason = f"{_lib_reason}; {path} selected by CPU feature detection"
    return {"path": path, "built": True, "reason": reason, "threads": int(lib.hr_get_threads()), **acts}


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K % 32 == 0) -> (int8 q [..., K], fp32 d [..., K/32]) exactly as the native int8 path does:
    per 32-column block d = amax / 127, q = round_half_even(x * (1 / d)) clamped to +-127, q = 0 where d = 0 (every
    step one fp32 rounding, so the bytes are identical)."""
    k = x.shape[-1]
    xb = x.to(torch.float32).reshape(*x.shape[:-1], k // FP4_BLOCK, FP4_BLOCK)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, torch.ones_like(d) / torch.where(d > 0, d, 1.0), 0.0)
    q = torch.round((xb * inv).clamp(-127, 127))
    return q.to(torch.int8).reshape(x.shape), d.squeeze(-1)


def _dequant_act_int8(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype).reshape(*d.shape, FP4_BLOCK) * d.to(dtype).unsqueeze(-1)).reshape(q.shape)


def _fp4_int8_torch(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """The native int8 path's math in float64 (exact integer dots, one rounding at the end): x2 [T, K] fp32.
    residual: also quantize x2 - dequant(q) and add its product, as the fused op does for its hidden activation."""
    q, d = quantize_act_int8(x2)
    xq = _dequant_act_int8(q, d, torch.float64)
    if residual:
        q2, d2 = quantize_act_int8(x2 - _dequant_act_int8(q, d, torch.float32))
        xq = xq + _dequant_act_int8(q2, d2, torch.float64)
    return (xq @ dequant_fp4(codes, scale, torch.float64).T).to(torch.float32)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelError(f"native {what} failed: {_ERRORS.get(rc, f'error {rc}')}", hint=_BUILD_HINT)


def _as_bytes(t: torch.Tensor, name: str) -> torch.Tensor:
    """A contiguous uint8 view of a CPU weight or scale tensor (no copy when it is already contiguous)."""
    if t.device.type != "cpu":
        raise KernelError(f"{name} is on {t.device}, the CPU kernels need CPU tensors", hint="keep it in host memory")
    if t.element_size() != 1:
        raise CheckpointError(f"{name} has dtype {t.dtype}, expected a 1-byte packed type (int8/e4m3/e8m0)",
                              hint="pass the checkpoint's packed tensors, not dequantized ones")
    return t.contiguous().view(torch.uint8)


def _fp4_shapes(codes: torch.Tensor, scale: torch.Tensor, name: str) -> tuple[int, int]:
    if codes.dim() != 2 or scale.dim() != 2:
        raise CheckpointError(f"{name}: FP4 codes and scale must be 2-D, got {tuple(codes.shape)} / {tuple(scale.shape)}",
                              hint="expected int8 [out, in/2] and e8m0 [out, in/32]")
    n, k = codes.shape[0], codes.shape[1] * 2
    if tuple(scale.shape) != (n, k // FP4_BLOCK) or k % FP4_BLOCK:
        raise CheckpointError(f"{name}: FP4 scale shape {tuple(scale.shape)} does not match codes {tuple(codes.shape)}",
                              hint=f"expected scale [{n}, {k // FP4_BLOCK}] for codes [{n}, {k // 2}]")
    return n, k


def _fp8_shapes(w: torch.Tensor, scale: torch.Tensor, name: str) -> tuple[int, int]:
    if w.dim() != 2 or scale.dim() != 2:
        raise CheckpointError(f"{name}: FP8 weight and scale must be 2-D", hint="expected [out, in] + [out/128, in/128]")
    n, k = w.shape
    want = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"{name}: FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)}",
                              hint=f"expected {list(want)}")
    return n, k


def _linear(fmt: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, path: str | None, name: str,
            act: str = "fp32") -> torch.Tensor:
    n, k = (_fp4_shapes if fmt == "fp4" else _fp8_shapes)(w, scale, name)
    if x.shape[-1] != k:
        raise KernelError(f"{name}: input width {x.shape[-1]} does not match the weight's {k}",
                          hint="check which weight is applied to which activation")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    p = resolve_path(path)
    act = _resolve_act(p, act)
    if fmt == "fp4" and act == "int8" and p == "torch" and x2.shape[0]:
        return _fp4_int8_torch(x2.to(torch.float32), w, scale).to(x.dtype).reshape(*lead, n)
    code = _path_code(p, act) if p != "torch" else None
    if p == "torch" or x2.shape[0] == 0:
        deq = dequant_fp4 if fmt == "fp4" else dequant_fp8
        y = x2.to(torch.float32) @ deq(w, scale, torch.float32).T
        return y.to(x.dtype).reshape(*lead, n)
    xf = x2.to(torch.float32).contiguous()
    wb, sb = _as_bytes(w, f"{name}.weight"), _as_bytes(scale, f"{name}.scale")
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    fn = _native().hr_fp4_gemm if fmt == "fp4" else _native().hr_fp8_gemm
    _check(fn(code, wb.data_ptr(), sb.data_ptr(), n, k, xf.data_ptr(), xf.shape[0], y.data_ptr()), f"{fmt} GEMM")
    return y.to(x.dtype).reshape(*lead, n)


def fp4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, path: str | None = None,
               act: str = "fp32", name: str = "fp4 weight") -> torch.Tensor:
    """x [..., K] @ dequant_fp4(codes [N, K/2], scale [N, K/32])^T -> [..., N] in x.dtype (fp32 accumulation).
    act: "fp32" (exact), "bf16", "int8", or "auto" (= default_act(path))."""
    return _linear("fp4", x, codes, scale, path, name, act)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, path: str | None = None,
               name: str = "fp8 weight") -> torch.Tensor:
    """x [..., K] @ dequant_fp8(w [N, K], scale [ceil(N/128), ceil(K/128)])^T -> [..., N] in x.dtype."""
    return _linear("fp8", x, w, scale, path, name)


@dataclass
class _LayerTable:
    """Per layer: expert id -> the six packed tensors' addresses, as the native op reads them."""

    fmt: str
    dim: int
    inter: int
    ptrs: torch.Tensor  # [n, 6] int64, 0 = not loaded yet
    loaded: torch.Tensor  # [n] bool
    keep: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # keeps the tensors (and addresses) alive


class CpuMoE:
    """Routed experts computed on the CPU from packed FP4/FP8 weights, with the forward of an ExpertBackend.

    `source(layer, e)` is asked once per expert; its tensors (normally zero-copy mmap views) are kept referenced and
    their addresses cached, so a forward call copies no weights and runs no Python per expert.
    """

    def __init__(self, source: ExpertSource, *, swiglu_limit: float, path: str | None = None,
                 act: str = "fp32", threads: int | None = None):
        self.source = source
        self.swiglu_limit = float(swiglu_limit)
        self.path = resolve_path(path)
        self.act = _resolve_act(self.path, act)  # "auto" -> default_act(path)
        self._code = _path_code(self.path, self.act) if self.path != "torch" else 0
        if threads is not None:
            set_threads(threads)
        self._tables: dict[int, _LayerTable] = {}

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        if self.path == "torch":
            if self.act == "int8":
                return self._int8_torch(layer, x, expert_ids, expert_weights)
            return reference_moe(self.source, layer, x, expert_ids, expert_weights, swiglu_limit=self.swiglu_limit)
        t, d = x.shape
        ids = expert_ids.to(torch.int64).contiguous()
        wts = expert_weights.to(torch.float32).contiguous()
        if ids.shape != wts.shape or ids.dim() != 2 or ids.shape[0] != t:
            raise KernelError(f"layer {layer}: expert_ids {tuple(ids.shape)} / weights {tuple(wts.shape)} do not match x {tuple(x.shape)}",
                              hint="expected [T, k] for both")
        if t == 0:
            return torch.zeros_like(x)
        tab = self._ensure(layer, ids)
        if tab.dim != d:
            raise KernelError(f"layer {layer}: hidden size {d} does not match the experts' {tab.dim}",
                              hint="check the expert source's layer indexing")
        xf = x.to(torch.float32).contiguous()
        out = torch.empty(t, d, dtype=torch.float32)
        rc = _native().hr_moe_forward(
            self._code, _FMT_CODE[tab.fmt], tab.ptrs.data_ptr(), tab.ptrs.shape[0], d, tab.inter,
            xf.data_ptr(), t, ids.data_ptr(), wts.data_ptr(), ids.shape[1], self.swiglu_limit, out.data_ptr())
        _check(rc, f"fused expert op (layer {layer})")
        return out.to(x.dtype)

    def _int8_torch(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                    expert_weights: torch.Tensor) -> torch.Tensor:
        """The fused op's int8-activation math in torch (FP4 experts; FP8 ones keep fp32 activations, as natively)."""
        xf, lim = x.to(torch.float32), self.swiglu_limit
        out = torch.zeros_like(xf)
        for e in torch.unique(expert_ids).tolist():
            rows, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            ew = self.source(layer, e)

            def lin(a: torch.Tensor, w: torch.Tensor, s: torch.Tensor, residual: bool = False) -> torch.Tensor:
                if ew.fmt != "fp4":
                    return a @ dequant_fp8(w, s, torch.float32).T
                return _fp4_int8_torch(a, w, s, residual)

            g = lin(xf[rows], ew.w1, ew.w1_scale).clamp(max=lim)
            u = lin(xf[rows], ew.w3, ew.w3_scale).clamp(-lim, lim)
            y = lin(torch.nn.functional.silu(g) * u, ew.w2, ew.w2_scale, residual=True)
            out.index_add_(0, rows, y * expert_weights[rows, slot].unsqueeze(-1).to(torch.float32))
        return out.to(x.dtype)

    def clear(self, layer: int | None = None) -> None:
        """Forget cached expert addresses (all layers, or one), releasing the references to their tensors."""
        if layer is None:
            self._tables.clear()
        else:
            self._tables.pop(layer, None)

    def _ensure(self, layer: int, ids: torch.Tensor) -> _LayerTable:
        tab = self._tables.get(layer)
        top = int(ids.max())
        if int(ids.min()) < 0:
            raise KernelError(f"layer {layer}: negative expert id in expert_ids", hint="the router produced an invalid id")
        if tab is not None and top < tab.ptrs.shape[0] and bool(tab.loaded[ids].all()):
            return tab  # hot path: every expert already known
        for e in torch.unique(ids).tolist():
            if tab is None or e >= tab.ptrs.shape[0] or not bool(tab.loaded[e]):
                tab = self._add(layer, tab, e, top)
        return tab

    def _add(self, layer: int, tab: _LayerTable | None, e: int, top: int) -> _LayerTable:
        ew: ExpertWeights = self.source(layer, e)
        name = f"layers.{layer}.ffn.experts.{e}"
        if ew.fmt not in _FMT_CODE:
            raise CheckpointError(f"{name}: unknown expert format {ew.fmt!r}", hint="expected 'fp4' or 'fp8'")
        shapes = _fp4_shapes if ew.fmt == "fp4" else _fp8_shapes
        i1, d1 = shapes(ew.w1, ew.w1_scale, f"{name}.w1")
        i3, d3 = shapes(ew.w3, ew.w3_scale, f"{name}.w3")
        d2, i2 = shapes(ew.w2, ew.w2_scale, f"{name}.w2")
        if not (i1 == i3 == i2 and d1 == d3 == d2):
            raise CheckpointError(f"{name}: w1/w3 [I, D] and w2 [D, I] disagree ({i1}x{d1}, {i3}x{d3}, {d2}x{i2})",
                                  hint="the expert's tensors come from different layers or models")
        if tab is None:
            n = max(top + 1, 8)
            tab = _LayerTable(ew.fmt, d1, i1, torch.zeros(n, 6, dtype=torch.int64), torch.zeros(n, dtype=torch.bool))
            self._tables[layer] = tab
        elif (ew.fmt, d1, i1) != (tab.fmt, tab.dim, tab.inter):
            raise CheckpointError(f"{name}: format/shape {ew.fmt} {i1}x{d1} differs from this layer's other experts "
                                  f"({tab.fmt} {tab.inter}x{tab.dim})", hint="every routed expert of a layer must match")
        if e >= tab.ptrs.shape[0]:
            n = max(e + 1, 2 * tab.ptrs.shape[0])
            ptrs, loaded = torch.zeros(n, 6, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
            ptrs[: tab.ptrs.shape[0]] = tab.ptrs
            loaded[: tab.loaded.shape[0]] = tab.loaded
            tab.ptrs, tab.loaded = ptrs, loaded
        parts = (ew.w1, ew.w1_scale, ew.w3, ew.w3_scale, ew.w2, ew.w2_scale)
        labels = ("w1.weight", "w1.scale", "w3.weight", "w3.scale", "w2.weight", "w2.scale")
        kept = tuple(_as_bytes(t, f"{name}.{lab}") for t, lab in zip(parts, labels))
        tab.keep[e] = kept
        tab.ptrs[e] = torch.tensor([t.data_ptr() for t in kept], dtype=torch.int64)
        tab.loaded[e] = True
        return tab
