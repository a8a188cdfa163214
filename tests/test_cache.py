import pytest
import torch

from homerun.errors import UsageError
from offload.cache import ExpertCache
from offload.devices import StandInDevice
from offload.host_store import HostExpertStore, random_packed_expert


@pytest.fixture
def store():
    g = torch.Generator().manual_seed(0)
    ex = {(l, e): random_packed_expert(64, 32, g) for l in range(3) for e in range(6)}
    return HostExpertStore(lambda l, e: ex[(l, e)], list(ex))


def _cache(store, **kw):
    kw.setdefault("policy", "lru")
    return ExpertCache(store, StandInDevice("gpu0", 1 << 30), **kw)


def _use(cache, key, in_use=frozenset()):
    cache.acquire(key, in_use=in_use)
    w = cache.weights(key)
    cache.release(key)
    return w


def test_hits_misses_and_lru_eviction(store):
    c = _cache(store, n_slots=2)
    for key in [(0, 0), (0, 1), (0, 0), (0, 2), (0, 1)]:  # (0,2) evicts (0,1); (0,1) then evicts (0,0)
        _use(c, key)
    s = c.stats().layers[0]
    assert (s.hits, s.misses) == (1, 4)
    assert (0, 2) in c and (0, 1) in c and (0, 0) not in c
    assert s.n_copies == 4 and s.bytes_moved == 4 * store.expert_bytes
    assert s.copy_s > 0 and s.achieved_gbps > 0
    c.close()


def test_slot_contents_are_the_experts(store):
    c = _cache(store, n_slots=1)
    for key in [(1, 3), (2, 5), (1, 3)]:
        w = _use(c, key)
        assert torch.equal(w.w2.view(torch.uint8), store(*key).w2.view(torch.uint8))
    c.close()


def test_pinned_keys_are_never_evicted(store):
    pinned = [(0, e) for e in range(6)]  # a hash layer, pinned whole
    c = _cache(store, n_slots=1, pinned_keys=pinned)
    assert c.n_slots == 7 and c.capacity(1) == 1
    for e in range(6):
        _use(c, (1, e))
        _use(c, (0, e))
    st = {s.layer: s for s in c.stats().layers}
    assert st[0].hits == 6 and st[0].misses == 0
    assert all(k in c for k in pinned)
    c.close()


def test_per_layer_pools_do_not_steal_from_each_other(store):
    c = _cache(store, slots_per_layer={0: 1, 1: 2, 2: 1})
    for e in range(6):
        _use(c, (1, e))
    _use(c, (0, 0))
    for e in range(6):
        _use(c, (2, e))
    assert (0, 0) in c and sum(k[0] == 1 for k in c._slot_of) == 2
    with pytest.raises(UsageError):
        ExpertCache(store, StandInDevice("g", 1 << 30), n_slots=2, slots_per_layer={0: 1})
    c.close()


def test_in_use_keys_survive_pressure(store):
    c = _cache(store, n_slots=2)
    c.acquire((0, 0))
    c.acquire((0, 1), in_use=frozenset({(0, 0)}))
    c.acquire((0, 2), in_use=frozenset({(0, 0)}))  # must evict (0,1), not the in-use (0,0)
    assert (0, 0) in c and (0, 1) not in c
    c.close()


def test_prefetch_then_use_is_a_hit(store):
    c = _cache(store, n_slots=2)
    assert c.prefetch((2, 4))
    assert not c.prefetch((2, 4))  # already resident (or in flight)
    _use(c, (2, 4))
    s = c.stats().layers[0]
    assert (s.hits, s.misses, s.prefetches) == (1, 0, 1)
    c.close()


def test_record_miss_counts_without_loading(store):
    c = _cache(store, n_slots=2)
    c.record_miss((1, 1))
    assert (1, 1) not in c
    assert c.prefetch((1, 1), promotion=True)
    c.engine.drain()  # copies are counted when they have landed
    s = c.stats().layers[0]
    assert (s.misses, s.promotions, s.n_copies) == (1, 1, 1)
    d = c.stats().to_dict()
    assert {"hits", "misses", "bytes_moved", "stall_s", "achieved_gbps", "layers"} <= set(d)
    c.close()


def test_speculative_prefetch_never_waits_but_certain_prefetch_does(store):
    c = _cache(store, n_slots=8, max_in_flight=1)
    c.engine.link_gbps = 2e-5  # a 20 KB/s link: the first copy (~4 KB) stays in flight for ~0.2 s
    assert c.prefetch((0, 0))
    assert not c.prefetch((0, 1))  # link busy: a speculative prefetch is dropped
    c.engine.link_gbps = None
    assert c.prefetch((0, 1), block=True)  # a certain one waits for room
    c.engine.drain()
    assert (0, 0) in c and (0, 1) in c and c.stats().layers[0].prefetches == 2
    c.close()
