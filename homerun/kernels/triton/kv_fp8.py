"""The FP8 KV cache's row codec in one launch each (homerun.models.kv.Fp8PagedRows, section 5 of deepseek-v4.md):
`put` quantizes rows into a page (e4m3 codes, one power-of-two scale per block as a ue8m0 byte or an fp32, the rope
columns in bf16) at device-side row indices or from a row; `read` decodes a page's first n rows, or the rows at
device-side indices (a gather), into the compute dtype (codes x scales, the rope columns beside them).

Bits: the same as the store's torch ops (`Fp8PagedRows._encode` / `_decode`), which stay the definition and the
CPU's path (tests/test_kv_fp8_kernels.py runs every non-NaN code under every scale through both):
- encode: the scale exponent is ceil(log2(amax / 448)), clamped to [-126, 126]. The torch ops take the ceil exactly
  from the bits of the fp32 quotient (frexp); here it comes from amax's bits: amax = M 2^E (M in [1, 2)) gives
  E - 8 when M <= 1.75 (amax / 448 = (M / 1.75) 2^(E - 8), a power of two only at M = 1.75) and E - 7 above. The
  same for every amax >= 1e-30: the rounded quotient is a power of two only where the exact one is (M one ulp
  either side of 1.75 gives M / 1.75 = 1 +- 0.57 x 2^-23, rounded to 1 + 2^-23 or 1 - 2^-24). Rows (bf16, fp16 or
  fp32) times 2^-exp (exact, as torch's division by 2^exp), clamped to +-448, then fp32 -> e4m3 rounded to nearest
  even as c10's Float8_e4m3fn conversion does.
- decode: each e4m3 code (the NaN codes 0x7f / 0xff as NaN) times its scale is exact in fp32 (or inf past fp32's
  range, as torch's product), then rounded once to the output dtype, as `_decode` rounds it.
Inputs without NaN (infinities included): a NaN in a block gives that block whatever the clamp makes of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import e8m0_to_f32, interpreting, launch

FP8_MAX = 448.0
ENCODE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # rows `put` encodes (module docstring)
READ_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the read kernel's OUT is the index here
_P120 = tl.constexpr(2.0**120)


@triton.jit
def _e4m3_to_f32(b):
    """float8_e4m3fn bytes -> fp32, exact; the NaN codes (0x7f, 0xff) -> NaN (common.e4m3_to_f32 without the NaNs:
    a store's unwritten rows may hold any byte, and torch decodes those as NaN)."""
    bi = b.to(tl.uint32)
    v = (((bi & 0x80) << 24) | ((bi & 0x7F) << 20)).to(tl.float32, bitcast=True) * _P120
    return tl.where((bi & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _f32_to_e4m3(v):
    """fp32 -> float8_e4m3fn byte, rounded to nearest even (c10's fp8e4m3fn_from_fp32_value, branch for branch):
    |v| >= 480 -> NaN code; below 2^-6 the subnormal codes through one fp32 add of 2^14 (whose ulp is e4m3's
    2^-9); else the 3 kept mantissa bits rounded on the bits and rebiased."""
    u = v.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    sub = ((a.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - (141 << 23)) & 0xFF
    an = tl.maximum(a, 121 << 23)  # the normal branch's input (no wrap where the subnormal branch is taken)
    nrm = ((an - (120 << 23) + 0x7FFFF + ((an >> 20) & 1)) >> 20) & 0xFF
    code = tl.where(a >= (1087 << 20), 0x7F, tl.where(a < (121 << 23), sub, nrm))
    return (code | sign).to(tl.uint8)


@triton.jit
def _bf16_bits(v):
    """fp32 -> the bits of the nearest bf16 (round to nearest even; subnormals too) as int16, for a store through an
    int16 view: the interpreter's own fp32 -> bf16 conversion loses bf16's subnormals (and truncates)."""
    u = v.to(tl.uint32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def _bf16_to_f32(b):
    """bf16 bits (int16, loaded through an int16 view) -> fp32, exact (subnormals too, unlike the interpreter's)."""
    return ((b.to(tl.uint32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _put_kernel(
    x_ptr, at_ptr, q_ptr, s_ptr, r_ptr, N, row0, sat,
    sxn, sxd, sqn, sqd, ssn, ssd, srn, srd,
    NB: tl.constexpr, BLK: tl.constexpr, NB_P2: tl.constexpr, BLK_P2: tl.constexpr, ROPE: tl.constexpr,
    ROPE_P2: tl.constexpr, SCALE_F32: tl.constexpr, HAS_AT: tl.constexpr, BLOCK_R: tl.constexpr,
    X_BF16: tl.constexpr,
):
    """Program: BLOCK_R input rows as [rows, blocks, dims of a block] tiles; row i goes to page row at[i] (HAS_AT) or
    row0 + i. X_BF16: x is bf16 rows seen as int16; else fp16 or fp32. The rope part is seen as int16."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < N
    if HAS_AT:
        dst = tl.load(at_ptr + rr * sat, mask=r_mask, other=0).to(tl.int64)
    else:
        dst = (row0 + rr).to(tl.int64)
    rb = tl.arange(0, NB_P2)
    rk = tl.arange(0, BLK_P2)
    b_mask = r_mask[:, None] & (rb < NB)[None, :]
    m3 = b_mask[:, :, None] & (rk < BLK)[None, None, :]
    col = rb[None, :, None] * BLK + rk[None, None, :]
    x = tl.load(x_ptr + rr.to(tl.int64)[:, None, None] * sxn + col * sxd, mask=m3, other=0)
    x = _bf16_to_f32(x) if X_BF16 else x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=2), 1e-30)  # [R, NB_P2]
    ab = amax.to(tl.uint32, bitcast=True)
    e = ((ab >> 23) & 0xFF).to(tl.int32) - 135 + ((ab & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.where(ab >= 0x7F800000, 126, tl.minimum(tl.maximum(e, -126), 126))  # ceil(log2(amax / 448)), clamped:
    # the module docstring; an inf gives the largest scale, as torch's log2 of it does
    inv = ((127 - e) << 23).to(tl.uint32).to(tl.float32, bitcast=True)  # 2^-e, exact
    y = tl.minimum(tl.maximum(x * inv[:, :, None], -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + dst[:, None, None] * sqn + col * sqd, _f32_to_e4m3(y), mask=m3)
    s_at = s_ptr + dst[:, None] * ssn + rb[None, :] * ssd
    if SCALE_F32:
        tl.store(s_at, ((e + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True), mask=b_mask)
    else:
        tl.store(s_at, (e + 127).to(tl.uint8), mask=b_mask)
    if ROPE > 0:
        rp = tl.arange(0, ROPE_P2)
        mp = r_mask[:, None] & (rp < ROPE)[None, :]
        v = tl.load(x_ptr + rr.to(tl.int64)[:, None] * sxn + (NB * BLK + rp)[None, :] * sxd, mask=mp, other=0)
        if not X_BF16:  # fp16 or fp32 -> bf16, rounded as torch's .to(bfloat16) of it
            v = _bf16_bits(v.to(tl.float32))
        tl.store(r_ptr + dst[:, None] * srn + rp[None, :] * srd, v, mask=mp)


@triton.jit
def _read_kernel(
    q_ptr, s_ptr, r_ptr, idx_ptr, y_ptr, N, sidx,
    sqn, sqd, ssn, ssd, srn, srd,
    NB: tl.constexpr, BLK: tl.constexpr, NB_P2: tl.constexpr, BLK_P2: tl.constexpr, ROPE: tl.constexpr,
    ROPE_P2: tl.constexpr, SCALE_F32: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr,
    OUT: tl.constexpr,
):
    """Program: BLOCK_R output rows of y [N, NB * BLK + ROPE] (contiguous); output row i decodes page row idx[i]
    (HAS_IDX) or i. OUT: 0 fp32, 1 bf16 (y and the rope part seen as int16), 2 fp16."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < N
    if HAS_IDX:
        src = tl.load(idx_ptr + rr * sidx, mask=r_mask, other=0).to(tl.int64)
    else:
        src = rr.to(tl.int64)
    width = NB * BLK + ROPE
    rb = tl.arange(0, NB_P2)
    rk = tl.arange(0, BLK_P2)
    b_mask = r_mask[:, None] & (rb < NB)[None, :]
    m3 = b_mask[:, :, None] & (rk < BLK)[None, None, :]
    col = rb[None, :, None] * BLK + rk[None, None, :]
    codes = tl.load(q_ptr + src[:, None, None] * sqn + col * sqd, mask=m3, other=0)
    s_at = s_ptr + src[:, None] * ssn + rb[None, :] * ssd
    if SCALE_F32:
        scale = tl.load(s_at, mask=b_mask, other=1.0)
    else:
        scale = e8m0_to_f32(tl.load(s_at, mask=b_mask, other=127))
    y_row = y_ptr + rr.to(tl.int64) * width
    y = _e4m3_to_f32(codes) * scale[:, :, None]  # exact (or inf) in fp32; rounded once by the store
    if OUT == 1:
        y = _bf16_bits(y)
    tl.store(y_row[:, None, None] + col, y, mask=m3)
    if ROPE > 0:
        rp = tl.arange(0, ROPE_P2)
        mp = r_mask[:, None] & (rp < ROPE)[None, :]
        v = tl.load(r_ptr + src[:, None] * srn + rp[None, :] * srd, mask=mp, other=0)
        if OUT != 1:  # bf16 bits -> fp32 (exact) -> the output's dtype; bf16 to bf16 is a copy of the bits
            v = _bf16_to_f32(v)
        tl.store(y_row[:, None] + (NB * BLK + rp)[None, :], v, mask=mp)


def _block_rows(n: int, row_elems: int) -> int:
    """Rows a program takes: under the interpreter (cost per program) up to 1,024; on a GPU about 8K elements."""
    cap = 1024 if interpreting() else max(1, 8192 // row_elems)
    return max(1, min(cap, triton.next_power_of_2(max(n, 1))))


def _i16(t: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor's bits (the kernels move bf16 as int16); a tensor of no columns as it is."""
    return t.view(torch.int16) if t.shape[-1] else t


def _layout(codes: torch.Tensor, scales: torch.Tensor, block: int) -> tuple[int, int, int]:
    nope = codes.shape[1]
    assert block > 0 and nope % block == 0, (nope, block)
    nb = nope // block
    return nb, triton.next_power_of_2(nb), triton.next_power_of_2(block)


def put(rows: torch.Tensor, page: tuple[torch.Tensor, torch.Tensor, torch.Tensor], block: int, scale_fp32: bool, *,
        at: torch.Tensor | None = None, row0: int = 0) -> None:
    """rows [n, nope + rope] (bf16, fp16 or fp32, any strides) quantized into page = (codes [R, nope] float8_e4m3fn,
    scales [R, >= nope / block] uint8 (ue8m0) or fp32 (scale_fp32), rope [R, rope] bf16), rows at the device
    indices `at` ([n] int64) or from row0; the scales' columns past nope / block are left as they are. One launch."""
    codes, scales, rope = page
    if rows.dtype not in ENCODE_DTYPES:
        raise ValueError(f"kv_fp8.put: rows in {rows.dtype}; the fused encoder takes {ENCODE_DTYPES}")
    n = rows.shape[0]
    assert rows.dim() == 2 and (at is None or at.shape == (n,)), (rows.shape, None if at is None else at.shape)
    nb, nb_p2, blk_p2 = _layout(codes, scales, block)
    nrope = rows.shape[1] - codes.shape[1]
    assert nrope == rope.shape[1] and scales.dtype == (torch.float32 if scale_fp32 else torch.uint8)
    if n == 0:
        return
    q, x, r = codes.view(torch.uint8), (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows), _i16(rope)
    br = _block_rows(n, nb_p2 * blk_p2)
    launch(_put_kernel, (triton.cdiv(n, br),))(
        x, at if at is not None else q, q, scales, r, n, row0, at.stride(0) if at is not None else 0,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scales.stride(0), scales.stride(1),
        r.stride(0), r.stride(1),
        NB=nb, BLK=block, NB_P2=nb_p2, BLK_P2=blk_p2, ROPE=nrope, ROPE_P2=triton.next_power_of_2(max(nrope, 1)),
        SCALE_F32=scale_fp32, HAS_AT=at is not None, BLOCK_R=br, X_BF16=rows.dtype == torch.bfloat16,
    )


def read(page: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, dtype: torch.dtype, block: int,
         scale_fp32: bool, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The page's first n rows (idx None) or its rows at the device indices idx ([n] int64, in range), decoded ->
    [n, nope + rope] in dtype (bf16, fp16 or fp32) on the page's device. One launch."""
    codes, scales, rope = page
    if dtype not in READ_DTYPES:
        raise ValueError(f"kv_fp8.read: dtype {dtype}; the fused decoder writes {READ_DTYPES}")
    nb, nb_p2, blk_p2 = _layout(codes, scales, block)
    nrope = rope.shape[1]
    if idx is not None:
        assert idx.dim() == 1, idx.shape
        n = idx.shape[0]
    y = torch.empty(n, codes.shape[1] + nrope, dtype=dtype, device=codes.device)
    if n == 0:
        return y
    q, r = codes.view(torch.uint8), _i16(rope)
    out = y.view(torch.int16) if dtype == torch.bfloat16 else y
    br = _block_rows(n, nb_p2 * blk_p2)
    launch(_read_kernel, (triton.cdiv(n, br),))(
        q, scales, r, idx if idx is not None else q, out, n, idx.stride(0) if idx is not None else 0,
        q.stride(0), q.stride(1), scales.stride(0), scales.stride(1), r.stride(0), r.stride(1),
        NB=nb, BLK=block, NB_P2=nb_p2, BLK_P2=blk_p2, ROPE=nrope, ROPE_P2=triton.next_power_of_2(max(nrope, 1)),
        SCALE_F32=scale_fp32, HAS_IDX=idx is not None, BLOCK_R=br, OUT=READ_DTYPES.index(dtype),
    )
    return y
