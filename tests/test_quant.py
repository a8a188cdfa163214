"""homerun.formats.quant against plain per-element references (bit-exact), including edge blocks, e8m0 extremes, all 16
FP4 codes and the nibble order; plus quantizer round-trip properties and the writer's fast FP4 quantizer."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homerun.formats.checkpoint import _quant_fp4_fast
from homerun.formats.quant import (
    pow2_exponent, dequant_fp4, dequant_fp8, e8m0_to_float, quant_fp4, quant_fp8, unpack_fp4,
)

# E2M1 code -> value, typed from deepseek-v4.md section 4.3 (independent of homerun.formats.quant.FP4_VALUES).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e4m3_value(byte: int) -> float:
    """float8 e4m3fn bit pattern -> value: 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals at exp 0."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, mant = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0:
        return sign * (mant / 8) * 2.0**-6
    return sign * (1 + mant / 8) * 2.0 ** (exp - 7)


def bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int32).numpy()


def ref_dequant_fp8(w_bytes: np.ndarray, s_bytes: np.ndarray) -> np.ndarray:
    out = np.zeros(w_bytes.shape, dtype=np.float64)
    for i in range(w_bytes.shape[0]):
        for j in range(w_bytes.shape[1]):
            out[i, j] = e4m3_value(int(w_bytes[i, j])) * 2.0 ** (int(s_bytes[i // 128, j // 128]) - 127)
    return out.astype(np.float32)  # every product is exact in float64; one rounding (or overflow) to fp32


def ref_dequant_fp4(packed: np.ndarray, s_bytes: np.ndarray) -> np.ndarray:
    rows, half = packed.shape
    out = np.zeros((rows, half * 2), dtype=np.float64)
    for i in range(rows):
        for c in range(half):
            byte = int(packed[i, c]) & 0xFF
            for j, code in ((2 * c, byte & 0xF), (2 * c + 1, byte >> 4)):  # low nibble = even column
                out[i, j] = E2M1[code] * 2.0 ** (int(s_bytes[i, j // 32]) - 127)
    return out.astype(np.float32)


def test_e8m0_every_byte():
    b = torch.arange(0, 255, dtype=torch.uint8)
    got = e8m0_to_float(b.view(torch.float8_e8m0fnu))
    want = np.array([2.0 ** (int(v) - 127) for v in range(255)], dtype=np.float32)
    assert want[0] > 0 and want[0] == 2.0**-127  # a subnormal float32, not flushed to zero
    assert np.array_equal(bits(got), want.view(np.int32))


def test_dequant_fp8_edge_blocks_bit_exact():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 130, 260  # 2 x 3 scale blocks, the last ones partial (2 rows, 4 columns)
    w = torch.randint(0, 256, (out_f, in_f), generator=g, dtype=torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0x7E  # 0x7F/0xFF are NaN in e4m3fn; everything else is a value
    s = torch.tensor([[127, 0, 254], [1, 130, 100]], dtype=torch.uint8)  # e8m0 extremes included
    got = dequant_fp8(w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu))
    with np.errstate(over="ignore"):
        want = ref_dequant_fp8(w.numpy(), s.numpy())
    assert np.array_equal(bits(got), want.view(np.int32))
    assert np.isinf(want[:128, 256:]).any()  # 448 * 2^127 overflows fp32 in both
    bf = dequant_fp8(w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), torch.bfloat16)
    # 4-bit mantissas are exact in bf16 too, except where the product is subnormal (scale bytes 0 and 1).
    assert torch.equal(bf.float()[:128, :128], got[:128, :128]) and torch.equal(bf.float()[128:, 128:], got[128:, 128:])


def test_dequant_fp4_all_codes_and_nibble_order():
    lo = torch.arange(16, dtype=torch.uint8).repeat_interleave(16)  # every (low, high) pair once: 256 bytes
    hi = torch.arange(16, dtype=torch.uint8).repeat(16)
    packed = (lo | (hi << 4)).view(torch.int8).reshape(4, 64)  # 4 rows x 128 logical columns
    assert torch.equal(unpack_fp4(packed).reshape(-1)[0::2], lo) and torch.equal(unpack_fp4(packed).reshape(-1)[1::2], hi)
    s = torch.tensor([[127, 126, 0, 254], [128, 1, 127, 200], [100, 127, 150, 127], [127, 127, 127, 127]],
                     dtype=torch.uint8)
    got = dequant_fp4(packed, s.view(torch.float8_e8m0fnu))
    with np.errstate(over="ignore"):  # 6 * 2^127 overflows fp32 in both
        want = ref_dequant_fp4(packed.numpy(), s.numpy())
    assert np.array_equal(bits(got), want.view(np.int32))
    assert got[3, 0::2].tolist()[:16] == [E2M1[c] for c in lo[192:208].tolist()]  # scale 1: the raw table


def test_dequant_fp4_edge_widths_bit_exact():
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(-128, 128, (3, 48), generator=g, dtype=torch.int8)  # in = 96: three 1x32 blocks
    s = torch.randint(90, 160, (3, 3), generator=g, dtype=torch.uint8)
    got = dequant_fp4(packed, s.view(torch.float8_e8m0fnu))
    assert np.array_equal(bits(got), ref_dequant_fp4(packed.numpy(), s.numpy()).view(np.int32))


def test_quant_fp8_round_trip_properties():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 300, generator=g) * torch.logspace(-3, 2, 300)  # columns span five decades
    w[:64, :64] = 0.0  # an all-zero block
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    deq = dequant_fp8(q, s)
    assert torch.equal(deq[:64, :64], torch.zeros(64, 64))
    scale = e8m0_to_float(s).repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert (q.float().abs() <= 448).all()
    # The scale is the smallest power of two that fits: half of it would push some block past 448.
    blocks = torch.zeros(256, 384)
    blocks[:200, :300] = w.abs()
    amax = blocks.view(2, 128, 3, 128).amax(dim=(1, 3))
    nz = amax > 0
    assert (amax[nz] / e8m0_to_float(s)[nz] <= 448).all() and (amax[nz] / (e8m0_to_float(s)[nz] / 2) > 448).all()
    # Elements in e4m3's normal range are within half an ulp (3 mantissa bits -> relative 2^-4).
    normal = w.abs() / scale >= 2.0**-6
    assert ((deq - w).abs()[normal] <= w.abs()[normal] * 2.0**-4).all()
    assert torch.equal(dequant_fp8(*quant_fp8(deq)), deq)  # representable values come back unchanged


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_quant_fp4_round_trip_properties(rows, blocks, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, blocks * 32, generator=g) * spread
    packed, s = quant_fp4(w)
    assert packed.shape == (rows, blocks * 16) and s.shape == (rows, blocks)
    deq = dequant_fp4(packed, s)
    scale = e8m0_to_float(s).repeat_interleave(32, 1)
    # Nearest E2M1 value: error at most half the widest gap (2, between 4 and 6), in units of the block scale.
    assert ((deq - w).abs() <= scale * 1.0).all()
    assert ((w / scale).abs() <= 6).all()
    assert torch.equal(dequant_fp4(*quant_fp4(deq)), deq)
    fast = _quant_fp4_fast(w)
    assert torch.equal(fast[0], packed) and torch.equal(fast[1].view(torch.uint8), s.view(torch.uint8))


def test_quant_fp4_ties_and_exact_values():
    # Midpoints between E2M1 magnitudes round to the lower code; -0 is written as +0; the block max is 6 * scale.
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.tensor(mids + [-m for m in mids] + [6.0, -6.0, -0.0, 0.0] + E2M1[:8] + [-v for v in E2M1[1:5]] + [0.1, -0.1])
    assert row.numel() == 32
    packed, s = quant_fp4(row.view(1, 32))
    assert int(s.view(torch.uint8)) == 127
    codes = unpack_fp4(packed)[0].tolist()
    assert codes[:7] == [0, 1, 2, 3, 4, 5, 6] and codes[7:14] == [0, 9, 10, 11, 12, 13, 14]
    assert codes[14:18] == [7, 15, 0, 0] and codes[30:] == [0, 0]
    fast = _quant_fp4_fast(row.view(1, 32))
    assert torch.equal(fast[0], packed)


def test_fast_fp4_matches_reference_on_large_random():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 1024, generator=g) * torch.logspace(-4, 3, 1024)
    a, b = quant_fp4(w), _quant_fp4_fast(w)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    with pytest.raises(ValueError):
        _quant_fp4_fast(torch.zeros(2, 48))
    assert math.isclose(float(dequant_fp4(*a).abs().max()), float(w.abs().max()), rel_tol=0.25)


def exact_pow2_exponent(amax: float, qmax: float) -> int:
    """ceil(log2(amax / qmax)) in rationals, clamped as the quantizers clamp it."""
    r = Fraction(max(amax, float(np.float32(1e-30)))) / Fraction(qmax)
    k = math.ceil(math.log2(r))  # a float estimate, then corrected exactly
    while Fraction(2) ** k < r:
        k += 1
    while Fraction(2) ** (k - 1) >= r:
        k -= 1
    return max(-127, min(127, k))


@pytest.mark.parametrize("qmax", [448.0, 6.0])
def test_pow2_exponent_exact_at_every_power_of_two_edge(qmax):
    # Every fp32 within 64 ulp of qmax x 2^E, for every E whose quotient is normal: a libm's log2 rounded amax up to
    # 39 ulp past qmax x 2^E onto E here, so the block's scale was one power too small and its amax saturated.
    base = torch.tensor([qmax * 2.0**e for e in range(-99, 120)], dtype=torch.float32)
    amax = (base.view(torch.int32)[:, None] + torch.arange(-64, 65, dtype=torch.int32)).view(torch.float32).flatten()
    g = torch.Generator().manual_seed(7)  # plus random magnitudes over the whole range, and zero
    rand = torch.exp2(torch.rand(4000, generator=g) * 250 - 125) * (1 + torch.rand(4000, generator=g))
    amax = torch.cat([amax, rand, torch.zeros(1)])
    got = pow2_exponent(amax, qmax)
    want = torch.tensor([exact_pow2_exponent(a, qmax) for a in amax.tolist()], dtype=torch.float32)
    assert torch.equal(got, want), amax[got != want][:4].tolist()
    special = pow2_exponent(torch.tensor([float("inf"), float("nan")]), qmax)
    assert special[0] == 127 and special[1].isnan()


def test_quant_scale_fits_one_ulp_past_the_edge():
    # amax one ulp past qmax x 2^k: the scale is 2^(k+1), amax is not clamped (was 2^k here, amax clamped to qmax).
    w8 = torch.full((128, 128), 2.0**-17)
    w8[5, 7] = float(np.nextafter(np.float32(448 * 2.0**-17), np.float32(np.inf)))
    q, s = quant_fp8(w8)
    assert int(s.view(torch.uint8)) == 127 - 16 and float(q[5, 7].float()) == 224.0
    w4 = torch.full((1, 32), 2.0**-10)
    w4[0, 3] = float(np.nextafter(np.float32(6 * 2.0**-10), np.float32(np.inf)))
    for packed, s4 in (quant_fp4(w4), _quant_fp4_fast(w4)):
        assert int(s4.view(torch.uint8)) == 127 - 9 and float(dequant_fp4(packed, s4)[0, 3]) == 3 * 2.0**-9
