"""Replay a routing trace through every replacement policy and Belady's MIN, for one global cache of N slots
keyed by (layer, expert). Pure computation over the access sequence: no devices, no timing."""

from __future__ import annotations

from dataclasses import dataclass

from homerun.errors import UsageError
from offload.policies import DEFAULT_POLICY, POLICIES, belady_hits, make_policy, replay_hits
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
    keys = trace.keys()
    if not keys:
        raise UsageError("the trace has no routing records", hint="record a trace with at least one token")
    n = len(keys)
    rates = {name: replay_hits(make_policy(name, cache_slots), keys) / n for name in (policies or tuple(POLICIES))}
    return SimulationResult(cache_slots, n, len(set(keys)), belady_hits(keys, cache_slots) / n, rates, DEFAULT_POLICY)
