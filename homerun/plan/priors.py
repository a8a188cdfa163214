"""Physical priors of the planner's speed model: the expert-cache hit rate from the model's routing shape, the page
cache of a disk-backed expert tier under memory pressure, and the per-layer CPU<->GPU handoff of a hybrid layer.

Each function is pure arithmetic on stated constants; each constant says where it comes from.
"""

from __future__ import annotations

from collections.abc import Callable

from homerun.formats.v4_layout import hash_layers
from homerun.plan.records import REUSE_PROB, STACK_ALPHA, STACK_OFFSET_TOKENS
from homerun.plan.specs import ModelSpec

# ---- expert-cache hit rate -----------------------------------------------------------------------------------------


def _stack_cdf(slots: float, n_experts: int, top_k: int) -> float:
    """P(LRU stack depth < slots) under P(d) ~ (d + d0)^-alpha, d in [0, n), d0 = STACK_OFFSET_TOKENS * top_k:
    the share of a layer's recency-driven picks that a per-layer LRU cache of `slots` experts holds."""
    if slots <= 0:
        return 0.0
    if slots >= n_experts:
        return 1.0
    d0 = STACK_OFFSET_TOKENS * top_k
    w = [(d + d0) ** -STACK_ALPHA for d in range(n_experts)]
    whole = int(slots)
    part = sum(w[:whole]) + (slots - whole) * w[whole]
    return part / sum(w)


def hit_rate_prior(spec: ModelSpec, cache_experts: int,
                   admit: Callable[[float], float] | None = None) -> tuple[float, str]:
    """Expected expert-cache hit rate of a GPU cache of `cache_experts` experts spread evenly over the MoE layers, and
    where the number comes from (for `hit_rate_source`).

    Routed layers: REUSE_PROB of picks follow the LRU stack-distance law of offload/trace.py's `reuse_trace` (a cache of
    S slots per layer holds the picks at depth < S); the rest are fresh draws, which hit in proportion to the cache
    fraction (no static skew assumed: llama.cpp #27861 found a learned top-32 of 512 covers ~10 %, near uniform).
    Hash-routed layers (DeepSeek V4's first `num_hash_layers`) pick by token id: no recency to exploit, hit = fraction.
    The law's offset scales with top_k, so a coarse MoE (Mixtral, top-2 of 8) gets far less from a small cache than
    a fine-grained one: at 15 % it gives ~0.3 where (fraction)^0.5 gave 0.39.

    `admit(h)`: the fraction of misses the cache can take in at hit rate h (None: all of them, as the law assumes).
    A miss enters the GPU cache only by crossing the host link (streamed, or promoted after the CPU computed it), so
    where the link cannot carry every miss, only the hits and the admitted misses stay cached: each recency-stack
    entry of a routed layer is cached with probability q = r + (1 - r) x admit(h), r the routed layers' own hit rate
    and h the rate over all MoE layers (the hashed ones' at the fraction), the cache's S entries reach S/q deep, and a
    reuse at depth d hits with probability q while d < S/q. Solved for the r that reproduces itself (admit = 1: the
    law as calibrated; admit = 0: nothing ever enters, a static cache hit at its fraction)."""
    layers = spec.moe_layers
    n, k = spec.n_routed_experts, spec.experts_per_tok
    total = layers * n
    if total <= 0 or cache_experts <= 0:
        return 0.0, "no expert cache"
    frac = min(1.0, cache_experts / total)
    slots = frac * n
    hashed = min(hash_layers(spec.config), layers) if spec.arch == "deepseek_v4" else 0  # the runtime's count

    def routed_at(q: float) -> float:  # a routed layer's hit rate when each stack entry is cached with probability q
        return REUSE_PROB * q * _stack_cdf(slots / q, n, k) + (1 - REUSE_PROB) * frac

    def mixed(r: float) -> float:  # all MoE layers: the routed layers at r, the hash-routed ones at the fraction
        return min(1.0, (hashed * frac + (layers - hashed) * r) / layers)

    full = mixed(routed_at(1.0))
    src = (f"prior from the routing model (offload/trace.py reuse_trace; llama.cpp #27861): cache {cache_experts}/"
           f"{total} experts = {slots:.1f} of {n} per layer, top-{k}: {REUSE_PROB:.0%} of picks reuse a recent expert "
           f"(LRU stack depth law (d + {STACK_OFFSET_TOKENS:g}*{k})^-{STACK_ALPHA:g}), the rest hit at the cache "
           "fraction" + (f"; {hashed} hash-routed layers hit at the cache fraction" if hashed else ""))
    if admit is None or full >= 1.0 or hashed == layers or admit(full) >= 1.0:
        return full, src
    # q follows the routed layers' own hit rate r (only their recency stacks keep what was admitted); the link's
    # admitted share a follows the whole token's misses, hashed layers' included.
    lo, hi = 0.0, routed_at(1.0)  # g(r) = routed_at(q(r)) - r is >= 0 at 0 and <= 0 at the full rate: bisect
    for _ in range(ADMIT_BISECT_STEPS):
        r = (lo + hi) / 2
        a = min(1.0, max(0.0, admit(mixed(r))))
        if routed_at(max(r + (1 - r) * a, 1e-9)) > r:
            lo = r
        else:
            hi = r
    h = mixed((lo + hi) / 2)
    a = min(1.0, max(0.0, admit(h)))
    return h, (src + f"; the host link admits only {a:.0%} of the misses into the cache (streamed or promoted), so "
               f"{h:.0%} where every miss admitted would give {full:.0%}")


ADMIT_BISECT_STEPS = 40  # bisection on [0, 1]: 2^-40 resolution, far below any figure the plan prints


# ---- page cache of an mmap'd expert tier ---------------------------------------------------------------------------


def page_cache_resident_fraction(page_cache_bytes: float, tier_bytes: float) -> float:
    """Fraction of a memory-mapped expert tier's reads the page cache serves from RAM under memory pressure.

    Nothing of the tier is pinned: the page cache is the only RAM copy, and it keeps whichever pages were used most
    recently. A routed expert is re-used after ~n/k tokens on average, and in between the layer-by-layer scan streams
    about the whole tier through the cache, so with (near) uniform popularity LRU keeps a random slice: the chance
    a read finds its page resident is cache / tier (Che's approximation for LRU with uniform popularity). Every other
    read faults the page in from disk: disk bytes per token = (1 - resident) x the tier's reads per token. A tier that
    fits (cache >= tier) is fully resident."""
    if tier_bytes <= 0 or page_cache_bytes >= tier_bytes:
        return 1.0
    return max(0.0, page_cache_bytes) / tier_bytes


def numa_estimate_gbps(mem_bw_gbps: float, numa_nodes: int) -> float:
    """DRAM bandwidth the CPU expert kernels sustain on a multi-socket host without NUMA-aware expert placement.

    The profile's mem_bw_gbps is the whole machine's. One process whose experts are spread over N nodes reads
    (N-1)/N of its bytes across the socket link (UPI / xGMI), which carries well under one socket's DRAM bandwidth;
    so its threads see about one node's share: mem_bw / N. Published: KTransformers' NUMA-aware TP gains up to +63 %
    decode over a NUMA-unaware run (peers.md §1.1), i.e. unaware ~0.6 of aware; 1/N = 0.5 on two sockets is on the
    conservative side of it. The bound keeps the full figure, which a NUMA-aware runtime can reach."""
    return mem_bw_gbps / max(1, numa_nodes)


# ---- tensor-parallel communication ----------------------------------------------------------------------------------

ALLREDUCE_LATENCY_S = 15e-6  # one small (few-KB) NCCL ring all-reduce inside a node is latency-bound at ~10-20 us
#   (nccl-tests all_reduce_perf, small-message rows); assumption: mid-range figure


def tp_comm_seconds(n_gpus: int, n_layers: int, hidden_size: int, link_gbps: float) -> float:
    """Per-token all-reduce time of a tensor-parallel decode: two all-reduces per layer (after attention, after the
    MLP / MoE) of the BF16 hidden state, each its latency plus a ring's 2(n-1)/n of the bytes over the GPU link."""
    if n_gpus <= 1:
        return 0.0
    msg = hidden_size * 2
    per = ALLREDUCE_LATENCY_S + 2 * (n_gpus - 1) / n_gpus * msg / (max(link_gbps, 1e-9) * 1e9)
    return 2 * n_layers * per


# ---- per-layer handoff of a hybrid layer ---------------------------------------------------------------------------

# A hybrid MoE layer hands off twice: the GPU's router output goes to the CPU expert pool, and the CPU's expert output
# comes back before the next layer can start. Per layer that costs:
KERNEL_ROUND_TRIP_S = 20e-6  # launch-to-start of a kernel on an idle GPU, ~20 us (NVIDIA Nsight Systems guide, PyTorch
#   element-wise kernel on V100): paid once for the wait on the router output and once to restart the GPU afterwards
SMALL_COPY_S = 6e-6  # one small cudaMemcpyAsync, 5-7 us per call (DualPath, arXiv 2602.21548 §5.2): activations and
#   expert ids down, expert output up
POOL_WAKE_S = 10e-6  # waking the CPU expert thread pool and joining it (futex wake + barrier): assumption, order of a
#   Linux context switch (a few us) for the wake plus the slowest thread's join


def handoff_seconds_per_layer(hidden_size: int, pcie_gbps: float) -> float:
    """One hybrid layer's CPU<->GPU handoff: two kernel round trips (wait for the router, restart the GPU), two small
    copies with the activation bytes (BF16 hidden state, down and up) at PCIe speed, and the CPU pool's wake/join."""
    act = 2 * hidden_size * 2  # BF16 hidden state down, expert output up
    xfer = act / (pcie_gbps * 1e9) if pcie_gbps > 0 else 0.0
    return 2 * KERNEL_ROUND_TRIP_S + 2 * SMALL_COPY_S + POOL_WAKE_S + xfer
