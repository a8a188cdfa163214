"""Cache replacement policies over hashable keys (ExpertKey = (layer, expert)), plus Belady's MIN for offline replay.

Every policy tracks which keys are resident in a fixed number of slots and, when full, names the victim; it never
owns memory. `exclude` lets the cache protect keys in use by the current layer. Policies:
- lru: least recently used.
- lfu: least frequently used, counts kept for the whole history (perfect LFU), LRU tie-break.
- arc: Megiddo & Modha's Adaptive Replacement Cache (recency list T1 / frequency list T2 with ghost lists).
- adaptive: keeps shadow LRU and LFU caches of the same size, scores their recent hits with exponential decay,
  and evicts by the ranking (recency or frequency) of whichever shadow is winning. It tracks LFU on static-skew
  routing ("10% of experts take 80% of hits") and LRU on reuse-heavy routing ("LRU-128 hits 81%").
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, defaultdict
from typing import Hashable, Iterable, Sequence

from homerun.errors import UsageError

NO_EXCLUDE: frozenset = frozenset()


class ReplacementPolicy:
    name = "abstract"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"replacement policy needs at least 1 slot, got {capacity}",
                             hint="raise --expert-cache-slots or pin fewer experts")
        self.capacity = int(capacity)

    def __contains__(self, key: Hashable) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def hit(self, key: Hashable) -> None:
        """Record an access to a resident key."""
        raise NotImplementedError

    def insert(self, key: Hashable, *, exclude: frozenset = NO_EXCLUDE, access: bool = True) -> Hashable | None:
        """Make a missing key resident; return the evicted key (None if a slot was free). `access=False` marks a
        prefetch: resident, but not counted as a use."""
        raise NotImplementedError

    def remove(self, key: Hashable) -> None:
        raise NotImplementedError

    def access(self, key: Hashable, exclude: frozenset = NO_EXCLUDE) -> tuple[bool, Hashable | None]:
        if key in self:
            self.hit(key)
            return True, None
        return False, self.insert(key, exclude=exclude)


def _no_victim(name: str) -> UsageError:
    return UsageError(f"{name}: every resident key is in use; nothing can be evicted",
                      hint="the cache needs more slots than experts used at once")


class LRUPolicy(ReplacementPolicy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict = OrderedDict()

    def __contains__(self, key):
        return key in self._order

    def __len__(self):
        return len(self._order)

    def hit(self, key):
        self._order.move_to_end(key)

    def victim(self, exclude: frozenset = NO_EXCLUDE) -> Hashable:
        for k in self._order:
            if k not in exclude:
                return k
        raise _no_victim(self.name)

    def insert(self, key, *, exclude=NO_EXCLUDE, access=True):
        victim = None
        if len(self._order) >= self.capacity:
            victim = self.victim(exclude)
            del self._order[victim]
        self._order[key] = None
        return victim

    def remove(self, key):
        self._order.pop(key, None)


class LFUPolicy(ReplacementPolicy):
    """Perfect LFU: a key's count survives its eviction, so a popular expert comes back with its history."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.counts: dict[Hashable, int] = defaultdict(int)
        self._resident: dict[Hashable, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._tick = 0

    def __contains__(self, key):
        return key in self._resident

    def __len__(self):
        return len(self._resident)

    def refresh(self, key) -> None:
        """Re-rank a resident key after its count changed elsewhere (shared counts)."""
        self._tick += 1
        rank = (self.counts[key], self._tick)
        self._resident[key] = rank
        heapq.heappush(self._heap, (*rank, key))
        if len(self._heap) > 4 * len(self._resident) + 64:  # drop stale entries now and then
            self._heap = [(*r, k) for k, r in self._resident.items()]
            heapq.heapify(self._heap)

    def hit(self, key):
        self.counts[key] += 1
        self.refresh(key)

    def victim(self, exclude: frozenset = NO_EXCLUDE) -> Hashable:
        held = []
        try:
            while self._heap:
                count, tick, k = entry = heapq.heappop(self._heap)
                if self._resident.get(k) != (count, tick):
                    continue  # stale
                held.append(entry)
                if k not in exclude:
                    return k
            raise _no_victim(self.name)
        finally:
            for e in held:
                heapq.heappush(self._heap, e)

    def insert(self, key, *, exclude=NO_EXCLUDE, access=True):
        victim = None
        if len(self._resident) >= self.capacity:
            victim = self.victim(exclude)
            del self._resident[victim]
        if access:
            self.counts[key] += 1
        self.refresh(key)
        return victim

    def remove(self, key):
        self._resident.pop(key, None)


class ARCPolicy(ReplacementPolicy):
    """Adaptive Replacement Cache (FAST'03): T1 seen once, T2 seen twice+, ghosts B1/B2 steer the target p."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.t1: OrderedDict = OrderedDict()
        self.t2: OrderedDict = OrderedDict()
        self.b1: OrderedDict = OrderedDict()
        self.b2: OrderedDict = OrderedDict()
        self.p = 0.0

    def __contains__(self, key):
        return key in self.t1 or key in self.t2

    def __len__(self):
        return len(self.t1) + len(self.t2)

    def hit(self, key):
        self.t1.pop(key, None)
        self.t2[key] = None
        self.t2.move_to_end(key)

    def _evict(self, key, exclude) -> Hashable:
        prefer_t1 = self.t1 and (len(self.t1) > self.p or (key in self.b2 and len(self.t1) == self.p))
        lists = [(self.t1, self.b1), (self.t2, self.b2)]
        for live, ghost in (lists if prefer_t1 else lists[::-1]):
            for k in live:
                if k not in exclude:
                    del live[k]
                    ghost[k] = None
                    return k
        raise _no_victim(self.name)

    def insert(self, key, *, exclude=NO_EXCLUDE, access=True):
        c, victim = self.capacity, None
        full = len(self) >= c
        if key in self.b1:
            self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1))
            del self.b1[key]
            victim = self._evict(key, exclude) if full else None
            self.t2[key] = None
            return victim
        if key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
            del self.b2[key]
            victim = self._evict(key, exclude) if full else None
            self.t2[key] = None
            return victim
        if len(self.t1) + len(self.b1) >= c:  # case IV(a)
            if len(self.t1) < c:
                self.b1.popitem(last=False)
                victim = self._evict(key, exclude) if full else None
            else:  # T1 alone fills the cache: drop its LRU without a ghost
                victim = next((k for k in self.t1 if k not in exclude), None)
                if victim is None:
                    victim = self._evict(key, exclude)
                else:
                    del self.t1[victim]
        else:  # case IV(b)
            if len(self) + len(self.b1) + len(self.b2) >= 2 * c and self.b2:
                self.b2.popitem(last=False)
            victim = self._evict(key, exclude) if full else None
        self.t1[key] = None
        return victim

    def remove(self, key):
        self.t1.pop(key, None)
        self.t2.pop(key, None)


class AdaptivePolicy(ReplacementPolicy):
    """Recency+frequency by online selection: evict like whichever of LRU/LFU a same-size shadow cache shows is
    hitting more lately (decayed hit scores, with hysteresis so one lucky stretch does not flip it)."""

    name = "adaptive"
    HYSTERESIS = 0.02  # the other ranking must lead by 2% of the decayed score before we switch

    def __init__(self, capacity: int, *, half_life_accesses: int | None = None) -> None:
        super().__init__(capacity)
        self._lru, self._lfu = LRUPolicy(capacity), LFUPolicy(capacity)  # rankings of the resident set
        self._shadow = {"lru": LRUPolicy(capacity), "lfu": LFUPolicy(capacity)}
        # The LFU ranking reads the shadow's history counts, so frequency survives eviction and is counted once.
        self._lfu.counts = self._shadow["lfu"].counts
        self._score = {"lru": 0.0, "lfu": 0.0}
        half_life = half_life_accesses or max(512, 8 * capacity)
        self._decay = 0.5 ** (1.0 / half_life)
        self.mode = "lru"

    def __contains__(self, key):
        return key in self._lru

    def __len__(self):
        return len(self._lru)

    def _observe(self, key) -> None:
        for name, shadow in self._shadow.items():
            hit, _ = shadow.access(key)
            self._score[name] = self._score[name] * self._decay + hit
        other = "lfu" if self.mode == "lru" else "lru"
        if self._score[other] > self._score[self.mode] * (1 + self.HYSTERESIS):
            self.mode = other

    def hit(self, key):
        self._observe(key)
        self._lru.hit(key)
        self._lfu.refresh(key)

    def insert(self, key, *, exclude=NO_EXCLUDE, access=True):
        if access:
            self._observe(key)
        victim = None
        if len(self._lru) >= self.capacity:
            victim = (self._lru if self.mode == "lru" else self._lfu).victim(exclude)
            self._lru.remove(victim)
            self._lfu.remove(victim)
        self._lru.insert(key)
        self._lfu.insert(key, access=False)
        return victim

    def remove(self, key):
        self._lru.remove(key)
        self._lfu.remove(key)


POLICIES: dict[str, type[ReplacementPolicy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "adaptive": AdaptivePolicy,
}
DEFAULT_POLICY = "adaptive"


def make_policy(name: str, capacity: int) -> ReplacementPolicy:
    try:
        return POLICIES[name](capacity)
    except KeyError:
        raise UsageError(f"unknown cache policy {name!r}", hint=f"choose one of {', '.join(POLICIES)}") from None


def replay_hits(policy: ReplacementPolicy, keys: Iterable[Hashable]) -> int:
    return sum(policy.access(k)[0] for k in keys)


def belady_hits(keys: Sequence[Hashable], capacity: int) -> int:
    """Belady's MIN with demand admission: on a miss the key is loaded and the resident key reused farthest in the
    future is evicted. The most hits any always-admitting cache of `capacity` slots can get on this sequence."""
    n = len(keys)
    next_use = [math.inf] * n
    last: dict[Hashable, float] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(keys[i], math.inf)
        last[keys[i]] = i
    resident: dict[Hashable, float] = {}
    heap: list[tuple[float, int, Hashable]] = []
    hits = 0
    for i, k in enumerate(keys):
        if k in resident:
            hits += 1
        elif len(resident) >= capacity:
            while True:
                neg, _, v = heapq.heappop(heap)
                if resident.get(v) == -neg:
                    del resident[v]
                    break
        resident[k] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, k))
    return hits
