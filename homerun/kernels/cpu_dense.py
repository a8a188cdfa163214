"""BF16-stored dense matrices times fp32 activations on the native CPU kernels (`hr_bf16_gemm`), and mHC's small
per-token ops (`hr_sinkhorn`, `hr_hc_pre`, `hr_hc_post`), whose many tiny torch ops per call cost more than the math.

V4 stores its head, compressors, routers and the indexer's weights_proj in bf16. An fp32 model used to hold them
upcast to fp32, which doubles the bytes every decode step reads (V4-Flash's head alone: 1.06 GB -> 2.1 GB). Widening
bf16 to fp32 is exact, so this kernel reads the bf16 bytes and still equals the fp32 matmul up to summation order.
Not here: large batches (prefill), where a BLAS GEMM on an fp32 block wins; callers route those elsewhere.
"""

from __future__ import annotations

import ctypes

import torch

from homerun.errors import KernelError

_bound: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _lib() -> ctypes.CDLL | None:
    """The kernel library with this module's entry points bound, or None (not built, or an older build); resolved
    once, since every decode step calls through here many times."""
    global _bound
    if _bound is None:
        from homerun.kernels.cpu_experts import _native, resolve_path

        lib = _native()
        _bound = False
        if lib is not None and resolve_path() != "torch" and hasattr(lib, "hr_hc_post"):
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.hr_fp8_gemm_grouped.argtypes = [ctypes.c_int, p, p, i64, i64, p, i64, i64, p]
            lib.hr_fp8_gemm_grouped.restype = ctypes.c_int
            f32 = ctypes.c_float
            lib.hr_hc_weights.argtypes = [ctypes.c_int, p, i64, i64, i64, p, i64, p, p, f32, f32, i64, p, p, p]
            lib.hr_hc_weights.restype = ctypes.c_int
            i32 = ctypes.c_int
            lib.hr_norm_rope.argtypes = [i32, p, p, i64, i64, p, f32, i32, p, p, i64, i64, i32]
            lib.hr_norm_rope.restype = ctypes.c_int
            lib.hr_multi_gemm.argtypes = [i32, p, i64, i64, p, i64]
            lib.hr_multi_gemm.restype = ctypes.c_int
            lib.hr_attend_one.argtypes = [i32, p, p, i64, i64, i64, p, f32, p]
            lib.hr_attend_one.restype = ctypes.c_int
            lib.hr_bf16_gemm.argtypes = [ctypes.c_int, p, i64, i64, p, i64, p]
            lib.hr_bf16_gemm.restype = ctypes.c_int
            lib.hr_sinkhorn.argtypes = [p, i64, i64, i64, ctypes.c_float]
            lib.hr_sinkhorn.restype = ctypes.c_int
            lib.hr_hc_pre.argtypes = [p, p, p, i64, i64, i64]
            lib.hr_hc_post.argtypes = [p, p, p, p, p, i64, i64, i64]
            lib.hr_hc_pre.restype = lib.hr_hc_post.restype = ctypes.c_int
            _bound = lib
    return _bound or None


def available() -> bool:
    return _lib() is not None


_REBUILD = "rebuild with `pip install -e .`"


def _need() -> ctypes.CDLL:
    """The bound library, or a KernelError naming the fix."""
    lib = _lib()
    if lib is None:
        raise KernelError("the native kernels are not available", hint=_REBUILD)
    return lib


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelError(f"native {what} failed with code {rc}", hint=_REBUILD)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 @ w [N, K] bf16 ^T -> [..., N] fp32, with exact products and fp32 sums (native kernel)."""
    lib = _need()
    if w.dtype != torch.bfloat16 or w.dim() != 2 or w.device.type != "cpu":
        raise KernelError(f"bf16_linear needs a 2-D CPU bf16 weight, got {w.dtype} {tuple(w.shape)} on {w.device}",
                          hint="keep the stored bf16 tensor")
    n, k = w.shape
    if x.shape[-1] != k:
        raise KernelError(f"bf16_linear: input width {x.shape[-1]} does not match the weight's {k}",
                          hint="check which weight is applied to which activation")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    wc = w.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        rc = lib.hr_bf16_gemm(0, wc.data_ptr(), n, k, x2.data_ptr(), x2.shape[0], y.data_ptr())
        _ok(rc, "bf16 GEMM")
    return y.reshape(*lead, n)


class BoundLinear:
    """One stored matrix's native matmul with its checks, path code and addresses resolved once: a decode step makes
    ~15 such calls per layer, and re-deriving them cost ~20 us a call, as long as a 4 MB GEMV."""

    __slots__ = ("weight", "scale", "n", "k", "_fn", "_grouped", "_head")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, fn, grouped, head: tuple):
        self.weight, self.scale = weight, scale  # keep the tensors behind the addresses alive
        self.n, self.k = weight.shape
        self._fn, self._grouped, self._head = fn, grouped, head

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] fp32 on the CPU -> [..., N] fp32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k).contiguous()
        y = torch.empty(x2.shape[0], self.n, dtype=torch.float32)
        if x2.shape[0]:
            rc = self._fn(*self._head, x2.data_ptr(), x2.shape[0], y.data_ptr())
            if rc:  # the message only on failure: this is on the per-token path
                _ok(rc, f"matmul of a {self.n}x{self.k} weight")
        return y.view(*lead, self.n)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Block-diagonal: x [T, G, K] fp32 -> [T, G, N/G], rows [g*N/G, (g+1)*N/G) applied to x[:, g] (FP8 only)."""
        t, g, _ = x.shape
        x3 = x.contiguous()
        y = torch.empty(t, self.n, dtype=torch.float32)
        if t:
            rc = self._grouped(*self._head, x3.data_ptr(), t, g, y.data_ptr())
            if rc != 0:
                raise KernelError(f"native grouped matmul of a {self.n}x{self.k} weight in {g} groups failed with "
                                  f"code {rc}", hint="each group needs whole 128-row scale blocks")
        return y.view(t, g, self.n // g)


_MULTI_FMT = {"fp8": 1, "bf16": 7}  # hr_multi_gemm's job formats
MULTI_MAX_JOBS = 16


class BoundMulti:
    """Several BoundLinears of one input as one native call (`hr_multi_gemm`): one dispatch per step instead of one
    per matrix, with the threads balanced over all their rows."""

    __slots__ = ("parts", "k", "_jobs", "_fn")

    def __init__(self, parts: list[BoundLinear]):
        if not parts or len(parts) > MULTI_MAX_JOBS or len({b.k for b in parts}) != 1:
            raise KernelError(f"bind_multi needs 1..{MULTI_MAX_JOBS} matrices of one input width",
                              hint="group only the projections of one activation")
        self.parts, self.k = parts, parts[0].k
        self._jobs = (ctypes.c_int64 * (5 * len(parts)))()
        for j, b in enumerate(parts):
            fmt = "bf16" if b.scale is None else "fp8"
            self._jobs[5 * j : 5 * j + 4] = [_MULTI_FMT[fmt], b.weight.data_ptr(),
                                             b.scale.data_ptr() if b.scale is not None else 0, b.n]
        self._fn = _lib().hr_multi_gemm

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., K] fp32 on the CPU -> one [..., N_j] fp32 output per matrix."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k).contiguous()
        t = x2.shape[0]
        outs = [torch.empty(t, b.n, dtype=torch.float32) for b in self.parts]
        for j, y in enumerate(outs):
            self._jobs[5 * j + 4] = y.data_ptr()
        rc = self._fn(0, self._jobs, len(self.parts), self.k, x2.data_ptr(), t)
        _ok(rc, "multi-matrix GEMM")
        return [y.view(*lead, y.shape[1]) for y in outs]


def bind_multi(parts: list[BoundLinear]) -> BoundMulti | None:
    """One native call for several bound matrices of the same input width, or None without the kernel."""
    return BoundMulti(parts) if _lib() is not None else None


def bind_linear(weight: torch.Tensor, scale: torch.Tensor | None) -> BoundLinear | None:
    """A BoundLinear for a CPU FP8 (weight + ue8m0 scale) or bf16 matrix, or None where no native kernel applies."""
    lib = _lib()
    if lib is None or weight.dim() != 2 or weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    if scale is None:
        if weight.dtype != torch.bfloat16:
            return None
        n, k = weight.shape
        return BoundLinear(weight, None, lib.hr_bf16_gemm, None, (0, weight.data_ptr(), n, k))
    from homerun.kernels.cpu_experts import _as_bytes, _fp8_shapes, _path_code, resolve_path

    if weight.element_size() != 1 or scale.device.type != "cpu":
        return None
    n, k = _fp8_shapes(weight, scale, "fp8 weight")
    sb = _as_bytes(scale, "fp8 scale")
    head = (_path_code(resolve_path(), "fp32"), weight.data_ptr(), sb.data_ptr(), n, k)
    return BoundLinear(weight, sb, lib.hr_fp8_gemm, lib.hr_fp8_gemm_grouped, head)


def sinkhorn_(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """In place on a contiguous fp32 CPU tensor [..., n, n]: a column pass, then (iters - 1) x (rows, columns), each
    dividing by (sum + eps), as the model's torch loop does."""
    lib = _need()
    if m.dtype != torch.float32 or m.device.type != "cpu" or not m.is_contiguous() or m.shape[-1] != m.shape[-2]:
        raise KernelError(f"sinkhorn_ needs a contiguous fp32 CPU [..., n, n] tensor, got {m.dtype} "
                          f"{tuple(m.shape)} on {m.device}", hint="call .contiguous().float() first")
    n = m.shape[-1]
    rc = lib.hr_sinkhorn(m.data_ptr(), m.numel() // (n * n), n, iters, eps)
    _ok(rc, "sinkhorn")
    return m


def _f32c(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise KernelError(f"{name} is on {t.device}, the CPU kernels need CPU tensors", hint="keep it in host memory")
    return t.to(torch.float32).contiguous()


def hc_pre(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i pre[t, i] * x[t, i, :]: pre [T, n], x [T, n, D] -> [T, D] fp32 (mHC's collapse before a sublayer)."""
    lib = _need()
    t, n, d = x.shape
    if tuple(pre.shape) != (t, n):
        raise KernelError(f"hc_pre: pre {tuple(pre.shape)} does not match x {tuple(x.shape)}", hint="pre is [T, n]")
    pre, x = _f32c(pre, "pre"), _f32c(x, "x")
    out = torch.empty(t, d, dtype=torch.float32)
    lib.hr_hc_pre(pre.data_ptr(), x.data_ptr(), out.data_ptr(), t, n, d)
    return out


def hc_post(post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """post[t, j] * y[t] + sum_i comb[t, i, j] * x[t, i]: post [T, n], y [T, D], comb [T, n, n], x [T, n, D] ->
    [T, n, D] fp32 (mHC's update after a sublayer; comb applied transposed, as the model does)."""
    lib = _need()
    t, n, d = x.shape
    if tuple(post.shape) != (t, n) or tuple(y.shape) != (t, d) or tuple(comb.shape) != (t, n, n):
        raise KernelError(f"hc_post: shapes post {tuple(post.shape)}, y {tuple(y.shape)}, comb {tuple(comb.shape)} "
                          f"do not match x {tuple(x.shape)}", hint="post [T, n], y [T, D], comb [T, n, n]")
    post, y, comb, x = (_f32c(a, nm) for a, nm in ((post, "post"), (y, "y"), (comb, "comb"), (x, "x")))
    out = torch.empty(t, n, d, dtype=torch.float32)
    lib.hr_hc_post(post.data_ptr(), y.data_ptr(), comb.data_ptr(), x.data_ptr(), out.data_ptr(), t, n, d)
    return out


def hc_weights_args(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> tuple:
    """hc_weights' inputs checked and made contiguous fp32, and its outputs allocated: ((x, fn, scale, base),
    (pre, post, comb)), post and comb None for the head's fn [n, n*D]. Shared by the decode and the pooled kernel."""
    t, n, d = x.shape
    m = fn.shape[0]
    if fn.dim() != 2 or fn.shape[1] != n * d or m not in (n, (2 + n) * n) or base.numel() != m:
        raise KernelError(f"hc_weights: fn {tuple(fn.shape)} / base {tuple(base.shape)} do not match streams "
                          f"{tuple(x.shape)}", hint="fn is [(2+n)n or n, n*D]")
    ins = tuple(_f32c(a, nm) for a, nm in ((x, "x"), (fn, "fn"), (scale, "scale"), (base, "base")))
    pre = torch.empty(t, n, dtype=torch.float32)
    post = comb = None
    if m != n:
        post, comb = torch.empty(t, n, dtype=torch.float32), torch.empty(t, n, n, dtype=torch.float32)
    return ins, (pre, post, comb)


def hc_weights(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
               hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mHC's per-token weights: x [T, n, D] (the streams), fn [(2+n)n, n*D] -> pre [T, n], post [T, n], comb
    [T, n, n] (Sinkhorn-normalized), all fp32; with the head's fn [n, n*D], pre alone (post, comb None)."""
    lib = _need()
    (x, fn, scale, base), (pre, post, comb) = hc_weights_args(x, fn, scale, base)
    t, n, d = x.shape
    m = fn.shape[0]
    rc = lib.hr_hc_weights(0, x.data_ptr(), t, n, d, fn.data_ptr(), m, scale.data_ptr(), base.data_ptr(), norm_eps,
                           hc_eps, iters, pre.data_ptr(), post.data_ptr() if post is not None else None,
                           comb.data_ptr() if comb is not None else None)
    _ok(rc, "hc_weights")
    return pre, post, comb


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """x [T, ..., d] fp32 -> a new tensor: RMSNorm over d (times weight unless None; skipped if not norm), then
    interleaved-pair RoPE of the trailing 2 * cos.shape[-1] channels with token t's cos/sin [T, r/2] (inverse
    negates sin), as the model's rms_norm and apply_rope compute them."""
    lib = _need()
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise KernelError(f"norm_rope needs fp32 CPU activations, got {x.dtype} on {x.device}", hint="use the torch ops")
    d, t = x.shape[-1], x.shape[0]
    xc = x.contiguous()
    rows = xc.numel() // d if d else 0
    half = 0 if cos is None else cos.shape[-1]
    if half and (tuple(cos.shape) != (t, half) or sin is None or tuple(sin.shape) != (t, half) or 2 * half > d):
        raise KernelError(f"norm_rope: cos/sin {tuple(cos.shape)} do not match x {tuple(x.shape)}",
                          hint="cos and sin are [T, rope_dim/2]")
    w = _f32c(weight, "norm weight") if weight is not None else None
    if w is not None and w.numel() != d:
        raise KernelError(f"norm_rope: weight of {w.numel()} values for rows of {d}", hint="one weight per channel")
    c = _f32c(cos, "cos") if half else None
    s = _f32c(sin, "sin") if half else None
    y = torch.empty_like(xc)
    rc = lib.hr_norm_rope(0, xc.data_ptr(), y.data_ptr(), rows, d, w.data_ptr() if w is not None else None, eps,
                          int(norm), c.data_ptr() if half else None, s.data_ptr() if half else None, 2 * half,
                          max(rows // max(t, 1), 1), int(inverse))
    _ok(rc, "norm_rope")
    return y


def attend_one(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """One query's attention over rows every head shares: q [H, D], kv [N, D], sink [H] -> [H, D] fp32, with
    out[h] = softmax([scale * q[h] . kv[j] for j] ++ [sink[h]]) (sink column dropped) @ kv; heads run on the pool."""
    lib = _need()
    h, d = q.shape
    if kv.dim() != 2 or kv.shape[1] != d or sink.numel() != h:
        raise KernelError(f"attend_one: q {tuple(q.shape)}, kv {tuple(kv.shape)}, sink {tuple(sink.shape)} do not "
                          "match", hint="q [H, D], kv [N, D], sink [H]")
    q, kv, sink = _f32c(q, "q"), _f32c(kv, "kv"), _f32c(sink, "sink")
    out = torch.empty(h, d, dtype=torch.float32)
    rc = lib.hr_attend_one(0, q.data_ptr(), kv.data_ptr(), kv.shape[0], h, d, sink.data_ptr(), scale, out.data_ptr())
    _ok(rc, "attend_one")
    return out
