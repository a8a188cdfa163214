"""Free CUDA memory as the KV ramp and the session see it (issue 13 item 6): what torch's caching allocator holds
unused counts as free, so context growth after a /reset is not refused. CPU-only: the CUDA queries are stubbed."""

import torch

from homerun.models import kv


def test_cuda_free_memory_counts_the_allocators_cache(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 18 * gib)
    # 2 GiB the driver has free + 12 GiB reserved by torch and unused (freed KV pages after a /reset)
    assert kv.free_memory_bytes("cuda:0") == 14 * gib


def test_cuda_free_memory_unknown_is_none(monkeypatch):
    def boom(dev=None):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    assert kv.free_memory_bytes("cuda:0") is None
