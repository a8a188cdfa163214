"""Prefill-sized native CPU ops (csrc/hr_attend.inc), used by the CPU prefill kernel sets (homerun.kernels.dispatch):

- `attend_prefill` (`hr_attend_prefill`): the torch set's `attend_prefill` (homerun.kernels.torch_set) without its
  [T, H, N + k] score, mask and gathered-row temporaries. Per query row the kernel lists the window rows and the
  compressed rows that query may see (CSA: the indexer's picks), runs the softmax with the sink in the denominator,
  and sums the value rows; query rows and head groups split over the native pool.
- `index_topk` (`hr_index_topk`, csrc/hr_index.inc): the torch set's `index_topk`, the lightning
  indexer's scores and top-k per query, page by page into running candidate lists per query: no [q, Hi, page] or
  [q, k + page] temporaries, queries (and, for a few queries, key ranges) on the pool.
- `hc_weights` (`hr_hc_weights_pool`): mHC's per-token weights as the decode kernel computes them (the same bits),
  tokens on the pool, each token's [n, D] streams read once.
- `hc_pre`, `hc_post`, `norm_rope`: the decode kernels of homerun.kernels.cpu_dense with tokens split over the pool
  (the RoPE in AVX-512 with the scalar loop's bits); `hc_pre_norm`: hc_pre and the norm in one call.
- `fp8_linear` / `fp8_grouped`: the exact fp32 prefill GEMM of an FP8 weight in QLinear.torch_forward's row blocks,
  each block dequantized natively (`hr_fp8_to_f32`, on the pool: on AVX-512 bit arithmetic over whole rows read front
  to back, as `hr_fp8_to_bf16`; elsewhere a table per 128 x 128 block) instead of torch's three full-size passes
  (cast, expanded scale, multiply), then multiplied on oneDNN's fp32 GEMM (`cpu_gemm.f32_linear`).

fp32 products and sums: equal to the torch set up to summation order."""

from __future__ import annotations

import ctypes

import torch

from homerun.errors import KernelError

_fn: object | None = None  # None: not tried yet; False: unavailable
_mix: dict = {}  # the pooled mHC mixes and norm+RoPE, bound with _fn


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
            lib.hr_hc_pre_pool.argtypes = [p, p, p, i64, i64, i64]
            if hasattr(lib, "hr_hc_pre_norm_pool"):
                lib.hr_hc_pre_norm_pool.argtypes = [p, p, p, ctypes.c_float, p, i64, i64, i64]
                lib.hr_hc_pre_norm_pool.restype = ctypes.c_int
                _mix.update(pre_norm=lib.hr_hc_pre_norm_pool)
            lib.hr_hc_post_pool.argtypes = [p, p, p, p, p, i64, i64, i64]
            lib.hr_norm_rope_pool.argtypes = [ctypes.c_int, p, p, i64, i64, i64, p, ctypes.c_float, ctypes.c_int, p, p,
                                              i64, ctypes.c_int]
            for g in (lib.hr_hc_pre_pool, lib.hr_hc_post_pool, lib.hr_norm_rope_pool):
                g.restype = ctypes.c_int
            if hasattr(lib, "hr_hc_weights_pool"):
                f32 = ctypes.c_float
                lib.hr_hc_weights_pool.argtypes = [ctypes.c_int, p, i64, i64, i64, p, i64, p, p, f32, f32, i64, p, p, p]
                lib.hr_hc_weights_pool.restype = ctypes.c_int
                _mix.update(weights=lib.hr_hc_weights_pool)
            _fn = f
            lib.hr_fp8_to_f32.argtypes = [ctypes.c_int, p, p, i64, i64, i64, i64, p]
            lib.hr_fp8_to_f32.restype = ctypes.c_int
            _mix.update(pre=lib.hr_hc_pre_pool, post=lib.hr_hc_post_pool, norm_rope=lib.hr_norm_rope_pool,
                        fp8_f32=lib.hr_fp8_to_f32)
            if hasattr(lib, "hr_index_topk"):
                lib.hr_index_topk.argtypes = [ctypes.c_int, p, p, i64, i64, i64, p, p, i64, p, i64, i64,
                                              ctypes.c_float, p, p, p, i64, p, p]
                lib.hr_index_topk.restype = ctypes.c_int
                _mix.update(index_topk=lib.hr_index_topk, threads=lib.hr_get_threads)
    return _fn or None


def available() -> bool:
    return _kernel() is not None


def has_hc_weights() -> bool:
    """Whether this build has the pooled mHC weights (`hr_hc_weights_pool`)."""
    return _kernel() is not None and "weights" in _mix


def _f32c(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise KernelError(f"attend_prefill: {name} is on {t.device}, the CPU kernel needs CPU tensors",
                          hint="use the torch kernel set for other devices")
    return t.to(torch.float32).contiguous()


def attend_prefill(q: torch.Tensor, keys: torch.Tensor, key_pos0: int, window: int, comp: torch.Tensor | None,
                sel: torch.Tensor | None, q_pos0: int, rate: int, sink: torch.Tensor, scale: float,
                path: str | None = None) -> torch.Tensor:
    """The torch set's `attend_prefill` on the native kernel: q [T, H, D], keys [N, D], comp [C, D] or None, sel [T, k]
    or None, sink [H] -> [T, H, D] fp32 (see homerun.kernels.torch_set.TorchKernels.attend_prefill). path: a native
    code path of homerun.kernels.cpu_experts.PATHS (default: the best here; tests run each)."""
    fn = _kernel()
    if fn is None:
        raise KernelError("the native prefill attention kernel is not available", hint="rebuild with `pip install -e .`")
    if q.dim() != 3 or keys.dim() != 2 or keys.shape[1] != q.shape[2] or sink.numel() != q.shape[1]:
        raise KernelError(f"attend_prefill: q {tuple(q.shape)}, keys {tuple(keys.shape)}, sink {tuple(sink.shape)} do "
                          "not match", hint="q [T, H, D], keys [N, D], sink [H]")
    code = 0
    if path is not None:
        from homerun.kernels.cpu_experts import _PATH_CODE, resolve_path

        code = _PATH_CODE.get(resolve_path(path), 0)
        if not code:
            raise KernelError(f"attend_prefill: {path!r} is not a native path", hint="use avx512, avx2 or portable")
    t, h, d = q.shape
    qc, kc, sc = _f32c(q, "q"), _f32c(keys, "keys"), _f32c(sink, "sink")
    cc = _f32c(comp, "comp") if comp is not None and comp.shape[0] else None
    if cc is not None and cc.shape[1] != d:
        raise KernelError(f"attend_prefill: compressed rows {tuple(cc.shape)} for queries of width {d}",
                          hint="comp is [C, D]")
    selc = None
    if sel is not None:
        if sel.dim() != 2 or sel.shape[0] != t:
            raise KernelError(f"attend_prefill: sel {tuple(sel.shape)} for {t} queries", hint="sel is [T, k]")
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


# Heads are packed to a multiple of this (the widest register tile's heads); padded heads have zero weight.
_INDEX_HEAD_PAD = 32
# Fewest keys per key range when the keys are split for a few queries (below that the split costs more in
# candidate merging than the extra threads give).
_INDEX_MIN_SPLIT_ROWS = 32
# Bytes of converted pages (bf16 or FP8-decoded rows made fp32) held for one kernel call; fp32 pages are passed as
# they lie. Beyond it the keys go over several calls, so a long context never holds all its keys in fp32 twice.
_INDEX_CONVERT_BYTES = 64 << 20


def index_topk(iq: torch.Tensor, iw: torch.Tensor, pages, n_vis: int, thr: torch.Tensor | None, k_sel: int,
               scale: float, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch set's `index_topk` on the native kernel: iq [q, Hi, Di], iw [q, Hi] (weights as used), pages
    (first row index, rows [p, Di]) in row order over the first n_vis keys, thr [q] or None -> (picks [q, k] int64,
    their scores [q, k] fp32), k = min(k_sel, n_vis), higher score first, lower index first on equal scores; -1 and
    -inf past a query's visible keys. Pages of another dtype (bf16, an FP8 store's decoded rows) are converted to
    fp32 a page at a time. path: a native code path (default: the best here; tests run each)."""
    if _kernel() is None or "index_topk" not in _mix:
        raise KernelError("the native indexer top-k kernel is not available", hint="rebuild with `pip install -e .`")
    code = _path_code(path, "index_topk")
    if iq.dim() != 3 or tuple(iw.shape) != tuple(iq.shape[:2]):
        raise KernelError(f"index_topk: iq {tuple(iq.shape)} and iw {tuple(iw.shape)} do not match",
                          hint="iq [q, Hi, Di], iw [q, Hi]")
    nq, hi, di = iq.shape
    k = min(k_sel, n_vis)
    if k <= 0 or nq == 0:
        return torch.empty(nq, max(k, 0), dtype=torch.int64), torch.empty(nq, max(k, 0), dtype=torch.float32)
    hp = -(-hi // _INDEX_HEAD_PAD) * _INDEX_HEAD_PAD
    qt = torch.zeros(nq, di, hp, dtype=torch.float32)
    qt[:, :, :hi] = _f32c(iq, "iq").transpose(1, 2)
    w = torch.zeros(nq, hp, dtype=torch.float32)
    w[:, :hi] = _f32c(iw, "iw")
    thr_c = None
    if thr is not None:
        if thr.numel() != nq:
            raise KernelError(f"index_topk: {thr.numel()} thresholds for {nq} queries", hint="thr is [q]")
        thr_c = thr.to(device="cpu", dtype=torch.int64).contiguous()
    # few queries: the keys split into ranges so every thread works (each range keeps its own candidates)
    threads = max(1, int(_mix["threads"]()))
    splits = max(1, min(-(-threads // nq), n_vis // _INDEX_MIN_SPLIT_ROWS))
    best_v = torch.empty(nq, splits, 2 * k, dtype=torch.float32)  # up to 2k candidates per (query, range)
    best_i = torch.empty(nq, splits, 2 * k, dtype=torch.int64)
    best_n = torch.zeros(nq, splits, dtype=torch.int64)
    out = torch.empty(nq, k, dtype=torch.int64)
    out_v = torch.empty(nq, k, dtype=torch.float32)
    group: list[torch.Tensor] = []
    bounds: list[int] = [0]
    held = 0

    def run(last: bool) -> None:
        ptrs = (ctypes.c_void_p * max(len(group), 1))(*[g.data_ptr() for g in group])
        r0s = torch.tensor(bounds, dtype=torch.int64)
        _ok(_mix["index_topk"](code, qt.data_ptr(), w.data_ptr(), nq, hp, di, ptrs, r0s.data_ptr(), len(group),
                               thr_c.data_ptr() if thr_c is not None else None, k, splits, scale, best_v.data_ptr(),
                               best_i.data_ptr(), best_n.data_ptr(), k, out.data_ptr() if last else None,
                               out_v.data_ptr() if last else None), "indexer top-k")

    for r0, rows in pages:
        if r0 != bounds[-1] or rows.dim() != 2 or rows.shape[1] != di:
            raise KernelError(f"index_topk: a page of {tuple(rows.shape)} at row {r0} after {bounds[-1]} rows",
                              hint="pages are consecutive [p, Di] rows from row 0")
        rc = _f32c(rows, "keys")
        extra = rc.numel() * 4 if rc.data_ptr() != rows.data_ptr() else 0  # a converted copy: bounded per call
        if held + extra > _INDEX_CONVERT_BYTES and group:
            run(last=False)
            group, bounds, held = [], [bounds[-1]], 0
        held += extra
        group.append(rc)
        bounds.append(r0 + rc.shape[0])
    if bounds[-1] != n_vis:
        raise KernelError(f"index_topk: the pages hold {bounds[-1]} rows, n_vis is {n_vis}", hint="pass n_vis rows")
    run(last=True)
    return out, out_v


def _path_code(path: str | None, what: str) -> int:
    """The native path code for `path` (None: 0, the best here)."""
    if path is None:
        return 0
    from homerun.kernels.cpu_experts import _PATH_CODE, resolve_path

    code = _PATH_CODE.get(resolve_path(path), 0)
    if not code:
        raise KernelError(f"{what}: {path!r} is not a native path", hint="use avx512, avx2 or portable")
    return code


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelError(f"native {what} failed with code {rc}", hint="rebuild with `pip install -e .`")


def hc_pre(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i pre[t, i] x[t, i, :]: pre [T, n], x [T, n, D] fp32 CPU -> [T, D] fp32, tokens on the pool."""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    t, n, d = x.shape
    if tuple(pre.shape) != (t, n):
        raise KernelError(f"hc_pre: pre {tuple(pre.shape)} does not match x {tuple(x.shape)}", hint="pre is [T, n]")
    pre, x = _f32c(pre, "pre"), _f32c(x, "x")
    out = torch.empty(t, d, dtype=torch.float32)
    _ok(_mix["pre"](pre.data_ptr(), x.data_ptr(), out.data_ptr(), t, n, d), "hc_pre")
    return out


def hc_pre_norm(pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """norm_rope(hc_pre(pre, x), weight, eps) bit for bit in one pool call (`hr_hc_pre_norm_pool`): each token's
    mixed row is normalized while it is in L1, with no [T, D] round trip. Builds without it run the two calls."""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    if "pre_norm" not in _mix:
        return norm_rope(hc_pre(pre, x), weight, eps)
    t, n, d = x.shape
    if tuple(pre.shape) != (t, n):
        raise KernelError(f"hc_pre_norm: pre {tuple(pre.shape)} does not match x {tuple(x.shape)}",
                          hint="pre is [T, n]")
    pre, x = _f32c(pre, "pre"), _f32c(x, "x")
    w = _f32c(weight, "norm weight") if weight is not None else None
    if w is not None and w.numel() != d:
        raise KernelError(f"hc_pre_norm: weight of {w.numel()} values for rows of {d}", hint="one weight per channel")
    out = torch.empty(t, d, dtype=torch.float32)
    _ok(_mix["pre_norm"](pre.data_ptr(), x.data_ptr(), w.data_ptr() if w is not None else None, eps, out.data_ptr(),
                         t, n, d), "hc_pre_norm")
    return out


def hc_weights(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
               hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """homerun.kernels.cpu_dense.hc_weights (bit for bit) with tokens split over the pool: x [T, n, D] fp32 CPU,
    fn [(2+n)n or n, n*D] -> pre [T, n], post [T, n], comb [T, n, n] (post, comb None for the head's fn)."""
    if _kernel() is None or "weights" not in _mix:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    from homerun.kernels.cpu_dense import hc_weights_args

    (x, fn, scale, base), (pre, post, comb) = hc_weights_args(x, fn, scale, base)
    t, n, d = x.shape
    m = fn.shape[0]
    if t:
        _ok(_mix["weights"](0, x.data_ptr(), t, n, d, fn.data_ptr(), m, scale.data_ptr(), base.data_ptr(), norm_eps,
                            hc_eps, iters, pre.data_ptr(), post.data_ptr() if post is not None else None,
                            comb.data_ptr() if comb is not None else None), "hc_weights")
    return pre, post, comb


def hc_post(post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """post[t, j] y[t] + sum_i comb[t, i, j] x[t, i]: post [T, n], y [T, D], comb [T, n, n], x [T, n, D] fp32 CPU ->
    [T, n, D] fp32, tokens on the pool."""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    t, n, d = x.shape
    if tuple(post.shape) != (t, n) or tuple(y.shape) != (t, d) or tuple(comb.shape) != (t, n, n):
        raise KernelError(f"hc_post: shapes post {tuple(post.shape)}, y {tuple(y.shape)}, comb {tuple(comb.shape)} "
                          f"do not match x {tuple(x.shape)}", hint="post [T, n], y [T, D], comb [T, n, n]")
    post, y, comb, x = (_f32c(a, nm) for a, nm in ((post, "post"), (y, "y"), (comb, "comb"), (x, "x")))
    out = torch.empty(t, n, d, dtype=torch.float32)
    _ok(_mix["post"](post.data_ptr(), y.data_ptr(), comb.data_ptr(), x.data_ptr(), out.data_ptr(), t, n, d),
        "hc_post")
    return out


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """homerun.kernels.cpu_dense.norm_rope (RMSNorm, then interleaved RoPE of the trailing 2 * cos.shape[-1]
    channels with token t's cos/sin) with tokens split over the pool: x [T, ..., d] fp32 CPU -> a new tensor."""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise KernelError(f"norm_rope needs fp32 CPU activations, got {x.dtype} on {x.device}", hint="use the torch ops")
    return _norm_rope(x.contiguous(), None, weight, eps, cos, sin, norm, inverse)


def rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """norm_rope(x, norm=False) written into x itself (contiguous fp32 CPU [T, ..., d]): only the trailing
    2 * cos.shape[-1] channels of each row are read and rotated, the rest stay untouched. The same bits as norm_rope
    (the same kernel, y aliasing x). -> x"""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise KernelError(f"rope_inplace needs contiguous fp32 CPU activations, got {x.dtype} on {x.device}",
                          hint="use norm_rope")
    return _norm_rope(x, x, None, 0.0, cos, sin, False, inverse)


def _norm_rope(xc: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
               cos: torch.Tensor | None, sin: torch.Tensor | None, norm: bool, inverse: bool) -> torch.Tensor:
    """The pool call of norm_rope from contiguous xc into y (a new tensor when None; xc itself rotates in place)."""
    d, t = xc.shape[-1], xc.shape[0]
    per_token = xc.numel() // (d * t) if d and t else 1
    half = 0 if cos is None else cos.shape[-1]
    if half and (tuple(cos.shape) != (t, half) or sin is None or tuple(sin.shape) != (t, half) or 2 * half > d):
        raise KernelError(f"norm_rope: cos/sin {tuple(cos.shape)} do not match x {tuple(xc.shape)}",
                          hint="cos and sin are [T, rope_dim/2]")
    w = _f32c(weight, "norm weight") if weight is not None else None
    if w is not None and w.numel() != d:
        raise KernelError(f"norm_rope: weight of {w.numel()} values for rows of {d}", hint="one weight per channel")
    c = _f32c(cos, "cos") if half else None
    s = _f32c(sin, "sin") if half else None
    if y is None:
        y = torch.empty_like(xc)
    if t:
        _ok(_mix["norm_rope"](0, xc.data_ptr(), y.data_ptr(), t, max(per_token, 1), d,
                              w.data_ptr() if w is not None else None, eps, int(norm),
                              c.data_ptr() if half else None, s.data_ptr() if half else None, 2 * half, int(inverse)),
            "norm_rope")
    return y


_FP8_PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}  # HR_PATH_*


def fp8_to_f32(w: torch.Tensor, scale: torch.Tensor, rows: tuple[int, int], *, path: str = "auto") -> torch.Tensor:
    """Rows [r0, r1) of an FP8 weight [N, K] (e4m3 + ue8m0 128x128 scales) -> fp32 [r1 - r0, K], bit for bit the
    fp32 dequantization. path: "auto" (the best here), or "portable" / "avx2" (the table) / "avx512" (the rows)."""
    if _kernel() is None:
        raise KernelError("the native prefill kernels are not available", hint="rebuild with `pip install -e .`")
    n, k = w.shape
    r0, r1 = rows
    wb, sb = w.contiguous().view(torch.uint8), scale.contiguous().view(torch.uint8)
    out = torch.empty(r1 - r0, k, dtype=torch.float32)
    _ok(_mix["fp8_f32"](_FP8_PATHS[path], wb.data_ptr(), sb.data_ptr(), n, k, r0, r1, out.data_ptr()),
        "FP8 -> fp32 conversion")
    return out


def fp8_linear(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, row_block: int) -> torch.Tensor:
    """x [..., K] fp32 @ dequant(W)^T -> [..., N] fp32, in row blocks of `row_block` weight rows (QLinear.row_block:
    the same blocks, so the same GEMMs, as QLinear.torch_forward)."""
    from homerun.kernels.cpu_gemm import f32_linear

    n = w.shape[0]
    if row_block >= n:
        return f32_linear(x, fp8_to_f32(w, scale, (0, n)))
    y = x.new_empty(*x.shape[:-1], n)
    for r0 in range(0, n, row_block):
        r1 = min(r0 + row_block, n)
        y[..., r0:r1] = f32_linear(x, fp8_to_f32(w, scale, (r0, r1)))
    return y


def fp8_grouped(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-diagonal x [T, G, in] -> [T, G, out/G] (group g: weight rows g*out/G ...), as QLinear.torch_grouped."""
    from homerun.kernels.cpu_gemm import f32_linear

    per = w.shape[0] // groups
    return torch.stack([f32_linear(x[:, g], fp8_to_f32(w, scale, (g * per, (g + 1) * per))) for g in range(groups)],
                       dim=1)
