"""Every method of the native CPU kernel set against the torch set (the definition, and the path CUDA runs), and
the torch set against formulas written out here: a wrong torch method cannot hide behind a matching native one."""

from __future__ import annotations

import pytest
import torch

from homerun.formats.quant import dequant_fp8, quant_fp8
from homerun.kernels import dispatch
from homerun.models.layers import Projections, QLinear

TORCH = dispatch.TORCH


@pytest.fixture
def native():
    dense = dispatch.native_dense()
    if dense is None:
        pytest.skip("native kernels not built")
    return dispatch.NativeCpuKernels(dense)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_selection():
    assert dispatch.kernels_for("meta", torch.float32, 1) is TORCH  # any non-CPU device: the torch set
    if dispatch.native_dense() is not None and dispatch.USE_NATIVE:
        assert dispatch.kernels_for("cpu", torch.float32, 1).name == "cpu-native"
        assert dispatch.kernels_for("cpu", torch.float32, dispatch.NATIVE_MAX_ROWS + 1).name == "cpu"
        assert dispatch.kernels_for("cpu", torch.bfloat16, 1).name == "cpu"
    restore = dispatch.set_native(False)
    try:
        assert dispatch.kernels_for("cpu", torch.float32, 1) is TORCH
    finally:
        restore()


def test_torch_attend_one_is_softmax_with_a_sink():
    g = _g(0)
    h, n, d = 4, 9, 16
    q, kv, sink = torch.randn(h, d, generator=g), torch.randn(n, d, generator=g), torch.randn(h, generator=g) * 3
    scale = d**-0.5
    s = (q.double() @ kv.double().T) * scale
    e = torch.exp(s - torch.maximum(s.amax(-1, keepdim=True), sink.double()[:, None]))
    z = e.sum(-1, keepdim=True) + torch.exp(sink.double()[:, None] - torch.maximum(s.amax(-1, keepdim=True),
                                                                                    sink.double()[:, None]))
    ref = (e / z) @ kv.double()
    assert torch.allclose(TORCH.attend_one(q, kv, sink, scale).double(), ref, rtol=1e-5, atol=1e-6)


def test_torch_hc_ops_are_the_written_formulas():
    g = _g(1)
    t, n, d = 3, 4, 8
    x, y = torch.randn(t, n, d, generator=g), torch.randn(t, d, generator=g)
    pre, post, comb = torch.rand(t, n, generator=g), torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
    want_pre = torch.stack([sum(pre[i, j] * x[i, j] for j in range(n)) for i in range(t)])
    assert torch.allclose(TORCH.hc_pre(pre, x), want_pre, atol=1e-6)
    want_post = torch.stack([torch.stack([post[i, j] * y[i] + sum(comb[i, k, j] * x[i, k] for k in range(n))
                                          for j in range(n)]) for i in range(t)])
    assert torch.allclose(TORCH.hc_post(post, y, comb, x), want_post, atol=1e-5)


def test_torch_sinkhorn_columns_then_rows():
    m = torch.rand(2, 3, 3, generator=_g(2)) + 0.1
    got = TORCH.sinkhorn(m, 1, 0.0)
    assert torch.allclose(got.sum(-2), torch.ones(2, 3), atol=1e-6)  # one pass: columns normalized
    got = TORCH.sinkhorn(m, 50, 0.0)
    assert torch.allclose(got.sum(-1), torch.ones(2, 3), atol=1e-4) and torch.allclose(got.sum(-2), torch.ones(2, 3), atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_native_linears_equal_torch(native, rows):
    g = _g(rows)
    w = torch.randn(256, 384, generator=g)
    q, s = quant_fp8(w)
    fp8 = QLinear(q, s)
    bf16 = QLinear(torch.randn(200, 384, generator=g).bfloat16())
    x = torch.randn(rows, 384, generator=g)
    for lin in (fp8, bf16):
        a, b = native.linear(lin, x), TORCH.linear(lin, x)
        assert torch.allclose(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
    xg = torch.randn(rows, 2, 384, generator=g)
    a, b = native.grouped(fp8, xg, 2), TORCH.grouped(fp8, xg, 2)
    assert torch.allclose(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
    projs = Projections([fp8, bf16])
    for a, b in zip(native.project(projs.lins, x, projs), TORCH.project(projs.lins, x, projs)):
        assert torch.allclose(a, b, rtol=0, atol=2e-6 * b.abs().max().item())
    ref = x.double() @ dequant_fp8(q, s).double().T
    assert torch.allclose(native.linear(fp8, x).double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("t", [1, 7])
def test_native_hc_and_norm_rope_equal_torch(native, t):
    g = _g(10 + t)
    n, d = 4, 64
    x = torch.randn(t, n, d, generator=g) * 2
    fn = torch.randn((2 + n) * n, n * d, generator=g) / d**0.5
    base, scale = torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g) + 0.5
    for a, b in zip(native.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20), TORCH.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    pre, post, comb = TORCH.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)
    y = torch.randn(t, d, generator=g)
    assert torch.allclose(native.hc_pre(pre, x), TORCH.hc_pre(pre, x), rtol=1e-6, atol=1e-6)
    assert torch.allclose(native.hc_post(post, y, comb, x), TORCH.hc_post(post, y, comb, x), rtol=1e-6, atol=1e-6)
    w = torch.rand(d, generator=g) + 0.5
    ang = torch.rand(t, 8, generator=g) * 6
    for inverse in (False, True):
        a = native.norm_rope(x, w, 1e-6, ang.cos(), ang.sin(), inverse=inverse)
        b = TORCH.norm_rope(x, w, 1e-6, ang.cos(), ang.sin(), inverse=inverse)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_native_attend_one_equals_torch(native):
    g = _g(20)
    q, kv, sink = torch.randn(8, 32, generator=g), torch.randn(40, 32, generator=g), torch.randn(8, generator=g)
    assert torch.allclose(native.attend_one(q, kv, sink, 0.2), TORCH.attend_one(q, kv, sink, 0.2), rtol=1e-5, atol=1e-6)
