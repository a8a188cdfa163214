"""FP8 / FP4 format edges that mutation testing found unpinned (benchmarks/mutation.md): e8m0 scale saturation,
the requested output dtype of dequantization, and the FP4 width error. Companion of tests/test_quant.py."""

from __future__ import annotations

import pytest
import torch

from homerun.formats.quant import dequant_fp4, dequant_fp8, e8m0_to_float, float_to_e8m0, quant_fp4, quant_fp8


def test_float_to_e8m0_saturates_at_the_format_ends():
    exps = torch.tensor([-300, -128, -127, -1, 0, 1, 127, 128, 300], dtype=torch.int64)
    got = float_to_e8m0(exps)
    assert got.dtype == torch.float8_e8m0fnu
    # byte = exponent + 127 clamped to [0, 254]; 255 is e8m0's NaN and is never written
    assert got.view(torch.uint8).tolist() == [0, 0, 0, 126, 127, 128, 254, 254, 254]
    assert e8m0_to_float(got).tolist() == [2.0**-127] * 3 + [0.5, 1.0, 2.0] + [2.0**127] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_returns_the_requested_dtype(dtype):
    w, s = quant_fp8(torch.linspace(-3, 3, 130 * 2).reshape(2, 130))
    d = dequant_fp8(w, s, dtype)
    assert d.dtype == dtype and torch.equal(d.float(), dequant_fp8(w, s).to(dtype).float())
    c, s4 = quant_fp4(torch.linspace(-6, 6, 64).reshape(1, 64))
    d4 = dequant_fp4(c, s4, dtype)
    assert d4.dtype == dtype and torch.equal(d4.float(), dequant_fp4(c, s4).to(dtype).float())


def test_quant_fp4_names_the_bad_width():
    with pytest.raises(ValueError, match="FP4 input width 48 is not a multiple of 32"):
        quant_fp4(torch.zeros(2, 48))
