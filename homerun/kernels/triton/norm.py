"""RMSNorm + interleaved-pair RoPE in one launch (definition: homerun.kernels.torch_set.TorchKernels.norm_rope).

x [T, ..., Dh] is read as rows (t, h) with strides; per row: the norm in fp32 (times the weight, rounded to x's
dtype as the torch set's rms_norm returns it), then on the trailing R channels the rotation of pairs (even, odd) by
(cos, sin)[t] (sin negated for the inverse), rounded once. bf16 rounding is done in registers (`rne_bf16`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import interpreting, launch, rne_bf16


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr,
    ROWS, HP, D, R2, eps,
    sxt, sxh, sxd, sct, scr, sst, ssr,
    NORM: tl.constexpr, HAS_W: tl.constexpr, ROPE: tl.constexpr, INVERSE: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program: BLOCK_R rows r = t * HP + h. y is contiguous [ROWS, D]; the rope channels are D - 2*R2 .. D - 1."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < ROWS
    t = (rr // HP).to(tl.int64)
    h = (rr % HP).to(tl.int64)
    xrow = x_ptr + t * sxt + h * sxh  # [BR] pointers
    yrow = y_ptr + rr.to(tl.int64) * D
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    m2 = r_mask[:, None] & d_mask[None, :]
    xv = tl.load(xrow[:, None] + rd[None, :] * sxd, mask=m2, other=0.0).to(tl.float32)
    rstd = tl.zeros((BLOCK_R,), dtype=tl.float32) + 1.0
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) / D + eps)
        xv = xv * rstd[:, None]
        if HAS_W:
            xv = tl.load(w_ptr + rd, mask=d_mask, other=0.0).to(tl.float32)[None, :] * xv
        if OUT_BF16:
            xv = rne_bf16(xv)
    pass_end = D
    if ROPE:
        pass_end = D - 2 * R2
    tl.store(yrow[:, None] + rd[None, :], xv, mask=m2 & (rd < pass_end)[None, :])
    if ROPE:
        rp = tl.arange(0, BLOCK_P)
        p_mask = rp < R2
        mp = r_mask[:, None] & p_mask[None, :]
        de = D - 2 * R2 + 2 * rp  # even channel of pair p
        ev = tl.load(xrow[:, None] + de[None, :] * sxd, mask=mp, other=0.0).to(tl.float32)
        od = tl.load(xrow[:, None] + (de + 1)[None, :] * sxd, mask=mp, other=0.0).to(tl.float32)
        if NORM:  # the same normalized values as the pass-through part (recomputed for the pair layout)
            ev = ev * rstd[:, None]
            od = od * rstd[:, None]
            if HAS_W:
                ev = tl.load(w_ptr + de, mask=p_mask, other=0.0).to(tl.float32)[None, :] * ev
                od = tl.load(w_ptr + de + 1, mask=p_mask, other=0.0).to(tl.float32)[None, :] * od
            if OUT_BF16:
                ev = rne_bf16(ev)
                od = rne_bf16(od)
        c = tl.load(cos_ptr + t[:, None] * sct + rp[None, :] * scr, mask=mp, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t[:, None] * sst + rp[None, :] * ssr, mask=mp, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        re = ev * c - od * s
        ro = od * c + ev * s
        if OUT_BF16:
            re = rne_bf16(re)
            ro = rne_bf16(ro)
        tl.store(yrow[:, None] + de[None, :], re, mask=mp)
        tl.store(yrow[:, None] + (de + 1)[None, :], ro, mask=mp)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """rms_norm over the last dim (when norm) then RoPE on the trailing 2*cos.shape[-1] channels (when cos is given),
    x [T, ..., Dh] any strides -> a new contiguous tensor in x's dtype. Nothing to do: x itself."""
    if not norm and cos is None:
        return x
    D = x.shape[-1]
    x3 = x.reshape(x.shape[0], -1, D) if x.dim() != 3 else x  # a view wherever the strides allow
    T, HP = x3.shape[0], x3.shape[1]
    rows = T * HP
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rope = cos is not None
    r2 = cos.shape[-1] if rope else 0
    if rope:
        assert cos.shape[0] == T and 2 * r2 <= D, (x.shape, cos.shape)
    c = cos if rope else y
    s = sin if rope else y
    bd = triton.next_power_of_2(D)
    br = min(triton.next_power_of_2(rows), max(1, (65536 if interpreting() else 4096) // bd))
    launch(_norm_rope_kernel, (triton.cdiv(rows, br),))(
        x3, weight if weight is not None else y, c, s, y, rows, HP, D, r2, float(eps),
        x3.stride(0), x3.stride(1), x3.stride(2), c.stride(0), c.stride(-1), s.stride(0), s.stride(-1),
        NORM=norm, HAS_W=weight is not None, ROPE=rope, INVERSE=inverse, OUT_BF16=x.dtype == torch.bfloat16,
        BLOCK_R=br, BLOCK_D=bd, BLOCK_P=max(1, triton.next_power_of_2(r2)),
    )
    return y
