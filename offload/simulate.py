"""Replay a routing trace through every replacement policy and Belady's MIN, for one global cache of N slots
keyed by (layer, expert). Pure computation over the access sequence: no devices, no timing.

Each record (one token at one layer) is served as the runtime serves it (offload/cached_backend.py): its resident
experts are hits, looked up before any of its misses is loaded (`replay_groups`), and Belady's MIN is taken over
the same grouped sequence (`belady_group_hits`: MIN's rule for groups, a reference near the optimum, not a proven bound)."""

from __future__ import annotations

from dataclasses import dataclass

from homerun.errors import UsageError
from offload.policies import DEFAULT_POLICY, POLICIES, belady_group_hits, make_policy, replay_groups
from offload.trace import RoutingTrace


@dataclass(frozen=True)
class SimulationResult:
    cache_slots: int
    n_accesses: int
    n_distinct: int
    belady: float
    policies: dict[str, float]
    default_policy: str

    def to_dict(self) -> dict:
        return {"belady": self.belady, "policies": dict(self.policies), "default_policy": self.default_policy,
                "cache_slots": self.cache_slots, "n_accesses": self.n_accesses, "n_distinct": self.n_distinct}


def simulate(trace: RoutingTrace, cache_slots: int, policies: tuple[str, ...] | None = None) -> SimulationResult:
    """Hit rate of each policy and of Belady's MIN (the optimum for this cache size) on the trace."""
    if cache_slots < 1:
        raise UsageError(f"--cache-slots must be at least 1, got {cache_slots}", hint="e.g. --cache-slots 128")
    groups = [[(r.layer, e) for e in r.experts] for r in trace.records]
    n = sum(len(g) for g in groups)
    if not n:
        raise UsageError("the trace has no routing records", hint="record a trace with at least one token")
    rates = {name: replay_groups(make_policy(name, cache_slots), groups) / n
             for name in (policies or tuple(POLICIES))}
    n_distinct = len({k for g in groups for k in g})
    return SimulationResult(cache_slots, n, n_distinct, belady_group_hits(groups, cache_slots) / n, rates,
                            DEFAULT_POLICY)
