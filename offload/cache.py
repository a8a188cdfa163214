"""The device expert cache: a pool of expert-sized slots on one device, filled from the host store on demand.

Slots are one uint8 tensor [n_slots, expert_bytes] charged to the device's budget; a slot holds one expert's
packed buffer, so `weights(key)` is views (dequant-ready codes + scales), never a copy. The pool is global
(one policy over (layer, expert) keys) or per layer (a policy and slot count per layer). Pinned keys (e.g. the
hash layers' experts) get their own slots and are never evicted. Per-layer counters: hits, misses, bytes moved,
copy time, stall time and achieved GB/s, all fed by the transfer engine's measurements.
The cache does not compute; the backend acquires a slot, waits for it, computes, and releases it.
`slot_table` [n_layers, n_experts] int32 lives ON THE DEVICE on GPU-flavored devices: expert -> slot, -1 when absent or still in flight. The
fused GPU kernel reads it directly (no host lookup on the hit path); an entry becomes valid only once its copy has
landed (`commit`, stream-ordered on CUDA), and goes back to -1 the moment the expert is evicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable

import torch

from homerun.errors import UsageError
from offload.base import ExpertWeights
from offload.devices import Device
from offload.host_store import HostExpertStore
from offload.policies import DEFAULT_POLICY, make_policy
from offload.transfer import Transfer, make_transfer_engine

ExpertKey = tuple[int, int]
_GLOBAL = -1  # policy-group id of the global pool


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    promotions: int = 0
    n_copies: int = 0
    bytes_moved: int = 0
    copy_s: float = 0.0
    stall_s: float = 0.0


@dataclass(frozen=True)
class LayerCacheStats:
    layer: int
    hits: int
    misses: int
    prefetches: int
    promotions: int
    n_copies: int
    bytes_moved: int
    copy_s: float
    stall_s: float

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def achieved_gbps(self) -> float:
        return self.bytes_moved / self.copy_s / 1e9 if self.copy_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"layer": self.layer, "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "prefetches": self.prefetches, "promotions": self.promotions, "n_copies": self.n_copies,
                "bytes_moved": self.bytes_moved, "copy_s": self.copy_s, "stall_s": self.stall_s,
                "achieved_gbps": self.achieved_gbps}


@dataclass(frozen=True)
class CacheStats:
    policy: str
    n_slots: int
    n_pinned: int
    expert_bytes: int
    layers: tuple[LayerCacheStats, ...]

    def _sum(self, field: str):
        return sum(getattr(s, field) for s in self.layers)

    @property
    def hit_rate(self) -> float:
        n = self._sum("hits") + self._sum("misses")
        return self._sum("hits") / n if n else 0.0

    @property
    def achieved_gbps(self) -> float:
        s = self._sum("copy_s")
        return self._sum("bytes_moved") / s / 1e9 if s > 0 else 0.0

    def to_dict(self) -> dict:
        tot = {f: self._sum(f) for f in ("hits", "misses", "prefetches", "promotions", "n_copies", "bytes_moved",
                                         "copy_s", "stall_s")}
        return {"policy": self.policy, "n_slots": self.n_slots, "n_pinned": self.n_pinned,
                "expert_bytes": self.expert_bytes, **tot, "hit_rate": self.hit_rate,
                "achieved_gbps": self.achieved_gbps, "layers": [s.to_dict() for s in self.layers]}


class ExpertCache:
    def __init__(
        self,
        store: HostExpertStore,
        device: Device,
        *,
        n_slots: int | None = None,
        slots_per_layer: dict[int, int] | None = None,
        policy: str = DEFAULT_POLICY,
        pinned_keys: Iterable[ExpertKey] = (),
        engine=None,
        max_in_flight: int = 4,
    ) -> None:
        """Give exactly one of `n_slots` (global pool) or `slots_per_layer`. Pinned keys come on top of either."""
        if (n_slots is None) == (slots_per_layer is None):
            raise UsageError("expert cache: give n_slots (global) or slots_per_layer, not both or neither",
                             hint="e.g. ExpertCache(store, device, n_slots=64)")
        self.store, self.device, self.policy_name = store, device, policy
        self.expert_bytes = store.expert_bytes
        self.pinned_keys = tuple(dict.fromkeys(pinned_keys))
        groups = {_GLOBAL: n_slots} if n_slots is not None else dict(slots_per_layer)
        self._policies = {g: make_policy(policy, n) for g, n in groups.items()}
        self.n_slots = sum(groups.values()) + len(self.pinned_keys)
        self._slots = device.empty(("expert_cache", id(self)), (self.n_slots, self.expert_bytes), torch.uint8)
        # On GPU-flavored devices the table is device memory a kernel reads, charged to the device; elsewhere nothing
        # reads it on a device, so it is a host tensor outside the budget (the byte accounting stays slots only).
        keys = store.keys()
        shape = (max(l for l, _ in keys) + 1, max(e for _, e in keys) + 1)
        if device.kernel_flavor == "gpu":
            self.slot_table = device.empty(("expert_cache", id(self), "slot_table"), shape, torch.int32)
        else:
            self.slot_table = torch.empty(shape, dtype=torch.int32)
        self.slot_table.fill_(-1)
        self.engine = engine or make_transfer_engine(device, max_in_flight=max_in_flight)
        self.engine.sink = self
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._slot_of: dict[ExpertKey, int] = {}
        self._pending: dict[ExpertKey, Transfer] = {}
        self._last_use: dict[int, object] = {}
        self._counters: dict[int, _Counters] = {}
        for key in self.pinned_keys:
            self._load(key)
        self.engine.drain()
        self.commit()

    # --- transfer sink -------------------------------------------------------------------------------------
    def on_copy(self, tag: Hashable, nbytes: int, seconds: float) -> None:
        c = self._c(tag[0])
        c.n_copies += 1
        c.bytes_moved += nbytes
        c.copy_s += seconds

    def on_stall(self, tag: Hashable, seconds: float) -> None:
        self._c(tag[0]).stall_s += seconds

    # --- queries -------------------------------------------------------------------------------------------
    def _c(self, layer: int) -> _Counters:
        return self._counters.setdefault(layer, _Counters())

    def _policy(self, layer: int):
        try:
            return self._policies[_GLOBAL] if _GLOBAL in self._policies else self._policies[layer]
        except KeyError:
            raise UsageError(f"expert cache: no slots configured for layer {layer}",
                             hint="slots_per_layer must name every offloaded layer") from None

    def capacity(self, layer: int) -> int:
        """How many evictable slots serve this layer (pinned slots excluded)."""
        return self._policy(layer).capacity

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def is_pinned(self, key: ExpertKey) -> bool:
        return key in self.pinned_keys

    # --- the backend's verbs -------------------------------------------------------------------------------
    def acquire(self, key: ExpertKey, *, in_use: frozenset = frozenset()) -> None:
        """Count a use of `key` and make it resident, starting its copy on a miss. `in_use` keys are not evicted."""
        if key in self._slot_of:
            self._c(key[0]).hits += 1
            if not self.is_pinned(key):
                self._policy(key[0]).hit(key)
            return
        self._c(key[0]).misses += 1
        self._admit(key, in_use, access=True)

    def record_miss(self, key: ExpertKey) -> None:
        """A miss served elsewhere (CPU compute): counted, not loaded (a later `prefetch(promotion=True)` may)."""
        self._c(key[0]).misses += 1

    def prefetch(self, key: ExpertKey, *, in_use: frozenset = frozenset(), promotion: bool = False,
                 block: bool = False) -> bool:
        """Start loading `key` ahead of use if it is absent. Without `block`, only if the link has a free in-flight
        slot (speculation must never delay the token); with it, wait for one (ids known for certain)."""
        if key in self._slot_of:
            return False
        if not block and self.engine.in_flight() >= self.engine.max_in_flight:
            return False
        policy = self._policy(key[0])
        if len(policy) >= policy.capacity and len(in_use) >= policy.capacity:
            return False
        c = self._c(key[0])
        if promotion:
            c.promotions += 1
        else:
            c.prefetches += 1
        self._admit(key, in_use, access=promotion)
        return True

    def weights(self, key: ExpertKey) -> ExpertWeights:
        """Views into the key's slot; makes the consumer wait for a copy still in flight."""
        self._land(key)
        return self.store.layout.views(self._slots[self._slot_of[key]])

    def kernel_views(self):
        """The slots as the fused FP4 kernels read them (ExpertLayout.kernel_views): w13 codes, scales, w2, scales."""
        return self.store.layout.kernel_views(self._slots)

    def slot(self, key: ExpertKey) -> int:
        return self._slot_of[key]

    def commit(self, layer: int | None = None) -> int:
        """Make the copies in flight for `layer` (all layers if None) visible to the device: the consumer waits for
        each (a device-side wait on CUDA) and its slot-table entry is set. Returns how many landed."""
        keys = [k for k in self._pending if layer is None or k[0] == layer]
        for key in keys:
            self._land(key)
        return len(keys)

    def touch(self, key: ExpertKey) -> None:
        """Count a hit on a resident key that the device already served (the fused path's bookkeeping)."""
        self._c(key[0]).hits += 1
        if not self.is_pinned(key):
            self._policy(key[0]).hit(key)

    def _land(self, key: ExpertKey) -> None:
        t = self._pending.pop(key, None)
        if t is not None:
            self.engine.wait(t)
            self.slot_table[key[0], key[1]] = self._slot_of[key]

    def release(self, key: ExpertKey) -> None:
        """The consumer is done reading this slot (CUDA: an event, so a later overwrite waits for it)."""
        ev = self.engine.record_use()
        if ev is not None:
            self._last_use[self._slot_of[key]] = ev

    def stats(self) -> CacheStats:
        self.engine.poll()
        layers = tuple(LayerCacheStats(l, **vars(c)) for l, c in sorted(self._counters.items()))
        return CacheStats(self.policy_name, self.n_slots, len(self.pinned_keys), self.expert_bytes, layers)

    def close(self) -> None:
        self.engine.close()
        self.device.free_all([("expert_cache", id(self)), ("expert_cache", id(self), "slot_table")])

    # --- internals -----------------------------------------------------------------------------------------
    def _admit(self, key: ExpertKey, in_use: frozenset, *, access: bool) -> None:
        victim = self._policy(key[0]).insert(key, exclude=in_use, access=access)
        if victim is not None:
            self._free.append(self._slot_of.pop(victim))
            self._pending.pop(victim, None)
            self.slot_table[victim[0], victim[1]] = -1
        self._load(key)

    def _load(self, key: ExpertKey) -> None:
        slot = self._free.pop()
        self._slot_of[key] = slot
        src = self.store.buffer(key)
        self._pending[key] = self.engine.copy(self._slots[slot], src, tag=key, after=self._last_use.pop(slot, None))
