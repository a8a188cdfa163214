"""DeepSeek-V4 weight formats: FP8 e4m3 with ue8m0 128x128 block scales, FP4 e2m1 (two codes per int8, low
nibble first) with ue8m0 1x32 scales. Dequantization is exact (every value is representable in fp32 and bf16);
quantization is used by the checkpoint writer. Pure functions, no I/O.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
# E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_LUT = torch.tensor(FP4_VALUES, dtype=torch.float32)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 byte b -> 2^(b-127) in fp32 (exact; b=0 gives 2^-127, a subnormal fp32)."""
    b = scale.view(torch.uint8).to(torch.int32)
    # Build the fp32 bit pattern directly: exponent field b, zero mantissa. b == 0 is 2^-127, a subnormal.
    bits = torch.where(b > 0, b << 23, torch.full_like(b, 1 << 22))
    return bits.view(torch.float32)


def float_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Integer power-of-two exponents -> ue8m0 bytes as torch.float8_e8m0fnu."""
    return (exponent.to(torch.int32) + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    return scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] float8_e4m3fn + [ceil(out/128), ceil(in/128)] e8m0 -> [out, in] dtype."""
    out_f, in_f = weight.shape
    s = _expand_blocks(e8m0_to_float(scale), out_f, in_f, FP8_BLOCK, FP8_BLOCK)
    return (weight.to(torch.float32) * s).to(dtype)


def unpack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in/2] int8 -> [out, in] uint8 codes (low nibble = even column)."""
    b = codes.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def dequant_fp4(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in/2] int8 packed e2m1 + [out, in/32] e8m0 -> [out, in] dtype."""
    vals = FP4_LUT[unpack_fp4(codes).long()]  # (out, in)
    s = e8m0_to_float(scale).repeat_interleave(FP4_BLOCK, 1)
    return (vals * s).to(dtype)


def pow2_exponent(amax: torch.Tensor, qmax: float, limit: int = 127) -> torch.Tensor:
    """fp32 amax -> ceil(log2(amax / qmax)) in [-limit, limit] (fp32): the smallest power-of-two scale with
    amax / scale <= qmax, as the official quantizers round scales. Exact for every amax >= 1e-30 (smaller ones are
    taken as 1e-30; inf -> limit, NaN stays NaN). The weight quantizers and the FP8 KV encoder share it."""
    # The ceil comes from the fp32 quotient's bits (frexp: m 2^e, m in [0.5, 1)), not through an fp32 log2, which
    # can't resolve offsets under ~|k| 2^-24 near an integer k: here it put amax up to 39 ulp past qmax x 2^k onto k.
    # The rounded quotient is a power of two only where the exact one is: amax's mantissa M and qmax's c (1.75 for
    # 448, 1.5 for 6) differ by >= 2^-23 unless equal, so M / c is >= 2^-23 / c from 1, over half an ulp.
    amax = amax.to(torch.float32).clamp_min(1e-30)
    m, e = torch.frexp(amax / qmax)
    return torch.where(m.isfinite(), (e - (m == 0.5).to(e.dtype)).to(torch.float32), m).clamp(-limit, limit)


def quant_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn weight, e8m0 [ceil(out/128), ceil(in/128)] scale)."""
    w = w.to(torch.float32)
    out_f, in_f = w.shape
    ro, ri = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    padded = torch.zeros(ro * FP8_BLOCK, ri * FP8_BLOCK)
    padded[:out_f, :in_f] = w
    amax = padded.view(ro, FP8_BLOCK, ri, FP8_BLOCK).abs().amax(dim=(1, 3))
    exp = pow2_exponent(amax, FP8_MAX)
    s = _expand_blocks(torch.exp2(exp), out_f, in_f, FP8_BLOCK, FP8_BLOCK)
    q = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, float_to_e8m0(exp)


def quant_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float (in % 32 == 0) -> (int8 [out, in/2] packed codes, e8m0 [out, in/32] scale)."""
    w = w.to(torch.float32)
    out_f, in_f = w.shape
    if in_f % FP4_BLOCK:
        raise ValueError(f"FP4 input width {in_f} is not a multiple of {FP4_BLOCK}")
    blocks = w.view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    exp = pow2_exponent(blocks.abs().amax(dim=-1), FP4_MAX)
    x = (blocks / torch.exp2(exp).unsqueeze(-1)).reshape(out_f, in_f)
    # Nearest E2M1 magnitude (ties to the lower code), sign in bit 3; -0 is written as +0.
    mags = FP4_LUT[:8]
    code = (x.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1).to(torch.uint8)
    code = code | ((x < 0) & (code > 0)).to(torch.uint8) << 3
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    return packed, float_to_e8m0(exp)
