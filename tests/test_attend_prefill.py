"""Prefill attention (issue 19): the torch set's `attend_prefill` against a plain fp64 per-query loop (its definition:
window visibility, closed compressed entries, CSA picks, the sink in the denominator), the native kernel
(`hr_attend_prefill`) against the torch set on every native path here, edge shapes (T < window, T not a multiple of
the compression rate, T = 1, a past window, heads and widths off the register tiles), and the model's prefill through
the native kernel against the torch set."""

from __future__ import annotations

import pytest
import torch

from homerun.errors import KernelError
from homerun.kernels import dispatch
from homerun.kernels.torch_set import TorchKernels

TORCH = TorchKernels()


def _native():
    from homerun.kernels import cpu_prefill

    if not cpu_prefill.available():
        pytest.skip("native kernels not built")
    return cpu_prefill


def _native_paths() -> list[str]:
    from homerun.kernels.cpu_experts import available_paths

    return [p for p in available_paths() if p != "torch"]


def _case(t, h, d, n_past, window, rate, csa, k=8, seed=0):
    """Random inputs of one prefill step starting at position n_past (the window holds n_past earlier rows)."""
    g = torch.Generator().manual_seed(seed)
    start = n_past
    q = torch.randn(t, h, d, generator=g)
    keys = torch.randn(n_past + t, d, generator=g)
    sink = torch.randn(h, generator=g) * 2
    n_comp = (start + t) // rate if rate else 0
    comp = torch.randn(n_comp, d, generator=g) if rate else None
    sel = None
    if csa and n_comp:
        # picks over every entry (future ones included, as the indexer's masked picks can be), distinct per query
        sel = torch.stack([torch.randperm(n_comp, generator=g)[: min(k, n_comp)] for _ in range(t)])
    return dict(q=q, keys=keys, key_pos0=start - n_past, window=window, comp=comp, sel=sel, q_pos0=start, rate=rate,
                sink=sink, scale=d**-0.5)


def _reference(q, keys, key_pos0, window, comp, sel, q_pos0, rate, sink, scale):
    """One query at a time in fp64: the rows it may see, then softmax over [scores..., sink]."""
    t, h, d = q.shape
    out = torch.empty(t, h, d, dtype=torch.float64)
    for i in range(t):
        pos = q_pos0 + i
        rows = [keys[j] for j in range(keys.shape[0]) if pos - window < key_pos0 + j <= pos]
        closed = (pos + 1) // rate if rate else 0
        if comp is not None and rate:
            picks = range(comp.shape[0]) if sel is None else sel[i].tolist()
            rows += [comp[c] for c in picks if 0 <= c < closed]
        r = torch.stack(rows).double() if rows else torch.zeros(0, d, dtype=torch.float64)
        s = torch.cat([q[i].double() @ r.T * scale, sink.double().view(h, 1)], dim=1)
        out[i] = torch.softmax(s, dim=1)[:, :-1] @ r
    return out


CASES = [
    # t, h, d, n_past, window, rate, csa
    (5, 4, 32, 0, 8, 0, False),  # sliding, T < window
    (20, 3, 24, 0, 8, 0, False),  # T > window, heads and width off the tiles
    (13, 5, 40, 6, 8, 4, True),  # CSA, T not a multiple of the rate, a past window
    (37, 6, 48, 3, 8, 4, True),
    (30, 17, 72, 0, 16, 8, False),  # HCA-like: every closed entry
    (1, 3, 16, 0, 8, 4, False),  # T = 1
    (1, 4, 64, 9, 8, 4, True),
    (9, 20, 36, 0, 4, 2, True),  # width not a multiple of 8 or 16
]


@pytest.mark.parametrize("case", CASES)
def test_torch_attend_prefill_is_the_definition(case):
    args = _case(*case)
    got = TORCH.attend_prefill(**args)
    assert got.shape == args["q"].shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), _reference(**args), rtol=1e-5, atol=1e-6)


def test_the_sink_and_the_masks_matter():
    """The definition is not vacuous: dropping the sink, or ignoring visibility, changes the result."""
    args = _case(13, 5, 40, 6, 8, 4, True)
    ref = _reference(**args)
    no_sink = dict(args, sink=torch.full_like(args["sink"], -1e9))
    assert not torch.allclose(_reference(**no_sink), ref, atol=1e-3)
    wide = dict(args, window=10**6)
    assert not torch.allclose(TORCH.attend_prefill(**wide).double(), ref, atol=1e-3)


@pytest.mark.parametrize("case", CASES + [(64, 64, 512, 40, 128, 4, True), (70, 64, 512, 0, 128, 128, False)])
def test_native_attend_prefill_equals_torch(case):
    ca = _native()
    args = _case(*case, k=64 if case[2] == 512 else 8)
    want = TORCH.attend_prefill(**args)
    for path in _native_paths():
        got = ca.attend_prefill(**args, path=path)
        assert got.shape == want.shape and got.dtype == torch.float32
        err = (got - want).abs().max().item()
        assert err <= 1e-5, (path, err)


def test_native_attend_prefill_default_path_and_kernel_set():
    _native()
    if not dispatch.USE_NATIVE or dispatch.native_dense() is None:
        pytest.skip("the native kernel sets are off (HOMERUN_KERNELS=torch)")
    args = _case(37, 6, 48, 3, 8, 4, True)
    ks = dispatch.kernels_for("cpu", torch.float32, 512)
    assert type(ks).attend_prefill is not TorchKernels.attend_prefill  # the CPU prefill set runs the native kernel
    assert torch.allclose(ks.attend_prefill(**args), TORCH.attend_prefill(**args), rtol=1e-5, atol=1e-5)


def test_native_attend_prefill_bad_input():
    ca = _native()
    args = _case(9, 4, 32, 0, 8, 4, True)
    with pytest.raises(KernelError, match="do not match"):
        ca.attend_prefill(**dict(args, keys=args["keys"][:, :-1]))
    with pytest.raises(KernelError, match="sel"):
        ca.attend_prefill(**dict(args, sel=args["sel"][:-1]))
    # a pick that is closed for its query but past the rows given
    bad = args["sel"].clone()
    bad[-1, 0] = args["comp"].shape[0]
    short = dict(args, sel=bad, comp=args["comp"], q_pos0=args["q_pos0"] + 8)
    with pytest.raises(KernelError, match="code -3"):
        ca.attend_prefill(**short)


@pytest.mark.parametrize("t,n,d", [(37, 4, 64), (1, 4, 32), (100, 3, 40), (9, 1, 8)])
def test_native_stream_mixes_equal_torch(t, n, d):
    cp = _native()
    g = torch.Generator().manual_seed(t + n + d)
    x, pre, y = torch.randn(t, n, d, generator=g), torch.rand(t, n, generator=g), torch.randn(t, d, generator=g)
    comb = torch.rand(t, n, n, generator=g)
    assert torch.allclose(cp.hc_pre(pre, x), TORCH.hc_pre(pre, x), rtol=1e-6, atol=1e-6)
    got, want = cp.hc_post(pre, y, comb, x), TORCH.hc_post(pre, y, comb, x)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(KernelError, match="do not match"):
        cp.hc_post(pre, y[:, :-1], comb, x)


@pytest.mark.parametrize("t,n,d", [(37, 4, 64), (1, 4, 32), (100, 3, 40), (9, 1, 8), (17, 4, 4096)])
def test_native_stream_mixes_pool_are_the_decode_kernels_bit_for_bit(t, n, d):
    """The pooled mixes (AVX-512 rows where present: each product rounded, then added) give the decode kernels'
    scalar bits, widths off the 16-lane registers included."""
    cp = _native()
    dense = dispatch.native_dense()
    g = torch.Generator().manual_seed(t + 3 * n + d)
    x, pre, y = torch.randn(t, n, d, generator=g), torch.rand(t, n, generator=g), torch.randn(t, d, generator=g)
    comb = torch.rand(t, n, n, generator=g)
    assert torch.equal(cp.hc_pre(pre, x), dense.hc_pre(pre, x))
    assert torch.equal(cp.hc_post(pre, y, comb, x), dense.hc_post(pre, y, comb, x))


@pytest.mark.parametrize("t,n,d", [(37, 4, 64), (1, 4, 32), (100, 3, 40), (9, 1, 8), (20, 4, 1000), (11, 4, 4096)])
@pytest.mark.parametrize("head", [False, True])
def test_native_hc_weights_pool_is_the_decode_kernel_bit_for_bit(t, n, d, head):
    """The pooled mHC weights (tokens on the pool) give the decode kernel's bits for every token, and stay within
    the decode kernel's bound of the torch set (rms_norm, then the GEMM)."""
    cp = _native()
    if not cp.has_hc_weights():
        pytest.skip("an older build without hr_hc_weights_pool")
    dense = dispatch.native_dense()
    g = torch.Generator().manual_seed(t * 7 + n + d)
    m = n if head else (2 + n) * n
    x = torch.randn(t, n, d, generator=g) * 2
    fn = torch.randn(m, n * d, generator=g) / (n * d) ** 0.5
    base, scale = torch.randn(m, generator=g), torch.rand(1 if head else 3, generator=g) + 0.5
    args = (x, fn, scale, base, 1e-6, 1e-6, 20)
    got, dec, ref = cp.hc_weights(*args), dense.hc_weights(*args), TORCH.hc_weights(*args)
    for a, b, r in zip(got, dec, ref):
        if r is None:
            assert a is None and b is None
            continue
        assert a.shape == r.shape and torch.equal(a, b)
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-6)
    with pytest.raises(KernelError, match="do not match"):
        cp.hc_weights(x, fn[:, 1:], scale, base, 1e-6, 1e-6, 20)


@pytest.mark.parametrize("shape", [(37, 64), (37, 5, 64), (9, 3, 20), (1, 2, 16)])
@pytest.mark.parametrize("opts", ["norm_w", "norm_rope", "norm_w_rope_inverse", "rope_only"])
def test_native_norm_rope_pool_equals_torch(shape, opts):
    cp = _native()
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g)
    ang = torch.randn(shape[0], 4, generator=g) * 3
    c, s = ang.cos(), ang.sin()
    kw = {"norm_w": dict(weight=w, eps=1e-6), "norm_rope": dict(weight=None, eps=1e-6, cos=c, sin=s),
          "norm_w_rope_inverse": dict(weight=w, eps=1e-6, cos=c, sin=s, inverse=True),
          "rope_only": dict(weight=None, eps=0.0, cos=c, sin=s, norm=False)}[opts]
    got, want = cp.norm_rope(x, **kw), TORCH.norm_rope(x, **kw)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    import homerun

    return {k: homerun.load(tiny_checkpoints[k], expert_act="fp32") for k in ("csa", "hca")}


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_model_prefill_native_attention_equals_torch(kind, models, monkeypatch):
    """Whole prefills (small query blocks; a second chunk over a past window and closed entries) with the native
    prefill ops (attention, stream mixes, norm+RoPE) against the same model on the torch set's: every position's
    logits."""
    _native()
    m = models[kind]
    ids = torch.randint(0, 500, (301,), generator=torch.Generator().manual_seed(3)).tolist()
    a = m.net.args
    assert len(ids) > a.window_size and len(ids) % a.csa_rate and len(ids) > a.hca_rate  # the edges are exercised

    def run():
        s = m.session()
        return torch.cat([m.logits(ids), s.feed(ids[:190])[None], s.feed(ids[190:])[None]])

    monkeypatch.setattr("homerun.models.deepseek_v4.model._BLOCK_ELEMS", 1 << 14)
    native = run()
    monkeypatch.setattr(dispatch, "_prefill_module", False)
    plain = run()
    assert ((native - plain).abs().max() / plain.abs().max()).item() <= 1e-5
