"""FP8 e4m3 + 128x128 ue8m0 block-scaled weight-only linear: y = x @ dequant(w)^T with e4m3 decoded in-kernel.

One kernel, grid (n_tiles, m_tiles, split_k). Decode (M <= 16) is a GEMV with split-K and a deterministic reduction
of fp32 partials; prefill (M > 16) a tiled GEMM. Any strides for x, w and the scale; `w_row0` serves row slices of a
grouped projection (scale row = (w_row0 + n) // 128).

Fused variants, still one launch (plus one reduction launch when split-K is used):
- `group_rows`: a block-diagonal (grouped) projection, x [M, G, K] -> y [M, G * rows]: output n reads x[:, n // rows];
- `x2` + `swiglu_limit`: the input is silu(min(x, L)) * clamp(x2, -L, L) (the shared expert's down projection, its
  activation computed on load, rounded as the torch set's ops round in x's dtype);
- `residual`: y + residual, rounded once more to the output dtype (the routed experts' sum added in the epilogue).

`dense_linear`: the same kernel over a dense (bf16 / fp16 / fp32) weight, read as stored and converted in-kernel to
x's dtype as the torch set does (no scale; split-K as above): a bf16 matrix in an fp32 model is multiplied without an
fp32 copy, and two of one input share a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import (
    e4m3_to_f32, e8m0_to_f32, interpreting, launch, mma, num_sms, rne_bf16, round_bf16, store_rounding,
)

@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, x2_ptr, r_ptr,
    M, N, K, w_row0, k_per_split, group_rows, limit, N2, n_tiles1, w_off, s_off,
    sxm, sxk, sxg, swn, swk, ssn, ssk, sys, sym, syn, srm, srn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr, GROUPED: tl.constexpr, SWIGLU: tl.constexpr, X_BF16: tl.constexpr,
    HAS_RES: tl.constexpr, OUT_BF16: tl.constexpr, TWO: tl.constexpr, DENSE: tl.constexpr, W_BF16: tl.constexpr,
):
    """Program (pid_n, pid_m, pid_s): y[s, m-tile, n-tile] = x[m-tile, K-slice s] @ dequant(w)[n-tile, K-slice s]^T.
    BLOCK_K divides 128, so one K tile lies in one scale column; scale rows are (w_row0 + n) // 128. DENSE: w is
    read in its own dtype (offsets in elements), no scale; W_BF16: rounded to bf16 first (a wider weight under a bf16
    x: the torch set's w.to(x.dtype), bit for bit)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_col0 = 0
    if TWO:  # tiles past n_tiles1 belong to the second weight (w_off / s_off bytes from the first), columns N..
        second = pid_n >= n_tiles1
        pid_n = tl.where(second, pid_n - n_tiles1, pid_n)
        w_ptr += tl.where(second, w_off, 0)
        s_ptr += tl.where(second, s_off, 0)
        n_col0 = tl.where(second, N, 0)
        N = tl.where(second, N2, N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rn64 = rn.to(tl.int64)
    srow = ((w_row0 + rn) // 128).to(tl.int64)
    k_begin = pid_s * k_per_split
    if GROUPED:  # BLOCK_N divides group_rows: this n-tile reads one group's slice of x
        x_ptr += ((pid_n * BLOCK_N) // group_rows).to(tl.int64) * sxg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_begin + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        wb = tl.load(w_ptr + rn64[:, None] * swn + rk[None, :] * swk,
                     mask=n_mask[:, None] & k_mask[None, :], other=0)
        if DENSE:
            w = wb.to(tl.float32)
            if W_BF16:
                w = rne_bf16(w)
        else:
            sb = tl.load(s_ptr + srow * ssn + (k0 // 128) * ssk, mask=n_mask, other=127)
            w = e4m3_to_f32(wb, NATIVE_FP8) * e8m0_to_f32(sb)[:, None]  # [BN, BK] fp32, exactly dequant_fp8
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if SWIGLU:  # x is the gate, x2 the up projection (same strides)
            u = tl.load(x2_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0).to(tl.float32)
            g = tl.minimum(x.to(tl.float32), limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            sg = g / (1.0 + tl.exp(-g))
            if X_BF16:  # torch's bf16 silu and product each round
                x = rne_bf16(rne_bf16(sg) * u)
            else:
                x = sg * u
        if USE_DOT:
            acc = mma(x, tl.trans(w), acc, DOT_F32, UPCAST)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_RES:  # split_k == 1 only: the linear's output in its dtype, plus the residual, rounded again
        if OUT_BF16:
            acc = rne_bf16(acc)
        acc += tl.load(r_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=m_mask[:, None] & n_mask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_s * sys + rm[:, None] * sym + (n_col0 + rn)[None, :] * syn, store_rounding(acc, ROUND_BF16),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_k_reduce_kernel(p_ptr, r_ptr, y_ptr, S, MN, N, sps, srm, srn,
                           HAS_RES: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum_s partial[s] (in order: deterministic), cast to y's dtype, then + residual (rounded again): the
    split-K reduction, the cast and the residual add in one launch."""
    ri = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = ri < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(p_ptr + s * sps + ri, mask=mask, other=0.0)
    if OUT_BF16:
        acc = rne_bf16(acc)
    if HAS_RES:
        acc += tl.load(r_ptr + (ri // N) * srm + (ri % N) * srn, mask=mask, other=0.0).to(tl.float32)
        if OUT_BF16:
            acc = rne_bf16(acc)
    tl.store(y_ptr + ri, acc, mask=mask)



def _split_output(x: torch.Tensor, M: int, K: int, n_out: int, bk: int, k_tiles: int, split_k: int,
                  out_dtype: torch.dtype) -> tuple[int, int, torch.Tensor, int]:
    """K split into whole BLOCK_K tiles -> (splits, K per split, output, its split stride): with one split the
    kernel writes the output dtype, else fp32 partials [split, M, n_out] that the reduce kernel sums."""
    k_per_split = triton.cdiv(k_tiles, split_k) * bk
    split_k = triton.cdiv(K, k_per_split)
    if split_k == 1:
        return 1, k_per_split, torch.empty((M, n_out), device=x.device, dtype=out_dtype), 0
    y = torch.empty((split_k, M, n_out), device=x.device, dtype=torch.float32)
    return split_k, k_per_split, y, y.stride(0)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype | None = None, *,
               w_row0: int = 0, native_fp8: bool = False, use_dot: bool | None = None, block_m: int | None = None,
               block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               fewest_programs: bool = False, group_rows: int = 0, x2: torch.Tensor | None = None,
               swiglu_limit: float = 0.0, residual: torch.Tensor | None = None,
               second: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y = x @ dequant_fp8(w_fp8, w_scale)^T. x [M, K] fp32/bf16 (any strides), w_fp8 [N, K] float8_e4m3fn or uint8
    (any strides, e.g. a row slice w[r0:r1]), w_scale ue8m0 with scale row (w_row0 + n) // 128 for output n (pass the
    full scale tensor and w_row0 = r0 for a row slice; or a sliced scale and w_row0 = 0 when r0 % 128 == 0).
    M <= 16: GEMV kernel (register FMA for M <= 2, bf16/fp32 tl.dot padded to 16 rows otherwise) with split-K and a
    deterministic reduction of the fp32 partials (one more launch); M > 16: tiled GEMM with tl.dot. Returns [M, N]
    out_dtype (default x.dtype). `fewest_programs`: default tiles as wide as allowed and no split-K (for the
    interpreter, whose cost is per program; the GPU defaults are for HBM bandwidth).
    group_rows > 0: x is [M, G, K] (any strides) and output n uses x[:, n // group_rows] (N = G * group_rows).
    x2 (same shape and strides as x): the input is silu(min(x, L)) * clamp(x2, -L, L), L = swiglu_limit.
    residual [M, N]: returns y + residual (y rounded to out_dtype first, as two torch ops would).
    second (w_fp8 [N2, K], w_scale), same strides as the first: both projections of x in one launch, returned side by
    side as y [M, N + N2] (w_row0 0; not with group_rows / x2 / residual)."""
    grouped = group_rows > 0
    if grouped:
        M, G, K = x.shape
        sxm, sxk, sxg = x.stride(0), x.stride(2), x.stride(1)
    else:
        M, K = x.shape
        sxm, sxk, sxg = x.stride(0), x.stride(1), 0
    N, K2 = w_fp8.shape
    assert K == K2, (x.shape, w_fp8.shape)
    two = second is not None
    n2, w_off, s_off = 0, 0, 0
    if two:
        wb, sb = second[0].view(torch.uint8), second[1].view(torch.uint8)
        assert wb.shape[1] == K and wb.stride() == w_fp8.stride() and sb.stride() == w_scale.stride(), "second weight"
        assert not grouped and x2 is None and residual is None and w_row0 == 0
        n2 = wb.shape[0]
        w_off = wb.data_ptr() - w_fp8.data_ptr()  # byte offsets: both are read as uint8
        s_off = sb.data_ptr() - w_scale.data_ptr()
    assert not grouped or N == G * group_rows, (x.shape, w_fp8.shape, group_rows)
    assert x2 is None or (x2.shape == x.shape and x2.stride() == x.stride()), "x2 must match x's shape and strides"
    out_dtype = out_dtype or x.dtype
    w = w_fp8.view(torch.uint8)
    s = w_scale.view(torch.uint8)
    assert s.shape[1] * 128 >= K and s.shape[0] * 128 >= w_row0 + N
    if fewest_programs:  # the interpreter's cost is per program and per op: the fewest, widest tiles, no split-K
        block_n = block_n or min(256, max(16, triton.next_power_of_2(N)))
        block_k = block_k or 128
        block_m = block_m or (min(128, max(16, triton.next_power_of_2(M))) if M > 16 else None)
        split_k = split_k or 1
    if M <= 16:
        use_dot = M > 2 if use_dot is None else use_dot
        bm = block_m or (16 if use_dot else triton.next_power_of_2(M))
        bn = block_n or (64 if use_dot or bm == 1 else 32)  # FMA path: BM*BN*BK product lives in registers
        bk = block_k or 128
    else:
        use_dot = True
        bm = block_m or (64 if M <= 64 else 128)
        bn = block_n or 128
        bk = block_k or 64
    if grouped:  # one n-tile inside one group: the largest power-of-two tile dividing group_rows
        bn = min(bn, group_rows & -group_rows)
        assert bn >= (16 if use_dot else 1), f"group_rows {group_rows} needs a power-of-two factor >= 16"
    assert 128 % bk == 0 and bk >= 16, "BLOCK_K must divide 128 (one scale column per K tile)"
    if use_dot:
        assert bm >= 16 and bn >= 16, "tl.dot needs 16x16 tiles"
    n_tiles1 = triton.cdiv(N, bn)
    n_tiles, m_tiles, k_tiles = n_tiles1 + triton.cdiv(n2, bn), triton.cdiv(M, bm), triton.cdiv(K, bk)
    n_out = N + n2
    if split_k is None:
        # Decode: enough programs for ~2 waves on the GPU so HBM streams from every SM; prefill has enough tiles.
        split_k = 1 if M > 16 else max(1, min(k_tiles, 8, triton.cdiv(2 * num_sms(x.device), n_tiles * m_tiles)))
    split_k, k_per_split, y, sys_ = _split_output(x, M, K, n_out, bk, k_tiles, split_k, out_dtype)
    res_in_kernel = residual is not None and split_k == 1
    r = residual if residual is not None else y
    grid = (n_tiles, m_tiles, split_k)
    launch(_fp8_linear_kernel, grid)(
        x, w, s, y, x2 if x2 is not None else x, r,
        M, N, K, w_row0, k_per_split, max(group_rows, 1), float(swiglu_limit), n2, n_tiles1, w_off, s_off,
        sxm, sxk, sxg, w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        sys_, y.stride(-2), y.stride(-1), r.stride(-2), r.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, NATIVE_FP8=native_fp8,
        DOT_F32=x.dtype == torch.float32, UPCAST=interpreting(), ROUND_BF16=round_bf16(y),
        GROUPED=grouped, SWIGLU=x2 is not None, X_BF16=x.dtype == torch.bfloat16, HAS_RES=res_in_kernel,
        OUT_BF16=y.dtype == torch.bfloat16, TWO=two, DENSE=False, W_BF16=False,
        num_warps=num_warps or (4 if M <= 16 else 8), num_stages=num_stages or (4 if M <= 16 else 3),
    )
    if split_k > 1:  # deterministic split-K reduction (tiny: split_k * M * N fp32), cast and residual in one launch
        out = torch.empty((M, n_out), device=x.device, dtype=out_dtype)
        block = 1024
        launch(_split_k_reduce_kernel, (triton.cdiv(M * n_out, block),))(
            y, r, out, split_k, M * n_out, n_out, y.stride(0), r.stride(-2), r.stride(-1),
            HAS_RES=residual is not None, OUT_BF16=out_dtype == torch.bfloat16, BLOCK=block,
        )
        y = out
    return y


def dense_linear(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None, *,
                 second: torch.Tensor | None = None, split_k: int | None = None,
                 fewest_programs: bool = False) -> torch.Tensor:
    """y = x @ w^T for a dense weight w [N, K] (bf16 / fp16 / fp32, any strides) read as stored, for decode-sized
    x [M <= 16, K] (fp32 / bf16, any strides), rounded once to out_dtype (default x.dtype): the register GEMV for
    M <= 2, tl.dot otherwise. As the torch set's F.linear(x, w.to(x.dtype)): a weight wider than a bf16 x is
    rounded to bf16 in-kernel, a narrower one widened exactly. Split-K as fp8_linear's (~2 waves of programs; the
    fp32 partials reduced in one more launch); `fewest_programs` (the interpreter): wide tiles, no split-K.
    second [N2, K] (w's dtype and strides): both projections of x in the one launch, side by side as y [M, N + N2]."""
    M, K = x.shape
    N, K2 = w.shape
    assert K == K2 and M <= 16, (x.shape, w.shape)
    n2 = w_off = 0
    if second is not None:
        assert second.shape[1] == K and second.stride() == w.stride() and second.dtype == w.dtype, "second weight"
        n2 = second.shape[0]
        w_off, rem = divmod(second.data_ptr() - w.data_ptr(), w.element_size())  # elements: w is read as typed
        assert rem == 0
    out_dtype = out_dtype or x.dtype
    x_bf16 = x.dtype == torch.bfloat16
    w_bf16 = x_bf16 and w.dtype != torch.bfloat16  # torch's w.to(bf16): products then exact as bf16 x bf16
    use_dot = M > 2
    bm = 16 if use_dot else triton.next_power_of_2(M)
    bn = min(256, max(16, triton.next_power_of_2(N))) if fewest_programs else (64 if use_dot or bm == 1 else 32)
    bk = 128 if fewest_programs or not use_dot else 64
    n_tiles1 = triton.cdiv(N, bn)
    n_tiles, k_tiles, n_out = n_tiles1 + triton.cdiv(n2, bn), triton.cdiv(K, bk), N + n2
    if split_k is None:  # fp8_linear's heuristic: ~2 waves of programs so HBM streams from every SM
        split_k = 1 if fewest_programs else max(1, min(k_tiles, 8, triton.cdiv(2 * num_sms(x.device), n_tiles)))
    split_k, k_per_split, y, sys_ = _split_output(x, M, K, n_out, bk, k_tiles, split_k, out_dtype)
    launch(_fp8_linear_kernel, (n_tiles, 1, split_k))(
        x, w, w, y, x, y,
        M, N, K, 0, k_per_split, 1, 0.0, n2, n_tiles1, w_off, 0,
        x.stride(0), x.stride(1), 0, w.stride(0), w.stride(1), 0, 0,
        sys_, y.stride(-2), y.stride(-1), y.stride(-2), y.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, NATIVE_FP8=False,
        DOT_F32=not x_bf16, UPCAST=interpreting(),
        ROUND_BF16=round_bf16(y), GROUPED=False, SWIGLU=False, X_BF16=x_bf16, HAS_RES=False,
        OUT_BF16=y.dtype == torch.bfloat16, TWO=second is not None, DENSE=True, W_BF16=w_bf16,
        num_warps=4, num_stages=4,
    )
    if split_k > 1:  # deterministic reduction of the fp32 partials and the cast, one launch
        out = torch.empty((M, n_out), device=x.device, dtype=out_dtype)
        block = 1024
        launch(_split_k_reduce_kernel, (triton.cdiv(M * n_out, block),))(
            y, y, out, split_k, M * n_out, n_out, y.stride(0), 0, 0,
            HAS_RES=False, OUT_BF16=out_dtype == torch.bfloat16, BLOCK=block,
        )
        y = out
    return y
