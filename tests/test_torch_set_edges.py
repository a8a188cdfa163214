"""The torch kernel set (the path CUDA runs without Triton) against plain float64 implementations written here from
the equations of docs/deepseek-v4.md (3.3 mHC, 3.5 RoPE, RMSNorm), at shapes and values where every constant and
operator shows: a non-trivial eps, positions beyond 0, unconverged Sinkhorn, distinct scales, bf16 in and out.
Companion of tests/test_kernel_sets.py; written for the attention survivors in benchmarks/mutation.md."""

from __future__ import annotations

import math

import pytest
import torch

from homerun.kernels.torch_set import TorchKernels, apply_rope, rms_norm, sinkhorn

TORCH = TorchKernels()


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- references: loops over plain float64 numbers, no torch_set helper ------------------------------------------


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last axis, in float64."""
    xd = x.double()
    flat = xd.reshape(-1, xd.shape[-1])
    out = torch.empty_like(flat)
    for r in range(flat.shape[0]):
        row = [float(v) for v in flat[r]]
        inv = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
        for c, v in enumerate(row):
            out[r, c] = v * inv * (1.0 if weight is None else float(weight[c]))
    return out.reshape(xd.shape)


def ref_rope(x: torch.Tensor, pos: list[int], theta: float, rope_dims: int, inverse: bool) -> torch.Tensor:
    """Pair (2i, 2i+1) of the last rope_dims channels rotated by pos * theta^(-2i/rope_dims) (or its negative)."""
    xd = x.double().clone()
    dh = x.shape[-1]
    start = dh - rope_dims
    flat = xd.reshape(x.shape[0], -1, dh)
    for t in range(x.shape[0]):
        for i in range(rope_dims // 2):
            ang = pos[t] * theta ** (-2 * i / rope_dims) * (-1 if inverse else 1)
            c, s = math.cos(ang), math.sin(ang)
            for h in range(flat.shape[1]):
                a, b = float(flat[t, h, start + 2 * i]), float(flat[t, h, start + 2 * i + 1])
                flat[t, h, start + 2 * i] = a * c - b * s
                flat[t, h, start + 2 * i + 1] = b * c + a * s
    return flat.reshape(x.shape)


def cos_sin(pos: list[int], theta: float, rope_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.tensor([theta ** (-2 * i / rope_dims) for i in range(rope_dims // 2)], dtype=torch.float64)
    ang = torch.tensor(pos, dtype=torch.float64)[:, None] * f[None, :]
    return ang.cos().float(), ang.sin().float()


def ref_sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Columns, then (iters - 1) x (rows, columns), each element divided by (its line's sum + eps)."""
    out = m.double().clone()
    n = out.shape[-1]
    for b in range(out.shape[0]):
        c = [[float(out[b, i, j]) for j in range(n)] for i in range(n)]

        def cols(c):
            sums = [sum(c[i][j] for i in range(n)) + eps for j in range(n)]
            return [[c[i][j] / sums[j] for j in range(n)] for i in range(n)]

        def rows(c):
            sums = [sum(c[i]) + eps for i in range(n)]
            return [[c[i][j] / sums[i] for j in range(n)] for i in range(n)]

        c = cols(c)
        for _ in range(iters - 1):
            c = cols(rows(c))
        out[b] = torch.tensor(c, dtype=torch.float64)
    return out


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def ref_hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters):
    """docs 3.3: mix = (f . fn^T) * rsqrt(mean(f^2) + norm_eps); pre/post/comb from mix, scale and base."""
    t, n = x.shape[0], x.shape[1]
    f = x.double().reshape(t, -1)
    mix = (f @ fn.double().T) / torch.sqrt((f * f).mean(-1, keepdim=True) + norm_eps)
    s, b = [float(v) for v in scale], [float(v) for v in base]
    if fn.shape[0] == n:
        pre = torch.tensor([[_sig(float(mix[r, i]) * s[0] + b[i]) + hc_eps for i in range(n)] for r in range(t)],
                           dtype=torch.float64)
        return pre, None, None
    pre = torch.tensor([[_sig(float(mix[r, i]) * s[0] + b[i]) + hc_eps for i in range(n)] for r in range(t)],
                       dtype=torch.float64)
    post = torch.tensor([[2 * _sig(float(mix[r, n + i]) * s[1] + b[n + i]) for i in range(n)] for r in range(t)],
                        dtype=torch.float64)
    comb = torch.empty(t, n, n, dtype=torch.float64)
    for r in range(t):
        for i in range(n):
            logits = [float(mix[r, 2 * n + i * n + j]) * s[2] + b[2 * n + i * n + j] for j in range(n)]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            for j in range(n):
                comb[r, i, j] = e[j] / sum(e) + hc_eps
    return pre, post, ref_sinkhorn(comb, iters, hc_eps)


def ref_hc_pre(pre, x):
    t, n, d = x.shape
    return torch.tensor([[sum(float(pre[r, i]) * float(x[r, i, c]) for i in range(n)) for c in range(d)]
                         for r in range(t)], dtype=torch.float64)


def ref_hc_post(post, y, comb, x):
    """X'_j = post_j * y + sum_i C[i, j] X_i (C transposed, docs 3.3)."""
    t, n, d = x.shape
    out = torch.empty(t, n, d, dtype=torch.float64)
    for r in range(t):
        for j in range(n):
            for c in range(d):
                out[r, j, c] = float(post[r, j]) * float(y[r, c]) + sum(float(comb[r, i, j]) * float(x[r, i, c])
                                                                        for i in range(n))
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol)


def _bf16_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """got is the float64 reference rounded once to bf16, give or take one bf16 step (2^-8 relative)."""
    return got.dtype == torch.bfloat16 and got.shape == want.shape and bool(
        ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all())


# ---- RMSNorm -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rms_norm_over_the_last_axis_with_eps_and_weight(eps):
    x = torch.randn(3, 4, 6, generator=_g(0)) * 0.7  # [T, H, D]: the last axis, not the second
    w = torch.rand(6, generator=_g(1)) + 0.5
    assert _close(rms_norm(x, w, eps), ref_rms_norm(x, w, eps))
    assert _close(rms_norm(x, None, eps), ref_rms_norm(x, None, eps))
    assert _close(TORCH.norm_rope(x, w, eps), ref_rms_norm(x, w, eps))  # norm on by default, no rope


def test_rms_norm_bf16_in_fp32_out_bf16():
    x = (torch.randn(4, 2, 64, generator=_g(2)) * 3).bfloat16()
    w = (torch.rand(64, generator=_g(3)) + 0.5).bfloat16()
    got = rms_norm(x, w, 1e-6)
    # the mean of 64 squares accumulated in bf16 misses by many bf16 steps; fp32 lands within one
    assert _bf16_close(got, ref_rms_norm(x, w, 1e-6))


# ---- RoPE ----------------------------------------------------------------------------------------------------------

POS = [0, 3, 17, 1000, 65]


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rotates_the_trailing_pairs_by_position(inverse):
    t, h, dh, r = len(POS), 3, 12, 8  # 4 nope channels kept as they are, 3 heads broadcast
    x = torch.randn(t, h, dh, generator=_g(4))
    cos, sin = cos_sin(POS, 10000.0, r)
    want = ref_rope(x, POS, 10000.0, r, inverse)
    assert _close(apply_rope(x, cos, sin, inverse=inverse), want)
    assert _close(TORCH.norm_rope(x, None, 0.0, cos, sin, norm=False, inverse=inverse), want)
    # norm then rope, with the inverse passed through
    w = torch.rand(dh, generator=_g(5)) + 0.5
    want_nr = ref_rope(ref_rms_norm(x, w, 0.1), POS, 10000.0, r, inverse)
    assert _close(TORCH.norm_rope(x, w, 0.1, cos, sin, inverse=inverse), want_nr)


def test_rope_defaults_are_forward_and_normed():
    x = torch.randn(len(POS), 2, 16, generator=_g(6))
    cos, sin = cos_sin(POS, 160000.0, 16)
    assert _close(apply_rope(x, cos, sin), ref_rope(x, POS, 160000.0, 16, False))
    want = ref_rope(ref_rms_norm(x, None, 0.2), POS, 160000.0, 16, False)
    assert _close(TORCH.norm_rope(x, None, 0.2, cos, sin), want)


def test_rope_without_head_axis_and_in_bf16():
    x = torch.randn(len(POS), 10, generator=_g(7))  # [T, Dh]: no head axis to broadcast over
    cos, sin = cos_sin(POS, 10000.0, 6)
    assert _close(apply_rope(x, cos, sin), ref_rope(x, POS, 10000.0, 6, False))
    xb = (torch.randn(len(POS), 4, 64, generator=_g(8)) * 4).bfloat16()
    cos, sin = cos_sin(POS, 10000.0, 64)
    got = apply_rope(xb, cos, sin)
    want = ref_rope(xb, POS, 10000.0, 64, False)
    # rotation in fp32 then one rounding: within a bf16 step of the exact rotation (bf16 arithmetic is not)
    assert _bf16_close(got, want)


# ---- Sinkhorn ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_sinkhorn_counts_its_passes_and_adds_eps(iters, eps):
    m = torch.rand(2, 4, 4, generator=_g(9)) * torch.tensor([1.0, 3.0, 0.2, 7.0]) + 0.05  # far from doubly stochastic
    want = ref_sinkhorn(m, iters, eps)
    assert _close(sinkhorn(m, iters, eps), want)
    assert _close(TORCH.sinkhorn(m, iters, eps), want)


# ---- mHC -----------------------------------------------------------------------------------------------------------


def _mhc_inputs(t: int, n: int, d: int, seed: int):
    g = _g(seed)
    x = torch.randn(t, n, d, generator=g) * 1.5
    fn = torch.randn((2 + n) * n, n * d, generator=g) / (n * d) ** 0.5
    scale = torch.tensor([0.7, 1.9, 3.1])  # distinct, none 1: a swapped index or operator shows
    base = torch.randn((2 + n) * n, generator=g)
    return x, fn, scale, base


@pytest.mark.parametrize("iters", [1, 3])
def test_hc_weights_pre_post_comb(iters):
    t, n, d = 3, 4, 5
    x, fn, scale, base = _mhc_inputs(t, n, d, 10)
    norm_eps, hc_eps = 0.3, 0.02  # both large enough to show
    got = TORCH.hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)
    want = ref_hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and _close(a, b)


def test_hc_weights_head_is_pre_only():
    t, n, d = 2, 4, 5
    x, _, _, base = _mhc_inputs(t, n, d, 11)
    fn = torch.randn(n, n * d, generator=_g(12)) / (n * d) ** 0.5
    scale = torch.tensor([1.7])
    pre, post, comb = TORCH.hc_weights(x, fn, scale, base[:n], 0.3, 0.02, 20)
    want, _, _ = ref_hc_weights(x, fn, scale, base[:n], 0.3, 0.02, 20)
    assert post is None and comb is None and _close(pre, want)


def test_hc_pre_and_post_keep_the_stream_dtype():
    t, n, d = 2, 3, 8  # n != d: a broadcast over the wrong axis does not line up
    g = _g(13)
    x = (torch.randn(t, n, d, generator=g) * 2).bfloat16()
    y = torch.randn(t, d, generator=g)  # the sublayer's output may come back in fp32
    pre, post = torch.rand(t, n, generator=g) + 0.5, torch.rand(t, n, generator=g) * 2
    comb = torch.rand(t, n, n, generator=g)
    got = TORCH.hc_pre(pre, x)
    assert got.dtype == torch.bfloat16 and _bf16_close(got, ref_hc_pre(pre, x))
    # post, comb and y are fp32; the update is taken in the streams' dtype (each rounded to bf16 first)
    got = TORCH.hc_post(post, y, comb, x)
    want = ref_hc_post(post.bfloat16(), y.bfloat16(), comb.bfloat16(), x)
    assert got.dtype == torch.bfloat16 and got.shape == (t, n, d)
    assert torch.allclose(got.double(), want, rtol=2**-6, atol=2e-2)


def test_hc_post_fp32_is_the_transposed_mix():
    t, n, d = 2, 3, 5
    g = _g(14)
    x, y = torch.randn(t, n, d, generator=g), torch.randn(t, d, generator=g)
    post, comb = torch.rand(t, n, generator=g) * 2, torch.rand(t, n, n, generator=g)
    assert _close(TORCH.hc_post(post, y, comb, x), ref_hc_post(post, y, comb, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_pre_norm_is_the_weighted_norm_of_the_collapsed_streams(dtype):
    t, n, d = 3, 4, 16
    g = _g(15)
    x = (torch.randn(t, n, d, generator=g) * 0.3).to(dtype)
    pre = torch.rand(t, n, generator=g) + 0.25
    w = torch.rand(d, generator=g) + 0.5
    eps = 0.05  # visible against mean squares of about 0.1
    got = TORCH.hc_pre_norm(pre, x, w, eps)
    collapsed = ref_hc_pre(pre, x)
    if dtype == torch.bfloat16:  # the collapse is rounded to the streams' dtype before the norm
        collapsed = collapsed.bfloat16()
        assert _bf16_close(got, ref_rms_norm(collapsed, w, eps))
    else:
        assert got.dtype == dtype and _close(got, ref_rms_norm(collapsed, w, eps))
    assert not _close(got.float(), TORCH.hc_pre_norm(pre, x, None, eps).float())  # the weight is applied

