import pytest
import torch

from homerun.errors import DoesNotFitError, UsageError
from offload.cache import ExpertCache
from offload.cached_backend import MissOptions, build_cached_backend
from offload.devices import StandInDevice, build_standin_devices, default_device
from offload.host_store import HostExpertStore, random_packed_expert


def test_budget_refuses_what_does_not_fit_and_frees_exactly():
    d = StandInDevice("gpu0", 1000)
    a = d.empty("a", (600,), torch.uint8)
    assert a.numel() == 600 and d.used_bytes == 600
    with pytest.raises(DoesNotFitError, match="gpu0"):
        d.empty("b", (101, 4), torch.uint8)
    assert d.used_bytes == 600  # a refused allocation charges nothing
    d.empty("c", (100,), torch.float32)  # 400 B: exactly full
    assert d.free_bytes == 0
    d.free("a")
    assert d.used_bytes == 400 and d.usage().peak_bytes == 1000


def test_duplicate_tag_and_negative_budget_are_usage_errors():
    d = StandInDevice("gpu0", 100)
    d.empty("x", (1,), torch.uint8)
    with pytest.raises(UsageError):
        d.empty("x", (1,), torch.uint8)
    with pytest.raises(UsageError):
        StandInDevice("bad", -1)


def test_several_devices_keep_separate_budgets():
    # A 3-GPU plan scaled down: layers split across devices, each placed tensor charged to its own device.
    devs = build_standin_devices([4096, 2048, 1024])
    layer_bytes = [3000, 1500, 1000]
    placed = [d.place(f"layer{i}", torch.zeros(n, dtype=torch.uint8))
              for i, (d, n) in enumerate(zip(devs, layer_bytes))]
    for d, n, t in zip(devs, layer_bytes, placed):
        assert d.used_bytes == n <= d.budget_bytes and t.numel() == n
    with pytest.raises(DoesNotFitError):
        devs[2].place("more", torch.zeros(25, dtype=torch.uint8))
    assert [d.usage().to_dict()["free_bytes"] for d in devs] == [1096, 548, 24]


def _store(n_layers=2, n_experts=4, d=64, i=32):
    g = torch.Generator().manual_seed(0)
    ex = {(l, e): random_packed_expert(d, i, g) for l in range(n_layers) for e in range(n_experts)}
    return HostExpertStore(lambda l, e: ex[(l, e)], list(ex))


def test_expert_cache_slots_are_charged_and_must_fit():
    store = _store()
    dev = StandInDevice("gpu0", 3 * store.expert_bytes)
    cache = ExpertCache(store, dev, n_slots=3)
    assert dev.used_bytes == 3 * store.expert_bytes
    with pytest.raises(DoesNotFitError):
        ExpertCache(store, dev, n_slots=1)
    cache.close()
    assert dev.used_bytes == 0


def test_offloaded_run_never_exceeds_device_budget():
    store = _store()
    dev = StandInDevice("gpu0", int(2.5 * store.expert_bytes))
    be = build_cached_backend(store, range(2), 4, swiglu_limit=10.0, host_store=store, device=dev,
                              misses=MissOptions("stream"))
    assert be.cache.n_slots == 2  # sized from the free budget
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for layer in range(2):
            ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(3)])
            be.forward(layer, torch.randn(3, 64, generator=g), ids, torch.rand(3, 2, generator=g))
    assert dev.usage().peak_bytes <= dev.budget_bytes
    be.close()


def test_default_device_without_cuda_is_a_standin():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    d = default_device(1 << 20)
    assert d.kind == "standin" and d.budget_bytes == 1 << 20 and not d.is_cuda


def test_multi_device_plan_splits_layers_and_keeps_each_budget():
    from offload.base import ReferenceExpertBackend
    from offload.cache import ExpertCache
    from offload.base import LayerSplitBackend
    from offload.cached_backend import CachedExpertBackend

    store = _store(n_layers=3)
    devs = build_standin_devices([2 * store.expert_bytes, 1 * store.expert_bytes])  # "gpu0" runs layers 0-1
    caches = [ExpertCache(store, devs[0], slots_per_layer={0: 1, 1: 1}), ExpertCache(store, devs[1], n_slots=1)]
    per_dev = [CachedExpertBackend(c, swiglu_limit=10.0) for c in caches]
    be = LayerSplitBackend({0: per_dev[0], 1: per_dev[0], 2: per_dev[1]})
    ref = ReferenceExpertBackend(store, swiglu_limit=10.0)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for layer in range(3):
            ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(2)])
            x, w = torch.randn(2, 64, generator=g), torch.rand(2, 2, generator=g)
            torch.testing.assert_close(be.forward(layer, x, ids, w), ref.forward(layer, x, ids, w))
    for d in devs:
        assert d.used_bytes == d.budget_bytes and d.usage().peak_bytes <= d.budget_bytes
    assert {s["cache"]["layers"][0]["layer"] for s in be.stats()["backends"]} == {0, 2}
    be.close()
    assert [d.used_bytes for d in devs] == [0, 0]
