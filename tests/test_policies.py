import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homerun.errors import UsageError
from offload.policies import (
    DEFAULT_POLICY, POLICIES, AdaptivePolicy, ARCPolicy, LFUPolicy, LRUPolicy, belady_group_hits, belady_hits,
    make_policy, replay_groups, replay_hits,
)
from offload.trace import reuse_online_bound, reuse_trace, skewed_online_bound, skewed_trace


def test_lru_evicts_least_recently_used():
    p = LRUPolicy(2)
    assert p.access("a") == (False, None)
    assert p.access("b") == (False, None)
    assert p.access("a") == (True, None)
    assert p.access("c") == (False, "b")
    assert "a" in p and "c" in p and "b" not in p


def test_lfu_keeps_history_across_eviction():
    p = LFUPolicy(2)
    for k in ["a", "a", "a", "b", "c"]:  # c evicts b (count 1, older)
        p.access(k)
    assert set(p._resident) == {"a", "c"}
    p.access("d")  # evicts c (count 1) not a (count 3)
    assert "a" in p and "d" in p
    p.access("c")  # c comes back with count 2 and evicts d (count 1)
    assert "c" in p and "d" not in p and p.counts["c"] == 2


def test_arc_moves_reused_keys_to_frequency_list():
    p = ARCPolicy(3)
    for k in "abc":
        p.access(k)
    p.access("a")
    assert "a" in p.t2 and "b" in p.t1
    _, victim = p.access("d")  # T1 is over target p=0 -> evicts T1's LRU (b), remembered in ghost B1
    assert victim == "b" and "b" in p.b1
    hit, _ = p.access("b")  # ghost hit: a miss that raises the recency target
    assert not hit and p.p > 0 and "b" in p.t2


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_exclude_is_never_evicted(name):
    p = make_policy(name, 3)
    for k in "abc":
        p.access(k)
    for k in "abc":
        p.access(k)
    victim = p.insert("d", exclude=frozenset("ab"))
    assert victim == "c"
    with pytest.raises(UsageError):
        p.insert("e", exclude=frozenset("abd"))


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.integers(0, 9), min_size=1, max_size=80), cap=st.integers(1, 5))
def test_policy_tracks_residency_exactly(name, seq, cap):
    p, resident = make_policy(name, cap), set()
    for k in seq:
        hit, victim = p.access(k)
        assert hit == (k in resident)
        if victim is not None:
            assert victim in resident and victim != k
            resident.discard(victim)
        resident.add(k)
        assert len(resident) <= cap and len(p) == len(resident)
        assert all(r in p for r in resident)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), min_size=1, max_size=300),
       cap=st.integers(1, 8))
def test_adaptive_tracks_residency_across_layers_and_switches(seq, cap):
    """(layer, expert) keys with a short half-life, so layers switch rankings (and move keys) often."""
    p, resident = AdaptivePolicy(cap, half_life_accesses=6), set()
    for k in seq:
        hit, victim = p.access(k)
        assert hit == (k in resident)
        if victim is not None:
            assert victim in resident and victim != k
            resident.discard(victim)
        resident.add(k)
        assert len(p) == len(resident) <= cap and all(r in p for r in resident)


@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=11), cap=st.integers(1, 3))
def test_belady_is_the_optimum(seq, cap):
    # Demand paging of single keys is the group search with groups of one.
    assert belady_hits(seq, cap) == _brute_force_group_optimum([(k,) for k in seq], cap)


def test_belady_bounds_every_policy_on_random_sequences():
    rng = random.Random(1)
    seq = [rng.randrange(30) for _ in range(3000)]
    best = belady_hits(seq, 8)
    for name in POLICIES:
        assert replay_hits(make_policy(name, 8), seq) <= best


def _brute_force_group_optimum(groups, cap):
    """Most hits serving groups as replay_groups does (hits first, each miss loaded, evicting anything)."""
    best = 0

    def go(i, cache, hits):
        nonlocal best
        if i == len(groups):
            best = max(best, hits)
            return
        misses = [k for k in groups[i] if k not in cache]
        gained = len(groups[i]) - len(misses)

        def load(j, c):
            if j == len(misses):
                go(i + 1, c, hits + gained)
            elif len(c) < cap:
                load(j + 1, c | {misses[j]})
            else:
                for v in c:
                    load(j + 1, (c - {v}) | {misses[j]})
        load(0, cache)
    go(0, frozenset(), 0)
    return best


@settings(max_examples=60, deadline=None)
@given(data=st.data(), cap=st.integers(2, 4))
def test_group_belady_is_a_schedule_near_the_optimum(data, cap):
    group = st.lists(st.integers(0, 5), min_size=1, max_size=cap - 1, unique=True).map(tuple)
    groups = data.draw(st.lists(group, min_size=1, max_size=6))
    best = _brute_force_group_optimum(groups, cap)
    # A real schedule: never above the optimum; MIN's rule for groups is at most one hit short on cases this small.
    assert best - 1 <= belady_group_hits(groups, cap) <= best
    for name in POLICIES:
        assert replay_groups(make_policy(name, cap), groups) <= best


def test_group_belady_breaks_a_next_use_tie_by_the_sooner_use_after_it():
    # Keys 1 and 0 are both next used by group 3; only 0 is used again (group 5). Keeping 1 through group 3 and
    # reloading 0 there keeps 0 for group 5: 5 hits. Evicting 1 at group 1 (plain MIN's tie) gives 4.
    groups = [(1, 0), (2, 3), (2,), (0, 1), (2, 3), (0,)]
    assert belady_group_hits(groups, 3) == _brute_force_group_optimum(groups, 3) == 5


def test_replay_groups_counts_hits_before_loading_misses():
    # Group 2 lists its miss (c) before its hit (a): a flat replay loads c first and evicts a, which the group uses.
    groups = [("a", "b"), ("c", "a")]
    assert replay_hits(LRUPolicy(2), [k for g in groups for k in g]) == 0  # c evicts a, then a misses
    assert replay_groups(LRUPolicy(2), groups) == 1  # a is a hit, looked up before c is loaded (c evicts b)
    assert belady_group_hits(groups, 2) == 1


def test_group_belady_bounds_every_policy_on_random_groups():
    rng = random.Random(2)
    groups = [tuple(rng.sample(range(40), 4)) for _ in range(800)]
    best = belady_group_hits(groups, 12)
    for name in POLICIES:
        assert replay_groups(make_policy(name, 12), groups) <= best


def test_unknown_policy_and_zero_capacity_are_usage_errors():
    with pytest.raises(UsageError, match="unknown cache policy"):
        make_policy("fifo", 4)
    with pytest.raises(UsageError):
        LRUPolicy(0)


def test_adaptive_switches_ranking_with_the_workload():
    p = AdaptivePolicy(8, half_life_accesses=200)
    rng = random.Random(0)
    for _ in range(3000):  # static skew: a hot set of 6 keys among 200
        p.access(rng.choice(range(6)) if rng.random() < 0.8 else rng.randrange(6, 200))
    assert p.mode == "lfu"
    for i in range(3000):  # a sliding working set: each key reused a few times right away, then never
        p.access(1000 + i // 3 + rng.randrange(3))
    assert p.mode == "lru"


# --- the goals, on both published routing patterns -----------------------------------------------------
# Traces as the issue describes them: one record per (token, layer), top_k distinct experts each, one global cache
# keyed by (layer, expert). Skewed: V4-Flash shape (256 experts, top-6). Reuse: #27861's shape (512, top-10).
# Cache sizes are fractions of layers x experts.

def _trace(kind, seed):
    if kind == "skewed":
        return skewed_trace(2000, 4, 256, 6, seed=seed)
    return reuse_trace(1000, 4, 512, 10, seed=seed)


def _rates(trace, slots, names=("lru", "lfu", DEFAULT_POLICY)):
    """Hit rates as `homerun simulate` computes them: grouped replay, grouped Belady."""
    groups = [[(r.layer, e) for e in r.experts] for r in trace.records]
    n = sum(map(len, groups))
    rates = {name: replay_groups(make_policy(name, slots), groups) / n for name in names}
    return rates, belady_group_hits(groups, slots) / n


def _slots(trace, frac):
    return max(1, int(frac * trace.header.n_layers * trace.header.n_experts))


# Where the goal holds. Below these sizes no online policy reaches 0.85 of Belady (the bound tests below): reuse
# routing below ~20% of layers x experts; skewed routing at 2% sits on the line (0.850-0.856 over seeds).
GOAL_SIZES = [("skewed", f) for f in (0.05, 0.1, 0.25, 0.5)] + [("reuse", f) for f in (0.2, 0.25, 0.5)]


@pytest.mark.parametrize("kind,frac", GOAL_SIZES)
def test_default_policy_meets_goals(kind, frac):
    trace = _trace(kind, seed=11)
    rates, belady = _rates(trace, _slots(trace, frac))
    default = rates[DEFAULT_POLICY]
    assert default >= 0.85 * belady, (rates, belady)
    assert default >= max(rates["lru"], rates["lfu"]) - 0.02, (rates, belady)


@pytest.mark.parametrize("frac", [pytest.param(f, marks=[] if f == 0.1 else pytest.mark.extended) for f in (0.02, 0.05, 0.1, 0.15)])
def test_small_caches_on_reuse_routing_are_out_of_reach_for_any_online_policy(frac):
    """The online bound (reuse_online_bound) sits below 0.85 of Belady, and the default is at that bound."""
    trace = reuse_trace(600, 4, 512, 10, seed=11)
    slots = _slots(trace, frac)
    bound = reuse_online_bound(600, 4, 512, 10, [slots], seed=11)[slots]
    rates, belady = _rates(trace, slots, names=("lru", "lfu", "arc", DEFAULT_POLICY))
    assert bound < 0.86 * belady, (bound, belady)
    assert max(rates.values()) <= bound + 0.01, (rates, bound)  # the bound holds for every policy we have
    assert rates[DEFAULT_POLICY] >= bound - 0.015, (rates, bound)  # and the default is at it
    assert rates[DEFAULT_POLICY] >= max(rates["lru"], rates["lfu"]) - 0.02


def test_tiny_cache_on_skewed_routing_is_at_the_online_bound():
    """At 2% (5 slots per layer of 256) the best online policy is ~0.87 of Belady; the default is within 1.5 points
    of that bound and at ~0.85 of Belady."""
    trace = _trace("skewed", seed=11)
    slots = _slots(trace, 0.02)
    bound = skewed_online_bound(4, 256, 6, [slots])[slots]
    rates, belady = _rates(trace, slots)
    assert bound < 0.9 * belady, (bound, belady)
    assert bound - 0.015 <= rates[DEFAULT_POLICY] <= bound + 0.01, (rates, bound)
    assert rates[DEFAULT_POLICY] >= 0.84 * belady, (rates, belady)
    assert rates[DEFAULT_POLICY] >= max(rates["lru"], rates["lfu"]) - 0.02


def test_default_ranks_by_frequency_at_high_hit_rates_on_skewed_routing():
    """Misses, not hits, decide the ranking: at a 97% hit rate LFU's lead is 0.5 points of hits but 15% of misses."""
    trace = _trace("skewed", seed=3)
    p = make_policy(DEFAULT_POLICY, _slots(trace, 0.5))
    replay_groups(p, [[(r.layer, e) for e in r.experts] for r in trace.records])
    assert p.mode == "lfu"


@pytest.mark.parametrize("frac", [0.05, 0.25])
def test_default_follows_the_workload_across_phase_changes(frac):
    """Skewed routing, then reuse routing, then skewed again (same 2 x 512 experts, top-10): the default keeps up
    with the better of LRU and LFU through both switches."""
    sk, ru = skewed_trace(900, 2, 512, 10, seed=5), reuse_trace(900, 2, 512, 10, seed=5)
    third = len(sk.records) // 3
    records = sk.records[:third] + ru.records[:third] + sk.records[third:2 * third]
    groups = [[(r.layer, e) for e in r.experts] for r in records]
    n, slots = sum(map(len, groups)), int(frac * 2 * 512)
    rates = {name: replay_groups(make_policy(name, slots), groups) / n for name in ("lru", "lfu", DEFAULT_POLICY)}
    assert rates[DEFAULT_POLICY] >= max(rates["lru"], rates["lfu"]) - 0.02, rates


def test_default_ranks_each_layer_its_own_way():
    """Layers 0-1 route with static skew, layers 2-3 with reuse (as when early and late layers differ): the default
    ranks 0-1 by frequency and 2-3 by recency, and beats both single rankings."""
    sk, ru = skewed_trace(800, 4, 512, 10, seed=5), reuse_trace(800, 4, 512, 10, seed=5)
    records = [(sk if i % 4 < 2 else ru).records[i] for i in range(len(sk.records))]  # token-major: i % 4 = layer
    groups = [[(r.layer, e) for e in r.experts] for r in records]
    n, slots = sum(map(len, groups)), int(0.05 * 4 * 512)
    policies = {name: make_policy(name, slots) for name in ("lru", "lfu", DEFAULT_POLICY)}
    rates = {name: replay_groups(p, groups) / n for name, p in policies.items()}
    assert policies[DEFAULT_POLICY].layer_modes() == {0: "lfu", 1: "lfu", 2: "lru", 3: "lru"}
    assert rates[DEFAULT_POLICY] >= max(rates["lru"], rates["lfu"]) + 0.03, rates


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_default_policy_meets_goals_sweep(seed):
    for kind in ("skewed", "reuse"):
        trace = _trace(kind, seed)
        for frac in (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5):
            rates, belady = _rates(trace, _slots(trace, frac))
            assert rates[DEFAULT_POLICY] >= max(rates["lru"], rates["lfu"]) - 0.02, (kind, frac, rates, belady)
            if (kind, frac) in GOAL_SIZES:
                assert rates[DEFAULT_POLICY] >= 0.85 * belady, (kind, frac, rates, belady)


def test_policy_registry_names_match():
    for name, cls in POLICIES.items():
        assert cls.name == name
    assert DEFAULT_POLICY in POLICIES
    assert list(itertools.islice(POLICIES, 2)) == ["lru", "lfu"]
