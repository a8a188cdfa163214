"""The one host arena (offload/host_store.py + offload/pinning.py): chunked pinning arithmetic, the pageable fallback
(one warning, never a crash), refusals part-way, the CPU backend reading the arena, and the kernel views of a slot."""

import warnings

import pytest
import torch

from offload.host_store import HostExpertStore, random_packed_expert
from offload.pinning import PAGE_BYTES, PinnedArena, chunk_ranges, page_aligned_empty

D, I = 64, 32


def _experts(n_layers=2, n_experts=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(l, e): random_packed_expert(D, I, g) for l in range(n_layers) for e in range(n_experts)}


def test_chunk_arithmetic_has_no_power_of_two_rounding():
    page = 4096
    gib = 1 << 30
    # 137 GiB + a bit, pinned whole in 1 GiB chunks: 138 chunks, total = the arena rounded up to a page, not 256 GiB
    n = 137 * gib + 5000
    r = chunk_ranges(n, None, gib, page)
    assert len(r) == 138 and sum(c for _, c in r) == -(-n // page) * page
    assert all(off % page == 0 for off, _ in r) and all(c == gib for _, c in r[:-1])
    assert r[-1] == (137 * gib, 8192)
    # within a budget: never past it (rounded down to a page when rounding up would exceed it)
    r = chunk_ranges(n, 10 * gib + 100, gib, page)
    assert sum(c for _, c in r) == 10 * gib and len(r) == 10
    r = chunk_ranges(10_000, 5000, 3 * page, page)
    assert r == [(0, page)]
    assert chunk_ranges(10_000, 0, gib, page) == [] and chunk_ranges(0, None) == []
    # chunk sizes are whole pages, at least one
    assert chunk_ranges(3 * page, None, 100, page) == [(0, page), (page, page), (2 * page, page)]


def test_arena_is_page_aligned():
    _, a = page_aligned_empty(12345)
    assert a.data_ptr() % PAGE_BYTES == 0 and a.numel() == 12345


def test_no_cuda_pin_request_falls_back_to_pageable_with_one_warning():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is available")
    ex = _experts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=True)
    assert len([w for w in caught if "pinned" in str(w.message)]) == 1
    s = store.stats()
    assert s.pin_state == "pageable" and s.pinned_bytes == 0 and s.pinned_experts == 0
    assert s.ram_experts == len(ex) and s.arena_bytes == len(ex) * store.expert_bytes
    assert "CUDA" in s.pin_reason and any("pageable" in n for n in store.notes())
    assert all(torch.equal(store.buffer(k), store.buffer(k)) for k in ex)  # still serves
    store.close()


def test_refusal_part_way_keeps_the_pinned_prefix_and_unpins_on_close():
    ex = _experts(n_layers=4, n_experts=8)
    calls, unpinned = [], []

    def register(addr, n):
        if len(calls) == 2:
            return "memlock limit"
        calls.append((addr, n))
        return None

    reg = (register, unpinned.append, "")
    with pytest.warns(RuntimeWarning, match="memlock"):
        store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=True, pin_chunk_bytes=PAGE_BYTES,
                                registrar=reg)
    s = store.stats()
    assert s.pin_state == "partial" and s.pinned_bytes == 2 * PAGE_BYTES
    assert calls[0][0] == store.arena.data_ptr() and calls[1][0] == calls[0][0] + PAGE_BYTES
    assert s.pinned_experts == 2 * PAGE_BYTES // store.expert_bytes
    keys = list(ex)
    assert [store.tier(k) for k in keys[:s.pinned_experts]] == ["pinned"] * s.pinned_experts
    assert store.tier(keys[s.pinned_experts]) == "ram"
    store.close()
    assert unpinned == [a for a, _ in calls]


def test_pinning_within_budget_counts_whole_pages():
    ex = _experts(n_layers=4, n_experts=8)
    seen = []
    reg = (lambda a, n: seen.append(n), lambda a: None, "")
    stride = HostExpertStore(lambda l, e: ex[(l, e)], [(0, 0)], pin=False).expert_bytes
    budget = 5 * stride + 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full pin warns nothing
        store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=True, pinned_budget_bytes=budget,
                                registrar=reg)
    s = store.stats()
    assert s.pin_state == "pinned" and s.pinned_bytes == sum(seen) <= budget
    assert s.pinned_bytes % PAGE_BYTES == 0 and budget - s.pinned_bytes < PAGE_BYTES
    assert s.pinned_experts == s.pinned_bytes // stride


def test_cpu_backend_reads_the_arena_not_the_source():
    from offload.base import ReferenceExpertBackend
    from offload.cpu_backend import CpuExpertBackend

    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=False)
    cpu = CpuExpertBackend(store, swiglu_limit=10.0, act="fp32")
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(3, D, generator=g), torch.randint(0, 4, (3, 2), generator=g)
    w = torch.rand(3, 2, generator=g)
    ref = ReferenceExpertBackend(lambda l, e: ex[(l, e)], swiglu_limit=10.0).forward(1, x, ids, w)
    assert torch.allclose(cpu.forward(1, x, ids, w), ref, rtol=1e-5, atol=1e-6)
    lo, hi = store.arena.data_ptr(), store.arena.data_ptr() + store.arena.numel()
    w0 = store(1, 0)
    assert lo <= w0.w1.data_ptr() < hi and lo <= w0.w2_scale.data_ptr() < hi


def test_kernel_views_of_slots_are_w13_blocks():
    ex = _experts(n_layers=1, n_experts=3)
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=False)
    slots = torch.stack([store.buffer((0, e)) for e in range(3)])
    w13, s13, w2, s2 = store.layout.kernel_views(slots)
    assert w13.shape == (3, 2 * I, D // 2) and s13.shape == (3, 2 * I, D // 32)
    assert w2.shape == (3, D, I // 2) and s2.shape == (3, D, I // 32)
    for e in range(3):
        w = ex[(0, e)]
        assert torch.equal(w13[e], torch.cat([w.w1, w.w3]).view(torch.int8))
        assert torch.equal(s13[e], torch.cat([w.w1_scale, w.w3_scale]).view(torch.uint8))
        assert torch.equal(w2[e], w.w2.view(torch.int8)) and torch.equal(s2[e], w.w2_scale.view(torch.uint8))
