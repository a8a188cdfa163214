"""The lightning indexer's prefill top-k (issue 19): the torch set's `index_topk` against a plain fp64 per-query
definition (scores, the visibility threshold, higher score then lower index, -1 past the visible keys), the native
kernel (`hr_index_topk`) against the torch set on every native path here: exactly (order included)
on integer inputs, whose sums are exact in any order and full of ties, and by the picked scores on random inputs;
page sizes from 1 row to all of them, k above n_vis, queries that see no key, key ranges split over threads, keys
stored fp32, bf16 and FP8 (homerun.models.kv), and the CPU prefill kernel set's dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homerun.errors import KernelError
from homerun.kernels import dispatch
from homerun.kernels.torch_set import TorchKernels
from homerun.models.kv import Fp8PagedRows, PagedRows

TORCH = TorchKernels()


def _native():
    from homerun.kernels import cpu_prefill

    if not cpu_prefill.available() or "index_topk" not in cpu_prefill._mix:
        pytest.skip("native kernels not built")
    return cpu_prefill


def _native_paths() -> list[str]:
    from homerun.kernels.cpu_experts import available_paths

    return [p for p in available_paths() if p != "torch"]


def _pages(keys: torch.Tensor, page: int) -> list[tuple[int, torch.Tensor]]:
    return [(r0, keys[r0 : r0 + page]) for r0 in range(0, keys.shape[0], page)]


def _case(nq, hi, di, n, seed=0, integer=False, thr="mixed"):
    """Queries, weights and n keys; integer: small integers (every sum exact in fp32, many equal scores)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        iq = torch.randint(-2, 3, (nq, hi, di), generator=g).float()
        iw = torch.randint(-2, 3, (nq, hi), generator=g).float()
        keys = torch.randint(-2, 3, (n, di), generator=g).float()
    else:
        iq, iw = torch.randn(nq, hi, di, generator=g), torch.randn(nq, hi, generator=g)
        keys = torch.randn(n, di, generator=g)
    if thr is None:
        t = None
    else:  # per query: anything from no visible key to all of them, as a prefill block's causal thresholds
        t = torch.randint(0, n + 1, (nq,), generator=g)
        t[0] = n
        if nq > 1:
            t[-1] = 0
    return iq, iw, keys, t


def _scores64(iq, iw, keys, scale):
    return (torch.relu(torch.einsum("qhd,nd->qhn", iq.double(), keys.double())) * iw.double()[..., None]).sum(1) * scale


def _reference(iq, iw, keys, thr, k_sel, scale):
    """Per query in fp64: the visible keys sorted by higher score then lower index, the first k; -1 after them."""
    nq, n = iq.shape[0], keys.shape[0]
    k = min(k_sel, n)
    s = _scores64(iq, iw, keys, scale)
    out = torch.full((nq, k), -1, dtype=torch.int64)
    for q in range(nq):
        vis = n if thr is None else int(thr[q])
        order = sorted(range(vis), key=lambda j: (-s[q, j].item(), j))[:k]
        out[q, : len(order)] = torch.tensor(order, dtype=torch.int64)
    return out


# nq, hi, di, n, page, k
SHAPES = [
    (6, 4, 16, 40, 7, 8),  # pages off everything
    (5, 64, 128, 300, 256, 64),  # V4's indexer heads and width, the last page partial
    (3, 8, 32, 20, 64, 50),  # k above n_vis: one page, k = n_vis
    (4, 5, 24, 33, 1, 10),  # one row per page, heads off the register tiles
    (9, 33, 20, 130, 32, 16),  # heads past one 32-head tile
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("thr", ["mixed", None])
def test_torch_index_topk_is_the_definition(shape, thr):
    nq, hi, di, n, page, k = shape
    iq, iw, keys, t = _case(nq, hi, di, n, seed=1, integer=True, thr=thr)
    got = TORCH.index_topk(iq, iw, _pages(keys, page), n, t, k, 0.5)
    assert torch.equal(got, _reference(iq, iw, keys, t, k, 0.5))  # exact sums: order and ties included
    # random inputs: the same picks as fp64, up to near-equal scores (none at this spread)
    iq, iw, keys, t = _case(nq, hi, di, n, seed=2, thr=thr)
    got = TORCH.index_topk(iq, iw, _pages(keys, page), n, t, k, di**-0.5)
    want = _reference(iq, iw, keys, t, k, di**-0.5)
    assert [set(r.tolist()) for r in got] == [set(r.tolist()) for r in want]


def test_torch_index_topk_detects_a_wrong_threshold():
    """The reference check fails when it should: keys at or past thr are not visible."""
    iq, iw, keys, t = _case(4, 8, 16, 30, seed=3, integer=True)
    want = _reference(iq, iw, keys, t, 6, 0.5)
    got = TORCH.index_topk(iq, iw, _pages(keys, 8), 30, t + 1, 6, 0.5)
    assert not torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("thr", ["mixed", None])
def test_native_index_topk_equals_torch_exactly_on_exact_sums(shape, thr):
    """Integer inputs: every score is exact in any summation order, so picks, order and ties must match."""
    cp = _native()
    nq, hi, di, n, page, k = shape
    iq, iw, keys, t = _case(nq, hi, di, n, seed=4, integer=True, thr=thr)
    want = TORCH.index_topk(iq, iw, _pages(keys, page), n, t, k, 0.5)
    for path in _native_paths():
        got, vals = cp.index_topk(iq, iw, _pages(keys, page), n, t, k, 0.5, path=path)
        assert torch.equal(got, want), path
        ref = _scores64(iq, iw, keys, 0.5).gather(1, got.clamp(min=0))
        assert torch.equal(torch.where(got >= 0, ref.float(), float("-inf")), vals), path


@pytest.mark.parametrize("shape", SHAPES)
def test_native_index_topk_random_picks(shape):
    """Random inputs: summation order moves scores by ~1e-6, so compare the picked scores (fp64) with the best ones,
    and the picks themselves away from near-ties."""
    cp = _native()
    nq, hi, di, n, page, k = shape
    iq, iw, keys, t = _case(nq, hi, di, n, seed=5)
    s = _scores64(iq, iw, keys, di**-0.5)
    want = TORCH.index_topk(iq, iw, _pages(keys, page), n, t, k, di**-0.5)
    for path in _native_paths():
        got, vals = cp.index_topk(iq, iw, _pages(keys, page), n, t, k, di**-0.5, path=path)
        assert torch.equal(got >= 0, want >= 0), path  # the same number of picks per query
        for q in range(nq):
            g, w = got[q][got[q] >= 0], want[q][want[q] >= 0]
            assert torch.allclose(s[q, g], s[q, w], rtol=1e-5, atol=1e-5), path  # ordered alike, scores alike
            assert torch.allclose(vals[q, : g.numel()].double(), s[q, g], rtol=1e-5, atol=1e-5), path
            if g.numel():
                kth = s[q, w[-1]].item()  # picks may differ only where scores sit at the k-th best
                diff = set(g.tolist()) ^ set(w.tolist())
                assert all(abs(s[q, j].item() - kth) <= 1e-5 * max(1.0, abs(kth)) for j in diff), path


def test_native_index_topk_key_ranges_over_threads():
    """One query over many keys splits each page into ranges (one candidate list each) that the final step
    merges; more threads than the host has give more ranges."""
    cp = _native()
    from homerun.kernels.cpu_experts import _native as lib

    iq, iw, keys, t = _case(1, 16, 32, 900, seed=6, integer=True, thr=None)
    want = TORCH.index_topk(iq, iw, _pages(keys, 256), 900, None, 100, 0.5)
    old = lib().hr_get_threads()
    try:
        for threads in (1, 3, 8):
            lib().hr_set_threads(threads)
            got, _ = cp.index_topk(iq, iw, _pages(keys, 256), 900, None, 100, 0.5)
            assert torch.equal(got, want), threads
    finally:
        lib().hr_set_threads(old)


@pytest.mark.parametrize("store", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("per_call", ["all", "one page"])
def test_native_index_topk_over_kv_stores(store, per_call, monkeypatch):
    """The pages the model passes: a PagedRows store's pages in fp32 or bf16 (converted per page), or an FP8 store's
    decoded rows (small integers survive every format exactly); converted pages over several kernel calls when they
    pass the per-call bound."""
    cp = _native()
    if per_call == "one page":
        monkeypatch.setattr(cp, "_INDEX_CONVERT_BYTES", 1)
    nq, hi, di, n = 5, 8, 64, 150
    iq, iw, keys, t = _case(nq, hi, di, n, seed=7, integer=True)
    if store == "fp8":
        rows = Fp8PagedRows(di, torch.float32, "cpu", 32, scale_fp32=True)
    else:
        rows = PagedRows(di, torch.bfloat16 if store == "bf16" else torch.float32, "cpu", 32)
    rows.write(0, keys)
    assert torch.equal(rows.view(n).float(), keys)
    want = TORCH.index_topk(iq, iw, _pages(keys, 32), n, t, 40, 0.5)
    got, _ = cp.index_topk(iq, iw, rows.iter_pages(n), n, t, 40, 0.5)
    assert torch.equal(got, want)
    assert torch.equal(TORCH.index_topk(iq, iw, rows.iter_pages(n), n, t, 40, 0.5), want)


def test_cpu_prefill_set_runs_the_native_index_topk():
    _native()
    if not dispatch.USE_NATIVE or dispatch.native_dense() is None:
        pytest.skip("the native kernel sets are off (HOMERUN_KERNELS=torch)")
    ks = dispatch.kernels_for("cpu", torch.float32, 512)
    assert type(ks).index_topk is not TorchKernels.index_topk
    iq, iw, keys, t = _case(7, 16, 32, 200, seed=8, integer=True)
    want = TORCH.index_topk(iq, iw, _pages(keys, 64), 200, t, 32, 0.5)
    assert torch.equal(ks.index_topk(iq, iw, _pages(keys, 64), 200, t, 32, 0.5), want)
    # non-fp32 queries take the torch set's path
    got = ks.index_topk(iq.double(), iw.double(), _pages(keys, 64), 200, t, 32, 0.5)
    assert torch.equal(got, want)


def test_native_index_topk_bad_input():
    cp = _native()
    iq, iw, keys, t = _case(3, 4, 16, 40, seed=9)
    with pytest.raises(KernelError):
        cp.index_topk(iq, iw[:, :-1], _pages(keys, 16), 40, t, 8, 0.5)
    with pytest.raises(KernelError):  # a page skipped
        cp.index_topk(iq, iw, _pages(keys, 16)[1:], 40, t, 8, 0.5)
    with pytest.raises(KernelError):  # fewer rows than n_vis
        cp.index_topk(iq, iw, _pages(keys[:30], 16), 40, t, 8, 0.5)
    with pytest.raises(KernelError):
        cp.index_topk(iq, iw, _pages(keys, 16), 40, t[:-1], 8, 0.5)
    with pytest.raises(KernelError):  # rows of another width
        cp.index_topk(iq, iw, _pages(keys[:, :8], 16), 40, t, 8, 0.5)


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 6), hi=st.integers(1, 40), di=st.integers(1, 24), n=st.integers(1, 120),
       page=st.integers(1, 70), k=st.integers(1, 80), seed=st.integers(0, 2**16), causal=st.booleans())
def test_native_index_topk_property(nq, hi, di, n, page, k, seed, causal):
    """Any shape, exact integer scores: the native picks equal the torch set's and the fp64 definition's."""
    cp = _native()
    iq, iw, keys, t = _case(nq, hi, di, n, seed=seed, integer=True, thr="mixed" if causal else None)
    want = _reference(iq, iw, keys, t, k, 0.5)
    assert torch.equal(TORCH.index_topk(iq, iw, _pages(keys, page), n, t, k, 0.5), want)
    got, _ = cp.index_topk(iq, iw, _pages(keys, page), n, t, k, 0.5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n,page,k", [(40, 64, 16), (300, 64, 32), (300, 7, 300), (5, 2, 16)])
def test_decode_index_topk_one_picks_the_definitions_best(n, page, k):
    """The decode step's one-query top-k (`index_topk_one`, iw scaled inside): the torch set's per-page top-k merge
    and the CPU sets' native kernel pick the fp64 definition's k best keys, best first, over one page or several."""
    iq, iw, keys, _ = _case(1, 8, 16, n, seed=n + page, thr=None)
    s = _scores64(iq, iw * 0.25, keys, 0.5)[0]
    want = s.argsort(descending=True)[: min(k, n)]
    sets = [TORCH]
    if dispatch.USE_NATIVE and dispatch.native_dense() is not None:
        sets += [dispatch.kernels_for("cpu", torch.float32, 1), dispatch.kernels_for("cpu", torch.float32, 512)]
        assert type(sets[1]).index_topk_one is not TorchKernels.index_topk_one  # decode runs the native kernel
    for ks in sets:
        got = ks.index_topk_one(iq, iw, _pages(keys, page), n, k, 0.25, 0.5)
        assert got.shape == (1, min(k, n)), ks.name
        assert torch.equal(got[0], want), ks.name  # random scores: no ties, one right answer in one order


def test_decode_index_topk_one_detects_a_wrong_merge():
    """A merge that dropped the running best (kept only the last page's picks) would differ from the definition."""
    iq, iw, keys, _ = _case(1, 8, 16, 200, seed=3, thr=None)
    one_page = TORCH.index_topk_one(iq, iw, _pages(keys, 200), 200, 24, 1.0, 0.5)
    last_page_only = TORCH.index_topk_one(iq, iw, [(128, keys[128:])], 72, 24, 1.0, 0.5) + 128
    assert torch.equal(TORCH.index_topk_one(iq, iw, _pages(keys, 64), 200, 24, 1.0, 0.5), one_page)
    assert not torch.equal(last_page_only, one_page)
