"""Cache-policy edges that users feel as hit rates: LFU's documented LRU tie-break, and "a prefetch is not a use"
(offload/policies.py `insert(access=False)`, offload/cache.py `prefetch`). Companion of tests/test_policies.py and
tests/test_cache.py; these pin what mutation testing found unpinned (benchmarks/mutation.md)."""

from __future__ import annotations

import pytest
import torch

from homerun.errors import UsageError
from offload.cache import ExpertCache
from offload.devices import StandInDevice
from offload.host_store import HostExpertStore, random_packed_expert
from offload.policies import AdaptivePolicy, ARCPolicy, LFUPolicy, LRUPolicy, make_policy

# --- LFU: ties go to the least recently used -----------------------------------------------------------------------


def test_lfu_tie_break_is_lru_not_key_order():
    p = LFUPolicy(2)
    p.access("b")
    p.access("a")  # counts a = b = 1; b is older (and sorts after a)
    assert p.ranked() == ["b", "a"]
    assert p.access("c") == (False, "b")
    assert p.access("b") == (False, "a")  # b comes back with count 2; a (1) and c (1) tie; a is older
    assert set(p._resident) == {"c", "b"} and p.counts == {"a": 1, "b": 2, "c": 1}


def test_lfu_tie_break_follows_the_latest_use():
    p = LFUPolicy(3)
    for k in "xyz":
        p.access(k)
    for k in "zyx":  # all counts 2; the order of last use is now z, y, x
        p.access(k)
    assert p.ranked() == ["z", "y", "x"]
    assert p.victim() == "z"
    assert p.victim(exclude=frozenset("z")) == "y"
    assert p.victim(exclude=frozenset("zy")) == "x"
    with pytest.raises(UsageError, match="^lfu: every resident key is in use"):
        p.victim(exclude=frozenset("xyz"))
    assert p.victim() == "z"  # a failed search leaves the heap intact


def test_lfu_fewer_uses_lose_to_more_regardless_of_recency():
    p = LFUPolicy(2)
    for k in ["a", "a", "b"]:
        p.access(k)
    assert p.access("c") == (False, "b")  # b (1, newer) goes before a (2, older)
    assert p.access("d") == (False, "c")


def test_lfu_remove_and_heap_compaction_keep_the_ranking():
    p = LFUPolicy(4)
    for i in range(200):  # many hits: stale heap entries pile up and are compacted
        p.access(i % 4)
    assert len(p._heap) <= 4 * len(p._resident) + 64
    assert p.ranked() == [0, 1, 2, 3] and p.victim() == 0
    p.remove(0)
    p.remove("absent")
    assert 0 not in p and len(p) == 3 and p.victim() == 1
    assert p.insert(9) is None  # a slot was free after the removal


# --- a prefetch is not a use ---------------------------------------------------------------------------------------


def test_lfu_prefetch_is_resident_but_not_counted():
    p = LFUPolicy(2)
    p.access("a")
    assert p.insert("b", access=False) is None
    assert "b" in p and p.counts["b"] == 0
    assert p.access("c") == (False, "b")  # b (0 uses) goes although a is older
    assert p.insert("d", access=False) == "a"  # a and c have one use each; a is older
    assert p.counts["d"] == 0 and p.ranked() == ["d", "c"]


def test_adaptive_prefetch_is_not_observed():
    p = AdaptivePolicy(4)
    assert p.insert((0, 1), access=False) is None
    assert (0, 1) in p and p._misses == {} and p._shadow["lfu"].counts == {}
    assert p.insert((0, 2)) is None  # a demand miss is observed: both shadows miss it
    assert p._misses == {0: {"lru": 1.0, "lfu": 1.0}} and p._shadow["lfu"].counts == {(0, 2): 1}


@pytest.mark.parametrize("cls", [LRUPolicy, LFUPolicy, ARCPolicy, AdaptivePolicy])
def test_every_policy_accepts_prefetch_inserts(cls):
    p = cls(2)
    assert p.insert("a", access=False) is None and "a" in p and len(p) == 1


@pytest.fixture
def store():
    g = torch.Generator().manual_seed(0)
    ex = {(l, e): random_packed_expert(64, 32, g) for l in range(2) for e in range(6)}
    return HostExpertStore(lambda l, e: ex[(l, e)], list(ex))


def _lfu_cache(store, **kw):
    return ExpertCache(store, StandInDevice("gpu0", 1 << 30), policy="lfu", **kw)


def test_cache_prefetch_is_not_a_use(store):
    c = _lfu_cache(store, n_slots=2)
    c.acquire((0, 0))  # used once
    assert c.prefetch((0, 1))  # resident, never used
    c.acquire((0, 2))  # a miss needs a slot: the unused prefetch goes, not the used (and older) expert
    assert (0, 0) in c and (0, 2) in c and (0, 1) not in c
    s = c.stats().layers[0]
    assert (s.hits, s.misses, s.prefetches, s.promotions) == (0, 2, 1, 0)
    c.close()


def test_cache_prefetch_then_use_counts_one_use(store):
    c = _lfu_cache(store, n_slots=2)
    c.acquire((0, 0))
    c.prefetch((0, 1))
    c.acquire((0, 1))  # a hit: now one use each, (0, 0) older
    c.acquire((0, 2))
    assert (0, 1) in c and (0, 0) not in c
    assert c._policy(0).counts[(0, 1)] == 1
    c.close()


def test_cache_promotion_is_a_use(store):
    c = _lfu_cache(store, n_slots=2)
    c.acquire((0, 0))
    c.record_miss((0, 1))  # served on the CPU...
    assert c.prefetch((0, 1), promotion=True)  # ...then promoted: that miss was a use
    c.acquire((0, 2))  # (0, 0) and (0, 1) have one use each; (0, 0) is older
    assert (0, 1) in c and (0, 0) not in c
    s = c.stats().layers[0]
    assert (s.misses, s.prefetches, s.promotions) == (3, 0, 1)
    c.close()


def test_cache_prefetch_refusals(store):
    c = _lfu_cache(store, n_slots=2)
    c.acquire((0, 0))
    assert not c.prefetch((0, 0))  # resident already
    in_use = frozenset({(0, 0), (0, 3)})
    c.acquire((0, 3), in_use=in_use)
    assert not c.prefetch((0, 4), in_use=in_use)  # full, and every slot is in use: nothing may be evicted
    assert c.prefetch((0, 4), in_use=frozenset({(0, 0)}))
    assert (0, 4) in c and (0, 0) in c and (0, 3) not in c
    s = c.stats().layers[0]
    assert s.prefetches == 1
    c.close()


def test_cache_touch_counts_a_hit_and_a_use(store):
    c = _lfu_cache(store, n_slots=2)
    c.acquire((1, 0))
    c.acquire((1, 1))
    c.touch((1, 0))  # served by the device: a hit, and a use for the policy
    c.acquire((1, 2))
    assert (1, 0) in c and (1, 1) not in c
    assert c.stats().layers[0].hits == 1
    c.close()


def test_cache_pinned_hits_do_not_touch_the_policy(store):
    c = _lfu_cache(store, n_slots=1, pinned_keys=[(0, 5)])
    c.acquire((0, 5))
    c.touch((0, 5))
    assert (0, 5) not in c._policy(0) and c._policy(0).counts == {}
    assert c.stats().layers[0].hits == 2 and c.is_pinned((0, 5)) and not c.is_pinned((0, 4))
    c.close()


def test_eviction_clears_the_slot_table_and_frees_the_slot(store):
    c = _lfu_cache(store, n_slots=1)
    c.acquire((0, 1))
    c.commit()
    slot = c.slot((0, 1))
    assert int(c.slot_table[0, 1]) == slot
    c.acquire((0, 2))  # evicts (0, 1)
    assert int(c.slot_table[0, 1]) == -1 and int(c.slot_table[0, 2]) == -1  # (0, 2) still in flight
    assert c.commit(layer=1) == 0 and c.commit(layer=0) == 1
    assert int(c.slot_table[0, 2]) == slot  # the freed slot was reused
    c.close()


def test_lru_remove_and_no_victim():
    p = LRUPolicy(2)
    p.access("a")
    p.access("b")
    p.remove("absent")
    p.remove("a")
    assert "a" not in p and p.ranked() == ["b"]
    p.access("c")
    with pytest.raises(UsageError, match="^lru: every resident key is in use"):
        p.victim(exclude=frozenset("bc"))


def test_make_policy_names():
    assert isinstance(make_policy("lfu", 1), LFUPolicy)
    with pytest.raises(UsageError, match="unknown cache policy 'mru'"):
        make_policy("mru", 1)
    with pytest.raises(UsageError):
        LRUPolicy(0)


def test_per_layer_pools_route_every_verb_to_the_keys_layer(store):
    # The layer is key[0]: keys whose expert id is not a configured layer would hit another pool (or none).
    c = ExpertCache(store, StandInDevice("gpu0", 1 << 30), policy="lru", slots_per_layer={0: 1, 1: 2})
    assert (c.capacity(0), c.capacity(1)) == (1, 2)
    c.acquire((1, 0))
    c.acquire((1, 5))
    c.acquire((1, 0))  # a hit, ranked in layer 1's pool
    c.touch((1, 5))
    assert c.prefetch((1, 4), in_use=frozenset({(1, 5)}))  # evicts (1, 0), the least recent of layer 1
    assert {k for k in c._slot_of if k[0] == 1} == {(1, 5), (1, 4)}
    with pytest.raises(UsageError, match="no slots configured for layer 2") as err:
        c.acquire((2, 0))
    assert err.value.hint == "slots_per_layer must name every offloaded layer"
    c.close()


def test_promotions_and_transfer_times_accumulate(store):
    c = _lfu_cache(store, n_slots=4)
    for e in (1, 2):
        c.record_miss((0, e))
        assert c.prefetch((0, e), promotion=True, block=True)
    c.on_copy((1, 3), 100, 0.5)  # the transfer engine's sink calls, as a copy and a stall are measured
    c.on_copy((1, 3), 300, 0.25)
    c.on_stall((1, 3), 0.125)
    c.on_stall((1, 3), 0.125)
    st = {s.layer: s for s in c.stats().layers}
    assert st[0].promotions == 2 and st[0].prefetches == 0
    assert (st[1].n_copies, st[1].bytes_moved, st[1].copy_s, st[1].stall_s) == (2, 400, 0.75, 0.25)
    assert 3 not in st
    c.close()


def test_a_victim_still_in_flight_is_dropped_from_the_pending_copies(store):
    c = _lfu_cache(store, n_slots=1)
    c.acquire((0, 1))  # copy started, not yet landed (nothing committed)
    c.acquire((0, 2))  # evicts (0, 1) while its copy is pending
    assert c.commit() == 1  # only (0, 2) lands; (0, 1) never gets a slot-table entry
    assert int(c.slot_table[0, 1]) == -1 and int(c.slot_table[0, 2]) == c.slot((0, 2))
    c.close()


def test_stats_header(store):
    c = ExpertCache(store, StandInDevice("gpu0", 1 << 30), policy="lfu", n_slots=3, pinned_keys=[(0, 0), (1, 0)])
    s = c.stats()
    assert (s.policy, s.n_slots, s.n_pinned, s.expert_bytes) == ("lfu", 5, 2, store.expert_bytes)
    c.close()


def test_close_hands_the_slots_back_to_the_device_budget(store):
    dev = StandInDevice("gpu0", 1 << 30)
    before = dev.used_bytes
    c = ExpertCache(store, dev, policy="lfu", n_slots=3)
    assert dev.used_bytes - before >= 3 * store.expert_bytes
    c.close()
    assert dev.used_bytes == before
    with pytest.raises(UsageError, match="^expert cache: give n_slots \\(global\\) or slots_per_layer, not both") as err:
        ExpertCache(store, dev, policy="lfu")
    assert err.value.hint == "e.g. ExpertCache(store, device, n_slots=64)"
