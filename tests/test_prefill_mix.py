"""The prefill set's fused mHC input and its AVX-512 RoPE (issue 19, h19k): `hc_pre_norm` in one pool call gives the
bits of its two calls (hc_pre, then the norm) and of the decode kernels; the pooled norm+RoPE (the rope in AVX-512
where present) gives the scalar decode kernel's bits for rope widths on and off its 16-lane path, in place and out of
place; both stay within fp32 rounding of the torch set (the plain fp32 definition)."""

from __future__ import annotations

import pytest
import torch

from homerun.kernels import dispatch
from homerun.kernels.torch_set import TorchKernels

TORCH = TorchKernels()


def _native():
    from homerun.kernels import cpu_prefill

    if not cpu_prefill.available() or dispatch.native_dense() is None:
        pytest.skip("native kernels not built")
    return cpu_prefill


@pytest.mark.parametrize("t,n,d", [(37, 4, 64), (1, 4, 32), (100, 3, 40), (9, 1, 8), (17, 4, 4096)])
@pytest.mark.parametrize("weighted", [True, False])
def test_hc_pre_norm_pool_is_its_two_calls_bit_for_bit(t, n, d, weighted):
    cp = _native()
    dense = dispatch.native_dense()
    g = torch.Generator().manual_seed(t + 5 * n + d)
    x, pre = torch.randn(t, n, d, generator=g) * 3, torch.rand(t, n, generator=g)
    w = torch.rand(d, generator=g) + 0.5 if weighted else None
    got = cp.hc_pre_norm(pre, x, w, 1e-6)
    assert torch.equal(got, cp.norm_rope(cp.hc_pre(pre, x), w, 1e-6))
    assert torch.equal(got, dense.norm_rope(dense.hc_pre(pre, x), w, 1e-6))
    want = TORCH.hc_pre_norm(pre.double(), x.double(), w.double() if w is not None else None, 1e-6)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    ks = dispatch.CpuPrefillKernels(dense)
    assert torch.equal(ks.hc_pre_norm(pre, x, w, 1e-6), got)  # the prefill set takes the fused call


# (rows per token, width, rope channels): V4's q heads (64 x 512, 64 rope), one row per token, a rope wider than
# the 64 pairs held in registers (144: a second chunk of 8 pairs), and widths off the 16-lane path (the scalar loop)
@pytest.mark.parametrize("pt,d,rope", [(64, 512, 64), (1, 64, 16), (3, 160, 144), (2, 40, 8), (5, 64, 24)])
@pytest.mark.parametrize("mode", ["norm_w", "norm", "rope_only", "inplace"])
@pytest.mark.parametrize("inverse", [False, True])
def test_norm_rope_pool_is_the_scalar_kernel_bit_for_bit(pt, d, rope, mode, inverse):
    cp = _native()
    dense = dispatch.native_dense()
    t = 11
    g = torch.Generator().manual_seed(pt * 7 + d + rope)
    x = torch.randn(t, pt, d, generator=g) * 2
    ang = torch.randn(t, rope // 2, generator=g) * 4
    c, s = ang.cos(), ang.sin()
    s[0, 0] = 0.0  # a zero sine (the sign of the products' zeros)
    w = torch.rand(d, generator=g) + 0.5 if mode == "norm_w" else None
    norm = mode in ("norm_w", "norm")
    want = dense.norm_rope(x, w, 1e-6, c, s, norm=norm, inverse=inverse)
    if mode == "inplace":
        y = x.clone()
        got = cp.rope_inplace(y, c, s, inverse=inverse)
        assert got.data_ptr() == y.data_ptr()
        assert torch.equal(got[..., : d - rope], x[..., : d - rope])
    else:
        got = cp.norm_rope(x, w, 1e-6, c, s, norm=norm, inverse=inverse)
    assert torch.equal(got, want)
    ref = TORCH.norm_rope(x.double(), w.double() if w is not None else None, 1e-6, c.double(), s.double(), norm=norm,
                          inverse=inverse)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
