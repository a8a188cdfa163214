"""The fused Triton decode ops (homerun.kernels.triton.mhc / norm / attention) against their definitions, the torch
kernel set's methods (homerun.kernels.torch_set.TorchKernels), on random inputs: fp32 row-relative error <= 1e-5,
bf16 <= 1e-2. CPU: the kernels run in Triton's interpreter (small shapes); skipped without triton."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.kernels import triton as hr_triton  # noqa: E402
from homerun.kernels.torch_set import TorchKernels  # noqa: E402

from homerun.kernels.triton import attention, mhc, norm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
REF = TorchKernels()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float().flatten(0, -2) if a.dim() > 1 else a.float()[None], ref.float()
    ref = ref.flatten(0, -2) if ref.dim() > 1 else ref[None]
    return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hc_inputs(t, n, d, dtype, g, head=False):
    x = torch.randn(t, n, 2 * d, generator=g).to(dtype)[:, :, ::2]  # strided streams
    m = n if head else (2 + n) * n
    fn = torch.randn(m, n * d, generator=g) * 0.05
    scale = torch.randn(1 if head else 3, generator=g)
    base = torch.randn(m, generator=g)
    return x, fn, scale, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, block_k, iters", [(4, 48, None, 20), (4, 48, None, 2), (3, 40, 64, 3)])
def test_hc_weights(monkeypatch, dtype, n, d, block_k, iters):
    """pre, post and the Sinkhorn-normalized comb in one launch; block_k 64 runs the K loop over several blocks and a
    masked tail; n 3 pads the n x n tile; few iterations (far from converged) see the order of the passes."""
    if block_k:
        monkeypatch.setattr(mhc, "_block_k", lambda k: block_k)
    x, fn, scale, base = _hc_inputs(3, n, d, dtype, _gen(1))
    scale = scale * 8  # a comb far from doubly stochastic
    got = mhc.hc_weights(x, fn, scale, base, 1e-6, 1e-6, iters)
    want = REF.hc_weights(x, fn, scale, base, 1e-6, 1e-6, iters)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert _rel(a, b) <= 1e-5
    comb = got[2]
    assert torch.allclose(comb.sum(-2), torch.ones(3, n), atol=1e-3)  # columns normalized last


def test_hc_weights_head():
    x, fn, scale, base = _hc_inputs(2, 4, 48, torch.bfloat16, _gen(2), head=True)
    pre, post, comb = mhc.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)
    assert post is None and comb is None
    assert _rel(pre, REF.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_norm_post(dtype):
    g = _gen(3)
    t, n, d = 3, 4, 96
    x = torch.randn(t, n, d, generator=g).to(dtype)
    pre = torch.rand(t, n, generator=g) + 0.1
    post = torch.rand(t, n, generator=g) * 2
    comb = torch.rand(t, n, n, generator=g)
    w = torch.randn(d, generator=g).to(dtype)
    y = torch.randn(t, d, generator=g).to(dtype)
    tol = TOL[dtype]
    assert _rel(mhc.hc_pre_norm(pre, x, None, 0.0, norm=False), REF.hc_pre(pre, x)) <= tol
    assert _rel(mhc.hc_pre_norm(pre, x, w, 1e-6), REF.hc_pre_norm(pre, x, w, 1e-6)) <= tol
    assert _rel(mhc.hc_pre_norm(pre, x, None, 1e-6), REF.hc_pre_norm(pre, x, None, 1e-6)) <= tol
    out = mhc.hc_post(post, y, comb, x)
    assert out.dtype == dtype and _rel(out, REF.hc_post(post, y, comb, x)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["norm+rope", "heads-rope", "inverse", "norm-only", "strided"])
def test_norm_rope(dtype, case):
    g = _gen(4)
    t, h, dh, r2 = 3, 5, 48, 8
    cos, sin = torch.randn(t, r2, generator=g), torch.randn(t, r2, generator=g)
    w = torch.randn(dh, generator=g)
    kw: dict = {}
    if case == "norm+rope":
        x, args = torch.randn(t, dh, generator=g), (w, 1e-6, cos, sin)
    elif case == "heads-rope":  # per head, no weight (the q path)
        x, args = torch.randn(t, h, dh, generator=g), (None, 1e-6, cos, sin)
    elif case == "inverse":  # rope alone, inverse (the attention output)
        x, args, kw = torch.randn(t, h, dh, generator=g), (None, 0.0, cos, sin), {"norm": False, "inverse": True}
    elif case == "norm-only":
        x, args = torch.randn(t, dh, generator=g), (w, 1e-6)
    else:  # a column slice of a wider projection output, heads on a 4-d view
        x, args = torch.randn(t, 2, h, 2 * dh, generator=g)[..., dh:], (None, 1e-6, cos, sin)
    x = x.to(dtype)
    got = norm.norm_rope(x, *args, **kw)
    want = REF.norm_rope(x, *args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("h, n", [(4, 1), (20, 300)])
def test_attend_one(h, n):
    """n 300 crosses the interpreter's 256-row block (the online softmax's rescale); the sink is in the denominator
    only."""
    g = _gen(5)
    d = 64
    q, kv = torch.randn(h, d, generator=g), torch.randn(n, d, generator=g)
    sink = torch.randn(h, generator=g) * 3
    got = attention.attend_one(q, kv, sink, d**-0.5 * 4)
    assert got.dtype == torch.float32
    assert _rel(got, REF.attend_one(q, kv, sink, d**-0.5 * 4)) <= 1e-5
    qb, kb = q.bfloat16(), kv.bfloat16()
    assert _rel(attention.attend_one(qb, kb, sink, d**-0.5), REF.attend_one(qb.float(), kb.float(), sink, d**-0.5)) \
        <= 1e-5


def test_gpu_set_routes_the_families_to_the_fused_kernels():
    """The GPU set (TritonKernels) runs each family in one counted launch."""
    from homerun.kernels.triton import common
    from homerun.kernels.triton.kernel_set import TritonKernels

    ks = TritonKernels(hr_triton.load())
    x, fn, scale, base = _hc_inputs(1, 4, 32, torch.bfloat16, _gen(6))
    n0 = common.LaunchCounter.n
    pre, post, comb = ks.hc_weights(x, fn, scale, base, 1e-6, 1e-6, 20)
    y = ks.hc_pre_norm(pre, x, None, 1e-6)
    ks.hc_post(post, y, comb, x)
    ks.hc_pre(pre, x)
    ks.norm_rope(y, None, 1e-6, torch.ones(1, 4), torch.zeros(1, 4))
    ks.attend_one(torch.randn(4, 32), torch.randn(3, 32), torch.zeros(4), 1.0)
    assert common.LaunchCounter.n - n0 == 6
