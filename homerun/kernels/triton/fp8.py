"""FP8 e4m3 + 128x128 ue8m0 block-scaled weight-only linear: y = x @ dequant(w)^T with e4m3 decoded in-kernel.

One kernel, grid (n_tiles, m_tiles, split_k). Decode (M <= 16) is a GEMV with split-K and a deterministic reduction
of fp32 partials; prefill (M > 16) a tiled GEMM. Any strides for x, w and the scale; `w_row0` serves row slices of a
grouped projection (scale row = (w_row0 + n) // 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import (
    e4m3_to_f32, e8m0_to_f32, interpreting, launch, mma, num_sms, round_bf16, store_rounding,
)

@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, K, w_row0, k_per_split,
    sxm, sxk, swn, swk, ssn, ssk, sys, sym, syn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """Program (pid_n, pid_m, pid_s): y[s, m-tile, n-tile] = x[m-tile, K-slice s] @ dequant(w)[n-tile, K-slice s]^T.
    BLOCK_K divides 128, so one K tile lies in one scale column; scale rows are (w_row0 + n) // 128."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rn64 = rn.to(tl.int64)
    srow = ((w_row0 + rn) // 128).to(tl.int64)
    k_begin = pid_s * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_begin + kk
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        wb = tl.load(w_ptr + rn64[:, None] * swn + rk[None, :] * swk,
                     mask=n_mask[:, None] & k_mask[None, :], other=0)
        sb = tl.load(s_ptr + srow * ssn + (k0 // 128) * ssk, mask=n_mask, other=127)
        w = e4m3_to_f32(wb, NATIVE_FP8) * e8m0_to_f32(sb)[:, None]  # [BN, BK] fp32, exactly dequant_fp8
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_DOT:
            acc = mma(x, tl.trans(w), acc, DOT_F32, UPCAST)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    tl.store(y_ptr + pid_s * sys + rm[:, None] * sym + rn[None, :] * syn, store_rounding(acc, ROUND_BF16),
             mask=m_mask[:, None] & n_mask[None, :])



def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype | None = None, *,
               w_row0: int = 0, native_fp8: bool = False, use_dot: bool | None = None, block_m: int | None = None,
               block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               fewest_programs: bool = False) -> torch.Tensor:
    """y = x @ dequant_fp8(w_fp8, w_scale)^T. x [M, K] fp32/bf16 (any strides), w_fp8 [N, K] float8_e4m3fn or uint8
    (any strides, e.g. a row slice w[r0:r1]), w_scale ue8m0 with scale row (w_row0 + n) // 128 for output n (pass the
    full scale tensor and w_row0 = r0 for a row slice; or a sliced scale and w_row0 = 0 when r0 % 128 == 0).
    M <= 16: GEMV kernel (register FMA for M <= 2, bf16/fp32 tl.dot padded to 16 rows otherwise) with split-K and a
    deterministic reduction of the fp32 partials; M > 16: tiled GEMM with tl.dot. Returns [M, N] out_dtype
    (default x.dtype). `fewest_programs`: default tiles as wide as allowed and no split-K (for the interpreter, whose
    cost is per program; the GPU defaults are for HBM bandwidth)."""
    M, K = x.shape
    N, K2 = w_fp8.shape
    assert K == K2, (x.shape, w_fp8.shape)
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
    assert 128 % bk == 0 and bk >= 16, "BLOCK_K must divide 128 (one scale column per K tile)"
    if use_dot:
        assert bm >= 16 and bn >= 16, "tl.dot needs 16x16 tiles"
    n_tiles, m_tiles, k_tiles = triton.cdiv(N, bn), triton.cdiv(M, bm), triton.cdiv(K, bk)
    if split_k is None:
        # Decode: enough programs for ~2 waves on the GPU so HBM streams from every SM; prefill has enough tiles.
        split_k = 1 if M > 16 else max(1, min(k_tiles, 8, triton.cdiv(2 * num_sms(x.device), n_tiles * m_tiles)))
    k_per_split = triton.cdiv(k_tiles, split_k) * bk
    split_k = triton.cdiv(K, k_per_split)
    if split_k == 1:
        y = torch.empty((M, N), device=x.device, dtype=out_dtype)
        sys_ = 0
    else:
        y = torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
        sys_ = y.stride(0)
    grid = (n_tiles, m_tiles, split_k)
    launch(_fp8_linear_kernel, grid)(
        x, w, s, y, M, N, K, w_row0, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        sys_, y.stride(-2), y.stride(-1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, NATIVE_FP8=native_fp8,
        DOT_F32=x.dtype == torch.float32, UPCAST=interpreting(), ROUND_BF16=round_bf16(y),
        num_warps=num_warps or (4 if M <= 16 else 8), num_stages=num_stages or (4 if M <= 16 else 3),
    )
    if split_k > 1:
        y = y.sum(0).to(out_dtype)  # deterministic split-K reduction (tiny: split_k * M * N fp32)
    return y

