"""The mHC family fused (definitions: homerun.kernels.torch_set.TorchKernels.hc_weights / hc_pre / hc_post):

- `hc_weights`: one launch, one program per token: RMSNorm of the flattened streams, the mix dot products over D in
  blocks, pre / post sigmoids, the n x n comb block's row softmax and every Sinkhorn pass on the tile in registers.
- `hc_pre_norm`: one launch, the stream collapse sum_i pre[i] x[i] (rounded to x's dtype, as the torch set's hc_pre
  returns it) and the sublayer's RMSNorm of it; `hc_pre` the collapse alone.
- `hc_post`: one launch, post[j] y + sum_i comb[i, j] x[i] (post and comb rounded to x's dtype first, as the
  torch set casts them).

All math in fp32; bf16 outputs are rounded to nearest even in registers (`rne_bf16`), so the interpreter's
truncating store writes the GPU's values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import interpreting, launch, rne_bf16


@triton.jit
def _hc_weights_kernel(
    x_ptr, fn_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr,
    N, D, norm_eps, hc_eps, iters,
    sxt, sxn, sxd, sfm, sfk,
    HEAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program t: mix = rmsnorm(x[t].flatten()) @ fn^T, then pre [N], post [N], Sinkhorn(comb) [N, N] (HEAD: pre
    only, with one scale). fn rows: pre 0..N-1, post N..2N-1, comb 2N + i*N + j."""
    t = tl.program_id(0)
    K = N * D
    ri = tl.arange(0, BLOCK_N)
    i_mask = ri < N
    ii = ri[:, None]
    jj = ri[None, :]
    c_mask = (ii < N) & (jj < N)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    acc_pre = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_post = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_comb = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    xrow = x_ptr + t.to(tl.int64) * sxt
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xv = tl.load(xrow + (rk // D) * sxn + (rk % D) * sxd, mask=k_mask, other=0.0).to(tl.float32)
        ss += xv * xv
        m2 = i_mask[:, None] & k_mask[None, :]
        f_pre = tl.load(fn_ptr + ri[:, None] * sfm + rk[None, :] * sfk, mask=m2, other=0.0).to(tl.float32)
        acc_pre += tl.sum(f_pre * xv[None, :], axis=1)
        if not HEAD:
            f_post = tl.load(fn_ptr + (N + ri)[:, None] * sfm + rk[None, :] * sfk, mask=m2, other=0.0).to(tl.float32)
            acc_post += tl.sum(f_post * xv[None, :], axis=1)
            crow = 2 * N + ii * N + jj  # [BN, BN]
            m3 = c_mask[:, :, None] & k_mask[None, None, :]
            f_comb = tl.load(fn_ptr + crow[:, :, None] * sfm + rk[None, None, :] * sfk, mask=m3, other=0.0).to(tl.float32)
            acc_comb += tl.sum(f_comb * xv[None, None, :], axis=2)
    rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + norm_eps)
    s0 = tl.load(scale_ptr).to(tl.float32)
    b_pre = tl.load(base_ptr + ri, mask=i_mask, other=0.0).to(tl.float32)
    pre = 1.0 / (1.0 + tl.exp(-(acc_pre * rstd * s0 + b_pre))) + hc_eps
    tl.store(pre_ptr + t * N + ri, pre, mask=i_mask)
    if not HEAD:
        s1 = tl.load(scale_ptr + 1).to(tl.float32)
        s2 = tl.load(scale_ptr + 2).to(tl.float32)
        b_post = tl.load(base_ptr + N + ri, mask=i_mask, other=0.0).to(tl.float32)
        post = 2.0 / (1.0 + tl.exp(-(acc_post * rstd * s1 + b_post)))
        tl.store(post_ptr + t * N + ri, post, mask=i_mask)
        b_comb = tl.load(base_ptr + 2 * N + ii * N + jj, mask=c_mask, other=0.0).to(tl.float32)
        logit = tl.where(c_mask, acc_comb * rstd * s2 + b_comb, -1e30)  # finite: padded rows stay NaN-free
        e = tl.exp(logit - tl.max(logit, axis=1)[:, None])  # softmax over each row's N entries
        comb = tl.where(c_mask, e / tl.sum(e, axis=1)[:, None] + hc_eps, 0.0)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)  # the column pass
        for _ in range(iters - 1):
            comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)  # rows
            comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)  # columns
        tl.store(comb_ptr + t * N * N + ii * N + jj, comb, mask=c_mask)


def _block_k(k: int) -> int:
    # The interpreter's cost is per program and per op: the whole row in one block where it fits.
    return min(triton.next_power_of_2(k), 4096 if interpreting() else 256)


def hc_weights(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
               hc_eps: float, iters: int):
    """x [T, n, D] -> (pre [T, n], post [T, n], comb [T, n, n]) fp32; the head's fn [n, n*D]: (pre, None, None)."""
    T, n, D = x.shape
    head = fn.shape[0] == n
    assert fn.shape[1] == n * D and (head or fn.shape[0] == (2 + n) * n), (x.shape, fn.shape)
    pre = torch.empty((T, n), device=x.device, dtype=torch.float32)
    post = pre if head else torch.empty((T, n), device=x.device, dtype=torch.float32)
    comb = pre if head else torch.empty((T, n, n), device=x.device, dtype=torch.float32)
    launch(_hc_weights_kernel, (T,))(
        x, fn, scale, base, pre, post, comb, n, D, float(norm_eps), float(hc_eps), int(iters),
        x.stride(0), x.stride(1), x.stride(2), fn.stride(0), fn.stride(1),
        HEAD=head, BLOCK_N=max(2, triton.next_power_of_2(n)), BLOCK_K=_block_k(n * D),
    )
    return (pre, None, None) if head else (pre, post, comb)


@triton.jit
def _hc_pre_norm_kernel(
    pre_ptr, x_ptr, w_ptr, y_ptr, N, D, eps,
    spt, spn, sxt, sxn, sxd, syt,
    NORM: tl.constexpr, HAS_W: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program t: h = sum_i pre[t, i] x[t, i] (rounded to the output dtype), then (NORM) rmsnorm(h) * w. The whole
    row is one block (BLOCK_D >= D): the norm needs every channel before the first store."""
    t = tl.program_id(0)
    ri = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    p = tl.load(pre_ptr + t * spt + ri * spn, mask=ri < N, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + t.to(tl.int64) * sxt + ri[:, None] * sxn + rd[None, :] * sxd,
                 mask=(ri < N)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    h = tl.sum(p[:, None] * xv, axis=0)
    if OUT_BF16:
        h = rne_bf16(h)
    if NORM:
        h = h / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
        if HAS_W:
            h = tl.load(w_ptr + rd, mask=d_mask, other=0.0).to(tl.float32) * h
        if OUT_BF16:
            h = rne_bf16(h)
    tl.store(y_ptr + t.to(tl.int64) * syt + rd, h, mask=d_mask)


def hc_pre_norm(pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
                norm: bool = True) -> torch.Tensor:
    """x [T, n, D], pre [T, n] -> rms_norm(hc_pre(pre, x), weight, eps) [T, D] in x's dtype (norm=False: hc_pre)."""
    T, n, D = x.shape
    y = torch.empty((T, D), device=x.device, dtype=x.dtype)
    w = weight if weight is not None else y
    launch(_hc_pre_norm_kernel, (T,))(
        pre, x, w, y, n, D, float(eps), pre.stride(0), pre.stride(1), x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), NORM=norm, HAS_W=weight is not None, OUT_BF16=x.dtype == torch.bfloat16,
        BLOCK_N=max(2, triton.next_power_of_2(n)), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4 if D <= 2048 else 8,
    )
    return y


@triton.jit
def _hc_post_kernel(
    post_ptr, y_ptr, comb_ptr, x_ptr, out_ptr, N, D,
    spt, spn, syt, syd, sct, sci, scj, sxt, sxn, sxd, sot, son, sod,
    OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (t, d-tile): out[t, j, d] = post[t, j] y[t, d] + sum_i comb[t, i, j] x[t, i, d]."""
    t = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = rd < D
    ri = tl.arange(0, BLOCK_N)
    n_mask = ri < N
    t64 = t.to(tl.int64)
    p = tl.load(post_ptr + t * spt + ri * spn, mask=n_mask, other=0.0).to(tl.float32)
    c = tl.load(comb_ptr + t * sct + ri[:, None] * sci + ri[None, :] * scj,
                mask=n_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [i, j]
    if OUT_BF16:  # the torch set casts post and comb to the streams' dtype
        p = rne_bf16(p)
        c = rne_bf16(c)
    yv = tl.load(y_ptr + t64 * syt + rd * syd, mask=d_mask, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + t64 * sxt + ri[:, None] * sxn + rd[None, :] * sxd,
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [i, d]
    py = p[:, None] * yv[None, :]
    cx = tl.sum(c[:, :, None] * xv[:, None, :], axis=0)  # [j, d]
    if OUT_BF16:  # the torch set's bf16 ops: the product, the matmul and their sum each rounded
        o = rne_bf16(rne_bf16(py) + rne_bf16(cx))
    else:
        o = py + cx
    tl.store(out_ptr + t64 * sot + ri[:, None] * son + rd[None, :] * sod, o,
             mask=n_mask[:, None] & d_mask[None, :])


def hc_post(post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """post [T, n], y [T, D], comb [T, n, n], x [T, n, D] -> [T, n, D] in x's dtype."""
    T, n, D = x.shape
    out = torch.empty((T, n, D), device=x.device, dtype=x.dtype)
    bd = min(triton.next_power_of_2(D), 8192 if interpreting() else 512)
    launch(_hc_post_kernel, (T, triton.cdiv(D, bd)))(
        post, y, comb, x, out, n, D, post.stride(0), post.stride(1), y.stride(0), y.stride(1),
        comb.stride(0), comb.stride(1), comb.stride(2), x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        OUT_BF16=x.dtype == torch.bfloat16, BLOCK_N=max(2, triton.next_power_of_2(n)), BLOCK_D=bd,
    )
    return out
