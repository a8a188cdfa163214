"""The layer-wise prefill's staging area on a GPU (issue 13 items 5/6): two buffers, separate from the decode cache,
so layer L+1's experts upload while layer L computes and the decode cache's hot set survives a long prompt.

One size rule for the planner (which charges it to VRAM) and the runtime (offload/cached_backend.py, which allocates
it): each buffer holds min(STAGE_MAX_BYTES, one layer's routed experts, a quarter of the device's VRAM budget),
in whole experts. The int32 tables the GPU path keeps next to them (the cache's slot table, one expert table per stage)
are device memory too: `device_table_bytes` is what the runtime allocates, so the plan charges the same. Pure arithmetic.
"""

from __future__ import annotations

# 512 MiB per buffer: at PCIe 5.0's ~56 GB/s one buffer fills in ~10 ms, long enough to hide copy latency and launch
# gaps behind a chunk's grouped GEMM; larger buffers only take VRAM from the decode cache.
STAGE_MAX_BYTES = 512 << 20
STAGE_BUFFERS = 2  # double-buffered: one layer computes while the next one's experts go up


def prefill_stage_experts(bytes_per_expert: int, experts_per_layer: int, budget_bytes: int) -> int:
    """Experts one staging buffer holds: min(STAGE_MAX_BYTES, one layer's experts, budget / 4), in whole experts
    (0 when not even one expert fits in a quarter of the budget: no staged prefill there)."""
    if bytes_per_expert <= 0 or experts_per_layer <= 0 or budget_bytes <= 0:
        return 0
    cap_bytes = min(STAGE_MAX_BYTES, experts_per_layer * bytes_per_expert, budget_bytes // 4)
    if cap_bytes < bytes_per_expert:  # an expert over 512 MiB still gets one slot if the budget's quarter holds it
        return 1 if budget_bytes // 4 >= bytes_per_expert else 0
    return min(cap_bytes // bytes_per_expert, experts_per_layer)


def prefill_staging_bytes(bytes_per_expert: int, experts_per_layer: int, budget_bytes: int) -> int:
    """VRAM both staging buffers take: STAGE_BUFFERS x prefill_stage_experts x bytes_per_expert."""
    return STAGE_BUFFERS * prefill_stage_experts(bytes_per_expert, experts_per_layer, budget_bytes) * bytes_per_expert


TABLE_ENTRY_BYTES = 4  # int32 expert -> slot entries (offload/cache.py slot_table, the stages' expert tables)


def device_table_bytes(table_layers: int, experts_per_layer: int, staged: bool) -> int:
    """Device bytes of the GPU path's lookup tables, as offload/cached_backend.py sizes them: the expert cache's
    slot table [table_layers, experts] int32 (table_layers = the highest offloaded layer + 1) plus, with prefill
    staging, one [experts] int32 table per stage buffer. V4-Flash, 43 layers x 256: 44,032 + 2,048 B."""
    return TABLE_ENTRY_BYTES * experts_per_layer * (max(table_layers, 0) + (STAGE_BUFFERS if staged else 0))
